//! `cargo bench --bench snapshot`: the snapshot coordinator over a real fleet (`blockfleet`
//! processes on 127.0.0.1, local store), in one run:
//!
//! - the pause window (first Pause sent to last Resume acknowledged) of CreateSnapshots for 1
//!   and for 8 volumes of one instance, p50/p99, with no load, and while every volume takes
//!   4 KiB random writes from 1 or 4 writers through the host agent's data path (XTS, block
//!   protocol);
//! - a snapshot of a 1 GiB volume of random data, full (the peer), then incremental with 1% of
//!   its chunks changed: time from the call to `completed`.
//!
//! Set BENCH_SETS (default 100) for the pause-window sample size. Prints one
//! `BENCH <name> <value> <unit>` line per figure.

#![allow(clippy::unwrap_used)] // a bench that cannot set up should stop loudly

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockfleet_api::{CreateSnapshotsRequest, SnapshotSet, SnapshotState};
use blockfleet_core::ids::{InstanceId, VolumeId};
use blockfleet_core::units::CHUNK;
use blockfleet_host_agent::AgentVolume;
use common::{Fleet, FleetOptions};

const UNIT: u64 = 4096;

fn request(instance: &InstanceId, exclude: Vec<VolumeId>) -> CreateSnapshotsRequest {
    CreateSnapshotsRequest {
        instance_id: instance.clone(),
        exclude_boot_volume: false,
        exclude_volume_ids: exclude,
        description: String::new(),
        tags: BTreeMap::new(),
        copy_tags_from_source: false,
        client_token: None,
    }
}

async fn snapshot(f: &Fleet, req: &CreateSnapshotsRequest) -> (SnapshotSet, Duration) {
    let start = Instant::now();
    let set = f.cp.create_snapshots(req).await.unwrap();
    loop {
        let s = f.cp.describe_snapshot_set(&set.set_id).await.unwrap();
        match s.state {
            SnapshotState::Pending => tokio::time::sleep(Duration::from_millis(5)).await,
            SnapshotState::Completed => return (s, start.elapsed()),
            SnapshotState::Error => panic!("set failed: {s:?}"),
        }
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Random 4 KiB writes to every volume, `per_volume` at a time, until `stop`.
fn start_writers(
    agents: &[Arc<AgentVolume>],
    per_volume: usize,
    stop: &Arc<AtomicBool>,
    count: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut out = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        for j in 0..per_volume {
            let (a, stop, count) = (Arc::clone(a), Arc::clone(stop), Arc::clone(count));
            out.push(tokio::spawn(async move {
                let mut x = 0x9e37_79b9_7f4a_7c15 ^ ((i * 64 + j) as u64 + 1);
                let units = a.size() / UNIT;
                let buf = vec![0x5au8; UNIT as usize];
                while !stop.load(Ordering::Relaxed) {
                    let u = xorshift(&mut x) % units;
                    a.write(u * UNIT, UNIT, Some(&buf), false).await.unwrap();
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    out
}

fn report_window(name: &str, label: &str, mut us: Vec<u64>) {
    us.sort_unstable();
    let at = |q: f64| us[((us.len() as f64 * q) as usize).min(us.len() - 1)] as f64 / 1000.0;
    println!(
        "{label:<52} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  ({} sets)",
        at(0.5),
        at(0.99),
        at(1.0),
        us.len()
    );
    println!("BENCH {name}_p50 {:.3} ms", at(0.5));
    println!("BENCH {name}_p99 {:.3} ms", at(0.99));
}

async fn pause_windows(f: &Fleet, sets: usize) {
    let (instance, vols, agents) = f.instance_with_volumes(8, 8, 64 << 20).await;
    let others: Vec<VolumeId> = vols[1..].iter().map(|v| v.volume_id.clone()).collect();
    // No load (the protocol's floor), one writer per volume, four (both CPUs saturated).
    for per_volume in [0, 1, 4] {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let writers = start_writers(&agents, per_volume, &stop, &writes);
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (n, exclude) in [(1, others.clone()), (8, vec![])] {
            let req = request(&instance, exclude);
            let mut windows = Vec::new();
            let started = Instant::now();
            let w0 = writes.load(Ordering::Relaxed);
            for _ in 0..sets {
                let (set, _) = snapshot(f, &req).await;
                assert_eq!(set.snapshots.len(), n);
                windows.push(set.pause_window_us);
            }
            let rate =
                (writes.load(Ordering::Relaxed) - w0) as f64 / started.elapsed().as_secs_f64();
            report_window(
                &format!("pause_window_{n}_volumes_{per_volume}_writers"),
                &format!("pause window, {n} vol, {per_volume} writer(s)/vol ({rate:.0} writes/s)"),
                windows,
            );
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }
    }
}

async fn incremental(f: &Fleet) {
    let size = 1u64 << 30;
    let (instance, _vols, agents) = f.instance_with_volumes(1, 1, size).await;
    let v = &agents[0];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut buf = vec![0u8; 4 << 20];
    let fill = Instant::now();
    for at in (0..size).step_by(buf.len()) {
        for w in buf.chunks_exact_mut(8) {
            w.copy_from_slice(&xorshift(&mut x).to_le_bytes());
        }
        v.write(at, buf.len() as u64, Some(&buf), false)
            .await
            .unwrap();
    }
    v.flush().await.unwrap();
    println!(
        "(filled 1 GiB of random data through the host agent path in {:.1} s)",
        fill.elapsed().as_secs_f64()
    );
    let req = request(&instance, vec![]);
    let (full, full_t) = snapshot(f, &req).await;
    let chunks = size / CHUNK;
    assert_eq!(full.snapshots[0].changed_chunks, Some(chunks));
    // 1% of the chunks get one new 4 KiB unit each.
    let changed = chunks / 100;
    for i in 0..changed {
        let c = i * 100 + xorshift(&mut x) % 100;
        let unit = vec![(i % 250) as u8 + 1; UNIT as usize];
        v.write(c * CHUNK + UNIT, UNIT, Some(&unit), false)
            .await
            .unwrap();
    }
    let (inc, inc_t) = snapshot(f, &req).await;
    assert_eq!(inc.snapshots[0].changed_chunks, Some(changed));
    let (ft, it) = (full_t.as_secs_f64(), inc_t.as_secs_f64());
    println!(
        "{:<52} {:>8.2} s  ({:.0} MB/s)",
        "full snapshot of a 1 GiB volume — peer",
        ft,
        size as f64 / ft / 1e6
    );
    println!(
        "{:<52} {:>8.3} s  ({:.1}% of the full; {changed} chunks read, {} stored)",
        "incremental snapshot, 1% of chunks changed",
        it,
        it / ft * 100.0,
        inc.snapshots[0].uploaded_chunks
    );
    println!("BENCH snapshot_full_1g {:.3} s", ft);
    println!("BENCH snapshot_incremental_1pct_1g {:.3} s", it);
    println!(
        "BENCH snapshot_incremental_vs_full {:.1} %",
        it / ft * 100.0
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("snapshot bench: run with `cargo bench --bench snapshot`");
        return;
    }
    let sets: usize = common::env_or("BENCH_SETS", 100);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let f = Fleet::start(FleetOptions::default());
        println!(
            "fleet: KMS, 3 block servers, control plane, transform worker; local store; 2 cores"
        );
        pause_windows(&f, sets).await;
        incremental(&f).await;
    });
}
