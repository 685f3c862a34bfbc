//! The remote-KMS path against a server that speaks the AWS KMS API and was not written here:
//! moto's server, started on 127.0.0.1. The same client code as every component uses.
//! (moto does not enforce grants or IAM: the policy tests run against the embedded KMS.)

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use blockfleet_core::config::{KmsClientConfig, Secret};
use blockfleet_core::ids::{KmsKeyId, VolumeId};
use blockfleet_keys::kms::Kms;
use blockfleet_testkit::Moto;

#[tokio::test]
async fn generate_decrypt_and_grants_against_moto() {
    let moto = Moto::start();
    let kms = Kms::connect(&KmsClientConfig {
        endpoint: Some(moto.endpoint.clone()),
        region: "us-east-1".into(),
        access_key_id: Some("testing".into()),
        secret_access_key: Some(Secret::new("testing")),
        credentials_from_environment: false,
    })
    .await;
    let key: KmsKeyId = kms
        .create_key("blockfleet volumes")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(kms.describe_key(&key).await.unwrap(), key.as_str());
    let (v1, v2) = (VolumeId::generate(), VolumeId::generate());
    let w1 = kms.generate_wrapped_key(&key, &v1).await.unwrap();
    let k1 = kms.decrypt_key(&w1, &v1).await.unwrap();
    assert_eq!(k1.expose_secret().len(), 64);
    assert_eq!(
        kms.decrypt_key(&w1, &v1).await.unwrap().expose_secret(),
        k1.expose_secret()
    );
    // The encryption context binds the key to its volume.
    assert!(kms.decrypt_key(&w1, &v2).await.is_err());

    let (grant_id, token) = kms
        .create_grant(&key, "arn:aws:iam::123456789012:role/host-a", &v1)
        .await
        .unwrap();
    assert!(!grant_id.is_empty() && !token.is_empty());
    let grants = kms.list_grants(&key).await.unwrap();
    assert!(
        grants
            .iter()
            .any(|g| g.grant_id == grant_id && g.volume.as_deref() == Some(v1.as_str())),
        "{grants:?}"
    );
    kms.retire_grant(&key, &grant_id).await.unwrap();
    assert!(!kms
        .list_grants(&key)
        .await
        .unwrap()
        .iter()
        .any(|g| g.grant_id == grant_id));

    let missing: KmsKeyId = "1234abcd-12ab-34cd-56ef-1234567890ab".parse().unwrap();
    assert_eq!(
        kms.generate_wrapped_key(&missing, &v1)
            .await
            .unwrap_err()
            .code(),
        "NotFoundException"
    );
}
