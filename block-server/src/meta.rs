//! Metadata in sled (0.34, behind this one module so it can be replaced):
//!
//! - tree `volumes`: volume id -> JSON [`VolumeRecord`];
//! - tree `chunks`: volume id, `/`, chunk index (u64 big-endian) -> 41-byte [`ChunkMeta`]
//!   (only chunks ever written or hydrated have an entry);
//! - tree `server`: `clean` -> 1 after a clean shutdown, 0 while running.

use std::collections::BTreeMap;

use blockfleet_core::ids::VolumeId;
use serde::{Deserialize, Serialize};

/// A volume as registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    pub size: u64,
    pub hydrating: bool,
    /// Id of the latest mark taken (0: none); mark ids never repeat.
    pub epoch: u64,
    /// Set when the server restarted without a clean shutdown while the epoch was this: chunk
    /// state written since may be lost, so change lists reaching back before it are full lists.
    pub unclean_epoch: Option<u64>,
}

/// Per-chunk state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkMeta {
    pub hydrated: bool,
    /// Units written by the user while the chunk was not hydrated (bit i = unit i).
    pub user_written: u128,
    /// Bumped on every write; 0 = never written.
    pub generation: u64,
    /// The epoch (latest mark id) when the chunk was last written by the user.
    pub last_epoch: u64,
}

const CHUNK_META_LEN: usize = 1 + 16 + 8 + 8;

impl ChunkMeta {
    fn encode(&self) -> [u8; CHUNK_META_LEN] {
        let mut b = [0u8; CHUNK_META_LEN];
        b[0] = u8::from(self.hydrated);
        b[1..17].copy_from_slice(&self.user_written.to_le_bytes());
        b[17..25].copy_from_slice(&self.generation.to_le_bytes());
        b[25..33].copy_from_slice(&self.last_epoch.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != CHUNK_META_LEN || b[0] > 1 {
            return None;
        }
        Some(ChunkMeta {
            hydrated: b[0] == 1,
            user_written: u128::from_le_bytes(b[1..17].try_into().ok()?),
            generation: u64::from_le_bytes(b[17..25].try_into().ok()?),
            last_epoch: u64::from_le_bytes(b[25..33].try_into().ok()?),
        })
    }
}

fn chunk_key(volume: &VolumeId, chunk: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(32);
    k.extend_from_slice(volume.as_str().as_bytes());
    k.push(b'/');
    k.extend_from_slice(&chunk.to_be_bytes());
    k
}

fn chunk_prefix(volume: &VolumeId) -> Vec<u8> {
    let mut k = volume.as_str().as_bytes().to_vec();
    k.push(b'/');
    k
}

#[derive(Debug, Clone)]
pub struct Meta {
    db: sled::Db,
    volumes: sled::Tree,
    chunks: sled::Tree,
    server: sled::Tree,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error(transparent)]
    Sled(#[from] sled::Error),
    #[error("corrupt metadata for {what}")]
    Corrupt { what: String },
}

impl Meta {
    pub fn open(path: &std::path::Path) -> Result<Self, sled::Error> {
        let db = open_when_released(path)?;
        Ok(Meta {
            volumes: db.open_tree("volumes")?,
            chunks: db.open_tree("chunks")?,
            server: db.open_tree("server")?,
            db,
        })
    }

    /// Whether the last run ended with a clean shutdown.
    pub fn was_clean(&self) -> Result<bool, sled::Error> {
        Ok(self.server.get("clean")?.is_some_and(|v| v.as_ref() == [1]))
    }

    pub fn set_clean(&self, clean: bool) -> Result<(), sled::Error> {
        self.server.insert("clean", &[u8::from(clean)])?;
        self.db.flush()?;
        Ok(())
    }

    pub fn volumes(&self) -> Result<Vec<(VolumeId, VolumeRecord)>, MetaError> {
        let mut out = Vec::new();
        for kv in self.volumes.iter() {
            let (k, v) = kv?;
            let corrupt = || MetaError::Corrupt {
                what: format!("volume record {:?}", String::from_utf8_lossy(&k)),
            };
            let id: VolumeId = std::str::from_utf8(&k)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(corrupt)?;
            let rec: VolumeRecord = serde_json::from_slice(&v).map_err(|_| corrupt())?;
            out.push((id, rec));
        }
        Ok(out)
    }

