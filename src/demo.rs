//! `blockfleet demo`: the README's first command. On the configured store (the embedded local
//! default unless told otherwise) it generates a raw image with random, repeated and zero
//! chunks, imports it, exports it back and proves the two files are identical.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context};
use blockfleet_core::config::Config;
use blockfleet_core::units::CHUNK;
use blockfleet_snapshot_service::{export_image, import_image, ExportOptions, ImportOptions};
use sha2::{Digest, Sha256};

use crate::cli::Output;
use crate::output::{emit, mb_per_s, Bar};
use crate::snapshot_cmd::open_archive;

/// Writes `size` bytes: every fifth chunk zero, every seventh a repeat of chunk 1, the rest random.
fn generate(path: &Path, size: u64) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut x = u64::from_le_bytes(seed) | 1;
    let mut chunk = vec![0u8; CHUNK as usize];
    let mut repeated = Vec::new();
    for i in 0..size.div_ceil(CHUNK) {
        let len = CHUNK.min(size - i * CHUNK) as usize;
        if i % 5 == 0 {
            chunk.fill(0);
        } else if i % 7 == 3 && !repeated.is_empty() {
            chunk.copy_from_slice(&repeated);
        } else {
            for word in chunk.chunks_exact_mut(8) {
                // xorshift64: fast filler; the data only has to be incompressible-looking.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
            if i == 1 {
                repeated = chunk.clone();
            }
        }
        f.write_all(&chunk[..len])?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

pub async fn run(config: &Config, output: Output, size_mib: u64) -> anyhow::Result<()> {
    if size_mib == 0 {
        bail!("--size-mib must be at least 1");
    }
    let size = size_mib << 20;
    let archive = open_archive(config).await?;
    let work = tempfile::tempdir().context("creating a temporary directory")?;
    let image = work.path().join("demo.raw");
    let restored = work.path().join("restored.raw");
    generate(&image, size).context("generating the demo image")?;

    let bar = Bar::new(output, "import");
    let opts = ImportOptions {
        parent: None,
        description: "blockfleet demo".into(),
        concurrency: config.snapshot.concurrency,
    };
    let imported = import_image(&archive, &image, &opts, &bar).await;
    bar.finish();
    let imported = imported?;

    let bar = Bar::new(output, "export");
    let opts = ExportOptions {
        force: false,
        concurrency: config.snapshot.concurrency,
    };
    let exported = export_image(&archive, &imported.snapshot_id, &restored, &opts, &bar).await;
    bar.finish();
    let exported = exported?;

    let (a, b) = (sha256_file(&image)?, sha256_file(&restored)?);
    if a != b {
        bail!("round trip FAILED: image sha256 {a}, restored sha256 {b}");
    }
    let json = serde_json::json!({
        "store": archive.store().describe(),
        "snapshot_id": imported.snapshot_id.to_string(),
        "image_bytes": size,
        "sha256": a,
        "uploaded_chunks": imported.uploaded_chunks,
        "deduplicated_chunks": imported.deduplicated_chunks,
        "zero_chunks": imported.zero_chunks,
        "import_mb_per_s": mb_per_s(size, imported.elapsed.as_secs_f64()),
        "export_mb_per_s": mb_per_s(size, exported.elapsed.as_secs_f64()),
        "verified": true,
    });
    emit(output, &json, || {
        format!(
            "store      {}\nsnapshot   {}\nimage      {size_mib} MiB, sha256 {a}\nimport     {:.0} MB/s: {} chunks uploaded, {} deduplicated, {} zero (not stored)\nexport     {:.0} MB/s\nverified   restored image is bit-identical",
            archive.store().describe(),
            imported.snapshot_id,
            mb_per_s(size, imported.elapsed.as_secs_f64()),
            imported.uploaded_chunks,
            imported.deduplicated_chunks,
            imported.zero_chunks,
            mb_per_s(size, exported.elapsed.as_secs_f64()),
        )
    })
}
