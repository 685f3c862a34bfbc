//! End-to-end tests of the `blockfleet` binary: real processes, a real local store, and a real
//! Garage S3 server on 127.0.0.1.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use blockfleet_testkit::Garage;
use serde_json::Value;

const CHUNK: usize = 512 * 1024;

/// A scratch directory the binary runs in, so `./blockfleet-data` lands there.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_blockfleet"))
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("BLOCKFLEET_CONFIG")
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }

    /// Runs and expects success; returns stdout parsed as JSON (`--output json` is added).
    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let out = self.run(&a);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Runs and expects failure with one line on stderr containing every `want`.
    fn fails(&self, args: &[&str], want: &[&str]) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        assert!(
            !out.status.success(),
            "{args:?} succeeded; stdout {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
        for w in want {
            assert!(err.contains(w), "{args:?}: {err:?} lacks {w:?}");
        }
        err
    }

    fn manifests(&self) -> Vec<String> {
        let dir = self.path("blockfleet-data/objects/snapshots");
        match fs::read_dir(dir) {
            Ok(d) => d
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect(),
            Err(_) => vec![],
        }
    }
}

/// An image with random, repeated and zero chunks, `extra` bytes past a whole number of chunks.
fn make_image(path: &Path, chunks: usize, extra: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut data = vec![0u8; chunks * CHUNK + extra];
    for (i, chunk) in data.chunks_mut(CHUNK).enumerate() {
        if i % 4 == 2 {
            continue; // zero chunk
        }
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = b.len();
            b.copy_from_slice(&x.to_le_bytes()[..n]);
        }
    }
    // Chunk 5 repeats chunk 1: stored once.
    if chunks > 5 {
        let (a, b) = data.split_at_mut(5 * CHUNK);
        b[..CHUNK].copy_from_slice(&a[CHUNK..2 * CHUNK]);
    }
    fs::write(path, &data).unwrap();
    data
}

