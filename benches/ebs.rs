//! `cargo bench --bench ebs`: the EBS direct APIs through the AWS SDK for Rust with 64
//! requests in flight (PutSnapshotBlock of every block of a snapshot, then GetSnapshotBlock of
//! each), beside the same store's raw PUT and GET of as many 512 KiB objects at the same
//! concurrency, in one run, on a fleet of `blockfleet` processes on 127.0.0.1 (local store).
//! `BENCH_EBS_MIB` (default 512) sizes the upload; `BENCH_EBS_ENCRYPTED=1` adds an
//! encrypted upload (through a transform worker).

use std::sync::Arc;
use std::time::Instant;

use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::ChecksumAlgorithm;
use base64::Engine;
use blockfleet_core::config::{LocalStoreConfig, Secret, StoreConfig};
use blockfleet_snapshot_format::store::{self, ObjectStore};
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};

#[path = "../tests/common/mod.rs"]
mod common;
use common::{Fleet, FleetOptions};

const BLOCK: usize = 512 << 10;
const CONCURRENCY: usize = 64;

fn report(name: &str, label: &str, blocks: usize, secs: f64, peer: Option<f64>) -> f64 {
    let mbps = (blocks * BLOCK) as f64 / secs / 1e6;
    let rps = blocks as f64 / secs;
    let vs = peer.map_or(String::new(), |p| {
        format!("  ({:.0}% of raw)", 100.0 * mbps / p)
    });
    println!("{label:<50} {mbps:>8.0} MB/s {rps:>8.0} req/s{vs}");
    println!("BENCH {name}_mbps {mbps:.0} MB/s");
    println!("BENCH {name}_rps {rps:.0} req/s");
    mbps
}

fn blocks(n: usize) -> Vec<Bytes> {
    let mut rng = blockfleet_testkit::Rng::new(7);
    (0..n)
        .map(|_| {
            let mut b = vec![0u8; BLOCK];
            rng.fill(&mut b);
            Bytes::from(b)
        })
        .collect()
}

async fn upload(c: &aws_sdk_ebs::Client, data: &[Bytes], key: Option<&str>) -> (String, f64) {
    let s = c
        .start_snapshot()
        .volume_size(((data.len() * BLOCK) >> 30).max(1) as i64)
        .set_encrypted(key.map(|_| true))
        .set_kms_key_arn(key.map(str::to_owned))
        .timeout(4320)
        .send()
        .await
        .expect("start");
    let id = s.snapshot_id().expect("id").to_owned();
    let start = Instant::now();
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut puts = futures::stream::iter(data.iter().enumerate().map(|(i, b)| {
        let (c, id) = (c.clone(), id.clone());
        let sum = b64.encode(Sha256::digest(b));
        let b = b.clone();
        async move {
            c.put_snapshot_block()
                .snapshot_id(id)
                .block_index(i as i32)
                .block_data(ByteStream::from(b))
                .data_length(BLOCK as i32)
                .checksum(sum)
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                .send()
                .await
                .expect("put")
        }
    }))
    .buffer_unordered(CONCURRENCY);
    while puts.next().await.is_some() {}
    drop(puts);
    let secs = start.elapsed().as_secs_f64();
    c.complete_snapshot()
        .snapshot_id(&id)
        .changed_blocks_count(data.len() as i32)
        .send()
        .await
        .expect("complete");
    (id, secs)
}

