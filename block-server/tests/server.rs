//! The block server over real TCP on 127.0.0.1, started in-process with `run`, driven by the
//! client library (and by raw bytes where the test is about bad input).

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use std::sync::Arc;
use std::time::Duration;

use blockfleet_block_server::{run, BlockServerConfig, Store};
use blockfleet_core::ids::VolumeId;
use blockfleet_core::token::TokenKey;
use blockfleet_core::units::{CHUNK, SECTOR};
use blockfleet_proto::{BlockClient, ErrorCode, Request, Response};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

struct Server {
    addr: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
    config: BlockServerConfig,
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config = BlockServerConfig {
            data_dir: dir.path().join("bs"),
            ..Default::default()
        };
        let mut s = Server::start_with(config).await;
        s._dir = Some(dir);
        s
    }

    async fn start_with(mut config: BlockServerConfig) -> Server {
        // The key file beside the data directory (in the test's temporary directory).
        config.token_key_file = config.data_dir.with_file_name("block-token.key");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = oneshot::channel();
        let c = config.clone();
        let task = tokio::spawn(async move {
            run(c, listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Server {
            addr,
            stop: Some(tx),
            task: Some(task),
            _dir: None,
            config,
        }
    }

    /// A client holding an admin capability (as the control plane's connections do).
    async fn client(&self) -> BlockClient {
        let c = self.plain_client().await;
        c.authorize_admin(&self.key(), "test-admin").await.unwrap();
        c
    }

    /// A client that presented no capability.
    async fn plain_client(&self) -> BlockClient {
        BlockClient::connect(&self.addr).await.unwrap()
    }

    fn key(&self) -> TokenKey {
        TokenKey::load_or_create(&self.config.token_key_file).unwrap()
    }

    /// Graceful stop, then start again on the same data directory.
    async fn restart(mut self) -> Server {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.take().unwrap().await.unwrap();
        let mut s = Server::start_with(self.config.clone()).await;
        s._dir = self._dir.take();
        s
    }
}

fn pattern(unit: u64, tag: u8) -> Vec<u8> {
    let mut v = vec![tag; SECTOR as usize];
    v[..8].copy_from_slice(&unit.to_le_bytes());
    v
}

fn vol() -> VolumeId {
    VolumeId::generate()
}

#[tokio::test]
async fn read_write_flush_and_bad_input() {
    let s = Server::start().await;
    let c = s.client().await;
    let v = vol();
    c.create_volume(&v, 4 * CHUNK, false).await.unwrap();
    let data = Bytes::from(pattern(3, 0xaa));
    c.write(&v, 3 * SECTOR, data.clone(), false).await.unwrap();
    c.flush(&v).await.unwrap();
    assert_eq!(c.read(&v, 3 * SECTOR, SECTOR as u32).await.unwrap(), data);
    // Never-written space reads as zeros.
    assert_eq!(
        c.read(&v, CHUNK, SECTOR as u32).await.unwrap(),
        vec![0u8; SECTOR as usize]
    );
    let stat = c.stat_volume(&v).await.unwrap();
    assert_eq!(
        (stat.size, stat.paused, stat.open_mark),
        (4 * CHUNK, false, 0)
    );

    let bad = |r: Result<(), blockfleet_proto::ClientError>| r.unwrap_err().code().unwrap();
    let junk = Bytes::from(vec![0x55u8; SECTOR as usize]);
    assert_eq!(
        bad(c.write(&v, 3 * SECTOR + 512, junk.clone(), false).await),
        ErrorCode::Unaligned
    );
    assert_eq!(
        bad(c
            .write(&v, 3 * SECTOR, Bytes::from(vec![1u8; 100]), false)
            .await),
        ErrorCode::Unaligned
    );
    assert_eq!(
        bad(c.write(&v, 4 * CHUNK, junk.clone(), true).await),
        ErrorCode::OutOfRange
    );
    assert_eq!(
        bad(c.write(&v, u64::MAX - SECTOR + 1, junk.clone(), true).await),
        ErrorCode::OutOfRange
    );
    assert_eq!(
        bad(c.write(&v, 0, Bytes::new(), false).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        c.read(&v, 4 * CHUNK - SECTOR, 2 * SECTOR as u32)
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::OutOfRange)
    );
    assert_eq!(
        bad(c.write(&vol(), 0, junk.clone(), false).await),
        ErrorCode::NoSuchVolume
    );
    assert_eq!(
        bad(c.create_volume(&v, CHUNK, false).await),
        ErrorCode::VolumeExists
    );
    assert_eq!(
        bad(c.create_volume(&vol(), CHUNK + SECTOR, false).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        bad(c.create_volume(&vol(), 0, false).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        c.write_if_unwritten(&v, 0, Bytes::from(vec![0u8; CHUNK as usize]))
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::BadRequest)
    );
    assert_eq!(
        c.chunk_state(&v, 4).await.unwrap_err().code(),
        Some(ErrorCode::OutOfRange)
    );
    // Nothing the refused requests carried reached the disk.
    assert_eq!(c.read(&v, 3 * SECTOR, SECTOR as u32).await.unwrap(), data);
    assert_eq!(c.chunk_state(&v, 0).await.unwrap().generation, 1);

    c.delete_volume(&v).await.unwrap();
    assert_eq!(
        c.read(&v, 0, SECTOR as u32).await.unwrap_err().code(),
        Some(ErrorCode::NoSuchVolume)
    );
}

#[tokio::test]
async fn unhydrated_reads_are_refused_and_progress_is_listed() {
    let s = Server::start().await;
    let c = s.client().await;
    let v = vol();
    c.create_volume(&v, 4 * CHUNK, true).await.unwrap();
    assert_eq!(c.stat_volume(&v).await.unwrap().unhydrated, 4);
    assert_eq!(
        c.unhydrated_chunks(&v, 0, 100).await.unwrap(),
        vec![0, 1, 2, 3]
    );
    // Unhydrated and not written by the user: the server does not hold the data yet.
    let e = c.read(&v, CHUNK, 4096).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotHydrated));
    // Units the user wrote read back even before hydration; the rest of the chunk does not.
    c.write(&v, CHUNK + SECTOR, Bytes::from(pattern(129, 1)), false)
        .await
        .unwrap();
    assert_eq!(
        c.read(&v, CHUNK + SECTOR, SECTOR as u32).await.unwrap(),
        pattern(129, 1)
    );
    assert_eq!(
        c.read(&v, CHUNK, 2 * SECTOR as u32)
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::NotHydrated)
    );
    // An empty hydration is a zero chunk: holes, and the user's unit kept.
    assert_eq!(
        c.write_if_unwritten(&v, 1, Bytes::new()).await.unwrap(),
        1 << 1
    );
    let chunk = c.read(&v, CHUNK, CHUNK as u32).await.unwrap();
    assert_eq!(
        &chunk[SECTOR as usize..2 * SECTOR as usize],
        &pattern(129, 1)[..]
    );
    assert!(chunk[..SECTOR as usize].iter().all(|&b| b == 0));
    assert!(chunk[2 * SECTOR as usize..].iter().all(|&b| b == 0));
    // A short payload is refused and changes nothing.
    assert_eq!(
        c.write_if_unwritten(&v, 2, Bytes::from(vec![1u8; 100]))
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::BadRequest)
    );
    assert_eq!(
        c.unhydrated_chunks(&v, 0, 100).await.unwrap(),
        vec![0, 2, 3]
    );
    assert_eq!(c.unhydrated_chunks(&v, 1, 1).await.unwrap(), vec![2]);
    assert_eq!(c.stat_volume(&v).await.unwrap().unhydrated, 3);
    // A volume that is not hydrating has nothing to hydrate and refuses no read.
    let plain = VolumeId::generate();
    c.create_volume(&plain, CHUNK, false).await.unwrap();
    assert!(c.unhydrated_chunks(&plain, 0, 10).await.unwrap().is_empty());
    assert_eq!(c.read(&plain, 0, 4096).await.unwrap(), vec![0u8; 4096]);
}

