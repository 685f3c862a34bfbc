//! Envelope encryption through any KMS that speaks the AWS KMS API (the embedded one, AWS KMS,
//! moto, ...), on `aws-sdk-kms`.
//!
//! - [`Kms`]: the calls blockfleet uses, every data-key call bound to its volume by the
//!   encryption context `{"blockfleet:volume": "<vol-id>"}`.
//! - [`cache`]: the in-memory cache of unwrapped keys (TTL, use limit, size bound).
//!
//! The fleet's manifest MAC key, wrapped by the KMS and kept in the store, is loaded by
//! `blockfleet_snapshot_format::manifest_key`.
//!
//! Plaintext keys leave this module only as [`XtsKey`]/[`Xts`](crate::xts::Xts) values, which
//! zeroize on drop and never print.

pub mod cache;

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{GrantConstraints, GrantOperation};
use aws_sdk_kms::Client;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::xts::{CryptoError, XtsKey, XTS_KEY_LEN};
use blockfleet_core::config::KmsClientConfig;
use blockfleet_core::ids::{KmsKeyId, VolumeId};

/// The encryption-context key that binds a data key to its volume.
pub const VOLUME_CONTEXT_KEY: &str = "blockfleet:volume";

pub fn volume_context(volume: &VolumeId) -> HashMap<String, String> {
    HashMap::from([(VOLUME_CONTEXT_KEY.to_owned(), volume.to_string())])
}

#[derive(Debug, Error)]
pub enum KmsError {
    #[error("KMS access denied: {0}")]
    AccessDenied(String),
    #[error("KMS: not found: {0}")]
    NotFound(String),
    #[error("KMS: invalid ciphertext: {0}")]
    InvalidCiphertext(String),
    #[error("KMS unreachable: {0}")]
    Unreachable(String),
    #[error("KMS {code}: {message}")]
    Other { code: String, message: String },
    #[error("KMS returned an unusable data key: {0}")]
    BadKey(#[from] CryptoError),
}

impl KmsError {
    /// The AWS error code, for tests and logs.
    pub fn code(&self) -> &str {
        match self {
            KmsError::AccessDenied(_) => "AccessDeniedException",
            KmsError::NotFound(_) => "NotFoundException",
            KmsError::InvalidCiphertext(_) => "InvalidCiphertextException",
            KmsError::Unreachable(_) => "Unreachable",
            KmsError::Other { code, .. } => code,
            KmsError::BadKey(_) => "BadKey",
        }
    }
}

fn map_err<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    err: SdkError<E, aws_sdk_kms::config::http::HttpResponse>,
) -> KmsError {
    if matches!(
        err,
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)
    ) {
        return KmsError::Unreachable(DisplayErrorContext(&err).to_string());
    }
    let message = err.message().unwrap_or_default().to_owned();
    match err.code().unwrap_or_default() {
        "AccessDeniedException" | "UnrecognizedClientException" | "InvalidSignatureException" => {
            KmsError::AccessDenied(if message.is_empty() {
                DisplayErrorContext(&err).to_string()
            } else {
                message
            })
        }
        "NotFoundException" => KmsError::NotFound(message),
        "InvalidCiphertextException" | "IncorrectKeyException" => {
            KmsError::InvalidCiphertext(message)
        }
        "" => KmsError::Other {
            code: "Unknown".into(),
            message: DisplayErrorContext(&err).to_string(),
        },
        code => KmsError::Other {
            code: code.to_owned(),
            message,
        },
    }
}

/// A grant as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantInfo {
    pub grant_id: String,
    pub grantee: String,
    pub volume: Option<String>,
}

/// A KMS client for one principal.
#[derive(Debug, Clone)]
pub struct Kms {
    client: Client,
}

impl Kms {
    pub async fn connect(config: &KmsClientConfig) -> Self {
        let shared = blockfleet_core::aws::sdk_config(blockfleet_core::aws::Endpoint {
            url: config.endpoint.as_deref(),
            region: &config.region,
            credentials: config
                .access_key_id
                .as_deref()
                .zip(config.secret_access_key.as_ref()),
            // A key-holding process takes no secret from its environment unless told to.
            environment: if config.credentials_from_environment {
                Ok(())
            } else {
                Err(
                    "no KMS credentials in config (access_key_id, secret_access_key); set \
                     credentials_from_environment = true to use the AWS environment's",
                )
            },
            max_attempts: 3,
            fleet_role: Some(blockfleet_core::tls::Role::Kms),
            timeouts: aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_timeout(Duration::from_secs(30))
                .build(),
        })
        .await;
        Kms {
            client: Client::new(&shared),
        }
    }

    /// Creates a symmetric master key; returns its id.
    pub async fn create_key(&self, description: &str) -> Result<String, KmsError> {
        let out = self
            .client
            .create_key()
            .description(description)
            .send()
            .await
            .map_err(map_err)?;
        out.key_metadata()
            .map(|m| m.key_id().to_owned())
            .ok_or_else(|| KmsError::Other {
                code: "NoKeyMetadata".into(),
                message: "CreateKey returned no key".into(),
            })
    }

