//! The EBS direct APIs driven by the AWS SDK for Rust (`aws-sdk-ebs`, endpoint pointed at the
//! control plane's `ebs_listen`): upload a raw image block by block, complete it, restore it
//! into a volume and read it back through NBD (`nbdcopy` against the host agent), download
//! it with GetSnapshotBlock, an incremental upload on a parent and ListChangedBlocks between
//! the two; bad input gets the AWS error and stores nothing.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

mod common;

use std::time::Duration;

use aws_sdk_ebs::error::ProvideErrorMetadata;
use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm, Tag};
use base64::Engine;
use blockfleet_api::{CreateVolumeRequest, HydrationState};
use blockfleet_core::config::Secret;
use common::{Fleet, FleetOptions};
use sha2::{Digest, Sha256};

const BLOCK: usize = 512 << 10;

async fn client(f: &Fleet, akid: &str, secret: &str) -> aws_sdk_ebs::Client {
    let secret = Secret::new(secret);
    let conf = blockfleet_core::aws::sdk_config(blockfleet_core::aws::Endpoint {
        url: Some(&f.ebs_endpoint),
        region: "local",
        credentials: Some((akid, &secret)),
        environment: Ok(()),
        max_attempts: 1,
        fleet_role: None,
        timeouts: aws_config::timeout::TimeoutConfig::builder().build(),
    })
    .await;
    aws_sdk_ebs::Client::new(&conf)
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn block(seed: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    blockfleet_testkit::Rng::new(seed).fill(&mut b);
    b
}

async fn put(c: &aws_sdk_ebs::Client, id: &str, index: i32, data: &[u8]) -> Result<(), String> {
    c.put_snapshot_block()
        .snapshot_id(id)
        .block_index(index)
        .block_data(ByteStream::from(data.to_vec()))
        .data_length(data.len() as i32)
        .checksum(b64(&Sha256::digest(data)))
        .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
        .send()
        .await
        .map(drop)
        .map_err(|e| format!("{}: {}", e.code().unwrap_or("?"), e.message().unwrap_or("")))
}

/// Uploads `blocks` as a snapshot (on `parent`), completing it with the right count and
/// aggregate checksum; returns its id.
async fn upload(
    c: &aws_sdk_ebs::Client,
    blocks: &[(i32, Vec<u8>)],
    parent: Option<&str>,
) -> String {
    let s = c
        .start_snapshot()
        .volume_size(1)
        .set_parent_snapshot_id(parent.map(str::to_owned))
        .description("uploaded with aws-sdk-ebs")
        .tags(Tag::builder().key("team").value("storage").build())
        // The test fleet's Timeout minute is 100 ms: the longest Timeout, 7.2 minutes real.
        .timeout(4320)
        .send()
        .await
        .unwrap();
    let id = s.snapshot_id().unwrap().to_owned();
    assert_eq!(s.block_size(), Some(BLOCK as i32));
    for (i, b) in blocks {
        put(c, &id, *i, b).await.unwrap();
    }
    let mut sorted: Vec<&(i32, Vec<u8>)> = blocks.iter().collect();
    sorted.sort_by_key(|(i, _)| *i);
    let mut agg = Sha256::new();
    for (_, b) in sorted {
        agg.update(Sha256::digest(b));
    }
    let done = c
        .complete_snapshot()
        .snapshot_id(&id)
        .changed_blocks_count(blocks.len() as i32)
        .checksum(b64(&agg.finalize()))
        .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
        .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear)
        .send()
        .await
        .unwrap();
    assert_eq!(done.status().map(|s| s.as_str()), Some("completed"));
    id
}

async fn list(
    c: &aws_sdk_ebs::Client,
    id: &str,
) -> aws_sdk_ebs::operation::list_snapshot_blocks::ListSnapshotBlocksOutput {
    c.list_snapshot_blocks()
        .snapshot_id(id)
        .send()
        .await
        .unwrap()
}