#[tokio::test]
async fn pipelined_requests_on_one_connection() {
    let s = Server::start().await;
    let c = Arc::new(s.client().await);
    let v = vol();
    c.create_volume(&v, 8 * CHUNK, false).await.unwrap();
    let units = 8 * CHUNK / SECTOR;
    let writes = (0..units).map(|u| {
        let (c, v) = (Arc::clone(&c), v.clone());
        async move {
            c.write(&v, u * SECTOR, Bytes::from(pattern(u, 7)), u % 17 == 0)
                .await
        }
    });
    futures::future::try_join_all(writes).await.unwrap();
    let reads = (0..units).map(|u| {
        let (c, v) = (Arc::clone(&c), v.clone());
        async move { (u, c.read(&v, u * SECTOR, SECTOR as u32).await.unwrap()) }
    });
    for (u, data) in futures::future::join_all(reads).await {
        assert_eq!(data, pattern(u, 7), "unit {u}");
    }
}

#[tokio::test]
async fn flushed_data_and_chunk_state_survive_restart() {
    let s = Server::start().await;
    let v = vol();
    {
        let c = s.client().await;
        c.create_volume(&v, 2 * CHUNK, true).await.unwrap();
        c.write(&v, CHUNK + 5 * SECTOR, Bytes::from(pattern(5, 9)), true)
            .await
            .unwrap();
    }
    let s = s.restart().await;
    let c = s.client().await;
    assert_eq!(
        c.read(&v, CHUNK + 5 * SECTOR, SECTOR as u32).await.unwrap(),
        pattern(5, 9)
    );
    let st = c.chunk_state(&v, 1).await.unwrap();
    assert_eq!(
        (st.hydrated, st.user_written, st.generation),
        (false, 1 << 5, 1)
    );
    // After a clean restart, change lists are exact.
    assert_eq!(c.list_changed_chunks(&v, 0, 0).await.unwrap(), vec![1]);
}

