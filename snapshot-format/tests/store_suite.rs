//! One behavioural suite for every object-store backend: the local directory and S3 against a
//! real Garage server started on 127.0.0.1. Then the snapshot archive's verification on top.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use std::sync::Arc;

use blockfleet_core::config::{S3StoreConfig, Secret, StoreConfig};
use blockfleet_core::ids::SnapshotId;
use blockfleet_core::units::CHUNK;
use blockfleet_snapshot_format::store::{self, LocalStore, ObjectStore, StoreError};
use blockfleet_snapshot_format::{Archive, ChunkHash, Manifest, ManifestKey, SnapshotError};
use blockfleet_testkit::Garage;
use bytes::Bytes;

async fn suite(s: Arc<dyn ObjectStore>) {
    s.check().await.expect("check");
    // Empty store.
    assert!(s.get("a/b").await.unwrap_err().is_not_found());
    assert_eq!(s.head("a/b").await.unwrap(), None);
    assert_eq!(s.list("").await.unwrap(), Vec::<String>::new());

    // Put, get, head, overwrite.
    s.put("a/b", Bytes::from_static(b"hello")).await.unwrap();
    assert_eq!(&s.get("a/b").await.unwrap()[..], b"hello");
    assert_eq!(s.head("a/b").await.unwrap(), Some(5));
    s.put("a/b", Bytes::from_static(b"hi")).await.unwrap();
    assert_eq!(&s.get("a/b").await.unwrap()[..], b"hi");

    // Empty and large objects.
    s.put("empty", Bytes::new()).await.unwrap();
    assert_eq!(s.head("empty").await.unwrap(), Some(0));
    let big: Vec<u8> = (0..3 * CHUNK as usize).map(|i| (i % 251) as u8).collect();
    s.put("big/one", Bytes::from(big.clone())).await.unwrap();
    assert_eq!(s.get("big/one").await.unwrap(), big);

    // List by prefix, sorted, only matching keys.
    for k in ["p/x/1", "p/x/2", "p/y", "pq", "q"] {
        s.put(k, Bytes::from_static(b".")).await.unwrap();
    }
    assert_eq!(s.list("p/").await.unwrap(), vec!["p/x/1", "p/x/2", "p/y"]);
    assert_eq!(s.list("p/x/").await.unwrap(), vec!["p/x/1", "p/x/2"]);
    assert_eq!(
        s.list("p").await.unwrap(),
        vec!["p/x/1", "p/x/2", "p/y", "pq"]
    );
    assert_eq!(s.list("zzz/").await.unwrap(), Vec::<String>::new());
    assert_eq!(s.list("").await.unwrap().len(), 8);

    // Delete is idempotent.
    s.delete("p/y").await.unwrap();
    s.delete("p/y").await.unwrap();
    assert_eq!(s.head("p/y").await.unwrap(), None);
    assert_eq!(s.list("p/").await.unwrap(), vec!["p/x/1", "p/x/2"]);

    // Bad keys are refused before anything is touched.
    for bad in [
        "",
        "../escape",
        "a/../b",
        "/abs",
        ".tmp/x",
        "a//b",
        "sp ace",
    ] {
        assert!(
            matches!(
                s.put(bad, Bytes::from_static(b"x")).await,
                Err(StoreError::InvalidKey { .. })
            ),
            "{bad}"
        );
        assert!(
            matches!(s.get(bad).await, Err(StoreError::InvalidKey { .. })),
            "{bad}"
        );
    }
    assert!(matches!(
        s.list("../").await,
        Err(StoreError::InvalidKey { .. })
    ));
    assert_eq!(s.list("").await.unwrap().len(), 7);

    // Concurrent puts of distinct keys all land.
    let futs = (0..32u8).map(|i| {
        let s = Arc::clone(&s);
        async move {
            s.put(&format!("conc/{i:02}"), Bytes::from(vec![i; 1000]))
                .await
        }
    });
    futures::future::try_join_all(futs).await.unwrap();
    assert_eq!(s.list("conc/").await.unwrap().len(), 32);
    assert_eq!(s.get("conc/07").await.unwrap(), vec![7u8; 1000]);

    archive_suite(s).await;
}

