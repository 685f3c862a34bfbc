//! `cargo bench --bench hydrate`: volumes from a 1 GiB snapshot over a real fleet (`blockfleet`
//! processes on 127.0.0.1: KMS, three block servers, control plane, one transform worker), on
//! the local store and on Garage S3, each beside the raw GET throughput of the same store
//! measured in the same run at the same concurrency:
//!
//! - hydration of one encrypted volume (snapshot size / time from CreateVolume to `done`);
//! - hydration of four encrypted volumes from one call (one job; the source must be read once);
//! - the first read of an unhydrated chunk through the host agent's read path (an on-demand
//!   fetch while background hydration crawls at 1 MiB/s), p50/p99, beside a read of a hydrated
//!   chunk and a raw GET of one chunk.
//!
//! Set BENCH_IMAGE_MIB to change the size, BENCH_STORES (default `local,s3`) to pick stores. Prints one `BENCH <name> <value> <unit>` line per figure.

#![allow(clippy::unwrap_used)] // a bench that cannot set up should stop loudly

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockfleet_api::{CreateVolumeRequest, HydrationState};
use blockfleet_core::config::{LocalStoreConfig, S3StoreConfig, Secret, StoreConfig};
use blockfleet_core::ids::{InstanceId, SnapshotId, VolumeId};
use blockfleet_core::units::CHUNK;
use blockfleet_host_agent::AgentVolume;
use blockfleet_snapshot_format::store::{self, ObjectStore};
use blockfleet_snapshot_format::{Archive, ManifestKey};
use common::{Fleet, FleetOptions};
use futures::StreamExt;

/// The transform worker's default, and the raw GET's.
const CONCURRENCY: usize = 16;
/// Unhydrated chunks read once each for the first-read latency.
const FIRST_READS: usize = 200;

fn write_image(path: &Path, size: u64) {
    let mut data = vec![0u8; size as usize];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for w in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, data).unwrap();
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

/// (busy, total) jiffies of all CPUs, from /proc/stat: whether a phase saturated the machine.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// CPU seconds (user + system) a process has used, from /proc/<pid>/stat.
fn process_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<u64> = rest
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    (f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)) as f64 / 100.0
}

fn busy_since(start: (u64, u64)) -> f64 {
    let now = cpu_ticks();
    (now.0 - start.0) as f64 * 100.0 / (now.1 - start.1).max(1) as f64
}

fn report_rate(name: &str, label: &str, bytes: u64, secs: f64, busy: f64) -> f64 {
    let r = mbps(bytes, secs);
    println!("{label:<58} {r:>8.0} MB/s  ({secs:.2} s, CPUs {busy:.0}% busy)");
    println!("BENCH {name} {r:.0} MB/s");
    r
}

fn report_latency(name: &str, label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let (p50, p99) = (at(0.50), at(0.99));
    println!(
        "{label:<58} p50 {:>8.2} ms  p99 {:>8.2} ms  ({} reads)",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        samples.len()
    );
    println!("BENCH {name}_p50 {:.3} ms", p50.as_secs_f64() * 1e3);
    println!("BENCH {name}_p99 {:.3} ms", p99.as_secs_f64() * 1e3);
}

/// Every chunk of the snapshot, GET from the store without verification, `CONCURRENCY` at once.
async fn raw_get(store: &Arc<dyn ObjectStore>, keys: &[String]) -> f64 {
    let start = Instant::now();
    let mut gets =
        futures::stream::iter(keys.iter().map(|k| store.get(k))).buffer_unordered(CONCURRENCY);
    while let Some(r) = gets.next().await {
        assert_eq!(r.unwrap().len() as u64, CHUNK);
    }
    start.elapsed().as_secs_f64()
}