#[tokio::test]
async fn write_if_unwritten_never_overwrites_user_writes() {
    let s = Server::start().await;
    let c = Arc::new(s.client().await);
    let v = vol();
    c.create_volume(&v, 4 * CHUNK, true).await.unwrap();
    let source = |chunk: u64| Bytes::from(vec![0xe0 | chunk as u8; CHUNK as usize]);

    c.write(&v, 3 * SECTOR, Bytes::from(pattern(3, 1)), false)
        .await
        .unwrap();
    c.write(
        &v,
        100 * SECTOR,
        Bytes::from([pattern(100, 1), pattern(101, 1)].concat()),
        false,
    )
    .await
    .unwrap();
    let skipped = c.write_if_unwritten(&v, 0, source(0)).await.unwrap();
    assert_eq!(skipped, 1 << 3 | 1 << 100 | 1 << 101);
    let chunk = c.read(&v, 0, CHUNK as u32).await.unwrap();
    for u in 0..128u64 {
        let got = &chunk[(u * SECTOR) as usize..((u + 1) * SECTOR) as usize];
        if [3, 100, 101].contains(&u) {
            assert_eq!(got, pattern(u, 1), "user unit {u} overwritten");
        } else {
            assert!(got.iter().all(|&b| b == 0xe0), "unit {u} not hydrated");
        }
    }
    assert!(c.chunk_state(&v, 0).await.unwrap().hydrated);
    // Hydrating again writes nothing.
    assert_eq!(
        c.write_if_unwritten(&v, 0, source(9)).await.unwrap(),
        u128::MAX
    );
    assert_eq!(c.read(&v, 0, CHUNK as u32).await.unwrap(), chunk);

    // Racing user writes against hydration of the other chunks: every acknowledged user write wins.
    let writers = (0..64u64).map(|i| {
        let (c, v) = (Arc::clone(&c), v.clone());
        async move {
            let u = CHUNK / SECTOR + (i * 37) % (3 * CHUNK / SECTOR);
            c.write(&v, u * SECTOR, Bytes::from(pattern(u, 2)), false)
                .await
                .unwrap();
            u
        }
    });
    let hydrate = (1..4u64).map(|chunk| {
        let (c, v) = (Arc::clone(&c), v.clone());
        async move {
            c.write_if_unwritten(&v, chunk, source(chunk))
                .await
                .unwrap()
        }
    });
    let (written, _) = futures::future::join(
        futures::future::join_all(writers),
        futures::future::join_all(hydrate),
    )
    .await;
    for u in written {
        assert_eq!(
            c.read(&v, u * SECTOR, SECTOR as u32).await.unwrap(),
            pattern(u, 2),
            "unit {u}"
        );
    }
}

