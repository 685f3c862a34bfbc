//! The snapshot format in an object store (bucket + prefix):
//!
//! ```text
//! chunks/<sha256 of the stored bytes, hex>      one 512 KiB chunk, content-addressed
//! snapshots/<snapshot-id>/manifest              every non-zero chunk, MAC'd (see `manifest`)
//! ```
//!
//! - [`chunk`]: chunk hashes, zero detection, verification.
//! - [`manifest`]: the versioned manifest and its binary encoding with an HMAC-SHA256 trailer.
//! - [`key`]: the manifest MAC key file.
//! - [`archive`]: reading and writing chunks and manifests in an [`ObjectStore`](crate::store::ObjectStore),
//!   verifying every byte read.

pub mod archive;
pub mod chunk;
pub mod key;
pub mod manifest;

use thiserror::Error;

pub use archive::Archive;
pub use chunk::ChunkHash;
pub use key::ManifestKey;
pub use manifest::{EncryptionHeader, Manifest};

use crate::ids::SnapshotId;
use crate::store::StoreError;

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
    #[error("manifest key {path}: {reason}")]
    ManifestKey { path: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}
