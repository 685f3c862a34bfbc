//! Chunks and manifests in an object store. Every chunk read is checked against its sha256 and
//! every manifest against its MAC: corrupt data is an error, never data.

use std::sync::Arc;

use bytes::Bytes;

use super::{ChunkHash, Manifest, ManifestKey, SnapshotError};
use crate::store::{ObjectStore, StoreError};
use blockfleet_core::ids::SnapshotId;
use blockfleet_core::units::CHUNK;

const SNAPSHOTS: &str = "snapshots/";

fn manifest_key(id: &SnapshotId) -> String {
    format!("{SNAPSHOTS}{id}/manifest")
}

/// A snapshot archive: the chunks and manifests under one store.
#[derive(Debug, Clone)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    key: Arc<ManifestKey>,
}

impl Archive {
    pub fn new(store: Arc<dyn ObjectStore>, key: Arc<ManifestKey>) -> Self {
        Archive { store, key }
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// True if a chunk with this hash is already stored (so it need not be uploaded again).
    pub async fn has_chunk(&self, hash: &ChunkHash) -> Result<bool, SnapshotError> {
        Ok(self.store.head(&hash.key()).await? == Some(CHUNK))
    }

    /// Stores a chunk under its hash. The caller has hashed it already (`hash` must be
    /// `ChunkHash::of(&data)`): hashing is the expensive step, done once.
    pub async fn put_chunk(&self, hash: &ChunkHash, data: Bytes) -> Result<(), SnapshotError> {
        debug_assert_eq!(data.len() as u64, CHUNK);
        self.store.put(&hash.key(), data).await?;
        Ok(())
    }

    /// Reads a chunk and proves it is the chunk asked for.
    pub async fn get_chunk(&self, hash: &ChunkHash) -> Result<Bytes, SnapshotError> {
        let key = hash.key();
        let data = self.store.get(&key).await?;
        if data.len() as u64 != CHUNK {
            return Err(SnapshotError::ChunkLength {
                key,
                len: data.len(),
                expected: CHUNK,
            });
        }
        let (data, actual) = tokio::task::spawn_blocking(move || {
            let h = ChunkHash::of(&data);
            (data, h)
        })
        .await
        .map_err(|e| StoreError::Backend {
            store: self.store.describe(),
            op: "verify",
            key: key.clone(),
            reason: e.to_string(),
        })?;
        if actual != *hash {
            return Err(SnapshotError::CorruptChunk { key, actual });
        }
        Ok(data)
    }

    /// Writes a manifest; the put is atomic, so a snapshot exists whole or not at all.
    pub async fn put_manifest(&self, manifest: &Manifest) -> Result<(), SnapshotError> {
        let bytes = manifest.encode(&self.key);
        self.store
            .put(&manifest_key(&manifest.snapshot_id), bytes.into())
            .await?;
        Ok(())
    }

    pub async fn get_manifest(&self, id: &SnapshotId) -> Result<Manifest, SnapshotError> {
        let bytes = match self.store.get(&manifest_key(id)).await {
            Err(e) if e.is_not_found() => return Err(SnapshotError::NotFound(id.clone())),
            other => other?,
        };
        Manifest::decode(&bytes, &self.key, id)
    }

    /// Removes a snapshot's manifest (its chunks stay: other manifests may share them). Gone
    /// already is not an error.
    pub async fn delete_manifest(&self, id: &SnapshotId) -> Result<(), SnapshotError> {
        match self.store.delete(&manifest_key(id)).await {
            Err(e) if !e.is_not_found() => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Removes a chunk object. Callers make sure no manifest references it.
    pub async fn delete_chunk(&self, hash: &ChunkHash) -> Result<(), SnapshotError> {
        match self.store.delete(&hash.key()).await {
            Err(e) if !e.is_not_found() => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Ids of the snapshots with a manifest, sorted. Keys that are not snapshot manifests are
    /// ignored (a bucket may hold other things).
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotId>, SnapshotError> {
        let keys = self.store.list(SNAPSHOTS).await?;
        Ok(keys
            .iter()
            .filter_map(|k| {
                k.strip_prefix(SNAPSHOTS)?
                    .strip_suffix("/manifest")?
                    .parse()
                    .ok()
            })
            .collect())
    }
}
