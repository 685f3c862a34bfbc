//! `cargo bench --bench block_server`: the block server through the client library over
//! loopback, beside `fio` on a raw file on the same disk, in one run:
//! 4 KiB random read and write IOPS at queue depth 32, and 1 MiB sequential MB/s.
//!
//! Both sides use buffered I/O (the server writes through the page cache and fsyncs on Flush;
//! fio runs libaio with direct=0), so the comparison is the server's overhead: protocol,
//! loopback TCP, metadata. Prints one `BENCH <name> <value> <unit>` line per figure.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockfleet_block_server::{run, BlockServerConfig};
use blockfleet_core::ids::VolumeId;
use blockfleet_proto::BlockClient;
use bytes::Bytes;

const SIZE: u64 = 1 << 30;
const RUN: Duration = Duration::from_secs(5);
const QD: usize = 32;

#[derive(Clone, Copy)]
enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

/// Runs `QD` tasks doing `pattern` with `bs`-byte requests for RUN; returns ops per second.
async fn drive(
    clients: &[Arc<BlockClient>],
    v: &VolumeId,
    pattern: Pattern,
    bs: u64,
    qd: usize,
) -> f64 {
    let ops = Arc::new(AtomicU64::new(0));
    let seq = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + RUN;
    let tasks: Vec<_> = (0..qd)
        .map(|t| {
            let c = Arc::clone(&clients[t % clients.len()]);
            let (v, ops, seq) = (v.clone(), Arc::clone(&ops), Arc::clone(&seq));
            tokio::spawn(async move {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                let data = Bytes::from(vec![0x5au8; bs as usize]);
                while Instant::now() < deadline {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let slots = SIZE / bs;
                    let offset = match pattern {
                        Pattern::RandRead | Pattern::RandWrite => (x % slots) * bs,
                        Pattern::SeqRead | Pattern::SeqWrite => {
                            (seq.fetch_add(1, Ordering::Relaxed) % slots) * bs
                        }
                    };
                    match pattern {
                        Pattern::RandRead | Pattern::SeqRead => {
                            c.read(&v, offset, bs as u32).await.expect("read");
                        }
                        Pattern::RandWrite | Pattern::SeqWrite => {
                            c.write(&v, offset, data.clone(), false)
                                .await
                                .expect("write");
                        }
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let start = Instant::now();
    for t in tasks {
        t.await.expect("task");
    }
    ops.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// fio on a raw file: returns (IOPS, bytes/s) of the job. `direct`: O_DIRECT (the disk
/// itself, the peer); else buffered with a warm page cache.
fn fio(file: &Path, rw: &str, bs: &str, qd: usize, direct: bool) -> Option<(f64, f64)> {
    let out = Command::new("fio")
        .args([
            "--name=peer",
            "--ioengine=libaio",
            "--invalidate=0",
            "--time_based",
            "--runtime=5",
            "--output-format=json",
        ])
        .arg(format!("--direct={}", u8::from(direct)))
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--size={SIZE}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={qd}"))
        .output()
        .ok()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let job = &json["jobs"][0];
    let side = if rw.contains("read") {
        &job["read"]
    } else {
        &job["write"]
    };
    Some((side["iops"].as_f64()?, side["bw_bytes"].as_f64()?))
}

fn line(name: &str, label: &str, value: f64, unit: &str, peer: Option<f64>) {
    let vs = peer.map_or(String::new(), |p| {
        format!("  ({:.0}% of fio)", 100.0 * value / p)
    });
    println!("{label:<52} {value:>10.0} {unit}{vs}");
    println!("BENCH {name} {value:.0} {unit}");
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("block_server bench: run with `cargo bench --bench block_server`");
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ours = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let config = BlockServerConfig {
            data_dir: dir.path().join("bs"),
            token_key_file: dir.path().join("block-token.key"),
            ..Default::default()
        };
        let key = blockfleet_core::token::TokenKey::load_or_create(&config.token_key_file)
            .expect("block token key");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(run(config, listener, async {
            let _ = stopped.await;
        }));
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(Arc::new(
                BlockClient::connect(&addr).await.expect("connect"),
            ));
        }
        let v = VolumeId::generate();
        for c in &clients {
            c.authorize_admin(&key, "bench").await.expect("authorize");
        }
        clients[0]
            .create_volume(&v, SIZE, false)
            .await
            .expect("create");
        // Fill the volume so reads read real blocks.
        let fill = Bytes::from(vec![0x11u8; 1 << 20]);
        for off in (0..SIZE).step_by(1 << 20) {
            clients[0]
                .write(&v, off, fill.clone(), false)
                .await
                .expect("fill");
        }
        clients[0].flush(&v).await.expect("flush");
        let r = (
            drive(&clients, &v, Pattern::RandRead, 4096, QD).await,
            drive(&clients, &v, Pattern::RandWrite, 4096, QD).await,
            drive(&clients, &v, Pattern::SeqRead, 1 << 20, 4).await,
            drive(&clients, &v, Pattern::SeqWrite, 1 << 20, 4).await,
        );
        clients[0].flush(&v).await.expect("flush");
        drop(clients);
        let _ = stop.send(());
        server.await.expect("server").expect("server run");
        r
    });
    let (rr, rw, sr, sw) = ours;

    let raw = dir.path().join("fio.raw");
    // Lay the file out first (sequential write), so reads read real, cached blocks.
    let peer = |rw: &str, bs: &str, qd, direct| fio(&raw, rw, bs, qd, direct);
    let (fsw, fsr) = (peer("write", "1m", 4, true), peer("read", "1m", 4, true));
    let (frw, frr) = (
        peer("randwrite", "4k", QD, true),
        peer("randread", "4k", QD, true),
    );
    let (brw, brr) = (
        peer("randwrite", "4k", QD, false),
        peer("randread", "4k", QD, false),
    );
    if frr.is_none() {
        println!("fio: not available (apt-get install fio); printing blockfleet figures only");
    }
    println!("1 GiB volume, 2 cores; blockfleet: buffered I/O over loopback TCP, 4 connections, client in the same process");
    println!("peer: fio libaio direct=1 on a raw file on the same disk");
    let show = |name: &str, label: &str, v: Option<(f64, f64)>, bytes: bool| {
        if let Some((iops, bw)) = v {
            if bytes {
                line(name, label, bw / 1e6, "MB/s", None);
            } else {
                line(name, label, iops, "IOPS", None);
            }
        }
    };
    show(
        "fio_randread_4k_qd32",
        "fio randread 4k qd32 (direct)",
        frr,
        false,
    );
    line(
        "bs_randread_4k_qd32",
        "block server randread 4k qd32",
        rr,
        "IOPS",
        frr.map(|p| p.0),
    );
    show(
        "fio_randwrite_4k_qd32",
        "fio randwrite 4k qd32 (direct)",
        frw,
        false,
    );
    line(
        "bs_randwrite_4k_qd32",
        "block server randwrite 4k qd32",
        rw,
        "IOPS",
        frw.map(|p| p.0),
    );
    show("fio_seqread_1m", "fio read 1m qd4 (direct)", fsr, true);
    line(
        "bs_seqread_1m",
        "block server read 1m qd4",
        sr * 1.048576,
        "MB/s",
        fsr.map(|p| p.1 / 1e6),
    );
    show("fio_seqwrite_1m", "fio write 1m qd4 (direct)", fsw, true);
    line(
        "bs_seqwrite_1m",
        "block server write 1m qd4",
        sw * 1.048576,
        "MB/s",
        fsw.map(|p| p.1 / 1e6),
    );
    println!("context: fio buffered, warm page cache (no network, no protocol)");
    show(
        "fio_buffered_randread_4k_qd32",
        "fio randread 4k qd32 (buffered)",
        brr,
        false,
    );
    show(
        "fio_buffered_randwrite_4k_qd32",
        "fio randwrite 4k qd32 (buffered)",
        brw,
        false,
    );
}