    /// The key's id if it exists and is enabled.
    pub async fn describe_key(&self, key: &KmsKeyId) -> Result<String, KmsError> {
        let out = self
            .client
            .describe_key()
            .key_id(key.as_str())
            .send()
            .await
            .map_err(map_err)?;
        out.key_metadata()
            .map(|m| m.key_id().to_owned())
            .ok_or_else(|| KmsError::NotFound(key.to_string()))
    }

    /// A new 512-bit XTS data key for `volume`, wrapped by `key`; the plaintext never leaves the KMS.
    pub async fn generate_wrapped_key(
        &self,
        key: &KmsKeyId,
        volume: &VolumeId,
    ) -> Result<Vec<u8>, KmsError> {
        self.generate_wrapped(key, XTS_KEY_LEN, volume_context(volume))
            .await
    }

    /// Unwraps `volume`'s data key.
    pub async fn decrypt_key(&self, wrapped: &[u8], volume: &VolumeId) -> Result<XtsKey, KmsError> {
        let plain = self.decrypt(wrapped, volume_context(volume)).await?;
        Ok(XtsKey::from_bytes(&plain)?)
    }

    /// A new secret of `len` bytes wrapped by `key` under `context`, without plaintext.
    pub async fn generate_wrapped(
        &self,
        key: &KmsKeyId,
        len: usize,
        context: HashMap<String, String>,
    ) -> Result<Vec<u8>, KmsError> {
        let out = self
            .client
            .generate_data_key_without_plaintext()
            .key_id(key.as_str())
            .number_of_bytes(len as i32)
            .set_encryption_context(Some(context))
            .send()
            .await
            .map_err(map_err)?;
        out.ciphertext_blob
            .map(Blob::into_inner)
            .ok_or_else(|| KmsError::InvalidCiphertext("no ciphertext in the reply".into()))
    }

    /// Unwraps a secret made under `context`.
    pub async fn decrypt(
        &self,
        wrapped: &[u8],
        context: HashMap<String, String>,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let out = self
            .client
            .decrypt()
            .ciphertext_blob(Blob::new(wrapped))
            .set_encryption_context(Some(context))
            .send()
            .await
            .map_err(map_err)?;
        Ok(Zeroizing::new(
            out.plaintext.map(Blob::into_inner).unwrap_or_default(),
        ))
    }

    /// Lets `grantee` decrypt `volume`'s data key under `key`; returns the grant id and token.
    pub async fn create_grant(
        &self,
        key: &KmsKeyId,
        grantee: &str,
        volume: &VolumeId,
    ) -> Result<(String, String), KmsError> {
        let out = self
            .client
            .create_grant()
            .key_id(key.as_str())
            .grantee_principal(grantee)
            .operations(GrantOperation::Decrypt)
            .constraints(
                GrantConstraints::builder()
                    .set_encryption_context_subset(Some(volume_context(volume)))
                    .build(),
            )
            .name(format!("attach-{volume}"))
            .send()
            .await
            .map_err(map_err)?;
        Ok((
            out.grant_id().unwrap_or_default().to_owned(),
            out.grant_token().unwrap_or_default().to_owned(),
        ))
    }

    pub async fn retire_grant(&self, key: &KmsKeyId, grant_id: &str) -> Result<(), KmsError> {
        self.client
            .retire_grant()
            .key_id(key.as_str())
            .grant_id(grant_id)
            .send()
            .await
            .map(|_| ())
            .map_err(map_err)
    }

    pub async fn list_grants(&self, key: &KmsKeyId) -> Result<Vec<GrantInfo>, KmsError> {
        let out = self
            .client
            .list_grants()
            .key_id(key.as_str())
            .send()
            .await
            .map_err(map_err)?;
        Ok(out
            .grants()
            .iter()
            .map(|g| GrantInfo {
                grant_id: g.grant_id().unwrap_or_default().to_owned(),
                grantee: g.grantee_principal().unwrap_or_default().to_owned(),
                volume: g
                    .constraints()
                    .and_then(|c| c.encryption_context_subset())
                    .and_then(|m| m.get(VOLUME_CONTEXT_KEY).cloned()),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key-holding process with no KMS credentials in its config takes none from its
    /// environment: every call fails before anything is sent, naming the setting.
    #[tokio::test]
    async fn no_credentials_from_the_environment_unless_asked() {
        let kms = Kms::connect(&KmsClientConfig {
            endpoint: Some("http://127.0.0.1:9".into()),
            ..Default::default()
        })
        .await;
        let e = kms.create_key("x").await.unwrap_err().to_string();
        assert!(e.contains("credentials_from_environment"), "{e}");
    }
}
