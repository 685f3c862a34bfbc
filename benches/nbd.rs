//! `cargo bench --bench nbd`: the host agent (encrypted, over a block server on loopback)
//! beside `qemu-nbd` serving a raw file on the same disk, in one run: nbdcopy throughput in and
//! out of a 1 GiB image, and 4 KiB random read and write IOPS at queue depth 32 with fio's nbd
//! engine; then the host agent again with the block protocol over mutual TLS, beside plain TCP.
//! Prints one `BENCH <name> <value> <unit>` line per figure.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockfleet_block_server::{run, BlockServerConfig};
use blockfleet_core::ids::VolumeId;
use blockfleet_core::tls::{Role, TlsConfig};
use blockfleet_host_agent::AgentVolume;
use blockfleet_keys::xts::{Xts, XtsKey};
use blockfleet_proto::BlockClient;
use blockfleet_proto::Transport;
use blockfleet_volume_client::ReplicatedVolume;

const SIZE: u64 = 1 << 30;

fn timed(cmd: &mut Command) -> f64 {
    let t = Instant::now();
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed().as_secs_f64()
}

fn fio_iops(uri: &str, rw: &str) -> f64 {
    let out = Command::new("fio")
        .args([
            "--name=nbd",
            "--ioengine=nbd",
            "--bs=4k",
            "--iodepth=32",
            "--time_based",
            "--runtime=5",
            "--output-format=json",
        ])
        .arg(format!("--uri={uri}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--size={SIZE}"))
        .output()
        .expect("fio");
    // fio may print notes before the JSON document.
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = text
        .find('{')
        .and_then(|i| serde_json::from_str(&text[i..]).ok())
        .unwrap_or_default();
    let side = if rw.contains("read") { "read" } else { "write" };
    json["jobs"][0][side]["iops"].as_f64().unwrap_or(0.0)
}

struct Figures {
    copy_in: f64,
    copy_out: f64,
    randread: f64,
    randwrite: f64,
}

fn measure(uri: &str, image: &Path, out: &Path) -> Figures {
    let copy_in = SIZE as f64 / timed(Command::new("nbdcopy").arg(image).arg(uri)) / 1e6;
    let copy_out = SIZE as f64 / timed(Command::new("nbdcopy").arg(uri).arg(out)) / 1e6;
    Figures {
        copy_in,
        copy_out,
        randread: fio_iops(uri, "randread"),
        randwrite: fio_iops(uri, "randwrite"),
    }
}

