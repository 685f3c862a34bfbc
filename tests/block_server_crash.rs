//! Crash test over a real `blockfleet block-server` process: random writes with FUA and
//! flushes, kill -9 at random points, restart, and check against an oracle of acknowledged
//! writes: every unit holds its last durable write or a later acknowledged-but-unflushed one,
//! whole (never torn), and nothing else.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use blockfleet_core::ids::VolumeId;

use bytes::Bytes;
use common::Proc;

const SECTOR: u64 = 4096;
const CHUNK: u64 = 512 * 1024;
const VOLUME: u64 = 8 * CHUNK;
const UNITS: u64 = VOLUME / SECTOR;

/// Starts the server on a free port.
fn start(dir: &std::path::Path) -> Proc {
    let mut cmd = common::bin();
    cmd.args(["block-server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .arg("--token-key-file")
        .arg(dir.with_file_name("block-token.key"))
        .stderr(Stdio::null());
    common::start_line(cmd)
}

/// Unit content: the unit number, the write's tag, and filler derived from both, so a torn
/// or misplaced unit cannot pass for a whole one.
fn content(unit: u64, tag: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(SECTOR as usize);
    let mut x = unit.wrapping_mul(0x9E3779B97F4A7C15) ^ tag;
    while v.len() < SECTOR as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v[..8].copy_from_slice(&unit.to_le_bytes());
    v[8..16].copy_from_slice(&tag.to_le_bytes());
    v
}

/// Per unit: the last tag known durable (0 = zeros) and the tags acknowledged since.
#[derive(Default, Clone)]
struct UnitOracle {
    durable: u64,
    since: Vec<u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_never_loses_an_acknowledged_flushed_write() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("bs");
    let volume = VolumeId::generate();
    let mut oracle: HashMap<u64, UnitOracle> = HashMap::new();
    let mut tag = 0u64;
    let mut rng: u64 = 0xdead_beef_1234_5678 ^ u64::from(std::process::id());
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let cycles = 24;
    let mut total_acked = 0;
    for cycle in 0..cycles {
        let mut server = start(&data_dir);
        let client =
            common::admin_block_client(&server.addr, &data_dir.with_file_name("block-token.key"))
                .await;
        if cycle == 0 {
            client.create_volume(&volume, VOLUME, false).await.unwrap();
            client.flush(&volume).await.unwrap();
        }
        // Verify what the last crash left.
        let all = client.read(&volume, 0, VOLUME as u32).await.unwrap();
        for u in 0..UNITS {
            let got = &all[(u * SECTOR) as usize..((u + 1) * SECTOR) as usize];
            let o = oracle.get(&u).cloned().unwrap_or_default();
            let ok = std::iter::once(o.durable)
                .chain(o.since.iter().copied())
                .any(|t| {
                    if t == 0 {
                        got.iter().all(|&b| b == 0)
                    } else {
                        got == content(u, t)
                    }
                });
            assert!(
                ok,
                "cycle {cycle}: unit {u} holds neither its durable write {} nor a later one {:?}",
                o.durable, o.since
            );
            // What is there now is what survived; it is the new durable state once flushed.
            let now = if got.iter().all(|&b| b == 0) {
                0
            } else {
                u64::from_le_bytes(got[8..16].try_into().unwrap())
            };
            oracle.insert(
                u,
                UnitOracle {
                    durable: now,
                    since: vec![],
                },
            );
        }
        client.flush(&volume).await.unwrap();

        // Write until a killer thread sends SIGKILL at a random moment, mid-request or not.
        let kill_after = Duration::from_millis(30 + next() % 250);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(kill_after);
            server.child.kill().unwrap();
            server.child.wait().unwrap();
        });
        loop {
            let units = 1 + next() % 8;
            let first = next() % (UNITS - units + 1);
            tag += 1;
            let data: Vec<u8> = (first..first + units)
                .flat_map(|u| content(u, tag))
                .collect();
            let fua = next() % 4 == 0;
            let acked = client
                .write(&volume, first * SECTOR, Bytes::from(data), fua)
                .await
                .is_ok();
            for u in first..first + units {
                let o = oracle.entry(u).or_default();
                if acked && fua {
                    *o = UnitOracle {
                        durable: tag,
                        since: vec![],
                    };
                } else {
                    // Unflushed, or cut off by the kill: it may or may not be there.
                    o.since.push(tag);
                }
            }
            if !acked {
                break;
            }
            total_acked += 1;
            if next() % 8 == 0 {
                if client.flush(&volume).await.is_err() {
                    break;
                }
                for o in oracle.values_mut() {
                    if let Some(&last) = o.since.last() {
                        *o = UnitOracle {
                            durable: last,
                            since: vec![],
                        };
                    }
                }
            }
        }
        killer.join().unwrap();
    }
    assert!(
        total_acked > cycles * 10,
        "only {total_acked} writes acknowledged in {cycles} cycles"
    );
}
