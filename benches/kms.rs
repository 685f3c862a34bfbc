//! `cargo bench --bench kms`: Decrypt latency through the embedded KMS (SigV4 + HTTP over
//! loopback + unwrap) and the key-cache hit path, p50 and p99. Prints `BENCH` lines.

use std::time::{Duration, Instant};

use blockfleet_core::config::{KmsClientConfig, KmsPrincipal, KmsRole, KmsServerConfig, Secret};
use blockfleet_core::ids::{KmsKeyId, VolumeId};
use blockfleet_keys::kms::cache::{CacheLimits, KeyCache};
use blockfleet_keys::kms::Kms;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn report(name: &str, label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    println!("{label:<44} p50 {p50:>9.1} us   p99 {p99:>9.1} us");
    println!("BENCH {name}_p50 {p50:.1} us");
    println!("BENCH {name}_p99 {p99:.1} us");
}

fn principal(name: &str, role: KmsRole) -> KmsPrincipal {
    KmsPrincipal {
        name: name.into(),
        role,
        access_key_id: format!("AK-{name}"),
        secret_access_key: Secret::new(format!("secret-{name}-0123456789")),
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("kms bench: run with `cargo bench --bench kms`");
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("dir");
        let config = KmsServerConfig {
            data_dir: dir.path().join("kms"),
            root_key_file: dir.path().join("root.key"),
            principals: vec![
                principal("cp", KmsRole::ControlPlane),
                principal("tf", KmsRole::Transform),
            ],
            ..Default::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(blockfleet_kms_server::run(
            config,
            listener,
            std::future::pending(),
        ));
        let client = |name: &str| {
            let c = KmsClientConfig {
                endpoint: Some(endpoint.clone()),
                region: "local".into(),
                access_key_id: Some(format!("AK-{name}")),
                secret_access_key: Some(Secret::new(format!("secret-{name}-0123456789"))),
                credentials_from_environment: false,
            };
            async move { Kms::connect(&c).await }
        };
        let (cp, tf) = (client("cp").await, client("tf").await);
        let key: KmsKeyId = cp
            .create_key("bench")
            .await
            .expect("key")
            .parse()
            .expect("id");
        let v = VolumeId::generate();
        let wrapped = cp.generate_wrapped_key(&key, &v).await.expect("wrap");
        for _ in 0..50 {
            tf.decrypt_key(&wrapped, &v).await.expect("warm up");
        }
        let mut samples = Vec::new();
        for _ in 0..2000 {
            let t = Instant::now();
            tf.decrypt_key(&wrapped, &v).await.expect("decrypt");
            samples.push(t.elapsed());
        }
        report(
            "kms_decrypt",
            "Decrypt via embedded KMS (SigV4, HTTP)",
            samples,
        );

        let cache = KeyCache::new(CacheLimits::default());
        cache
            .get(&wrapped, &v, || tf.decrypt_key(&wrapped, &v))
            .await
            .expect("fill");
        let mut samples = Vec::new();
        for _ in 0..100_000 {
            let t = Instant::now();
            cache
                .get(&wrapped, &v, || tf.decrypt_key(&wrapped, &v))
                .await
                .expect("hit");
            samples.push(t.elapsed());
        }
        report("key_cache_hit", "key cache hit", samples);
    });
}
