//! The snapshot format in an object store (bucket + prefix):
//!
//! ```text
//! chunks/<sha256 of the stored bytes, hex>      one 512 KiB chunk, content-addressed
//! snapshots/<snapshot-id>/manifest              every non-zero chunk, MAC'd (see `manifest`)
//! ```
//!
//! - [`chunk`]: chunk hashes, zero detection, verification.
//! - [`manifest`]: the versioned manifest and its binary encoding with an HMAC-SHA256 trailer.
//! - [`manifest_key`]: the fleet manifest key, kept wrapped by the KMS in the store (or a key file).
//! - [`store`]: the object-store trait with its local-directory and S3 backends.
//! - [`archive`]: reading and writing chunks and manifests in an [`ObjectStore`](crate::store::ObjectStore),
//!   verifying every byte read.

pub mod archive;
pub mod chunk;
pub mod manifest;
#[cfg(feature = "kms")]
pub mod manifest_key;
pub mod store;

use thiserror::Error;

pub use archive::Archive;
pub use blockfleet_keys::ManifestKey;
pub use chunk::ChunkHash;
pub use manifest::{EncryptionHeader, Manifest};

use crate::store::StoreError;
use blockfleet_core::ids::SnapshotId;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("snapshot {0} does not exist")]
    NotFound(SnapshotId),
    #[error("chunk {key} is corrupt: its bytes hash to {actual}")]
    CorruptChunk { key: String, actual: ChunkHash },
    #[error("chunk {key} is corrupt: {len} bytes, expected {expected}")]
    ChunkLength {
        key: String,
        len: usize,
        expected: u64,
    },
    #[error("manifest of {snapshot_id} is corrupt: {reason}")]
    CorruptManifest { snapshot_id: String, reason: String },
    #[error("manifest of {snapshot_id} fails authentication: it was altered, or was written under another manifest key")]
    ManifestMac { snapshot_id: String },
    #[error("manifest of {snapshot_id} has format {format}; this build reads format {supported}")]
    UnsupportedFormat {
        snapshot_id: String,
        format: u32,
        supported: u32,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}