#[tokio::test]
async fn marks_give_exact_point_in_time_reads_under_concurrent_writes() {
    let s = Server::start().await;
    let c = Arc::new(s.client().await);
    let v = vol();
    let chunks = 6u64;
    c.create_volume(&v, chunks * CHUNK, false).await.unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let (c, v, stop) = (Arc::clone(&c), v.clone(), Arc::clone(&stop));
        writers.push(tokio::spawn(async move {
            let mut tag = 0u8;
            let mut x = w * 7919 + 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (x >> 33) % (chunks * CHUNK / SECTOR);
                tag = tag.wrapping_add(1);
                c.write(&v, u * SECTOR, Bytes::from(pattern(u, tag)), false)
                    .await
                    .unwrap();
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.pause(&v).await.unwrap();
    // Paused: no write is acknowledged, so what is on the volume now is the cut.
    let cut = c.read(&v, 0, (chunks * CHUNK) as u32).await.unwrap();
    let mark = c.mark(&v, 0).await.unwrap();
    c.resume(&v).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let now = c.read(&v, 0, (chunks * CHUNK) as u32).await.unwrap();
    assert_ne!(
        now, cut,
        "the writers changed nothing after the mark: the test proves nothing"
    );
    for chunk in 0..chunks {
        let (_, data) = c.read_mark(&v, mark, chunk).await.unwrap();
        let range = (chunk * CHUNK) as usize..((chunk + 1) * CHUNK) as usize;
        assert!(data == cut[range], "chunk {chunk} differs from the cut");
    }
    c.release_mark(&v, mark).await.unwrap();
    assert_eq!(
        c.read_mark(&v, mark, 0).await.unwrap_err().code(),
        Some(ErrorCode::NoSuchMark)
    );
    assert_eq!(
        c.release_mark(&v, mark).await.unwrap_err().code(),
        Some(ErrorCode::NoSuchMark)
    );
    assert_eq!(
        c.resume(&v).await.unwrap_err().code(),
        Some(ErrorCode::NotPaused)
    );

    // MarkResume: a cut and a resume in one request; writes go on at once.
    c.pause(&v).await.unwrap();
    let cut = c.read(&v, 0, (chunks * CHUNK) as u32).await.unwrap();
    let m2 = c.mark_resume(&v, 0).await.unwrap();
    assert!(m2 > mark);
    c.write(&v, 0, Bytes::from(pattern(0, 99)), true)
        .await
        .unwrap();
    let (_, first) = c.read_mark(&v, m2, 0).await.unwrap();
    assert!(first == cut[..CHUNK as usize], "the write reached the cut");
    // With every mark slot taken, the mark fails but the volume is resumed anyway.
    let mut extra = Vec::new();
    for _ in 1..blockfleet_block_server::volume::MAX_MARKS {
        extra.push(c.mark(&v, 0).await.unwrap());
    }
    c.pause(&v).await.unwrap();
    assert_eq!(
        c.mark_resume(&v, 0).await.unwrap_err().code(),
        Some(ErrorCode::MarkOpen)
    );
    assert_eq!(
        c.resume(&v).await.unwrap_err().code(),
        Some(ErrorCode::NotPaused)
    );
    for m in extra {
        c.release_mark(&v, m).await.unwrap();
    }
    c.release_mark(&v, m2).await.unwrap();
}

#[tokio::test]
async fn several_open_marks_each_keep_their_cut() {
    let s = Server::start().await;
    let c = s.client().await;
    let v = vol();
    c.create_volume(&v, 4 * CHUNK, false).await.unwrap();
    let write = |u: u64, tag: u8| c.write(&v, u * SECTOR, Bytes::from(pattern(u, tag)), false);
    write(0, 1).await.unwrap();
    let m1 = c.mark(&v, 0).await.unwrap();
    let at1 = c.read(&v, 0, (4 * CHUNK) as u32).await.unwrap();
    write(0, 2).await.unwrap();
    write(200, 2).await.unwrap();
    let m2 = c.mark(&v, 0).await.unwrap();
    let at2 = c.read(&v, 0, (4 * CHUNK) as u32).await.unwrap();
    write(0, 3).await.unwrap();
    write(200, 3).await.unwrap();
    write(300, 3).await.unwrap();
    let now = c.read(&v, 0, (4 * CHUNK) as u32).await.unwrap();
    assert_ne!(now, at2);
    for (m, at) in [(m1, &at1), (m2, &at2)] {
        for chunk in 0..4u64 {
            let (_, data) = c.read_mark(&v, m, chunk).await.unwrap();
            let r = (chunk * CHUNK) as usize..((chunk + 1) * CHUNK) as usize;
            assert!(data == at[r], "mark {m} chunk {chunk} is not its cut");
        }
    }
    assert_eq!(c.list_changed_chunks(&v, m1, m2).await.unwrap(), vec![0, 1]);
    // Releasing the older keeps the newer whole.
    c.release_mark(&v, m1).await.unwrap();
    write(300, 4).await.unwrap();
    for chunk in 0..4u64 {
        let (_, data) = c.read_mark(&v, m2, chunk).await.unwrap();
        let r = (chunk * CHUNK) as usize..((chunk + 1) * CHUNK) as usize;
        assert!(data == at2[r], "mark {m2} chunk {chunk} changed");
    }
    c.release_mark(&v, m2).await.unwrap();
}

#[tokio::test]
async fn changed_chunk_lists() {
    let s = Server::start().await;
    let c = s.client().await;
    let v = vol();
    c.create_volume(&v, 8 * CHUNK, false).await.unwrap();
    let w = |chunk: u64| c.write(&v, chunk * CHUNK, Bytes::from(pattern(chunk, 1)), false);
    w(1).await.unwrap();
    w(2).await.unwrap();
    let m1 = c.mark(&v, 0).await.unwrap();
    c.release_mark(&v, m1).await.unwrap();
    w(3).await.unwrap();
    let m2 = c.mark(&v, 0).await.unwrap();
    w(4).await.unwrap();
    w(3).await.unwrap(); // rewritten after m2: still changed between m1 and m2
    assert_eq!(c.list_changed_chunks(&v, m1, m2).await.unwrap(), vec![3]);
    assert_eq!(c.list_changed_chunks(&v, m1, 0).await.unwrap(), vec![3, 4]);
    assert_eq!(c.list_changed_chunks(&v, m2, 0).await.unwrap(), vec![3, 4]);
    assert_eq!(
        c.list_changed_chunks(&v, 0, 0).await.unwrap(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        c.list_changed_chunks(&v, 0, m2).await.unwrap(),
        vec![1, 2, 3]
    );
    assert_eq!(
        c.list_changed_chunks(&v, m2 + 1, 0)
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::NoSuchMark)
    );
    assert_eq!(
        c.list_changed_chunks(&v, m1, m1).await.unwrap_err().code(),
        Some(ErrorCode::NoSuchMark)
    );
}

#[tokio::test]
async fn a_pause_not_resumed_in_time_resumes_and_drops_its_mark() {
    let dir = tempfile::tempdir().unwrap();
    let config = BlockServerConfig {
        data_dir: dir.path().join("bs"),
        pause_timeout_ms: 200,
        ..Default::default()
    };
    let s = Server::start_with(config).await;
    let c = Arc::new(s.client().await);
    let v = vol();
    c.create_volume(&v, CHUNK, false).await.unwrap();
    c.pause(&v).await.unwrap();
    assert_eq!(
        c.pause(&v).await.unwrap_err().code(),
        Some(ErrorCode::AlreadyPaused)
    );
    let mark = c.mark(&v, 0).await.unwrap();
    // A write issued while paused is held back, then goes through when the pause times out.
    let started = std::time::Instant::now();
    c.write(&v, 0, Bytes::from(pattern(0, 3)), true)
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "write was not held back"
    );
    let stat = c.stat_volume(&v).await.unwrap();
    assert!(!stat.paused);
    assert_eq!(stat.open_mark, 0);
    assert_eq!(
        c.read_mark(&v, mark, 0).await.unwrap_err().code(),
        Some(ErrorCode::NoSuchMark)
    );
}

#[tokio::test]
async fn group_commit_shares_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let config = BlockServerConfig {
        data_dir: dir.path().join("bs"),
        ..Default::default()
    };
    let store = Arc::new(Store::open(&config).unwrap());
    let v = vol();
    store
        .handle(Request::CreateVolume {
            volume: v.clone(),
            size: 4 * CHUNK,
            hydrating: false,
        })
        .await
        .unwrap();
    let ops = (0..64u64).map(|u| {
        let (store, v) = (Arc::clone(&store), v.clone());
        async move {
            let data = Bytes::from(pattern(u, 4));
            store
                .handle(Request::Write {
                    volume: v.clone(),
                    offset: u * SECTOR,
                    fua: true,
                    data,
                })
                .await
                .unwrap();
        }
    });
    futures::future::join_all(ops).await;
    let flushes = store
        .metrics
        .flushes
        .load(std::sync::atomic::Ordering::Relaxed);
    let fsyncs = store
        .metrics
        .fsyncs
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(flushes, 64);
    assert!(
        fsyncs < flushes / 2,
        "{fsyncs} fsyncs for {flushes} concurrent flushes"
    );
    let r = store
        .handle(Request::Read {
            volume: v,
            offset: 0,
            len: SECTOR as u32,
        })
        .await
        .unwrap();
    assert_eq!(r, Response::Data(Bytes::from(pattern(0, 4))));
}

/// Garbage, bad handshakes, oversized and malformed frames: errors or closed connections for
/// the sender, nothing changed on disk, and other clients served throughout.
#[tokio::test]
async fn random_bytes_do_not_disturb_the_server() {
    let s = Server::start().await;
    let good = s.client().await;
    let v = vol();
    good.create_volume(&v, CHUNK, false).await.unwrap();
    good.write(&v, 0, Bytes::from(pattern(0, 5)), true)
        .await
        .unwrap();
    let before = good.read(&v, 0, CHUNK as u32).await.unwrap();

    let mut x: u64 = 0x2545F4914F6CDD1D;
    let mut rnd = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let hello = blockfleet_proto::wire::encode_hello(blockfleet_proto::PROTOCOL_VERSION);
    let mut cases: Vec<Vec<u8>> = (0..30).map(|i| rnd(1 + i * 37)).collect();
    cases.push(blockfleet_proto::wire::encode_hello(99).to_vec()); // wrong version
    cases.push(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec());
    cases.push([hello.to_vec(), vec![0xff, 0xff, 0xff, 0x7f]].concat()); // oversized frame
    for i in 0..30 {
        // A valid hello, then random frames with a sane length prefix.
        let body = rnd(9 + i * 13);
        let mut f = hello.to_vec();
        f.extend_from_slice(&(body.len() as u32).to_le_bytes());
        f.extend_from_slice(&body);
        cases.push(f);
    }
    for case in cases {
        let mut raw = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
        let _ = raw.write_all(&case).await;
        let _ = raw.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), raw.read_to_end(&mut sink)).await;
    }
    // A well-formed frame with an unknown opcode gets a typed error reply.
    let mut raw = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
    raw.write_all(&hello).await.unwrap();
    let mut buf = [0u8; 14];
    raw.read_exact(&mut buf).await.unwrap();
    let mut frame = Request::Flush { volume: v.clone() }.encode(77).to_vec();
    frame[12] = 200;
    raw.write_all(&frame).await.unwrap();
    let len = raw.read_u32_le().await.unwrap() as usize;
    let mut body = vec![0u8; len];
    raw.read_exact(&mut body).await.unwrap();
    let (id, result) = blockfleet_proto::wire::decode_response(&body).unwrap();
    assert_eq!(id, 77);
    assert_eq!(result.unwrap_err().0, ErrorCode::UnknownOpcode);

    assert_eq!(good.read(&v, 0, CHUNK as u32).await.unwrap(), before);
    let fresh = s.client().await;
    assert_eq!(fresh.read(&v, 0, CHUNK as u32).await.unwrap(), before);
}