/// Creates `count` encrypted volumes from `snap` and waits for their hydration to end.
async fn hydrate(f: &Fleet, snap: &SnapshotId, count: u32) -> (f64, Vec<VolumeId>) {
    let start = Instant::now();
    let vols =
        f.cp.create_volume(&CreateVolumeRequest {
            snapshot_id: Some(snap.clone()),
            encrypted: true,
            count: Some(count),
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<VolumeId> = vols.iter().map(|v| v.volume_id.clone()).collect();
    loop {
        let v = f.cp.describe_volumes(&ids).await.unwrap();
        let states: Vec<_> = v
            .iter()
            .map(|v| v.hydration.as_ref().unwrap().state)
            .collect();
        assert!(
            !states.contains(&HydrationState::Failed),
            "hydration failed: {v:?}"
        );
        if states.iter().all(|s| *s == HydrationState::Done) {
            return (start.elapsed().as_secs_f64(), ids);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn time_reads(v: &AgentVolume, chunks: &[u64]) -> Vec<Duration> {
    let mut out = Vec::with_capacity(chunks.len());
    for &c in chunks {
        let start = Instant::now();
        let data = v.read(c * CHUNK + 8192, 4096).await.unwrap();
        out.push(start.elapsed());
        assert_eq!(data.len(), 4096);
    }
    out
}

async fn run_store(
    label: &str,
    name: &str,
    store_toml: String,
    store_cfg: StoreConfig,
    image: &Path,
    size: u64,
) {
    println!("-- {label}");
    let mut f = Fleet::start(FleetOptions {
        store: Some(store_toml),
        concurrency: CONCURRENCY,
        poll_ms: 20,
        ..FleetOptions::default()
    });
    let snap: SnapshotId = f
        .ok(&["snapshot", "import", image.to_str().unwrap()])
        .trim()
        .parse()
        .unwrap();
    let store = store::open(&store_cfg).await.unwrap();
    let mkey = ManifestKey::load_or_create(&f.dir.path().join("manifest.key")).unwrap();
    let archive = Archive::new(Arc::clone(&store), Arc::new(mkey));
    let manifest = archive.get_manifest(&snap).await.unwrap();
    let keys: Vec<String> = manifest.chunks.values().map(|h| h.key()).collect();
    let chunks = keys.len() as u64;
    assert_eq!(chunks * CHUNK, size, "random image: every chunk stored");

    let cpu = cpu_ticks();
    let secs = raw_get(&store, &keys).await;
    let get = report_rate(
        &format!("raw_get_{name}"),
        &format!("raw GET of every chunk, {CONCURRENCY} at once ({label})"),
        size,
        secs,
        busy_since(cpu),
    );
    let cpu = cpu_ticks();
    let worker = f.transform.as_ref().unwrap().child.id();
    let worker_cpu = process_cpu_secs(worker);
    let (secs, _) = hydrate(&f, &snap, 1).await;
    let one = report_rate(
        &format!("hydrate_1_target_{name}"),
        &format!("hydration, 1 encrypted volume ({label})"),
        size,
        secs,
        busy_since(cpu),
    );
    // What one core of a dedicated transform host could push: the worker's own CPU per byte.
    let per_core = mbps(size, process_cpu_secs(worker) - worker_cpu);
    println!("  transform worker: {per_core:.0} MB/s per CPU-second it used");
    println!("BENCH transform_worker_per_core_{name} {per_core:.0} MB/s");
    let before = f.metric("blockfleet_transform_source_chunks_total");
    let cpu = cpu_ticks();
    let (secs, _) = hydrate(&f, &snap, 4).await;
    let busy = busy_since(cpu);
    let read = f.metric("blockfleet_transform_source_chunks_total") - before;
    assert_eq!(read, chunks, "4 targets must read the source once");
    let four = report_rate(
        &format!("hydrate_4_targets_{name}"),
        &format!("hydration, 4 encrypted volumes, one call ({label})"),
        size,
        secs,
        busy,
    );
    println!(
        "  1 target at {:.0}% of raw GET; 4 targets at {:.0}% (source chunks read: {read} for {chunks})",
        one / get * 100.0,
        four / get * 100.0
    );
    println!(
        "BENCH hydrate_1_target_vs_get_{name} {:.0} %",
        one / get * 100.0
    );
    println!(
        "BENCH hydrate_4_source_reads_per_chunk_{name} {:.2} x",
        read as f64 / chunks as f64
    );

    // First reads: background hydration crawls (1 MiB/s from chunk 0), so the upper half
    // stays unhydrated and each read there waits for an on-demand fetch.
    let text = std::fs::read_to_string(&f.config).unwrap();
    std::fs::write(
        &f.config,
        text.replace("background_mib_per_sec = 0", "background_mib_per_sec = 1"),
    )
    .unwrap();
    f.transform.take();
    f.start_transform();
    let lazy =
        f.cp.create_volume(&CreateVolumeRequest {
            snapshot_id: Some(snap.clone()),
            encrypted: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let v = f
        .attach_in_process(
            &lazy[0].volume_id,
            &InstanceId::generate(),
            None,
            false,
            true,
        )
        .await;
    let mut x = 0x9e37_79b9u64;
    let mut picks = Vec::new();
    while picks.len() < FIRST_READS.min(chunks as usize / 4) {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let c = chunks / 2 + (x >> 33) % (chunks / 2);
        if !picks.contains(&c) {
            picks.push(c);
        }
    }
    let first = time_reads(&v, &picks).await;
    let again = time_reads(&v, &picks).await;
    let mut gets = Vec::new();
    for &c in &picks {
        let start = Instant::now();
        store.get(&keys[c as usize]).await.unwrap();
        gets.push(start.elapsed());
    }
    report_latency(
        &format!("first_read_unhydrated_{name}"),
        &format!("4 KiB read of an unhydrated chunk ({label})"),
        first,
    );
    report_latency(
        &format!("read_hydrated_{name}"),
        &format!("4 KiB read of the same chunk, hydrated ({label})"),
        again,
    );
    report_latency(
        &format!("raw_get_one_chunk_{name}"),
        &format!("raw GET of one 512 KiB chunk ({label})"),
        gets,
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("hydrate bench: run with `cargo bench --bench hydrate`");
        return;
    }
    let mib: u64 = common::env_or("BENCH_IMAGE_MIB", 1024);
    let size = mib << 20;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let image = dir.path().join("image.raw");
    write_image(&image, size);
    println!(
        "snapshot: {mib} MiB of random data (every chunk stored); transform concurrency {CONCURRENCY}; 2 cores"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let stores = std::env::var("BENCH_STORES").unwrap_or_else(|_| "local,s3".into());
        let objects = dir.path().join("objects");
        if stores.contains("local") {
            run_store(
            "local store",
            "local",
            format!("kind = \"local\"\npath = \"{}\"", objects.display()),
            StoreConfig::Local(LocalStoreConfig { path: objects }),
            &image,
            size,
        )
        .await;
        }
        match blockfleet_testkit::garage_binary() {
            _ if !stores.contains("s3") => println!("S3 (Garage): skipped (BENCH_STORES)"),
            None => println!("S3 (Garage): skipped, garage not installed"),
            Some(_) => {
                let g = blockfleet_testkit::Garage::start();
                let toml = format!(
                    "kind = \"s3\"\nendpoint = \"{}\"\nregion = \"{}\"\nbucket = \"{}\"\npath_style = true\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"",
                    g.endpoint, g.region, g.bucket, g.access_key, g.secret_key
                );
                let mut c = S3StoreConfig::new(Some(g.endpoint.clone()), &g.region, &g.bucket);
                c.access_key_id = Some(g.access_key.clone());
                c.secret_access_key = Some(Secret::new(g.secret_key.clone()));
                run_store("Garage S3 on loopback", "s3", toml, StoreConfig::S3(c), &image, size)
                    .await;
            }
        }
    });
}
