//! The fleet manifest key held by the KMS: 32 bytes made by GenerateDataKeyWithoutPlaintext
//! under the encryption context `blockfleet:purpose = manifest-mac`, kept wrapped in the object
//! store at `keys/manifest-mac.wrapped`, and unwrapped on use. Only the snapshot coordinator
//! and the transform fleet may unwrap it (the embedded KMS's policy).

use std::collections::HashMap;

use thiserror::Error;

use crate::store::{ObjectStore, StoreError};
use crate::ManifestKey;
use blockfleet_core::ids::KmsKeyId;
use blockfleet_keys::kms::{Kms, KmsError};
use blockfleet_keys::KeyFileError;

/// Where the wrapped key lives in the store.
pub const WRAPPED_MANIFEST_KEY: &str = "keys/manifest-mac.wrapped";
pub const PURPOSE_CONTEXT_KEY: &str = "blockfleet:purpose";
pub const MANIFEST_MAC_PURPOSE: &str = "manifest-mac";

pub fn manifest_key_context() -> HashMap<String, String> {
    HashMap::from([(
        PURPOSE_CONTEXT_KEY.to_owned(),
        MANIFEST_MAC_PURPOSE.to_owned(),
    )])
}

#[derive(Debug, Error)]
pub enum ManifestKeyError {
    #[error("manifest key: {0}")]
    Kms(#[from] KmsError),
    #[error("manifest key: {0}")]
    Store(#[from] StoreError),
    #[error("manifest key: the KMS returned {0} bytes, not 32")]
    Length(usize),
}

/// Loads the fleet manifest key, creating and storing a wrapped one on first use.
pub async fn load_or_create(
    store: &dyn ObjectStore,
    kms: &Kms,
    key: &KmsKeyId,
) -> Result<ManifestKey, ManifestKeyError> {
    let wrapped = match store.get(WRAPPED_MANIFEST_KEY).await {
        Ok(w) => w.to_vec(),
        Err(e) if e.is_not_found() => {
            let w = kms
                .generate_wrapped(key, 32, manifest_key_context())
                .await?;
            store.put(WRAPPED_MANIFEST_KEY, w.clone().into()).await?;
            // Two first users racing: both put; read back so every user ends on the survivor.
            store.get(WRAPPED_MANIFEST_KEY).await?.to_vec()
        }
        Err(e) => return Err(e.into()),
    };
    let plain = kms.decrypt(&wrapped, manifest_key_context()).await?;
    let bytes: [u8; 32] = plain[..]
        .try_into()
        .map_err(|_| ManifestKeyError::Length(plain.len()))?;
    Ok(ManifestKey::from_bytes(bytes))
}

#[derive(Debug, Error)]
pub enum OpenArchiveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Kms(#[from] ManifestKeyError),
    #[error(transparent)]
    File(#[from] KeyFileError),
}

/// The snapshot archive of `config`: its object store and the fleet manifest key, from the
/// KMS (as the principal of `kms`) when `snapshot.manifest_key_kms_key_id` is set, else from
/// `snapshot.manifest_key_file`.
pub async fn open_archive(
    store: &blockfleet_core::config::StoreConfig,
    snapshot: &blockfleet_core::config::SnapshotConfig,
    kms: &blockfleet_core::config::KmsClientConfig,
) -> Result<crate::Archive, OpenArchiveError> {
    let store = crate::store::open(store).await?;
    let key = match &snapshot.manifest_key_kms_key_id {
        Some(kms_key) => {
            let kms = Kms::connect(kms).await;
            load_or_create(store.as_ref(), &kms, kms_key).await?
        }
        None => ManifestKey::load_or_create(&snapshot.manifest_key_file)?,
    };
    Ok(crate::Archive::new(store, std::sync::Arc::new(key)))
}