async fn download(c: &aws_sdk_ebs::Client, id: &str) -> (usize, f64) {
    let mut tokens = Vec::new();
    let mut next = None;
    loop {
        let page = c
            .list_snapshot_blocks()
            .snapshot_id(id)
            .set_next_token(next)
            .send()
            .await
            .expect("list");
        for b in page.blocks() {
            tokens.push((
                b.block_index().expect("index"),
                b.block_token().expect("token").to_owned(),
            ));
        }
        next = page.next_token().map(str::to_owned);
        if next.is_none() {
            break;
        }
    }
    let start = Instant::now();
    let mut gets = futures::stream::iter(tokens.iter().map(|(i, t)| {
        let c = c.clone();
        async move {
            let r = c
                .get_snapshot_block()
                .snapshot_id(id)
                .block_index(*i)
                .block_token(t)
                .send()
                .await
                .expect("get");
            let data = r.block_data.collect().await.expect("body").into_bytes();
            assert_eq!(data.len(), BLOCK);
        }
    }))
    .buffer_unordered(CONCURRENCY);
    while gets.next().await.is_some() {}
    (tokens.len(), start.elapsed().as_secs_f64())
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("ebs bench: run with `cargo bench --bench ebs`");
        return;
    }
    let mib: usize = common::env_or("BENCH_EBS_MIB", 512);
    let n = (mib << 20) / BLOCK;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let f = Fleet::start(FleetOptions::default());
        let secret = Secret::new("ebs-secret-0123");
        let conf = blockfleet_core::aws::sdk_config(blockfleet_core::aws::Endpoint {
            url: Some(&f.ebs_endpoint),
            region: "local",
            credentials: Some(("AKEBS", &secret)),
            environment: Ok(()),
            max_attempts: 1,
            fleet_role: None,
            timeouts: aws_config::timeout::TimeoutConfig::builder().build(),
        })
        .await;
        let c = aws_sdk_ebs::Client::new(&conf);
        let data = blocks(n);
        println!("{n} blocks of 512 KiB ({mib} MiB), {CONCURRENCY} requests in flight, local store, 2 cores");

        // The peer: the same store, raw, as many objects, same concurrency.
        let store: Arc<dyn ObjectStore> = store::open(&StoreConfig::Local(LocalStoreConfig {
            path: f.dir.path().join("objects-raw"),
        }))
        .await
        .expect("store");
        let start = Instant::now();
        let mut puts = futures::stream::iter(data.iter().enumerate().map(|(i, b)| {
            let (s, b) = (Arc::clone(&store), b.clone());
            async move { s.put(&format!("raw/{i}"), b).await.expect("raw put") }
        }))
        .buffer_unordered(CONCURRENCY);
        while puts.next().await.is_some() {}
        let raw_put = report("ebs_raw_put", "raw PUT to the store", n, start.elapsed().as_secs_f64(), None);
        let start = Instant::now();
        let mut gets = futures::stream::iter((0..n).map(|i| {
            let s = Arc::clone(&store);
            async move { s.get(&format!("raw/{i}")).await.expect("raw get").len() }
        }))
        .buffer_unordered(CONCURRENCY);
        while gets.next().await.is_some() {}
        let raw_get = report("ebs_raw_get", "raw GET from the store", n, start.elapsed().as_secs_f64(), None);

        let (id, secs) = upload(&c, &data, None).await;
        report("ebs_put_snapshot_block", "PutSnapshotBlock (aws-sdk-ebs)", n, secs, Some(raw_put));
        let (got, secs) = download(&c, &id).await;
        assert_eq!(got, n);
        report("ebs_get_snapshot_block", "GetSnapshotBlock (aws-sdk-ebs)", n, secs, Some(raw_get));

        if common::env_or("BENCH_EBS_ENCRYPTED", 0u8) == 1 {
            let key = f.kms("AKCP", "cp-secret-0123").await.create_key("bench").await.expect("key");
            // Other data, so nothing is deduplicated against the first upload.
            let data: Vec<Bytes> = blocks(n + 1).into_iter().skip(1).collect();
            let (id, secs) = upload(&c, &data, Some(&key)).await;
            report("ebs_put_snapshot_block_encrypted", "PutSnapshotBlock, encrypted", n, secs, Some(raw_put));
            let (_, secs) = download(&c, &id).await;
            report("ebs_get_snapshot_block_encrypted", "GetSnapshotBlock, encrypted", n, secs, Some(raw_get));
        }
    });
}