#[test]
fn import_export_round_trip_with_dedup_zeros_and_parent() {
    let env = Env::new();
    let image = env.path("disk.raw");
    // 9 chunks and 2 sectors: the last chunk is partial.
    let mut data = make_image(&image, 9, 8192, 42);
    let r = env.json(&["snapshot", "import", "disk.raw", "--description", "first"]);
    let id = r["snapshot_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("snap-") && id.len() == 22, "{id}");
    assert_eq!(r["volume_size"], data.len() as u64);
    assert_eq!(r["chunks"], 10);
    // Chunks 2 and 6 are zero; chunk 5 repeats chunk 1.
    assert_eq!(r["zero_chunks"], 2);
    assert_eq!(r["uploaded_chunks"], 7);
    assert_eq!(r["deduplicated_chunks"], 1);

    let out = env.run(&["snapshot", "export", &id, "out.raw"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        fs::read(env.path("out.raw")).unwrap() == data,
        "export differs from the image"
    );

    // Text mode prints the id alone on stdout, for scripts.
    let out = env.run(&["snapshot", "import", "disk.raw"]);
    assert!(out.status.success());
    let second = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(second.starts_with("snap-") && second != id);

    // Same image again: everything deduplicated, nothing uploaded.
    let again = env.json(&["snapshot", "import", "disk.raw"]);
    assert_eq!(again["uploaded_chunks"], 0);

    // Change one chunk: an incremental import on the parent uploads exactly that one.
    data[3 * CHUNK + 17] ^= 0xff;
    fs::write(&image, &data).unwrap();
    let inc = env.json(&["snapshot", "import", "disk.raw", "--parent", &id]);
    assert_eq!(inc["uploaded_chunks"], 1);
    let inc_id = inc["snapshot_id"].as_str().unwrap();
    let out = env.run(&["snapshot", "export", inc_id, "inc.raw"]);
    assert!(out.status.success());
    assert!(fs::read(env.path("inc.raw")).unwrap() == data);

    // ls and show describe what is there.
    let ls = env.json(&["snapshot", "ls"]);
    assert_eq!(ls.as_array().unwrap().len(), 4);
    let show = env.json(&["snapshot", "show", inc_id]);
    assert_eq!(show["parent"], id.as_str());
    assert_eq!(show["stored_chunks"], 8);
    assert_eq!(show["volume_size"], data.len() as u64);
    let out = env.run(&["snapshot", "show", &id]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("first") && text.contains(&id), "{text}");
    // People read binary units (JSON above keeps bytes): 9 chunks and 8 KiB.
    assert!(text.contains("volume size  4.51 MiB"), "{text}");
}

#[test]
fn bad_images_are_refused_and_leave_no_snapshot() {
    let env = Env::new();
    env.fails(
        &["snapshot", "import", "missing.raw"],
        &["missing.raw", "No such file"],
    );
    fs::write(env.path("odd.raw"), vec![1u8; 4096 * 3 + 512]).unwrap();
    env.fails(
        &["snapshot", "import", "odd.raw"],
        &["odd.raw", "not a multiple of 4096"],
    );
    fs::write(env.path("empty.raw"), b"").unwrap();
    env.fails(
        &["snapshot", "import", "empty.raw"],
        &["empty.raw", "greater than zero"],
    );
    fs::create_dir(env.path("adir")).unwrap();
    env.fails(
        &["snapshot", "import", "adir"],
        &["adir", "not a regular file"],
    );
    env.fails(
        &["snapshot", "import", "x.raw", "--parent", "snap-nope"],
        &["invalid snapshot id"],
    );
    make_image(&env.path("ok.raw"), 2, 0, 1);
    env.fails(
        &[
            "snapshot",
            "import",
            "ok.raw",
            "--parent",
            "snap-0123456789abcdef0",
        ],
        &["snap-0123456789abcdef0", "does not exist"],
    );
    assert!(env.manifests().is_empty());

    // A store that fails mid-import (chunk writes fail): no manifest is written.
    fs::create_dir_all(env.path("blockfleet-data/objects")).unwrap();
    fs::write(env.path("blockfleet-data/objects/chunks"), b"in the way").unwrap();
    env.fails(&["snapshot", "import", "ok.raw"], &["chunks/"]);
    assert!(env.manifests().is_empty());
}

#[test]
fn unknown_or_malformed_snapshot_ids() {
    let env = Env::new();
    env.fails(
        &["snapshot", "show", "snap-0123456789abcdef0"],
        &["snap-0123456789abcdef0", "does not exist"],
    );
    env.fails(
        &["snapshot", "export", "snap-0123456789abcdef0", "o.raw"],
        &["does not exist"],
    );
    env.fails(
        &["snapshot", "export", "vol-0123456789abcdef0", "o.raw"],
        &["invalid snapshot id"],
    );
    env.fails(&["snapshot", "show", "../../etc"], &["invalid snapshot id"]);
    assert!(!env.path("o.raw").exists());
}

#[test]
fn corrupt_chunks_and_manifests_are_errors_never_data() {
    let env = Env::new();
    make_image(&env.path("d.raw"), 4, 0, 7);
    let id = env.json(&["snapshot", "import", "d.raw"])["snapshot_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Flip one byte of one stored chunk.
    let chunks = env.path("blockfleet-data/objects/chunks");
    let victim = fs::read_dir(&chunks)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let original = fs::read(&victim).unwrap();
    let mut bad = original.clone();
    bad[1000] ^= 1;
    fs::write(&victim, &bad).unwrap();
    let name = victim.file_name().unwrap().to_str().unwrap().to_owned();
    env.fails(
        &["snapshot", "export", &id, "o.raw"],
        &["corrupt", &name, &id],
    );
    assert!(
        !env.path("o.raw").exists(),
        "a failed export leaves no file"
    );
    let leftovers: Vec<_> = fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "no temp file left: {leftovers:?}");
    fs::write(&victim, &original).unwrap();

    // Tamper with, truncate, and replace the manifest.
    let manifest = env.path(&format!("blockfleet-data/objects/snapshots/{id}/manifest"));
    let good = fs::read(&manifest).unwrap();
    let mut tampered = good.clone();
    let n = tampered.len();
    tampered[n - 40] ^= 0x80;
    fs::write(&manifest, &tampered).unwrap();
    env.fails(
        &["snapshot", "export", &id, "o.raw"],
        &["fails authentication", &id],
    );
    fs::write(&manifest, &good[..good.len() / 2]).unwrap();
    env.fails(&["snapshot", "show", &id], &[&id]);
    fs::write(&manifest, b"garbage").unwrap();
    env.fails(&["snapshot", "show", &id], &["corrupt", "truncated"]);
    // ls still lists the others and flags this one.
    let ls = env.json(&["snapshot", "ls"]);
    assert!(ls[0]["error"].as_str().unwrap().contains("corrupt"), "{ls}");

    // A lost or foreign manifest key: every manifest fails authentication.
    fs::write(&manifest, &good).unwrap();
    fs::remove_file(env.path("blockfleet-data/manifest.key")).unwrap();
    env.fails(&["snapshot", "show", &id], &["fails authentication"]);
}

#[test]
fn export_does_not_clobber_without_force() {
    let env = Env::new();
    let data = make_image(&env.path("d.raw"), 2, 4096, 9);
    let id = env.json(&["snapshot", "import", "d.raw"])["snapshot_id"]
        .as_str()
        .unwrap()
        .to_owned();
    fs::write(env.path("o.raw"), b"precious").unwrap();
    env.fails(
        &["snapshot", "export", &id, "o.raw"],
        &["already exists", "--force"],
    );
    assert_eq!(fs::read(env.path("o.raw")).unwrap(), b"precious");
    let out = env.run(&["snapshot", "export", &id, "o.raw", "--force"]);
    assert!(out.status.success());
    assert!(fs::read(env.path("o.raw")).unwrap() == data);
}

#[test]
fn bad_configs_are_refused() {
    let env = Env::new();
    env.fails(&["--config", "nope.toml", "snapshot", "ls"], &["nope.toml"]);
    fs::write(
        env.path("bad.toml"),
        "[store]\nkind = \"local\"\npath = \"x\"\ncolour = \"red\"\n",
    )
    .unwrap();
    env.fails(
        &["--config", "bad.toml", "snapshot", "ls"],
        &["bad.toml", "unknown field", "colour"],
    );
    fs::write(env.path("bad2.toml"), "[snapshot]\nconcurrency = 100000\n").unwrap();
    env.fails(
        &["--config", "bad2.toml", "snapshot", "ls"],
        &["snapshot.concurrency"],
    );
    // A key file others can read is refused.
    fs::write(
        env.path("key.toml"),
        "[snapshot]\nmanifest_key_file = \"k\"\n",
    )
    .unwrap();
    fs::write(env.path("k"), "00".repeat(32)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(env.path("k"), fs::Permissions::from_mode(0o644)).unwrap();
    env.fails(&["--config", "key.toml", "snapshot", "ls"], &["chmod 600"]);
    assert!(!env.path("blockfleet-data/objects/snapshots").exists());
}

fn s3_config(env: &Env, g: &Garage, bucket: &str, endpoint: &str) -> String {
    let p = env.path("s3.toml");
    fs::write(
        &p,
        format!(
            "[store]\nkind = \"s3\"\nendpoint = \"{endpoint}\"\nregion = \"{}\"\nbucket = \"{bucket}\"\nprefix = \"t\"\npath_style = true\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nmax_attempts = 2\nconnect_timeout_ms = 500\n",
            g.region, g.access_key, g.secret_key
        ),
    )
    .unwrap();
    p.to_str().unwrap().to_owned()
}

#[test]
fn s3_round_trip_and_errors_against_garage() {
    let g = Garage::start();
    let env = Env::new();
    let data = make_image(&env.path("d.raw"), 7, 4096, 3);
    let cfg = s3_config(&env, &g, &g.bucket, &g.endpoint);
    let r = env.json(&["--config", &cfg, "snapshot", "import", "d.raw"]);
    let id = r["snapshot_id"].as_str().unwrap().to_owned();
    assert_eq!(r["uploaded_chunks"], 5);
    let out = env.run(&["--config", &cfg, "snapshot", "export", &id, "o.raw"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(fs::read(env.path("o.raw")).unwrap() == data);
    let ls = env.json(&["--config", &cfg, "snapshot", "ls"]);
    assert_eq!(ls[0]["snapshot_id"], id.as_str());
    assert!(
        !env.path("blockfleet-data/objects").exists(),
        "nothing went to the local store"
    );

    let cfg = s3_config(&env, &g, "missing-bucket", &g.endpoint);
    env.fails(
        &["--config", &cfg, "snapshot", "import", "d.raw"],
        &["missing-bucket", "does not exist"],
    );
    let dead = format!("http://127.0.0.1:{}", blockfleet_testkit::free_port());
    let cfg = s3_config(&env, &g, &g.bucket, &dead);
    env.fails(
        &["--config", &cfg, "snapshot", "ls"],
        &["cannot reach the endpoint"],
    );
}

#[test]
fn s3_by_flags_with_credentials_from_the_environment() {
    let g = Garage::start();
    let env = Env::new();
    let data = make_image(&env.path("d.raw"), 3, 0, 5);
    let flags = [
        "--s3-bucket",
        g.bucket.as_str(),
        "--s3-endpoint",
        g.endpoint.as_str(),
        "--s3-region",
        g.region.as_str(),
        "--s3-prefix",
        "by-flags",
    ];
    let run = |extra: &[&str]| {
        let mut args = flags.to_vec();
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_blockfleet"))
            .args(&args)
            .current_dir(env.dir.path())
            .env("AWS_ACCESS_KEY_ID", &g.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &g.secret_key)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap()
    };
    let out = run(&["--output", "json", "snapshot", "import", "d.raw"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["snapshot_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = run(&["snapshot", "export", &id, "o.raw"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(fs::read(env.path("o.raw")).unwrap() == data);
}

/// Kill -9 the importer at different points: the store never holds a torn object (every chunk
/// file hashes to its name), no manifest appears for an unfinished import, and the store stays
/// usable.
#[test]
fn killed_import_leaves_no_torn_object_and_no_manifest() {
    use sha2::{Digest, Sha256};
    let env = Env::new();
    let data = make_image(&env.path("big.raw"), 192, 0, 11);
    let mut killed_mid_import = 0;
    for delay_ms in [20u64, 60, 120, 200, 300] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_blockfleet"))
            .args(["snapshot", "import", "big.raw"])
            .current_dir(env.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let chunks = env.path("blockfleet-data/objects/chunks");
        for entry in fs::read_dir(&chunks).into_iter().flatten() {
            let p = entry.unwrap().path();
            let bytes = fs::read(&p).unwrap();
            assert_eq!(bytes.len(), CHUNK, "{p:?} torn");
            assert_eq!(
                hex::encode(Sha256::digest(&bytes)),
                p.file_name().unwrap().to_str().unwrap()
            );
        }
        if !status.success() {
            assert!(
                env.manifests().is_empty(),
                "killed after {delay_ms} ms yet a manifest exists"
            );
            killed_mid_import += 1;
        } else {
            // It finished before the kill: start over so later rounds test a kill again.
            fs::remove_dir_all(env.path("blockfleet-data/objects/snapshots")).unwrap();
        }
    }
    assert!(
        killed_mid_import >= 2,
        "only {killed_mid_import} kills landed mid-import"
    );
    // The store still works after the kills and the result is right.
    let id = env.json(&["snapshot", "import", "big.raw"])["snapshot_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = env.run(&["snapshot", "export", &id, "o.raw"]);
    assert!(out.status.success());
    assert!(fs::read(env.path("o.raw")).unwrap() == data);
}
