//! The control plane's durable state in sled: volumes, hydration jobs, fleet settings,
//! snapshot sets and their snapshots, client tokens, and the chunks each set uploaded.
//! Records are JSON (readable with any sled dump, versioned by serde defaults); every
//! mutation flushes before the API answers, so an acknowledged change survives a crash.

use std::collections::BTreeMap;
use std::path::Path;

use blockfleet_api::{Attachment, HydrationState, JobSource, SnapshotState, VolumeState};
use blockfleet_core::ids::{InstanceId, SnapshotId, VolumeId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("control plane state: {0}")]
    Db(#[from] sled::Error),
    #[error("control plane state: record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub attachment: Attachment,
    /// The KMS grant that lets the host agent unwrap the key (encrypted volumes).
    pub grant_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub size: u64,
    pub state: VolumeState,
    pub kms_key_id: Option<String>,
    /// Hex of the KMS-wrapped data key.
    pub wrapped_key: Option<String>,
    pub snapshot_id: Option<SnapshotId>,
    #[serde(default)]
    pub source_volume_id: Option<VolumeId>,
    /// The block servers holding the replicas.
    pub placement: Vec<String>,
    /// Bumped on every placement change.
    #[serde(default)]
    pub placement_generation: u64,
    /// A replica being moved (a drain): `.1` is filled from the others, then replaces `.0`.
    #[serde(default)]
    pub moving: Option<(String, String)>,
    pub job_id: Option<String>,
    pub attachment: Option<AttachmentRecord>,
    pub created_at: u64,
    pub impaired_reason: Option<String>,
    /// The last completed snapshot and the mark it was cut at: the base of the next one.
    #[serde(default)]
    pub last_snapshot: Option<(SnapshotId, u64)>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// One CreateSnapshots call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetRecord {
    pub id: String,
    pub instance_id: InstanceId,
    pub state: SnapshotState,
    pub snapshots: Vec<SnapshotId>,
    pub pause_window_us: u64,
    pub created_at: u64,
    pub error: Option<String>,
    /// What the call asked, to tell a retry from a different call under the same token.
    pub request: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub set_id: String,
    pub volume_id: VolumeId,
    pub volume_size: u64,
    /// Where (the volume's replicas) and at which mark the volume was cut.
    pub replicas: Vec<String>,
    pub mark: u64,
    /// The previous snapshot and its mark: only chunks changed since are read.
    pub base: Option<(SnapshotId, u64)>,
    pub state: SnapshotState,
    pub kms_key_id: Option<String>,
    pub wrapped_key: Option<String>,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    pub created_at: u64,
    pub changed_chunks: Option<u64>,
    pub uploaded_chunks: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub worker: String,
    pub endpoint: String,
    /// Milliseconds since the Unix epoch.
    pub until_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub source: JobSource,
    pub targets: Vec<VolumeId>,
    pub state: HydrationState,
    pub lease: Option<Lease>,
    /// Claims so far.
    pub attempts: u32,
    pub error: Option<String>,
}

#[derive(Debug)]
pub struct State {
    db: sled::Db,
    volumes: sled::Tree,
    jobs: sled::Tree,
    settings: sled::Tree,
    sets: sled::Tree,
    snapshots: sled::Tree,
    tokens: sled::Tree,
    /// `<set id>/<chunk hash>` for each chunk a set put in the store: what to delete if the
    /// set fails (unless another manifest took it meanwhile).
    uploads: sled::Tree,
    /// Snapshots made through the EBS direct APIs, by id.
    ebs: sled::Tree,
    /// Blocks put to pending EBS snapshots: `<id>/<index, 20 digits>` -> [hash, sum] (moved
    /// into the record at completion), so a put costs one small insert.
    ebs_blocks: sled::Tree,
}

