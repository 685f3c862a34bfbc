//! `cargo bench --bench replication`: writes through the replicated client library to three
//! block servers (three replicas, majority acknowledgement) beside the same writes to one
//! replica, in one run, every server in this process on 127.0.0.1 (so the two CPUs serve
//! all three replicas: the cost a replicated write adds is all on this machine).
//!
//! Prints 4 KiB random-write IOPS (QD 32, and QD 1: latency-bound) and 1 MiB sequential-write
//! MB/s (QD 4) for each, and the replicated figure as a share of the single one (the goal: at
//! least 70%); then the three replicas over mutual TLS, as a share of plain TCP (the goal: at
//! least 85% at QD 32).
//!
//! Then repair after a kill -9: three block-server processes, a volume written whole, random
//! writes (no flush, as fio's default) over all of it, then over its first 32 MiB while one
//! server is killed -9 and restarted at once;
//! prints the time from its restart to in sync and the bytes copied, with repair copying every
//! chunk whose version differs (before: the versions a server persists only at a flush make
//! every chunk written since look stale) beside repair checking digests first (after).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::path::Path;

use blockfleet_block_server::{run, BlockServerConfig};
use blockfleet_core::ids::VolumeId;
use blockfleet_core::tls::{Role, TlsConfig};
use blockfleet_core::token::TokenKey;
use blockfleet_proto::BlockClient;
use blockfleet_proto::Transport;
use blockfleet_volume_client::ReplicatedVolume;
use bytes::Bytes;

#[path = "../tests/common/mod.rs"]
mod common;

const SIZE: u64 = 1 << 30;
const QD: usize = 32;

