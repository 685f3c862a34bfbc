//! `cargo bench --bench import`: `snapshot import` and `export` of a 1 GiB image (random data:
//! every chunk hashed and stored) into the local store and into Garage S3 on loopback, beside
//! `cp` and `sha256sum` of the same file in the same run.
//!
//! Set BENCH_IMAGE_MIB to change the size. Prints one `BENCH <name> <value> <unit>` line per figure.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use blockfleet_core::config::{S3StoreConfig, Secret, StoreConfig};
use blockfleet_snapshot_format::store::{self, LocalStore, ObjectStore};
use blockfleet_snapshot_format::{Archive, ManifestKey};
use blockfleet_snapshot_service::{
    export_image, import_image, ExportOptions, ImportOptions, NoProgress,
};

fn report(name: &str, label: &str, bytes: u64, secs: f64) {
    let mbps = bytes as f64 / secs / 1e6;
    println!("{label:<44} {mbps:>8.0} MB/s  ({secs:.2} s)");
    println!("BENCH {name} {mbps:.0} MB/s");
}

fn time_command(cmd: &mut Command) -> f64 {
    let start = Instant::now();
    let status = cmd.status().expect("run command");
    assert!(status.success(), "{cmd:?} failed");
    start.elapsed().as_secs_f64()
}

fn write_image(path: &Path, size: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create image"));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..size >> 20 {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).expect("write image");
    }
    f.into_inner().expect("flush").sync_all().expect("sync");
}

async fn import_export(
    label: &str,
    name: &str,
    store: Arc<dyn ObjectStore>,
    image: &Path,
    size: u64,
    out: &Path,
) {
    let archive = Archive::new(store, Arc::new(ManifestKey::generate()));
    let opts = ImportOptions {
        parent: None,
        description: String::new(),
        concurrency: 8,
    };
    let r = import_image(&archive, image, &opts, &NoProgress)
        .await
        .expect("import");
    report(
        &format!("import_{name}"),
        &format!("snapshot import ({label})"),
        size,
        r.elapsed.as_secs_f64(),
    );
    let again = import_image(&archive, image, &opts, &NoProgress)
        .await
        .expect("re-import");
    assert_eq!(again.uploaded_chunks, 0);
    report(
        &format!("reimport_dedup_{name}"),
        &format!("snapshot import again, all dedup ({label})"),
        size,
        again.elapsed.as_secs_f64(),
    );
    let e = export_image(
        &archive,
        &r.snapshot_id,
        out,
        &ExportOptions {
            force: true,
            concurrency: 8,
        },
        &NoProgress,
    )
    .await
    .expect("export");
    report(
        &format!("export_{name}"),
        &format!("snapshot export ({label})"),
        size,
        e.elapsed.as_secs_f64(),
    );
    std::fs::remove_file(out).expect("remove export");
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("import bench: run with `cargo bench --bench import`");
        return;
    }
    let mib: u64 = std::env::var("BENCH_IMAGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let size = mib << 20;
    // Beside the build, on the same disk as a user's images would likely be.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let image = dir.path().join("image.raw");
    let out = dir.path().join("out.raw");
    write_image(&image, size);
    println!("image: {mib} MiB of random data (every chunk stored), concurrency 8, 2 cores");

    let secs = time_command(Command::new("cp").arg(&image).arg(&out));
    report(
        &format!("cp_{mib}m"),
        "cp (page cache, no fsync)",
        size,
        secs,
    );
    std::fs::remove_file(&out).expect("rm");
    let secs = time_command(
        Command::new("sha256sum")
            .arg(&image)
            .stdout(std::process::Stdio::null()),
    );
    report(&format!("sha256sum_{mib}m"), "sha256sum", size, secs);

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let local = Arc::new(LocalStore::open(&dir.path().join("objects")).expect("local store"));
        import_export(
            "local store",
            &format!("local_{mib}m"),
            local,
            &image,
            size,
            &out,
        )
        .await;

        match blockfleet_testkit::garage_binary() {
            None => println!("S3 (Garage): skipped, garage not installed"),
            Some(_) => {
                let g = blockfleet_testkit::Garage::start();
                let mut c = S3StoreConfig::new(Some(g.endpoint.clone()), &g.region, &g.bucket);
                c.access_key_id = Some(g.access_key.clone());
                c.secret_access_key = Some(Secret::new(g.secret_key.clone()));
                let s3 = store::open(&StoreConfig::S3(c))
                    .await
                    .expect("garage store");
                import_export(
                    "Garage S3 on loopback",
                    &format!("s3_{mib}m"),
                    s3,
                    &image,
                    size,
                    &out,
                )
                .await;
            }
        }
    });
}