/// A snapshot made through the EBS direct APIs (StartSnapshot .. CompleteSnapshot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EbsRecord {
    pub id: SnapshotId,
    pub volume_size_gib: u64,
    pub parent: Option<SnapshotId>,
    pub description: String,
    pub tags: Vec<(String, String)>,
    pub client_token: Option<String>,
    pub state: SnapshotState,
    /// Seconds since the epoch.
    pub started_at: u64,
    /// A pending snapshot not completed by then (ms since the epoch) is deleted with its blocks.
    pub expires_at_ms: u64,
    /// Block index -> hex SHA-256 of the block as put (its chunk; all-zero blocks are not
    /// stored).
    pub blocks: BTreeMap<u64, String>,
    pub error: Option<String>,
    /// Block index -> hex SHA-256 of the block as the caller sent it (what checksums cover;
    /// the same as `blocks` unless encrypted).
    #[serde(default)]
    pub sums: BTreeMap<u64, String>,
    /// The data key blocks are encrypted under, if encrypted.
    #[serde(default)]
    pub encryption: Option<EbsKey>,
}

/// An encrypted EBS-direct snapshot's data key: only ever wrapped here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EbsKey {
    pub kms_key_id: String,
    /// Hex.
    pub wrapped_key: String,
    /// The encryption context's volume id the key is bound to.
    pub context_volume: VolumeId,
}

fn get<T: DeserializeOwned>(tree: &sled::Tree, key: &str) -> Result<Option<T>, StateError> {
    match tree.get(key)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                key: key.to_owned(),
                reason: e.to_string(),
            }),
    }
}

fn put<T: Serialize>(tree: &sled::Tree, key: &str, v: &T) -> Result<(), StateError> {
    tree.insert(key, serde_json::to_vec(v).unwrap_or_default())?;
    Ok(())
}

fn all<T: DeserializeOwned>(tree: &sled::Tree) -> Result<Vec<T>, StateError> {
    tree.iter()
        .map(|kv| {
            let (k, v) = kv?;
            serde_json::from_slice(&v).map_err(|e| StateError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: e.to_string(),
            })
        })
        .collect()
}