#[tokio::test]
async fn metrics_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = BlockServerConfig {
        data_dir: dir.path().join("bs"),
        metrics_listen: Some(format!("127.0.0.1:{port}")),
        ..Default::default()
    };
    let s = Server::start_with(config).await;
    let c = s.client().await;
    let v = vol();
    c.create_volume(&v, CHUNK, false).await.unwrap();
    c.write(&v, 0, Bytes::from(pattern(0, 1)), true)
        .await
        .unwrap();
    let _ = c.read(&v, CHUNK, SECTOR as u32).await; // out of range: an error
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    raw.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    raw.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for want in [
        "blockfleet_bs_requests_total{op=\"write\"} 1",
        "blockfleet_bs_request_errors_total{op=\"read\"} 1",
        "blockfleet_bs_written_bytes_total 4096",
        "blockfleet_bs_request_seconds_count{op=\"write\"} 1",
        "blockfleet_bs_volumes 1",
    ] {
        assert!(text.contains(want), "missing {want}");
    }
    assert!(
        !text.contains("blockfleet_bs_fsyncs_total 0\n"),
        "a FUA write made no fsync"
    );
}

/// The replication ops: versions count writes (hydration sets `hydrated`), a reset forgets
/// chunks durably while open marks keep their view, PutChunk sets a chunk as another replica
/// has it (refused on a version mismatch), mark ids chosen by the client must increase; bad
/// input changes nothing.
#[tokio::test]
async fn versions_reset_put_chunk_and_mark_ids() {
    let s = Server::start().await;
    let v = vol();
    let c = s.client().await;
    c.create_volume(&v, 4 * CHUNK, true).await.unwrap();
    c.write(&v, 0, Bytes::from(pattern(0, 1)), false)
        .await
        .unwrap();
    c.write(&v, SECTOR, Bytes::from(pattern(1, 2)), false)
        .await
        .unwrap();
    c.write_if_unwritten(&v, 1, Bytes::from(vec![7u8; CHUNK as usize]))
        .await
        .unwrap();
    // Chunk 0: two writes; chunk 1: hydrated only; 2 and 3: nothing.
    assert_eq!(
        c.chunk_versions(&v, 0, 0, 100).await.unwrap(),
        vec![4, 1, 0, 0]
    );
    assert_eq!(c.chunk_versions(&v, 0, 3, 100).await.unwrap(), vec![0]);
    assert!(c.chunk_versions(&v, 0, 9, 100).await.unwrap().is_empty());

    // Mark ids: the client's, increasing.
    assert_eq!(c.mark(&v, 1000).await.unwrap(), 1000);
    let e = c.mark(&v, 1000).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
    assert_eq!(c.mark(&v, 0).await.unwrap(), 1001);

    // A reset forgets chunk 0 (durably) but mark 1000 still reads it as it was.
    c.reset_chunks(&v, vec![0]).await.unwrap();
    assert_eq!(c.chunk_versions(&v, 0, 0, 2).await.unwrap(), vec![0, 1]);
    assert_eq!(c.chunk_versions(&v, 1000, 0, 2).await.unwrap(), vec![4, 1]);
    let (info, data) = c.read_mark(&v, 1000, 0).await.unwrap();
    assert_eq!(info.generation, 2);
    assert_eq!(&data[..SECTOR as usize], &pattern(0, 1)[..]);

    // PutChunk: as another replica has it; with `expect`, only at that version.
    let theirs = blockfleet_proto::ChunkInfo {
        hydrated: true,
        user_written: 0,
        generation: 9,
        last_epoch: 1001,
    };
    let body = Bytes::from(vec![3u8; CHUNK as usize]);
    let e = c
        .put_chunk(&v, 0, 5, theirs, body.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::VersionMismatch), "{e}");
    c.put_chunk(&v, 0, 0, theirs, body.clone()).await.unwrap();
    let (info, data) = c.read_mark(&v, 0, 0).await.unwrap();
    assert_eq!(
        (info.generation, info.hydrated, info.last_epoch),
        (9, true, 1001)
    );
    assert!(data.iter().all(|&b| b == 3));
    assert_eq!(c.chunk_versions(&v, 0, 0, 1).await.unwrap(), vec![19]);
    // Mark 1000 still sees the old chunk 0.
    assert_eq!(c.read_mark(&v, 1000, 0).await.unwrap().0.generation, 2);

    // Bad input: nothing changes.
    let e = c
        .put_chunk(&v, 1, u64::MAX, theirs, Bytes::from(vec![1u8; 100]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
    let e = c
        .put_chunk(&v, 4, u64::MAX, theirs, body.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::OutOfRange), "{e}");
    let e = c.reset_chunks(&v, vec![1, 4]).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::OutOfRange), "{e}");
    let e = c.chunk_versions(&v, 77, 0, 1).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NoSuchMark), "{e}");
    assert_eq!(
        c.chunk_versions(&v, 0, 0, 4).await.unwrap(),
        vec![19, 1, 0, 0]
    );

    // The reset and the put survive a restart.
    drop(c);
    let s = s.restart().await;
    let c = s.client().await;
    assert_eq!(
        c.chunk_versions(&v, 0, 0, 4).await.unwrap(),
        vec![19, 1, 0, 0]
    );
    c.reset_chunks(&v, vec![1]).await.unwrap();
    let s = s.restart().await;
    let c = s.client().await;
    assert_eq!(
        c.chunk_versions(&v, 0, 0, 4).await.unwrap(),
        vec![19, 0, 0, 0]
    );
}

