//! Snapshot marks on the block server: point-in-time reads, several marks, change lists,
//! pause timeouts.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

mod common;

use common::*;

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