    /// Writes a volume record durably.
    /// Updates a volume's record in memory; it reaches disk with the next flush (a mark's
    /// epoch: see `Volume::mark`).
    pub fn put_volume_unsynced(
        &self,
        id: &VolumeId,
        rec: &VolumeRecord,
    ) -> Result<(), sled::Error> {
        let v = serde_json::to_vec(rec).expect("volume record serializes");
        self.volumes.insert(id.as_str(), v)?;
        Ok(())
    }

    pub fn put_volume(&self, id: &VolumeId, rec: &VolumeRecord) -> Result<(), sled::Error> {
        let v = serde_json::to_vec(rec).expect("volume record serializes");
        self.volumes.insert(id.as_str(), v)?;
        self.db.flush()?;
        Ok(())
    }

    /// Removes a volume's record and chunk state durably.
    pub fn delete_volume(&self, id: &VolumeId) -> Result<(), sled::Error> {
        self.volumes.remove(id.as_str())?;
        let mut batch = sled::Batch::default();
        for kv in self.chunks.scan_prefix(chunk_prefix(id)) {
            batch.remove(kv?.0);
        }
        self.chunks.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    pub fn load_chunks(&self, id: &VolumeId) -> Result<BTreeMap<u64, ChunkMeta>, MetaError> {
        let prefix = chunk_prefix(id);
        let mut out = BTreeMap::new();
        for kv in self.chunks.scan_prefix(&prefix) {
            let (k, v) = kv?;
            let corrupt = || MetaError::Corrupt {
                what: format!("chunk state of {id}"),
            };
            let idx = k
                .get(prefix.len()..)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(corrupt)?;
            out.insert(idx, ChunkMeta::decode(&v).ok_or_else(corrupt)?);
        }
        Ok(out)
    }

    /// Stages chunk states; they become durable at the next [`Meta::flush`].
    pub fn stage_chunks(
        &self,
        id: &VolumeId,
        metas: &[(u64, ChunkMeta)],
    ) -> Result<(), sled::Error> {
        let mut batch = sled::Batch::default();
        for (c, m) in metas {
            batch.insert(chunk_key(id, *c), &m.encode()[..]);
        }
        self.chunks.apply_batch(batch)
    }

    pub fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush().map(|_| ())
    }
}

/// Opens the sled database at `path`, waiting up to 2 s for its file lock: a server restarted
/// in the same process may find the previous instance's sled flusher thread still holding it
/// for a moment after the last handle was dropped.
fn open_when_released(path: &std::path::Path) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match sled::Config::new().path(path).open() {
            Err(sled::Error::Io(e))
                if (e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("could not acquire lock"))
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_meta_round_trip_and_corruption() {
        let m = ChunkMeta {
            hydrated: true,
            user_written: 3 << 90,
            generation: 77,
            last_epoch: 4,
        };
        assert_eq!(ChunkMeta::decode(&m.encode()), Some(m));
        let mut b = m.encode();
        b[0] = 9;
        assert_eq!(ChunkMeta::decode(&b), None);
        assert_eq!(ChunkMeta::decode(&b[..10]), None);
    }

    #[test]
    fn persisted_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = VolumeId::generate();
        let rec = VolumeRecord {
            size: 1 << 20,
            hydrating: false,
            epoch: 3,
            unclean_epoch: None,
        };
        {
            let m = Meta::open(&dir.path().join("db")).unwrap();
            m.put_volume(&id, &rec).unwrap();
            m.stage_chunks(
                &id,
                &[(
                    1,
                    ChunkMeta {
                        generation: 5,
                        ..Default::default()
                    },
                )],
            )
            .unwrap();
            m.flush().unwrap();
            m.set_clean(true).unwrap();
        }
        let m = Meta::open(&dir.path().join("db")).unwrap();
        assert!(m.was_clean().unwrap());
        assert_eq!(m.volumes().unwrap(), vec![(id.clone(), rec)]);
        assert_eq!(m.load_chunks(&id).unwrap()[&1].generation, 5);
        m.delete_volume(&id).unwrap();
        assert!(m.volumes().unwrap().is_empty());
        assert!(m.load_chunks(&id).unwrap().is_empty());
    }
}