/// CompleteSnapshot with just the block count.
async fn complete(c: &aws_sdk_ebs::Client, id: &str, blocks: i32) {
    c.complete_snapshot()
        .snapshot_id(id)
        .changed_blocks_count(blocks)
        .send()
        .await
        .unwrap();
}

async fn get(
    c: &aws_sdk_ebs::Client,
    id: &str,
    index: i32,
    token: &str,
) -> Result<Vec<u8>, String> {
    let r = c
        .get_snapshot_block()
        .snapshot_id(id)
        .block_index(index)
        .block_token(token)
        .send()
        .await
        .map_err(|e| format!("{}: {}", e.code().unwrap_or("?"), e.message().unwrap_or("")))?;
    let checksum = r.checksum().unwrap().to_owned();
    let data = r.block_data.collect().await.unwrap().into_bytes().to_vec();
    assert_eq!(checksum, b64(&Sha256::digest(&data)));
    Ok(data)
}

/// Restores `snapshot` into a new volume (`encrypted`: under the fleet's default key), waits
/// for hydration, and reads the whole volume back through NBD (nbdcopy against a host agent).
async fn restore(f: &Fleet, snapshot: &str, encrypted: bool) -> Vec<u8> {
    let v =
        f.cp.create_volume(&CreateVolumeRequest {
            snapshot_id: Some(snapshot.parse().unwrap()),
            encrypted,
            ..Default::default()
        })
        .await
        .unwrap()
        .remove(0);
    let start = std::time::Instant::now();
    while f
        .cp
        .describe_volumes(std::slice::from_ref(&v.volume_id))
        .await
        .unwrap()[0]
        .hydration
        .as_ref()
        .is_some_and(|h| h.state != HydrationState::Done)
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "hydration did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let agent = f.attach(&v.volume_id);
    let out = f.dir.path().join(format!("{}.raw", v.volume_id));
    let st = std::process::Command::new("nbdcopy")
        .arg(format!("nbd://{}/{}", agent.addr, v.volume_id))
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let restored = std::fs::read(&out).unwrap();
    assert_eq!(restored.len(), 1 << 30);
    restored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_restore_download_and_incremental_through_the_aws_sdk() {
    let f = Fleet::start(FleetOptions::default());
    let c = client(&f, "AKEBS", "ebs-secret-0123").await;
    // 8 blocks at the start of a 1 GiB volume, block 3 all zeros.
    let image: Vec<(i32, Vec<u8>)> = (0..8)
        .map(|i| {
            (
                i,
                if i == 3 {
                    vec![0u8; BLOCK]
                } else {
                    block(i as u64)
                },
            )
        })
        .collect();
    let first = upload(&c, &image, None).await;

    // Listed blocks (a zero block is not stored) download bit-identical.
    let listed = list(&c, &first).await;
    assert_eq!(listed.volume_size(), Some(1));
    let blocks = listed.blocks();
    assert_eq!(
        blocks
            .iter()
            .map(|b| b.block_index().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 1, 2, 4, 5, 6, 7]
    );
    for b in blocks {
        let i = b.block_index().unwrap();
        let data = get(&c, &first, i, b.block_token().unwrap()).await.unwrap();
        assert!(data == image[i as usize].1, "block {i} differs");
    }
    // A token opens only its own block.
    let t0 = blocks[0].block_token().unwrap();
    let e = get(&c, &first, 1, t0).await.unwrap_err();
    assert!(e.starts_with("ValidationException"), "{e}");

    // Restored into a volume and read back through NBD, bit-identical.
    let restored = restore(&f, &first, false).await;
    let want: Vec<u8> = image.iter().flat_map(|(_, b)| b.clone()).collect();
    assert!(
        restored[..want.len()] == want[..],
        "restored volume differs"
    );
    assert!(restored[want.len()..].iter().all(|&b| b == 0));

    // Incremental on the parent: block 1 changed, block 20 new; the rest comes from the parent.
    let changed = vec![(1, block(101)), (20, block(120))];
    let second = upload(&c, &changed, Some(&first)).await;
    let diff = c
        .list_changed_blocks()
        .first_snapshot_id(&first)
        .second_snapshot_id(&second)
        .send()
        .await
        .unwrap();
    let cb = diff.changed_blocks();
    assert_eq!(
        cb.iter()
            .map(|b| b.block_index().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 20]
    );
    assert!(cb[0].first_block_token().is_some() && cb[1].first_block_token().is_none());
    for (b, (_, data)) in cb.iter().zip(&changed) {
        let got = get(
            &c,
            &second,
            b.block_index().unwrap(),
            b.second_block_token().unwrap(),
        )
        .await
        .unwrap();
        assert!(got == *data);
    }
    let old = get(&c, &first, 1, cb[0].first_block_token().unwrap())
        .await
        .unwrap();
    assert!(old == image[1].1);
    let all = list(&c, &second).await;
    assert_eq!(
        all.blocks().len(),
        8,
        "7 from the parent (one replaced) and a new one"
    );

    // Ordinary snapshots: listed by DescribeSnapshots, deleted and collected the same way.
    let listed =
        f.cp.describe_snapshots(&blockfleet_api::DescribeSnapshotsRequest {
            snapshot_ids: vec![first.parse().unwrap(), second.parse().unwrap()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|s| s.volume_id.is_none()
        && s.state == blockfleet_api::SnapshotState::Completed
        && s.volume_size == 1 << 30));
    f.cp.delete_snapshot(&first.parse().unwrap()).await.unwrap();
    let e = c
        .list_snapshot_blocks()
        .snapshot_id(&first)
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("ResourceNotFoundException"));
    // The child keeps the blocks it shares with the deleted parent.
    let b0 = &all.blocks()[0];
    assert_eq!(b0.block_index(), Some(0));
    assert!(
        get(&c, &second, 0, b0.block_token().unwrap())
            .await
            .unwrap()
            == image[0].1
    );
    assert_eq!(
        f.cp.describe_snapshots(&Default::default())
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_aws_error_and_stores_nothing() {
    let f = Fleet::start(FleetOptions::default());
    let c = client(&f, "AKEBS", "ebs-secret-0123").await;
    fn code_of<E: ProvideErrorMetadata>(e: &E) -> Option<String> {
        e.code().map(str::to_owned)
    }

    // A wrong signature, an unknown key.
    let bad = client(&f, "AKEBS", "not-the-secret").await;
    let e = bad
        .start_snapshot()
        .volume_size(1)
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        code_of(&e).as_deref(),
        Some("AccessDeniedException"),
        "{e:?}"
    );
    let unknown = client(&f, "AKNOBODY", "whatever-secret").await;
    let e = unknown
        .start_snapshot()
        .volume_size(1)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code_of(&e).as_deref(), Some("AccessDeniedException"));

    let e = c.start_snapshot().volume_size(0).send().await.unwrap_err();
    assert_eq!(code_of(&e).as_deref(), Some("ValidationException"));
    let e = c
        .start_snapshot()
        .volume_size(1)
        .parent_snapshot_id("snap-0123456789abcdef0")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code_of(&e).as_deref(), Some("ResourceNotFoundException"));

    let s = c
        .start_snapshot()
        .volume_size(1)
        .client_token("token-1")
        .timeout(4320)
        .send()
        .await
        .unwrap();
    let id = s.snapshot_id().unwrap().to_owned();
    let again = c
        .start_snapshot()
        .volume_size(1)
        .client_token("token-1")
        .timeout(4320)
        .send()
        .await
        .unwrap();
    assert_eq!(again.snapshot_id(), Some(id.as_str()));
    let e = c
        .start_snapshot()
        .volume_size(2)
        .client_token("token-1")
        .timeout(4320)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code_of(&e).as_deref(), Some("ConflictException"));

    let data = block(7);
    // Wrong checksum, index outside the volume, wrong length.
    let e = c
        .put_snapshot_block()
        .snapshot_id(&id)
        .block_index(0)
        .block_data(ByteStream::from(data.clone()))
        .data_length(BLOCK as i32)
        .checksum(b64(&Sha256::digest(b"other")))
        .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code_of(&e).as_deref(), Some("ValidationException"));
    let e = put(&c, &id, 2048, &data).await.unwrap_err();
    assert!(e.starts_with("ValidationException"), "{e}");
    let e = put(&c, &id, 0, &data[..4096]).await.unwrap_err();
    assert!(e.starts_with("ValidationException"), "{e}");
    let e = put(&c, "snap-0123456789abcdef0", 0, &data)
        .await
        .unwrap_err();
    assert!(e.starts_with("ResourceNotFoundException"), "{e}");
    put(&c, &id, 0, &data).await.unwrap();
    // Pending, with the one block put so far, in DescribeSnapshots.
    let pending =
        f.cp.describe_snapshots(&blockfleet_api::DescribeSnapshotsRequest {
            snapshot_ids: vec![id.parse().unwrap()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(pending[0].state, blockfleet_api::SnapshotState::Pending);
    assert_eq!(pending[0].done_chunks, 1);

    // Wrong count, wrong aggregate checksum: refused, the snapshot stays pending.
    let e = c
        .complete_snapshot()
        .snapshot_id(&id)
        .changed_blocks_count(2)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code_of(&e).as_deref(), Some("ValidationException"));
    let e = c
        .complete_snapshot()
        .snapshot_id(&id)
        .changed_blocks_count(1)
        .checksum(b64(&Sha256::digest(b"x")))
        .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
        .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code_of(&e).as_deref(), Some("ValidationException"));
    let e = c
        .list_snapshot_blocks()
        .snapshot_id(&id)
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        code_of(&e).as_deref(),
        Some("ResourceNotFoundException"),
        "not completed yet"
    );
    complete(&c, &id, 1).await;
    // After completion: no more blocks.
    let e = put(&c, &id, 1, &data).await.unwrap_err();
    assert!(e.starts_with("ValidationException"), "{e}");
    // A block token of another snapshot.
    let other = upload(&c, &[(0, block(8))], None).await;
    let t = list(&c, &other).await;
    let e = get(&c, &id, 0, t.blocks()[0].block_token().unwrap())
        .await
        .unwrap_err();
    assert!(e.starts_with("ValidationException"), "{e}");
}