/// The archive on top of the store: corrupt chunks and manifests are errors, never data.
async fn archive_suite(store: Arc<dyn ObjectStore>) {
    let archive = Archive::new(store.clone(), Arc::new(ManifestKey::generate()));

    let chunk = Bytes::from(vec![0xabu8; CHUNK as usize]);
    let hash = ChunkHash::of(&chunk);
    assert!(!archive.has_chunk(&hash).await.unwrap());
    archive.put_chunk(&hash, chunk.clone()).await.unwrap();
    assert!(archive.has_chunk(&hash).await.unwrap());
    assert_eq!(archive.get_chunk(&hash).await.unwrap(), chunk);

    // Rewrite the chunk in place: reading it is now an error naming the chunk.
    let mut bad = chunk.to_vec();
    bad[100] ^= 1;
    store.put(&hash.key(), Bytes::from(bad)).await.unwrap();
    let err = archive.get_chunk(&hash).await.unwrap_err();
    assert!(matches!(err, SnapshotError::CorruptChunk { .. }), "{err}");
    assert!(err.to_string().contains(&hash.to_string()), "{err}");
    store
        .put(&hash.key(), Bytes::from_static(b"short"))
        .await
        .unwrap();
    assert!(matches!(
        archive.get_chunk(&hash).await.unwrap_err(),
        SnapshotError::ChunkLength { .. }
    ));

    // Manifests round-trip, list, and refuse tampering.
    let id = SnapshotId::generate();
    let m = Manifest {
        snapshot_id: id.clone(),
        volume_size: 4 * CHUNK,
        parent: None,
        created_at: 1,
        description: String::new(),
        encryption: None,
        chunks: [(2, hash)].into_iter().collect(),
    };
    archive.put_manifest(&m).await.unwrap();
    assert_eq!(archive.get_manifest(&id).await.unwrap(), m);
    assert_eq!(archive.list_snapshots().await.unwrap(), vec![id.clone()]);
    let key = format!("snapshots/{id}/manifest");
    let mut raw = store.get(&key).await.unwrap().to_vec();
    let n = raw.len();
    raw[n - 50] ^= 0x10;
    store.put(&key, Bytes::from(raw)).await.unwrap();
    assert!(matches!(
        archive.get_manifest(&id).await.unwrap_err(),
        SnapshotError::ManifestMac { .. }
    ));
    let missing = SnapshotId::generate();
    assert!(matches!(
        archive.get_manifest(&missing).await.unwrap_err(),
        SnapshotError::NotFound(_)
    ));
}

#[tokio::test]
async fn local_store() {
    let dir = tempfile::tempdir().unwrap();
    suite(Arc::new(
        LocalStore::open(&dir.path().join("objects")).unwrap(),
    ))
    .await;
    // Nothing but the objects and the (now empty) temp directory is left behind.
    let tmp: Vec<_> = std::fs::read_dir(dir.path().join("objects/.tmp"))
        .unwrap()
        .collect();
    assert!(tmp.is_empty(), "{tmp:?}");
}

fn garage_config(g: &Garage, prefix: &str) -> S3StoreConfig {
    let mut c = S3StoreConfig::new(Some(g.endpoint.clone()), &g.region, &g.bucket);
    c.prefix = prefix.to_owned();
    c.access_key_id = Some(g.access_key.clone());
    c.secret_access_key = Some(Secret::new(g.secret_key.clone()));
    c.max_attempts = 2;
    c.attempt_timeout_secs = 5;
    c
}

#[tokio::test]
async fn s3_store_against_garage() {
    let g = Garage::start();
    // Two prefixes in one bucket see only their own objects.
    let a = store::open(&StoreConfig::S3(garage_config(&g, "fleet-a")))
        .await
        .unwrap();
    suite(a).await;
    let b = store::open(&StoreConfig::S3(garage_config(&g, "fleet-b/")))
        .await
        .unwrap();
    assert_eq!(b.list("").await.unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn s3_misconfiguration_is_a_clear_error() {
    let g = Garage::start();
    let mut c = garage_config(&g, "");
    c.bucket = "no-such-bucket".into();
    let err = store::open(&StoreConfig::S3(c)).await.unwrap_err();
    assert!(matches!(err, StoreError::NoSuchBucket { .. }), "{err}");
    assert!(err.to_string().contains("no-such-bucket"), "{err}");

    let mut c = garage_config(&g, "");
    c.secret_access_key = Some(Secret::new("0".repeat(64)));
    let err = store::open(&StoreConfig::S3(c)).await.unwrap_err();
    assert!(matches!(err, StoreError::AccessDenied { .. }), "{err}");

    let mut c = garage_config(&g, "");
    c.endpoint = Some(format!(
        "http://127.0.0.1:{}",
        blockfleet_testkit::free_port()
    ));
    c.connect_timeout_ms = 500;
    let err = store::open(&StoreConfig::S3(c)).await.unwrap_err();
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err}");
}