/// Runs `depth` writers of `bs`-byte writes (random or sequential) for `secs`; returns
/// (writes per second, bytes per second).
async fn drive(
    rv: &Arc<ReplicatedVolume>,
    bs: u64,
    depth: usize,
    random: bool,
    secs: f64,
) -> (f64, f64) {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..depth)
        .map(|t| {
            let (rv, done) = (Arc::clone(rv), Arc::clone(&done));
            tokio::spawn(async move {
                let mut rng = blockfleet_testkit::Rng::new(t as u64 + 1);
                let data = Bytes::from(vec![0x5au8; bs as usize]);
                let slots = SIZE / bs;
                let mut next = t as u64 * (slots / depth as u64);
                while Instant::now() < deadline {
                    let slot = if random {
                        rng.below(slots)
                    } else {
                        next % slots
                    };
                    next += 1;
                    rv.write(slot * bs, data.clone(), false)
                        .await
                        .expect("write");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer");
    }
    rv.flush().await.expect("flush");
    let n = done.load(Ordering::Relaxed) as f64;
    let el = start.elapsed().as_secs_f64();
    (n / el, n * bs as f64 / el)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("replication bench: run with `cargo bench --bench replication`");
        return;
    }
    let secs: f64 = common::env_or("BENCH_SECS", 5.0);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(throughput(secs));
    rt.block_on(repair_after_kill());
}

/// Three block servers in this process (mutual TLS with certificates in `tls`); their
/// addresses.
async fn start_servers(dir: &Path, tls: Option<&Path>) -> Vec<String> {
    let mut addrs = Vec::new();
    for i in 0..3 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        addrs.push(l.local_addr().expect("addr").to_string());
        let config = BlockServerConfig {
            data_dir: dir.join(format!("bs{i}-{}", tls.is_some())),
            token_key_file: dir.join("block-token.key"),
            tls: tls.map(|d| TlsConfig { dir: d.to_owned() }),
            ..Default::default()
        };
        tokio::spawn(run(config, l, std::future::pending()));
    }
    addrs
}

/// A new volume on `addrs`, written whole, then (QD 32 random 4 KiB IOPS, QD 1 IOPS, 1 MiB
/// sequential bytes/s).
async fn measure(addrs: &[String], key: &TokenKey, secs: f64) -> (f64, f64, f64) {
    let v = VolumeId::generate();
    for a in addrs {
        let c = BlockClient::connect(a).await.expect("connect");
        c.authorize_admin(key, "bench").await.expect("authorize");
        c.create_volume(&v, SIZE, false).await.expect("create");
    }
    let rv = Arc::new(
        ReplicatedVolume::open(
            v.clone(),
            addrs,
            Duration::from_secs(5),
            Some(blockfleet_proto::Grant::writer(key, &v, "bench")),
        )
        .await
        .expect("open"),
    );
    // Laid out first so every run overwrites allocated blocks.
    drive(&rv, 1 << 20, 4, false, secs).await;
    let (iops, _) = drive(&rv, 4096, QD, true, secs).await;
    let (iops_qd1, _) = drive(&rv, 4096, 1, true, secs).await;
    let (_, bw) = drive(&rv, 1 << 20, 4, false, secs).await;
    (iops, iops_qd1, bw)
}

/// One replica against three, in this process; three again over mutual TLS.
async fn throughput(secs: f64) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let key = TokenKey::load_or_create(&dir.path().join("block-token.key")).expect("token key");
    blockfleet_proto::transport::set_default(Transport::plain());
    let addrs = start_servers(dir.path(), None).await;
    let results = [
        measure(&addrs[..1], &key, secs).await,
        measure(&addrs, &key, secs).await,
    ];
    let tls_dir = dir.path().join("tls");
    blockfleet_core::tls::ensure(&tls_dir, &Role::ALL, "bench").expect("certificates");
    blockfleet_proto::transport::set_default(
        Transport::tls(&tls_dir, Role::ControlPlane).expect("client certificate"),
    );
    let tls_addrs = start_servers(dir.path(), Some(&tls_dir)).await;
    let (iops_tls, lat_tls, bw_tls) = measure(&tls_addrs, &key, secs).await;
    blockfleet_proto::transport::set_default(Transport::plain());
    let (iops1, lat1, bw1) = results[0];
    let (iops3, lat3, bw3) = results[1];
    println!(
        "{:<46} {:>10.0} IOPS",
        "4 KiB random write, 1 replica (QD 32)", iops1
    );
    println!(
        "{:<46} {:>10.0} IOPS  ({:.0}% of 1 replica)",
        "4 KiB random write, 3 replicas",
        iops3,
        100.0 * iops3 / iops1
    );
    println!(
        "{:<46} {:>10.1} MB/s",
        "1 MiB sequential write, 1 replica (QD 4)",
        bw1 / 1e6
    );
    println!(
        "{:<46} {:>10.1} MB/s  ({:.0}% of 1 replica)",
        "1 MiB sequential write, 3 replicas",
        bw3 / 1e6,
        100.0 * bw3 / bw1
    );
    println!(
        "{:<46} {:>10.0} IOPS",
        "4 KiB random write, 1 replica (QD 1)", lat1
    );
    println!(
        "{:<46} {:>10.0} IOPS  ({:.0}% of 1 replica)",
        "4 KiB random write, 3 replicas (QD 1)",
        lat3,
        100.0 * lat3 / lat1
    );
    println!("BENCH replication_randwrite_4k_qd1_1replica {lat1:.0} IOPS");
    println!("BENCH replication_randwrite_4k_qd1_3replicas {lat3:.0} IOPS");
    println!("BENCH replication_randwrite_4k_1replica {iops1:.0} IOPS");
    println!("BENCH replication_randwrite_4k_3replicas {iops3:.0} IOPS");
    println!(
        "BENCH replication_seqwrite_1m_1replica {:.1} MB/s",
        bw1 / 1e6
    );
    println!(
        "BENCH replication_seqwrite_1m_3replicas {:.1} MB/s",
        bw3 / 1e6
    );
    println!(
        "BENCH replication_randwrite_ratio {:.0} %",
        100.0 * iops3 / iops1
    );
    println!(
        "BENCH replication_seqwrite_ratio {:.0} %",
        100.0 * bw3 / bw1
    );
    println!("3 replicas over mutual TLS, beside plain TCP in this run:");
    for (name, label, t, p, unit, scale) in [
        (
            "randwrite_4k",
            "4 KiB random write (QD 32)",
            iops_tls,
            iops3,
            "IOPS",
            1.0,
        ),
        (
            "randwrite_4k_qd1",
            "4 KiB random write (QD 1)",
            lat_tls,
            lat3,
            "IOPS",
            1.0,
        ),
        (
            "seqwrite_1m",
            "1 MiB sequential write (QD 4)",
            bw_tls,
            bw3,
            "MB/s",
            1e6,
        ),
    ] {
        println!(
            "{label:<46} {:>10.0} {unit}  plain {:>10.0} {unit}  ({:.0}%)",
            t / scale,
            p / scale,
            100.0 * t / p
        );
        println!(
            "BENCH replication_{name}_3replicas_tls {:.0} {unit}",
            t / scale
        );
        println!("BENCH replication_{name}_tls_ratio {:.0} %", 100.0 * t / p);
    }
}

/// What one repair after a kill -9 cost.
struct Repair {
    secs: f64,
    copied_bytes: u64,
    copied: u64,
    adopted: u64,
    writes: u64,
}

