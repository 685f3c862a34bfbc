//! Object stores: one async trait with a local-directory backend (the embedded default) and an S3
//! backend. Keys are relative to the store's root (a directory, or a bucket and prefix) and
//! are checked before they reach a path or a URL.
//!
//! Both backends make `put` atomic: a reader sees no object or the whole object, never part of it.

mod local;
#[cfg(feature = "s3")]
mod s3;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use thiserror::Error;

pub use local::LocalStore;
#[cfg(feature = "s3")]
pub use s3::S3Store;

use blockfleet_core::config::StoreConfig;
use blockfleet_core::object_key;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{store}: object {key:?} not found")]
    NotFound { store: String, key: String },
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("{store}: bucket {bucket:?} does not exist")]
    NoSuchBucket { store: String, bucket: String },
    #[error("{store}: cannot reach the endpoint: {reason}")]
    Unreachable { store: String, reason: String },
    #[error("{store}: access denied ({reason})")]
    AccessDenied { store: String, reason: String },
    #[error("{store}: {op} {key:?} timed out")]
    Timeout {
        store: String,
        op: &'static str,
        key: String,
    },
    #[error("{store}: {op} {key:?}: {source}")]
    Io {
        store: String,
        op: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{store}: {op} {key:?} failed: {reason}")]
    Backend {
        store: String,
        op: &'static str,
        key: String,
        reason: String,
    },
}

impl StoreError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// An object store holding snapshot chunks and manifests.
#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug {
    /// Where the store is, for messages: `local:/path` or `s3://bucket/prefix`.
    fn describe(&self) -> String;
    /// Checks the store is reachable and its bucket or directory exists.
    async fn check(&self) -> Result<(), StoreError>;
    /// Writes an object whole, replacing any object of that key.
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError>;
    /// Reads a whole object; `NotFound` if there is none.
    async fn get(&self, key: &str) -> Result<Bytes, StoreError>;
    /// The object's size, or `None` if there is none.
    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError>;
    /// Keys beginning with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Removes an object; removing a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
}

/// Opens the store a config names and checks that it answers.
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let store: Arc<dyn ObjectStore> = match config {
        StoreConfig::Local(c) => Arc::new(LocalStore::open(&c.path)?),
        #[cfg(feature = "s3")]
        StoreConfig::S3(c) => Arc::new(S3Store::connect(c).await),
        #[cfg(not(feature = "s3"))]
        StoreConfig::S3(_) => {
            return Err(StoreError::Unreachable {
                store: "s3".into(),
                reason: "this build has no S3 support (feature `s3`)".into(),
            })
        }
    };
    store.check().await?;
    Ok(store)
}

/// Checks an object key (see [`blockfleet_core::object_key`]).
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    object_key::check_key(key).map_err(|reason| StoreError::InvalidKey {
        key: key.chars().take(200).collect(),
        reason,
    })
}

/// Checks a list prefix: empty, or a valid key optionally ending in `/`.
pub fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    object_key::check_prefix(prefix).map_err(|reason| StoreError::InvalidKey {
        key: prefix.chars().take(200).collect(),
        reason,
    })
}