/// The AWS CLI (`aws ebs ...`, from PyPI) against the same endpoint: a block up, the
/// snapshot completed, listed and the block downloaded bit-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_cli_uploads_and_downloads() {
    let f = Fleet::start(FleetOptions::default());
    let aws = |args: &[&str]| -> serde_json::Value {
        common::aws("ebs", &f.ebs_endpoint, ("AKEBS", "ebs-secret-0123"), args)
            .unwrap_or_else(|e| panic!("aws ebs {args:?}: {e}"))
    };
    let data = block(42);
    let file = f.dir.path().join("block.bin");
    std::fs::write(&file, &data).unwrap();
    let s = aws(&[
        "start-snapshot",
        "--volume-size",
        "1",
        "--description",
        "from the CLI",
        // The longest Timeout: a "minute" is 100 ms here, and the default 60 ran out under
        // load between the CLI's invocations.
        "--timeout",
        "4320",
    ]);
    let id = s["SnapshotId"].as_str().unwrap().to_owned();
    aws(&[
        "put-snapshot-block",
        "--snapshot-id",
        &id,
        "--block-index",
        "5",
        "--block-data",
        file.to_str().unwrap(),
        "--data-length",
        &BLOCK.to_string(),
        "--checksum",
        &b64(&Sha256::digest(&data)),
        "--checksum-algorithm",
        "SHA256",
    ]);
    let done = aws(&[
        "complete-snapshot",
        "--snapshot-id",
        &id,
        "--changed-blocks-count",
        "1",
    ]);
    assert_eq!(done["Status"], "completed");
    let listed = aws(&["list-snapshot-blocks", "--snapshot-id", &id]);
    let b = &listed["Blocks"][0];
    assert_eq!(b["BlockIndex"], 5);
    let out = f.dir.path().join("out.bin");
    aws(&[
        "get-snapshot-block",
        "--snapshot-id",
        &id,
        "--block-index",
        "5",
        "--block-token",
        b["BlockToken"].as_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&out).unwrap() == data);
}

