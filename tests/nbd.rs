//! The host agent's NBD front end against real clients (qemu-img, qemu-io, nbdinfo, nbdcopy),
//! over a real block server, encrypted with a volume key: all on 127.0.0.1.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;

use blockfleet_block_server::BlockServerConfig;
use blockfleet_core::ids::VolumeId;
use blockfleet_host_agent::AgentVolume;
use blockfleet_keys::xts::{Xts, XtsKey};

use blockfleet_volume_client::ReplicatedVolume;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const SIZE: u64 = 256 << 20;

struct Rig {
    bs_addr: String,
    bs_stop: Option<oneshot::Sender<()>>,
    bs_task: Option<tokio::task::JoinHandle<()>>,
    agent_stop: Option<oneshot::Sender<()>>,
    agent_task: Option<tokio::task::JoinHandle<()>>,
    uri: String,
    volume: VolumeId,
    dir: tempfile::TempDir,
    agent: Arc<AgentVolume>,
}

async fn start_block_server(
    dir: &std::path::Path,
) -> (String, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = oneshot::channel();
    let config = BlockServerConfig {
        data_dir: dir.join("bs"),
        token_key_file: dir.join("block-token.key"),
        ..Default::default()
    };
    let task = tokio::spawn(async move {
        blockfleet_block_server::run(config, listener, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (addr, tx, task)
}

async fn start_agent(
    bs_addr: &str,
    volume: &VolumeId,
    key: &[u8],
    key_file: &std::path::Path,
) -> (
    String,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
    Arc<AgentVolume>,
) {
    let replicas = ReplicatedVolume::open(
        volume.clone(),
        &[bs_addr.to_owned()],
        std::time::Duration::from_secs(5),
        Some(common::rw_grant(key_file, volume)),
    )
    .await
    .unwrap();
    let xts = Arc::new(Xts::new(&XtsKey::from_bytes(key).unwrap()));
    let vol = Arc::new(AgentVolume::open(Arc::new(replicas), Some(xts), None));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("nbd://{}/{}", listener.local_addr().unwrap(), volume);
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(blockfleet_host_agent::run(
        Arc::clone(&vol),
        listener,
        async {
            let _ = rx.await;
        },
    ));
    (uri, tx, task, vol)
}

impl Rig {
    async fn start(key: &[u8]) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let (bs_addr, bs_stop, bs_task) = start_block_server(dir.path()).await;
        let volume = VolumeId::generate();
        common::admin_block_client(&bs_addr, &dir.path().join("block-token.key"))
            .await
            .create_volume(&volume, SIZE, false)
            .await
            .unwrap();
        let (uri, agent_stop, agent_task, agent) =
            start_agent(&bs_addr, &volume, key, &dir.path().join("block-token.key")).await;
        Rig {
            agent,
            bs_addr,
            bs_stop: Some(bs_stop),
            bs_task: Some(bs_task),
            agent_stop: Some(agent_stop),
            agent_task: Some(agent_task),
            uri,
            volume,
            dir,
        }
    }

    /// Stops the agent and the block server gracefully, starts both again on the same data.
    async fn restart(&mut self, key: &[u8]) {
        self.agent_stop.take().unwrap().send(()).unwrap();
        self.agent_task.take().unwrap().await.unwrap();
        self.bs_stop.take().unwrap().send(()).unwrap();
        self.bs_task.take().unwrap().await.unwrap();
        let (bs_addr, bs_stop, bs_task) = start_block_server(self.dir.path()).await;
        let key_file = self.dir.path().join("block-token.key");
        let (uri, agent_stop, agent_task, agent) =
            start_agent(&bs_addr, &self.volume, key, &key_file).await;
        self.agent = agent;
        (self.bs_addr, self.bs_stop, self.bs_task) = (bs_addr, Some(bs_stop), Some(bs_task));
        (self.uri, self.agent_stop, self.agent_task) = (uri, Some(agent_stop), Some(agent_task));
    }
}

/// Runs a client program; returns stdout, failing the test with its stderr on error.
async fn run(program: &str, args: Vec<String>) -> String {
    let p = program.to_owned();
    let out = tokio::task::spawn_blocking(move || Command::new(&p).args(&args).output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{program} is missing ({e}); .ci/run installs it"));
    assert!(
        out.status.success(),
        "{program} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_nbd_clients_over_an_encrypted_volume() {
    let key = XtsKey::generate().expose_secret().to_vec();
    let mut rig = Rig::start(&key).await;

    // nbdinfo: size and block sizes as advertised.
    let info: serde_json::Value =
        serde_json::from_str(&run("nbdinfo", s(&["--json", &rig.uri])).await).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], SIZE);
    assert_eq!(export["block_size_preferred"], 4096);
    assert_eq!(export["block_size_minimum"], 1);
    // qemu-img info sees the size too.
    let qinfo = run("qemu-img", s(&["info", "--output=json", &rig.uri])).await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&qinfo).unwrap()["virtual-size"],
        SIZE
    );

    // qemu-io: aligned and unaligned writes verified by pattern, neighbours untouched.
    run(
        "qemu-io",
        s(&[
            "-f",
            "raw",
            &rig.uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 513 1000",
            "-c",
            "write -P 0xef 8191 2",
            "-c",
            "read -P 0xab 0 513",
            "-c",
            "read -P 0xcd 513 1000",
            "-c",
            "read -P 0xab 1513 6678",
            "-c",
            "read -P 0xef 8191 2",
            "-c",
            "read -P 0xab 8193 1040383",
            "-c",
            "write -z 4096 4096",
            "-c",
            "read -P 0 4096 4096",
            "-c",
            "flush",
        ]),
    )
    .await;

    // nbdcopy a 256 MiB image in and out: bit-identical.
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let image: Vec<u8> = (0..SIZE / 8)
        .flat_map(|i| {
            // Every eighth unit zero, to exercise zero-looking data through the cipher.
            if (i / 512) % 8 == 7 {
                return [0u8; 8];
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let img = rig.dir.path().join("in.raw");
    std::fs::write(&img, &image).unwrap();
    run("nbdcopy", vec![img.display().to_string(), rig.uri.clone()]).await;
    let out = rig.dir.path().join("out.raw");
    run("nbdcopy", vec![rig.uri.clone(), out.display().to_string()]).await;
    assert!(
        std::fs::read(&out).unwrap() == image,
        "nbdcopy round trip differs"
    );

    // The block server holds only ciphertext: no 4 KiB unit of the image appears in its file.
    let extent = std::fs::read(
        rig.dir
            .path()
            .join("bs/volumes")
            .join(rig.volume.as_str())
            .join("data"),
    )
    .unwrap();
    let units: HashSet<&[u8]> = image
        .chunks(4096)
        .filter(|u| u.iter().any(|&b| b != 0))
        .collect();
    assert!(
        extent.chunks(4096).all(|u| !units.contains(u)),
        "plaintext unit on the block server"
    );
    assert!(
        !extent.windows(key.len()).any(|w| w == key.as_slice()),
        "key bytes on the block server"
    );

    // qemu-img convert from the export to a file and back.
    let conv = rig.dir.path().join("conv.raw");
    run(
        "qemu-img",
        vec![
            "convert".into(),
            "-f".into(),
            "raw".into(),
            "-O".into(),
            "raw".into(),
            rig.uri.clone(),
            conv.display().to_string(),
        ],
    )
    .await;
    assert!(std::fs::read(&conv).unwrap() == image);

    // Restart every process; a second agent reads the same data.
    rig.restart(&key).await;
    let again = rig.dir.path().join("again.raw");
    run(
        "nbdcopy",
        vec![rig.uri.clone(), again.display().to_string()],
    )
    .await;
    assert!(
        std::fs::read(&again).unwrap() == image,
        "data differs after restarting every process"
    );
}

/// Malformed handshakes, unknown options, oversized lengths, out-of-range requests: errors or a
/// closed connection for the sender, other clients served, nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_nbd_input() {
    let key = XtsKey::generate().expose_secret().to_vec();
    let rig = Rig::start(&key).await;
    let addr = rig
        .uri
        .trim_start_matches("nbd://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    run(
        "qemu-io",
        s(&["-f", "raw", &rig.uri, "-c", "write -P 0x5a 0 64k"]),
    )
    .await;

    async fn greet(addr: &str) -> tokio::net::TcpStream {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut hello = [0u8; 18];
        c.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        c.write_all(&3u32.to_be_bytes()).await.unwrap();
        c
    }
    async fn option(c: &mut tokio::net::TcpStream, opt: u32, data: &[u8]) -> u32 {
        let mut b = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        c.write_all(&b).await.unwrap();
        let mut h = [0u8; 20];
        c.read_exact(&mut h).await.unwrap();
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut rest = vec![0u8; len as usize];
        c.read_exact(&mut rest).await.unwrap();
        u32::from_be_bytes(h[12..16].try_into().unwrap())
    }
    // Unknown option, malformed GO, unknown export: error replies, the session goes on.
    let mut c = greet(&addr).await;
    assert_eq!(option(&mut c, 99, b"").await, (1 << 31) + 1);
    assert_eq!(option(&mut c, 7, &[0, 0, 0, 9, b'x']).await, (1 << 31) + 3);
    let name = b"vol-ffffffffffffffff0";
    let mut go = (name.len() as u32).to_be_bytes().to_vec();
    go.extend_from_slice(name);
    go.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(option(&mut c, 7, &go).await, (1 << 31) + 6);
    assert_eq!(
        option(&mut c, 3, b"").await,
        2,
        "LIST answers with the export"
    );

    // An oversized option length closes the connection.
    let mut c2 = greet(&addr).await;
    let mut b = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c2.write_all(&b).await.unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        c2.read(&mut buf).await.unwrap_or(0),
        0,
        "connection should close"
    );

    // Transmission: out-of-range read and write get errors; a garbage header closes.
    let mut t = greet(&addr).await;
    let mut export = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
    export.extend_from_slice(&1u32.to_be_bytes());
    export.extend_from_slice(&0u32.to_be_bytes());
    t.write_all(&export).await.unwrap();
    let mut ex = [0u8; 10];
    t.read_exact(&mut ex).await.unwrap();
    assert_eq!(u64::from_be_bytes(ex[..8].try_into().unwrap()), SIZE);
    let request = |kind: u16, offset: u64, len: u32| {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&7u64.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r
    };
    for (kind, offset, len) in [
        (0u16, SIZE, 4096u32),
        (0, u64::MAX - 10, 4096),
        (6, SIZE - 10, 4096),
        (42, 0, 1),
    ] {
        t.write_all(&request(kind, offset, len)).await.unwrap();
        let mut rep = [0u8; 16];
        t.read_exact(&mut rep).await.unwrap();
        assert_ne!(
            u32::from_be_bytes(rep[4..8].try_into().unwrap()),
            0,
            "kind {kind} offset {offset} accepted"
        );
    }
    let mut oversized = request(1, 0, u32::MAX);
    oversized.extend_from_slice(&[0u8; 16]);
    t.write_all(&oversized).await.unwrap();
    assert_eq!(
        t.read(&mut buf).await.unwrap_or(0),
        0,
        "connection should close"
    );

    // Others are still served, and nothing was written.
    run(
        "qemu-io",
        s(&[
            "-f",
            "raw",
            &rig.uri,
            "-c",
            "read -P 0x5a 0 64k",
            "-c",
            "read -P 0 64k 4k",
        ]),
    )
    .await;
}