fn start_qemu_nbd(file: &Path, port: u16) -> Child {
    let child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-t",
            "--cache=writeback",
            "--bind=127.0.0.1",
            "--export-name=raw",
        ])
        .arg(format!("--port={port}"))
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn line(name: &str, label: &str, v: f64, unit: &str, peer: f64) {
    println!(
        "{label:<44} {v:>10.0} {unit}   qemu-nbd {peer:>10.0} {unit}   ({:.0}%)",
        100.0 * v / peer
    );
    println!("BENCH {name} {v:.0} {unit}");
    println!("BENCH {name}_qemu_nbd {peer:.0} {unit}");
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("nbd bench: run with `cargo bench --bench nbd`");
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("dir");
    let image = dir.path().join("image.raw");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let data: Vec<u8> = (0..SIZE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&image, &data).expect("image");
    drop(data);

    // qemu-nbd on a raw file on the same disk.
    let raw = dir.path().join("qemu.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(SIZE))
        .expect("raw");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let mut qemu = start_qemu_nbd(&raw, port);
    let peer = measure(
        &format!("nbd://127.0.0.1:{port}/raw"),
        &image,
        &dir.path().join("q.out"),
    );
    let _ = qemu.kill();
    let _ = qemu.wait();

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ours = rt.block_on(serve_ours(dir.path(), &image, None));
    let tls_dir = dir.path().join("tls");
    blockfleet_core::tls::ensure(&tls_dir, &Role::ALL, "bench").expect("certificates");
    let tls = rt.block_on(serve_ours(dir.path(), &image, Some(&tls_dir)));

    println!(
        "1 GiB, 2 cores; host agent: XTS-encrypted, block server over loopback, all in one process"
    );
    line(
        "nbd_copy_in",
        "nbdcopy image -> export",
        ours.copy_in,
        "MB/s",
        peer.copy_in,
    );
    line(
        "nbd_copy_out",
        "nbdcopy export -> file",
        ours.copy_out,
        "MB/s",
        peer.copy_out,
    );
    line(
        "nbd_randread_4k_qd32",
        "fio nbd randread 4k qd32",
        ours.randread,
        "IOPS",
        peer.randread,
    );
    line(
        "nbd_randwrite_4k_qd32",
        "fio nbd randwrite 4k qd32",
        ours.randwrite,
        "IOPS",
        peer.randwrite,
    );
    println!("the same over mutual TLS (block protocol), beside plain TCP in this run:");
    for (name, label, t, p, unit) in [
        (
            "nbd_copy_in",
            "nbdcopy image -> export",
            tls.copy_in,
            ours.copy_in,
            "MB/s",
        ),
        (
            "nbd_copy_out",
            "nbdcopy export -> file",
            tls.copy_out,
            ours.copy_out,
            "MB/s",
        ),
        (
            "nbd_randread_4k_qd32",
            "fio nbd randread 4k qd32",
            tls.randread,
            ours.randread,
            "IOPS",
        ),
        (
            "nbd_randwrite_4k_qd32",
            "fio nbd randwrite 4k qd32",
            tls.randwrite,
            ours.randwrite,
            "IOPS",
        ),
    ] {
        println!(
            "{label:<44} {t:>10.0} {unit}   plain {p:>10.0} {unit}   ({:.0}%)",
            100.0 * t / p
        );
        println!("BENCH {name}_tls {t:.0} {unit}");
        println!("BENCH {name}_tls_ratio {:.0} %", 100.0 * t / p);
    }
}

/// The host agent over a block server of its own (mutual TLS with `tls`: certificates there),
/// all in this process; measured as qemu-nbd is.
async fn serve_ours(dir: &Path, image: &Path, tls: Option<&Path>) -> Figures {
    let name = if tls.is_some() { "tls" } else { "plain" };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let bs_addr = listener.local_addr().expect("addr").to_string();
    let config = BlockServerConfig {
        data_dir: dir.join(format!("bs-{name}")),
        token_key_file: dir.join("block-token.key"),
        tls: tls.map(|d| TlsConfig { dir: d.to_owned() }),
        ..Default::default()
    };
    // One process: it connects as the control plane (admin) and as the host agent.
    blockfleet_proto::transport::set_default(match tls {
        Some(d) => Transport::tls(d, Role::ControlPlane).expect("client certificate"),
        None => Transport::plain(),
    });
    let key = blockfleet_core::token::TokenKey::load_or_create(&config.token_key_file)
        .expect("block token key");
    tokio::spawn(run(config, listener, std::future::pending()));
    let client = Arc::new(BlockClient::connect(&bs_addr).await.expect("connect"));
    client
        .authorize_admin(&key, "bench")
        .await
        .expect("authorize");
    let v = VolumeId::generate();
    client.create_volume(&v, SIZE, false).await.expect("create");
    let xts = Arc::new(Xts::new(&XtsKey::generate()));
    let vol = Arc::new(AgentVolume::open(
        Arc::new(
            ReplicatedVolume::open(
                v.clone(),
                std::slice::from_ref(&bs_addr),
                Duration::from_secs(5),
                Some(blockfleet_proto::Grant::writer(&key, &v, "bench")),
            )
            .await
            .expect("open"),
        ),
        Some(xts),
        None,
    ));
    let nbd = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let uri = format!("nbd://{}/{v}", nbd.local_addr().expect("addr"));
    tokio::spawn(blockfleet_host_agent::run(vol, nbd, std::future::pending()));
    let (image, out) = (image.to_owned(), dir.join(format!("{name}.out")));
    tokio::task::spawn_blocking(move || measure(&uri, &image, &out))
        .await
        .expect("measure")
}
