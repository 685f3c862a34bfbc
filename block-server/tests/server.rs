//! The block server over real TCP on 127.0.0.1, started in-process with `run`, driven by the
//! client library (and by raw bytes where the test is about bad input): the data path.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

mod common;

use common::*;

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
