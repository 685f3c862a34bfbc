#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic
//! Key isolation by construction: the block server's crate graph holds no key type, no cipher
//! and no KMS client, so no change to it can make it hold a plaintext key. `.ci/run` runs the
//! same check.

use std::process::Command;

mod common;

/// The normal (non-dev) dependencies of `package`, one crate name a line.
fn normal_deps(package: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            package,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Crates that hold or make plaintext keys.
const KEY_CRATES: [&str; 4] = ["blockfleet-keys", "aes", "aws-sdk-kms", "aes-gcm"];

#[test]
fn block_server_links_no_key_crate() {
    let deps = normal_deps("blockfleet-block-server");
    assert!(deps.iter().any(|d| d == "blockfleet-proto"), "{deps:?}");
    for k in KEY_CRATES {
        assert!(
            !deps.iter().any(|d| d == k),
            "blockfleet-block-server depends on {k}"
        );
    }
}

#[test]
fn key_holders_do_link_the_key_crate() {
    // The check above has teeth only if the tree shows the key crate where it is used.
    for p in ["blockfleet-host-agent", "blockfleet-transform-fleet"] {
        let deps = normal_deps(p);
        assert!(deps.iter().any(|d| d == "blockfleet-keys"), "{p}: {deps:?}");
        assert!(deps.iter().any(|d| d == "aes"), "{p}: {deps:?}");
    }
}

/// `Max core file size` of a running process, from /proc.
fn core_limit(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .to_owned();
    line.split_whitespace().nth(4).unwrap().to_owned()
}

/// Starts `blockfleet ARGS` with core files allowed (as an operator's shell might), so the
/// limit each process ends up with is its own doing.
fn start_with_cores(args: &str) -> common::Proc {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("ulimit -S -c unlimited && exec \"$0\" {args}"))
        .arg(env!("CARGO_BIN_EXE_blockfleet"))
        .stderr(std::process::Stdio::inherit());
    common::start_line(cmd)
}

#[test]
fn key_holding_processes_drop_core_files_and_the_block_server_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let config = dir.path().join("fleet.toml");
    std::fs::write(
        &config,
        format!(
            r#"[kms_server]
listen = "127.0.0.1:0"
data_dir = "{d}/kms"
root_key_file = "{d}/kms-root.key"
[[kms_server.principals]]
name = "transform"
role = "transform"
access_key_id = "AKTF"
secret_access_key = "tf-secret-0123"
"#
        ),
    )
    .unwrap();
    let kms = start_with_cores(&format!("-c {} kms", config.display()));
    let bs = start_with_cores(&format!(
        "block-server --listen 127.0.0.1:0 --data-dir {d}/bs"
    ));
    assert_eq!(
        core_limit(kms.child.id()),
        "0",
        "the KMS writes no core file"
    );
    assert_eq!(
        core_limit(bs.child.id()),
        "unlimited",
        "the block server (no keys) keeps the limit it was given"
    );
}