/// Repair of one replica killed -9 under random 4 KiB writes (QD 8, no flush) on a volume of
/// `REPAIR_SIZE` (all of it written since the last flush; the first 32 MiB during the kill),
/// with digests checked before copying (`adopt`) or not.
async fn repair_once(adopt: bool) -> Repair {
    const REPAIR_SIZE: u64 = 256 << 20;
    let mut f = common::Fleet::start(common::FleetOptions::default());
    let v =
        f.cp.create_volume(&blockfleet_api::CreateVolumeRequest {
            size: Some(REPAIR_SIZE),
            ..Default::default()
        })
        .await
        .expect("create volume")
        .remove(0);
    let grant = common::rw_grant(&f.block_key_file(), &v.volume_id);
    let rv = Arc::new(
        ReplicatedVolume::open(
            v.volume_id.clone(),
            &v.placement,
            Duration::from_secs(2),
            Some(grant),
        )
        .await
        .expect("open"),
    );
    rv.set_adopt_by_digest(adopt);
    let _repair = rv.spawn_repair(Duration::from_millis(500));
    // Written whole and flushed: every chunk allocated, every version durable.
    let mib = Bytes::from(vec![0x3cu8; 1 << 20]);
    for at in (0..REPAIR_SIZE).step_by(1 << 20) {
        rv.write(at, mib.clone(), false).await.expect("fill");
    }
    rv.flush().await.expect("flush");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // First over the whole volume, then (during the kill) over its first 32 MiB only: every
    // chunk was written since the last flush, few while the server was down.
    let hot = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..8u64)
        .map(|t| {
            let (rv, stop, writes) = (Arc::clone(&rv), Arc::clone(&stop), Arc::clone(&writes));
            let hot = Arc::clone(&hot);
            tokio::spawn(async move {
                let mut rng = blockfleet_testkit::Rng::new(t + 11);
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    rng.fill(&mut buf);
                    let span = if hot.load(Ordering::Relaxed) {
                        32 << 20
                    } else {
                        REPAIR_SIZE
                    };
                    let at = rng.below(span / 4096) * 4096;
                    rv.write(at, Bytes::copy_from_slice(&buf), false)
                        .await
                        .expect("a write failed with one replica down");
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Long enough for the writes to touch every chunk.
    tokio::time::sleep(Duration::from_secs(2)).await;
    hot.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let victim = 2;
    let addr = f.block_server_addr(victim).to_owned();
    let m = &rv.metrics;
    let (bytes0, copied0, adopted0) = (
        m.repair_bytes.load(Ordering::Relaxed),
        m.repair_chunks.load(Ordering::Relaxed),
        m.repair_adopted.load(Ordering::Relaxed),
    );
    f.kill_block_server(victim);
    f.restart_block_server(victim);
    let restarted = Instant::now();
    let health = |rv: &ReplicatedVolume| {
        rv.status()
            .into_iter()
            .find(|r| r.addr == addr)
            .map(|r| r.health)
    };
    // Seen out or repairing first (a closed connection), then back in sync.
    while health(&rv) == Some(blockfleet_volume_client::Health::InSync) {
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "kill not noticed"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while health(&rv) != Some(blockfleet_volume_client::Health::InSync) {
        assert!(
            restarted.elapsed() < Duration::from_secs(300),
            "repair never finished"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = restarted.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    Repair {
        secs,
        copied_bytes: m.repair_bytes.load(Ordering::Relaxed) - bytes0,
        copied: m.repair_chunks.load(Ordering::Relaxed) - copied0,
        adopted: m.repair_adopted.load(Ordering::Relaxed) - adopted0,
        writes: writes.load(Ordering::Relaxed),
    }
}

async fn repair_after_kill() {
    let before = repair_once(false).await;
    let after = repair_once(true).await;
    for (name, r) in [
        ("versions only (before)", &before),
        ("digests checked (after)", &after),
    ] {
        println!(
            "repair after kill -9, {name:<24} {:>7.2} s  {:>8.1} MiB copied  ({} chunks copied, {} adopted, {} writes)",
            r.secs,
            r.copied_bytes as f64 / (1 << 20) as f64,
            r.copied,
            r.adopted,
            r.writes
        );
    }
    println!(
        "BENCH replication_repair_after_kill_versions_only {:.3} s",
        before.secs
    );
    println!(
        "BENCH replication_repair_after_kill_digests {:.3} s",
        after.secs
    );
    println!(
        "BENCH replication_repair_bytes_versions_only {:.1} MiB",
        before.copied_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "BENCH replication_repair_bytes_digests {:.1} MiB",
        after.copied_bytes as f64 / (1 << 20) as f64
    );
}
