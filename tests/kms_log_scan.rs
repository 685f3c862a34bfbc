//! A full key flow with every log at TRACE (the KMS server, the aws-sdk-kms client, hyper, and
//! everything else in this process) captured, then scanned for the plaintext key bytes: raw,
//! hex and base64. None may appear.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine;
use blockfleet_core::config::{KmsClientConfig, KmsPrincipal, KmsRole, KmsServerConfig, Secret};
use blockfleet_core::ids::{KmsKeyId, VolumeId};
use blockfleet_keys::kms::Kms;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn principal(name: &str, role: KmsRole) -> KmsPrincipal {
    KmsPrincipal {
        name: name.into(),
        role,
        access_key_id: format!("AK-{name}"),
        secret_access_key: Secret::new(format!("secret-{name}-0123456789")),
    }
}

async fn client(endpoint: &str, name: &str) -> Kms {
    Kms::connect(&KmsClientConfig {
        endpoint: Some(endpoint.to_owned()),
        region: "local".into(),
        access_key_id: Some(format!("AK-{name}")),
        secret_access_key: Some(Secret::new(format!("secret-{name}-0123456789"))),
        credentials_from_environment: false,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_key_byte_in_any_log_line_or_error() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let dir = tempfile::tempdir().unwrap();
    let config = KmsServerConfig {
        data_dir: dir.path().join("kms"),
        root_key_file: dir.path().join("root.key"),
        principals: vec![
            principal("cp", KmsRole::ControlPlane),
            principal("tf", KmsRole::Transform),
            principal("host", KmsRole::HostAgent),
        ],
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(blockfleet_kms_server::run(
        config,
        listener,
        std::future::pending(),
    ));

    let (cp, tf, host) = (
        client(&endpoint, "cp").await,
        client(&endpoint, "tf").await,
        client(&endpoint, "host").await,
    );
    let key: KmsKeyId = cp.create_key("scan").await.unwrap().parse().unwrap();
    let v = VolumeId::generate();
    let wrapped = cp.generate_wrapped_key(&key, &v).await.unwrap();
    let mut secrets = vec![tf.decrypt_key(&wrapped, &v).await.unwrap()];
    let (grant, _) = cp.create_grant(&key, "host", &v).await.unwrap();
    secrets.push(host.decrypt_key(&wrapped, &v).await.unwrap());
    cp.retire_grant(&key, &grant).await.unwrap();
    let mut errors = Vec::new();
    errors.push(
        host.decrypt_key(&wrapped, &v)
            .await
            .unwrap_err()
            .to_string(),
    );
    errors.push(cp.decrypt_key(&wrapped, &v).await.unwrap_err().to_string());
    errors.push(
        tf.decrypt_key(&wrapped, &VolumeId::generate())
            .await
            .unwrap_err()
            .to_string(),
    );
    errors.push(format!("{:?}", secrets[0]));

    let logs = capture.0.lock().unwrap().clone();
    assert!(
        logs.len() > 10_000,
        "TRACE logging captured too little ({} bytes) to prove anything",
        logs.len()
    );
    let text = String::from_utf8_lossy(&logs).to_string() + &errors.join("\n");
    // Both sides were really traced: the SDK's HTTP layer and the server's request log.
    assert!(
        text.contains("aws_smithy"),
        "no aws-sdk trace lines captured"
    );
    assert!(
        text.contains("kms request served"),
        "no server log lines captured"
    );
    for k in &secrets {
        let raw = k.expose_secret();
        assert!(
            !logs.windows(raw.len()).any(|w| w == raw),
            "raw key bytes in the logs"
        );
        let hex = hex::encode(raw);
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        for (form, s) in [("hex", &hex), ("base64", &b64)] {
            // Any 16-character run of the encoding would be a leak of part of the key.
            for start in (0..s.len() - 16).step_by(8) {
                assert!(
                    !text.contains(&s[start..start + 16]),
                    "{form} key material in the logs or errors"
                );
            }
        }
    }
}