/// ChunkDigest hashes a chunk's data as stored; AdoptChunk takes another replica's state only
/// for the same data, refuses other data without changing anything, and what it took
/// survives a restart once flushed.
#[tokio::test]
async fn chunk_digests_and_adopting_a_state() {
    use sha2::{Digest, Sha256};
    let s = Server::start().await;
    let (a, b) = (vol(), vol());
    let c = s.client().await;
    for v in [&a, &b] {
        c.create_volume(v, 2 * CHUNK, false).await.unwrap();
        c.write(v, 0, Bytes::from(pattern(0, 5)), false)
            .await
            .unwrap();
    }
    // A second write of the same data: a is at a higher version, with the same bytes.
    c.write(&a, 0, Bytes::from(pattern(0, 5)), false)
        .await
        .unwrap();
    let (ia, da) = c.chunk_digest(&a, 0).await.unwrap();
    let (ib, db) = c.chunk_digest(&b, 0).await.unwrap();
    let mut want = pattern(0, 5);
    want.resize(CHUNK as usize, 0);
    assert_eq!(da, <[u8; 32]>::from(Sha256::digest(&want)));
    assert_eq!(da, db, "same data, same digest");
    assert_eq!((ia.generation, ib.generation), (2, 1));
    // Chunk 1 is a hole on both: the digest of zeros.
    let (_, zero) = c.chunk_digest(&a, 1).await.unwrap();
    assert_eq!(
        zero,
        <[u8; 32]>::from(Sha256::digest(vec![0u8; CHUNK as usize]))
    );

    // Other data: refused, nothing changes.
    let e = c.adopt_chunk(&b, 1, da, ia).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::VersionMismatch), "{e}");
    assert_eq!(c.chunk_versions(&b, 0, 0, 2).await.unwrap(), vec![2, 0]);
    let e = c.adopt_chunk(&b, 2, da, ia).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::OutOfRange), "{e}");

    // Same data: b takes a's state, durable with the next flush.
    c.adopt_chunk(&b, 0, da, ia).await.unwrap();
    assert_eq!(c.chunk_state(&b, 0).await.unwrap(), ia);
    c.flush(&b).await.unwrap();
    drop(c);
    let s = s.restart().await;
    let c = s.client().await;
    assert_eq!(c.chunk_state(&b, 0).await.unwrap(), ia);
    assert_eq!(c.chunk_digest(&b, 0).await.unwrap().1, da);
}