impl State {
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let db = sled::open(dir.join("state"))?;
        Ok(State {
            volumes: db.open_tree("volumes")?,
            jobs: db.open_tree("jobs")?,
            settings: db.open_tree("settings")?,
            sets: db.open_tree("sets")?,
            snapshots: db.open_tree("snapshots")?,
            tokens: db.open_tree("tokens")?,
            uploads: db.open_tree("uploads")?,
            ebs: db.open_tree("ebs")?,
            ebs_blocks: db.open_tree("ebs_blocks")?,
            db,
        })
    }

    /// Makes every change so far durable.
    pub fn flush(&self) -> Result<(), StateError> {
        self.db.flush()?;
        Ok(())
    }

    pub fn volume(&self, id: &VolumeId) -> Result<Option<VolumeRecord>, StateError> {
        get(&self.volumes, id.as_str())
    }

    pub fn volumes(&self) -> Result<Vec<VolumeRecord>, StateError> {
        all(&self.volumes)
    }

    pub fn put_volume(&self, v: &VolumeRecord) -> Result<(), StateError> {
        self.volumes
            .insert(v.id.as_str(), serde_json::to_vec(v).unwrap_or_default())?;
        Ok(())
    }

    pub fn remove_volume(&self, id: &VolumeId) -> Result<(), StateError> {
        self.volumes.remove(id.as_str())?;
        Ok(())
    }

    pub fn job(&self, id: &str) -> Result<Option<JobRecord>, StateError> {
        get(&self.jobs, id)
    }

    pub fn jobs(&self) -> Result<Vec<JobRecord>, StateError> {
        all(&self.jobs)
    }

    pub fn put_job(&self, j: &JobRecord) -> Result<(), StateError> {
        self.jobs
            .insert(j.id.as_str(), serde_json::to_vec(j).unwrap_or_default())?;
        Ok(())
    }

    pub fn remove_job(&self, id: &str) -> Result<(), StateError> {
        self.jobs.remove(id)?;
        Ok(())
    }

    pub fn set(&self, id: &str) -> Result<Option<SetRecord>, StateError> {
        get(&self.sets, id)
    }

    pub fn sets(&self) -> Result<Vec<SetRecord>, StateError> {
        all(&self.sets)
    }

    pub fn put_set(&self, r: &SetRecord) -> Result<(), StateError> {
        put(&self.sets, &r.id, r)
    }

    pub fn snapshot(&self, id: &SnapshotId) -> Result<Option<SnapshotRecord>, StateError> {
        get(&self.snapshots, id.as_str())
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StateError> {
        all(&self.snapshots)
    }

    pub fn put_snapshot(&self, r: &SnapshotRecord) -> Result<(), StateError> {
        put(&self.snapshots, r.id.as_str(), r)
    }

    pub fn remove_snapshot(&self, id: &SnapshotId) -> Result<(), StateError> {
        self.snapshots.remove(id.as_str())?;
        Ok(())
    }

    /// What a client token made (a set id; `create-volume:` tokens: fingerprint and ids).
    pub fn token(&self, token: &str) -> Result<Option<String>, StateError> {
        get(&self.tokens, token)
    }

    pub fn put_token(&self, token: &str, made: &str) -> Result<(), StateError> {
        put(&self.tokens, token, &made)
    }

    pub fn remove_token(&self, token: &str) -> Result<(), StateError> {
        self.tokens.remove(token)?;
        Ok(())
    }

    pub fn record_upload(&self, set_id: &str, hash: &str) -> Result<(), StateError> {
        self.uploads.insert(format!("{set_id}/{hash}"), &[])?;
        Ok(())
    }

    /// Chunk hashes (hex) set `set_id` put in the store.
    pub fn uploads(&self, set_id: &str) -> Result<Vec<String>, StateError> {
        let prefix = format!("{set_id}/");
        self.uploads
            .scan_prefix(&prefix)
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?[prefix.len()..]).into_owned()))
            .collect()
    }

    pub fn forget_uploads(&self, set_id: &str) -> Result<(), StateError> {
        for k in self.uploads.scan_prefix(format!("{set_id}/")).keys() {
            self.uploads.remove(k?)?;
        }
        Ok(())
    }

    pub fn ebs(&self, id: &SnapshotId) -> Result<Option<EbsRecord>, StateError> {
        get(&self.ebs, id.as_str())
    }

    pub fn ebs_all(&self) -> Result<Vec<EbsRecord>, StateError> {
        all(&self.ebs)
    }

    pub fn put_ebs(&self, r: &EbsRecord) -> Result<(), StateError> {
        put(&self.ebs, r.id.as_str(), r)
    }

    pub fn remove_ebs(&self, id: &SnapshotId) -> Result<(), StateError> {
        self.ebs.remove(id.as_str())?;
        self.remove_ebs_blocks(id)
    }

    /// Records block `index` of pending snapshot `id`: its stored hash and the caller's sum.
    pub fn put_ebs_block(
        &self,
        id: &SnapshotId,
        index: u64,
        hash: &str,
        sum: &str,
    ) -> Result<(), StateError> {
        put(&self.ebs_blocks, &format!("{id}/{index:020}"), &(hash, sum))
    }

    /// The blocks put to pending snapshot `id`: index -> (hash, sum).
    pub fn ebs_blocks(
        &self,
        id: &SnapshotId,
    ) -> Result<BTreeMap<u64, (String, String)>, StateError> {
        let prefix = format!("{id}/");
        let mut out = BTreeMap::new();
        for kv in self.ebs_blocks.scan_prefix(&prefix) {
            let (k, v) = kv?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let corrupt = |reason: String| StateError::Corrupt {
                key: key.clone(),
                reason,
            };
            let index: u64 = key[prefix.len()..]
                .parse()
                .map_err(|e: std::num::ParseIntError| corrupt(e.to_string()))?;
            let pair: (String, String) =
                serde_json::from_slice(&v).map_err(|e| corrupt(e.to_string()))?;
            out.insert(index, pair);
        }
        Ok(out)
    }

    pub fn remove_ebs_blocks(&self, id: &SnapshotId) -> Result<(), StateError> {
        for k in self.ebs_blocks.scan_prefix(format!("{id}/")).keys() {
            self.ebs_blocks.remove(k?)?;
        }
        Ok(())
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>, StateError> {
        get(&self.settings, key)
    }

    pub fn put_setting(&self, key: &str, value: &str) -> Result<(), StateError> {
        self.settings
            .insert(key, serde_json::to_vec(value).unwrap_or_default())?;
        Ok(())
    }
}