fn store_files(f: &Fleet) -> std::collections::BTreeSet<std::path::PathBuf> {
    fn walk(d: &std::path::Path, out: &mut std::collections::BTreeSet<std::path::PathBuf>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.insert(p);
            }
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(&f.dir.path().join("objects"), &mut out);
    out
}

/// A snapshot not completed within its Timeout fails, and its blocks leave the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_snapshot_expires_with_its_blocks() {
    let f = Fleet::start(FleetOptions::default());
    let c = client(&f, "AKEBS", "ebs-secret-0123").await;
    let before = store_files(&f);
    // Timeout 10 "minutes" of 100 ms each in the test fleet.
    let s = c
        .start_snapshot()
        .volume_size(1)
        .timeout(10)
        .send()
        .await
        .unwrap();
    let id = s.snapshot_id().unwrap().to_owned();
    put(&c, &id, 0, &block(900)).await.unwrap();
    assert!(store_files(&f).len() > before.len(), "the block was stored");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let e = put(&c, &id, 1, &block(901)).await.unwrap_err();
    assert!(e.starts_with("ValidationException"), "{e}");
    let start = std::time::Instant::now();
    while store_files(&f) != before {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the expired snapshot's block stayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Encrypted uploads: blocks go through a transform worker's encryption path under a data
/// key of the named KMS key; the store holds only ciphertext; downloads and restores give the
/// plaintext back; a child of an encrypted parent is encrypted under the parent's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_uploads_store_ciphertext_and_restore() {
    let f = Fleet::start(FleetOptions::default());
    let c = client(&f, "AKEBS", "ebs-secret-0123").await;
    let cp_kms = f.kms("AKCP", "cp-secret-0123").await;
    let key = cp_kms.create_key("ebs uploads").await.unwrap();
    let other = cp_kms.create_key("another").await.unwrap();
    let blocks: Vec<(i32, Vec<u8>)> = vec![(0, block(500)), (1, vec![0u8; BLOCK]), (2, block(502))];
    let s = c
        .start_snapshot()
        .volume_size(1)
        .encrypted(true)
        .kms_key_arn(&key)
        .timeout(4320)
        .send()
        .await
        .unwrap();
    let id = s.snapshot_id().unwrap().to_owned();
    let before = store_files(&f);
    for (i, b) in &blocks {
        put(&c, &id, *i, b).await.unwrap();
    }
    // Ciphertext only: no stored object holds a plaintext block.
    for p in store_files(&f).difference(&before) {
        let stored = std::fs::read(p).unwrap();
        for (_, b) in &blocks {
            assert!(stored != *b, "a plaintext block in the store");
        }
    }
    complete(&c, &id, 3).await;
    let listed = list(&c, &id).await;
    let listed = listed.blocks();
    assert_eq!(listed.len(), 2, "the zero block is not stored");
    for b in listed {
        let i = b.block_index().unwrap() as usize;
        let got = get(&c, &id, i as i32, b.block_token().unwrap())
            .await
            .unwrap();
        assert!(got == blocks[i].1, "block {i}");
    }
    // Restored into an encrypted volume and read back through NBD.
    let restored = restore(&f, &id, true).await;
    let want: Vec<u8> = blocks.iter().flat_map(|(_, b)| b.clone()).collect();
    assert!(
        restored[..want.len()] == want[..],
        "restored volume differs"
    );

    // A child of the encrypted parent: encrypted under the same key, another key refused.
    let e = c
        .start_snapshot()
        .volume_size(1)
        .parent_snapshot_id(&id)
        .kms_key_arn(&other)
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("ValidationException"));
    let child = upload(&c, &[(2, block(602))], Some(&id)).await;
    let diff = c
        .list_changed_blocks()
        .first_snapshot_id(&id)
        .second_snapshot_id(&child)
        .send()
        .await
        .unwrap();
    let cb = diff.changed_blocks();
    assert_eq!(cb.len(), 1);
    let got = get(&c, &child, 2, cb[0].second_block_token().unwrap())
        .await
        .unwrap();
    assert!(got == block(602));
    let kept = list(&c, &child).await;
    let b0 = &kept.blocks()[0];
    assert_eq!(b0.block_index(), Some(0));
    assert!(get(&c, &child, 0, b0.block_token().unwrap()).await.unwrap() == blocks[0].1);
    // An unknown KMS key is refused.
    let e = c
        .start_snapshot()
        .volume_size(1)
        .encrypted(true)
        .kms_key_arn("1234abcd-12ab-34cd-56ef-1234567890ab")
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("ValidationException"), "{e:?}");
}