/// Every request on a volume needs a capability the control plane issued under the server's
/// key, for that volume (or all) with the right the request takes: without one, with a forged
/// one, one for another holder, volume or rights, or an expired one, it is refused and changes
/// nothing.
#[tokio::test]
async fn requests_need_a_capability_for_their_volume_and_right() {
    use blockfleet_proto::wire::rights::{ADMIN, READ, WRITE};
    use blockfleet_proto::Grant;
    let s = Server::start().await;
    let admin = s.client().await;
    let (v, other) = (vol(), VolumeId::generate());
    admin.create_volume(&v, 2 * CHUNK, false).await.unwrap();
    admin.create_volume(&other, CHUNK, false).await.unwrap();
    let unit = || Bytes::from(vec![5u8; SECTOR as usize]);
    let denied = |r: Result<(), blockfleet_proto::ClientError>| {
        assert_eq!(r.unwrap_err().code(), Some(ErrorCode::AccessDenied));
    };
    let c = s.plain_client().await;
    denied(c.create_volume(&vol(), CHUNK, false).await);
    denied(c.delete_volume(&v).await);
    denied(c.pause(&v).await);
    denied(c.write(&v, 0, unit(), false).await);
    denied(c.flush(&v).await);
    assert_eq!(
        c.read(&v, 0, 4096).await.unwrap_err().code(),
        Some(ErrorCode::AccessDenied)
    );
    assert_eq!(
        c.stat_volume(&v).await.unwrap_err().code(),
        Some(ErrorCode::AccessDenied)
    );
    assert_eq!(
        c.mark(&v, 0).await.unwrap_err().code(),
        Some(ErrorCode::AccessDenied)
    );
    // Forged (another key), another holder, other rights, expired: refused.
    let key = s.key();
    let ttl = Duration::from_secs(60);
    let forged = TokenKey::from_bytes([3; 32]);
    denied(
        c.authorize(&Grant::issue(&forged, Some(&v), READ, "mallory", ttl))
            .await,
    );
    let mut stolen = Grant::issue(&key, Some(&v), READ, "host-a", ttl);
    stolen.holder = "mallory".into();
    denied(c.authorize(&stolen).await);
    let mut widened = Grant::issue(&key, Some(&v), READ, "host-a", ttl);
    widened.rights = READ | WRITE;
    denied(c.authorize(&widened).await);
    let mut moved = Grant::issue(&key, Some(&v), READ, "host-a", ttl);
    moved.volume = Some(other.clone());
    denied(c.authorize(&moved).await);
    let mut everywhere = Grant::issue(&key, Some(&v), READ, "host-a", ttl);
    everywhere.volume = None;
    denied(c.authorize(&everywhere).await);
    let expired = Grant {
        token: key.issue(
            blockfleet_proto::wire::CAPABILITY,
            &blockfleet_proto::wire::capability_subject(Some(&v), READ, "host-a"),
            std::time::SystemTime::now() - Duration::from_secs(3600),
            ttl,
        ),
        ..Grant::issue(&key, Some(&v), READ, "host-a", ttl)
    };
    denied(c.authorize(&expired).await);
    assert_eq!(
        c.read(&v, 0, 4096).await.unwrap_err().code(),
        Some(ErrorCode::AccessDenied)
    );
    // Read on v: reads v, writes nothing, reaches no other volume.
    c.authorize(&Grant::issue(&key, Some(&v), READ, "host-a", ttl))
        .await
        .unwrap();
    assert_eq!(c.read(&v, 0, 4096).await.unwrap().len(), 4096);
    denied(c.write(&v, 0, unit(), false).await);
    assert_eq!(
        c.read(&other, 0, 4096).await.unwrap_err().code(),
        Some(ErrorCode::AccessDenied)
    );
    // Write on v: writes v; still no admin request.
    c.authorize(&Grant::issue(&key, Some(&v), READ | WRITE, "host-a", ttl))
        .await
        .unwrap();
    c.write(&v, 0, unit(), false).await.unwrap();
    c.flush(&v).await.unwrap();
    denied(c.delete_volume(&v).await);
    denied(c.write(&other, 0, unit(), false).await);
    // Nothing the refusals touched changed.
    assert_eq!(&admin.read(&v, 0, 4096).await.unwrap()[..], &unit()[..]);
    assert_eq!(
        &admin.read(&other, 0, 4096).await.unwrap()[..],
        &[0u8; 4096][..]
    );
    // Admin on every volume makes the same connection an admin one.
    c.authorize(&Grant::issue(&key, None, ADMIN, "control-plane", ttl))
        .await
        .unwrap();
    c.delete_volume(&other).await.unwrap();
}

