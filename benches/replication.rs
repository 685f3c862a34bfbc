//! `cargo bench --bench replication`: writes through the replicated client library to three
//! block servers (three replicas, majority acknowledgement) beside the same writes to one
//! replica, in one run, every server in this process on 127.0.0.1 (so the two CPUs serve
//! all three replicas: the cost a replicated write adds is all on this machine).
//!
//! Prints 4 KiB random-write IOPS (QD 32, and QD 1: latency-bound) and 1 MiB sequential-write
//! MB/s (QD 4) for each, and the replicated figure as a share of the single one (the goal: at
//! least 70%).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockfleet_block_server::{run, BlockServerConfig};
use blockfleet_core::ids::VolumeId;
use blockfleet_proto::BlockClient;
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
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut addrs = Vec::new();
        for i in 0..3 {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            addrs.push(l.local_addr().expect("addr").to_string());
            let config = BlockServerConfig {
                data_dir: dir.path().join(format!("bs{i}")),
                token_key_file: dir.path().join("block-token.key"),
                ..Default::default()
            };
            tokio::spawn(run(config, l, std::future::pending()));
        }
        let key =
            blockfleet_core::token::TokenKey::load_or_create(&dir.path().join("block-token.key"))
                .expect("block token key");
        let mut results = Vec::new();
        for replicas in [1usize, 3] {
            let v = VolumeId::generate();
            for a in &addrs[..replicas] {
                let c = BlockClient::connect(a).await.expect("connect");
                c.authorize_admin(&key, "bench").await.expect("authorize");
                c.create_volume(&v, SIZE, false).await.expect("create");
            }
            let rv = Arc::new(
                ReplicatedVolume::open(
                    v.clone(),
                    &addrs[..replicas],
                    Duration::from_secs(5),
                    Some(blockfleet_proto::Grant::writer(&key, &v, "bench")),
                )
                .await
                .expect("open"),
            );
            // Laid out first so both runs overwrite allocated blocks.
            drive(&rv, 1 << 20, 4, false, secs).await;
            let (iops, _) = drive(&rv, 4096, QD, true, secs).await;
            let (iops_qd1, _) = drive(&rv, 4096, 1, true, secs).await;
            let (_, bw) = drive(&rv, 1 << 20, 4, false, secs).await;
            results.push((iops, iops_qd1, bw));
        }
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
    });
}
