//! The embedded KMS through `aws-sdk-kms` (the same client code every component uses), over
//! HTTP on 127.0.0.1: the policy table principal by principal, grants, tampering, bad
//! credentials.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use blockfleet::kms_server;
use blockfleet_core::config::{KmsClientConfig, KmsPrincipal, KmsRole, KmsServerConfig, Secret};
use blockfleet_core::ids::{KmsKeyId, VolumeId};
use blockfleet_core::kms::Kms;

struct Fleet {
    endpoint: String,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

const PRINCIPALS: [(&str, KmsRole); 5] = [
    ("control-plane", KmsRole::ControlPlane),
    ("transform", KmsRole::Transform),
    ("host-a", KmsRole::HostAgent),
    ("host-b", KmsRole::HostAgent),
    ("block-server", KmsRole::BlockServer),
];

fn akid(name: &str) -> String {
    format!("AK{}", name.to_uppercase().replace('-', ""))
}

fn secret(name: &str) -> String {
    format!("secret-of-{name}-0123456789")
}

async fn start() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let config = KmsServerConfig {
        data_dir: dir.path().join("kms"),
        root_key_file: dir.path().join("root.key"),
        principals: PRINCIPALS
            .iter()
            .map(|(name, role)| KmsPrincipal {
                name: (*name).into(),
                role: *role,
                access_key_id: akid(name),
                secret_access_key: Secret::new(secret(name)),
            })
            .collect(),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(kms_server::run(config, listener, async {
        let _ = rx.await;
    }));
    Fleet {
        endpoint,
        _dir: dir,
        _stop: tx,
    }
}

async fn client(f: &Fleet, name: &str, secret_key: &str) -> Kms {
    Kms::connect(&KmsClientConfig {
        endpoint: Some(f.endpoint.clone()),
        region: "local".into(),
        access_key_id: Some(akid(name)),
        secret_access_key: Some(Secret::new(secret_key)),
    })
    .await
}

#[tokio::test]
async fn policy_grants_and_tampering_through_aws_sdk_kms() {
    let f = start().await;
    let cp = client(&f, "control-plane", &secret("control-plane")).await;
    let tf = client(&f, "transform", &secret("transform")).await;
    let host_a = client(&f, "host-a", &secret("host-a")).await;
    let host_b = client(&f, "host-b", &secret("host-b")).await;
    let bs = client(&f, "block-server", &secret("block-server")).await;

    let key: KmsKeyId = cp.create_key("volumes").await.unwrap().parse().unwrap();
    assert_eq!(cp.describe_key(&key).await.unwrap(), key.as_str());
    let (v1, v2) = (VolumeId::generate(), VolumeId::generate());
    let w1 = cp.generate_wrapped_key(&key, &v1).await.unwrap();
    let w2 = cp.generate_wrapped_key(&key, &v2).await.unwrap();
    assert_ne!(w1, w2);

    // Transform may decrypt; the same wrapped key gives the same key.
    let k1 = tf.decrypt_key(&w1, &v1).await.unwrap();
    assert_eq!(
        k1.expose_secret(),
        tf.decrypt_key(&w1, &v1).await.unwrap().expose_secret()
    );
    assert!(
        !w1.windows(64).any(|w| w == k1.expose_secret()),
        "wrapped key holds the plaintext"
    );

    // The control plane and block servers never decrypt; block servers do nothing at all.
    for (who, c) in [("control-plane", &cp), ("block-server", &bs)] {
        assert_eq!(
            c.decrypt_key(&w1, &v1).await.unwrap_err().code(),
            "AccessDeniedException",
            "{who}"
        );
    }
    assert_eq!(
        bs.create_key("x").await.unwrap_err().code(),
        "AccessDeniedException"
    );
    assert_eq!(
        bs.generate_wrapped_key(&key, &v1).await.unwrap_err().code(),
        "AccessDeniedException"
    );
    assert_eq!(
        tf.generate_wrapped_key(&key, &v1).await.unwrap_err().code(),
        "AccessDeniedException"
    );
    assert_eq!(
        host_a
            .create_grant(&key, "host-a", &v1)
            .await
            .unwrap_err()
            .code(),
        "AccessDeniedException"
    );

    // A host agent decrypts only under a live grant for that volume.
    assert_eq!(
        host_a.decrypt_key(&w1, &v1).await.unwrap_err().code(),
        "AccessDeniedException"
    );
    let (grant_id, _token) = cp.create_grant(&key, "host-a", &v1).await.unwrap();
    assert_eq!(
        host_a.decrypt_key(&w1, &v1).await.unwrap().expose_secret(),
        k1.expose_secret()
    );
    assert_eq!(
        host_a.decrypt_key(&w2, &v2).await.unwrap_err().code(),
        "AccessDeniedException",
        "other volume"
    );
    assert_eq!(
        host_b.decrypt_key(&w1, &v1).await.unwrap_err().code(),
        "AccessDeniedException",
        "other host"
    );
    let grants = cp.list_grants(&key).await.unwrap();
    assert_eq!(grants.len(), 1);
    assert_eq!(
        (grants[0].grantee.as_str(), grants[0].volume.as_deref()),
        ("host-a", Some(v1.as_str()))
    );
    cp.retire_grant(&key, &grant_id).await.unwrap();
    assert_eq!(
        host_a.decrypt_key(&w1, &v1).await.unwrap_err().code(),
        "AccessDeniedException",
        "retired"
    );
    assert!(cp.list_grants(&key).await.unwrap().is_empty());
    assert_eq!(
        cp.retire_grant(&key, &grant_id).await.unwrap_err().code(),
        "NotFoundException"
    );

    // A ciphertext for another volume's context, or altered, does not open.
    assert_eq!(
        tf.decrypt_key(&w1, &v2).await.unwrap_err().code(),
        "InvalidCiphertextException"
    );
    let mut bad = w1.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x40;
    assert_eq!(
        tf.decrypt_key(&bad, &v1).await.unwrap_err().code(),
        "InvalidCiphertextException"
    );
    assert_eq!(
        tf.decrypt_key(b"garbage", &v1).await.unwrap_err().code(),
        "InvalidCiphertextException"
    );

    // Unknown keys, wrong secrets and unknown access keys.
    let missing: KmsKeyId = "1234abcd-12ab-34cd-56ef-1234567890ab".parse().unwrap();
    assert_eq!(
        cp.generate_wrapped_key(&missing, &v1)
            .await
            .unwrap_err()
            .code(),
        "NotFoundException"
    );
    let forged = client(&f, "transform", "not-the-secret-at-all").await;
    assert_eq!(
        forged.decrypt_key(&w1, &v1).await.unwrap_err().code(),
        "AccessDeniedException"
    );
    let stranger = client(&f, "nobody", &secret("nobody")).await;
    assert_eq!(
        stranger.create_key("x").await.unwrap_err().code(),
        "AccessDeniedException"
    );
}