/// A revocation takes a holder's rights on a volume from open connections at once and refuses
/// the capabilities it held before; other holders, volumes and later capabilities are untouched.
#[tokio::test]
async fn revoke_cuts_open_connections_and_earlier_capabilities() {
    use blockfleet_proto::wire::rights::{READ, WRITE};
    use blockfleet_proto::Grant;
    let s = Server::start().await;
    let admin = s.client().await;
    let (v, w) = (vol(), VolumeId::generate());
    admin.create_volume(&v, CHUNK, false).await.unwrap();
    admin.create_volume(&w, CHUNK, false).await.unwrap();
    let key = s.key();
    let ttl = Duration::from_secs(3600);
    let old = Grant::issue(&key, Some(&v), READ | WRITE, "host-a", ttl);
    let (a, b) = (s.plain_client().await, s.plain_client().await);
    a.authorize(&old).await.unwrap();
    a.authorize(&Grant::issue(&key, Some(&w), READ, "host-a", ttl))
        .await
        .unwrap();
    b.authorize(&Grant::issue(&key, Some(&v), READ, "host-b", ttl))
        .await
        .unwrap();
    a.read(&v, 0, 4096).await.unwrap();
    // Only an admin may revoke.
    assert_eq!(
        a.revoke(&v, "host-b").await.unwrap_err().code(),
        Some(ErrorCode::AccessDenied)
    );
    admin.revoke(&v, "host-a").await.unwrap();
    assert_eq!(
        a.read(&v, 0, 4096).await.unwrap_err().code(),
        Some(ErrorCode::AccessDenied)
    );
    a.read(&w, 0, 4096).await.unwrap();
    b.read(&v, 0, 4096).await.unwrap();
    // The capability held before is refused on a new connection; a new one is taken.
    let c = s.plain_client().await;
    assert_eq!(
        c.authorize(&old).await.unwrap_err().code(),
        Some(ErrorCode::AccessDenied)
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    c.authorize(&Grant::issue(&key, Some(&v), READ, "host-a", ttl))
        .await
        .unwrap();
    c.read(&v, 0, 4096).await.unwrap();
}