/// Past `ebs_max_inflight` requests at once, the AWS throttling error (which SDKs retry):
/// with a limit of 1, a request whose body is still arriving holds the only slot, so a put
/// is refused; once it is gone the put succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_at_once_are_throttled() {
    use std::io::Write;
    let f = Fleet::start(FleetOptions {
        control_plane_extra: "ebs_max_inflight = 1".into(),
        ..Default::default()
    });
    let c = client(&f, "AKEBS", "ebs-secret-0123").await;
    let s = c
        .start_snapshot()
        .volume_size(1)
        .timeout(4320)
        .send()
        .await
        .unwrap();
    let id = s.snapshot_id().unwrap().to_owned();
    let addr = f.ebs_endpoint.trim_start_matches("http://").to_owned();
    // A request whose body is still arriving: it holds the only slot.
    let open_slow = || {
        let mut slow = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            slow,
            "PUT /snapshots/{id}/blocks/0 HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {BLOCK}\r\n\r\n"
        )
        .unwrap();
        slow.write_all(&[0u8; 1024]).unwrap();
        slow
    };
    let mut slow = open_slow();
    let data = block(1000);
    // The slow request reaches the server just after its head is sent.
    let start = std::time::Instant::now();
    let mut puts = 0;
    let e = loop {
        match put(&c, &id, 1, &data).await {
            Err(e) => break e,
            Ok(()) => {
                puts += 1;
                // The slow request was let go, or (its head parsed while a put held the slot)
                // throttled itself, reading its body without the slot: a new one, started
                // while no put is in flight, takes the slot.
                slow.set_nonblocking(true).unwrap();
                let mut buf = [0u8; 512];
                match std::io::Read::read(&mut slow, &mut buf) {
                    Ok(n) => eprintln!(
                        "the server let the slow request go ({n} bytes: {:?})",
                        String::from_utf8_lossy(&buf[..n])
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("slow request: {e}"),
                }
                slow = open_slow();
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Counted, not timed: on a loaded machine one put alone has taken over 30 s.
                assert!(
                    puts < 100 && start.elapsed() < Duration::from_secs(180),
                    "never throttled ({puts} puts went through in {:?})",
                    start.elapsed()
                );
            }
        }
    };
    assert!(e.starts_with("RequestThrottledException"), "{e}");
    drop(slow);
    let mut tries = 0;
    while let Err(e) = put(&c, &id, 1, &data).await {
        assert!(e.starts_with("RequestThrottledException"), "{e}");
        tries += 1;
        assert!(tries < 100, "still throttled after the slow request went");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    complete(&c, &id, 1).await;
    let listed = list(&c, &id).await;
    assert_eq!(listed.blocks().len(), 1);
}
