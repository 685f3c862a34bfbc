//! What replication and access control ask of the block server: chunk versions, reset,
//! PutChunk, digests and adoption, capabilities per volume and right, revocation.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

mod common;

use common::*;

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
    drop((a, b, c, admin));

    // A restart does not forget: the capability held before the revocation is still refused,
    // the later one still taken.
    let s = s.restart().await;
    let c = s.plain_client().await;
    assert_eq!(
        c.authorize(&old).await.unwrap_err().code(),
        Some(ErrorCode::AccessDenied),
        "a revoked capability taken after a restart"
    );
    c.authorize(&Grant::issue(&key, Some(&v), READ, "host-a", ttl))
        .await
        .unwrap();
    c.read(&v, 0, 4096).await.unwrap();
    drop(c);

    // A revocation list that does not parse stops the server at start with the file named,
    // and is left as it was.
    let file = s
        .config
        .data_dir
        .join(blockfleet_block_server::REVOCATIONS_FILE);
    let config = s.config.clone();
    let mut s = s;
    s.stop().await;
    std::fs::write(&file, b"[{\"volume\": 7}]").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = run(config, listener, async {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("revoked.json") && e.contains("not a revocation list"),
        "{e}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"[{\"volume\": 7}]");
}
