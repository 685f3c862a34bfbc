//! The control plane's durable state in sled: volumes, hydration jobs, fleet settings.
//! Records are JSON (readable with any sled dump, versioned by serde defaults); every
//! mutation flushes before the API answers, so an acknowledged change survives a crash.

use std::path::Path;

use blockfleet_core::api::{Attachment, HydrationState, JobSource, VolumeState};
use blockfleet_core::ids::{SnapshotId, VolumeId};
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
    pub placement: Vec<String>,
    pub job_id: Option<String>,
    pub attachment: Option<AttachmentRecord>,
    pub created_at: u64,
    pub impaired_reason: Option<String>,
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

    pub fn setting(&self, key: &str) -> Result<Option<String>, StateError> {
        get(&self.settings, key)
    }

    pub fn put_setting(&self, key: &str, value: &str) -> Result<(), StateError> {
        self.settings
            .insert(key, serde_json::to_vec(value).unwrap_or_default())?;
        Ok(())
    }
}
