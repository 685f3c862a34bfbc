//! One hydration job as a worker holds it: the source (a snapshot, its manifest checked, or a
//! volume at a mark on its block server; its key unwrapped if it is encrypted) and the targets (a block-server connection and an unwrapped key
//! each). A source chunk is read and verified once, decrypted once, then encrypted under each
//! target's own key and written with `WriteIfUnwritten`, which never overwrites a user write.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use blockfleet_api::{Job, JobSource, JobTarget};
use blockfleet_core::ids::VolumeId;
use blockfleet_core::units::{chunk_count, SECTORS_PER_CHUNK};
use blockfleet_keys::kms::{Kms, KmsError};
use blockfleet_keys::xts::Xts;
use blockfleet_proto::{BlockPool, ClientError, ErrorCode};
use blockfleet_snapshot_format::{Archive, Manifest, SnapshotError};
use blockfleet_volume_client::ReplicatedVolume;
use bytes::{Bytes, BytesMut};
use thiserror::Error;

use crate::metrics::Metrics;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum JobError {
    /// Will not succeed on retry: corrupt or missing source data, a key that does not open.
    #[error("{0}")]
    Fatal(String),
    /// Something was unreachable; another attempt may succeed.
    #[error("{0}")]
    Retry(String),
}

fn snapshot_error(e: SnapshotError) -> JobError {
    match &e {
        SnapshotError::Store(s) if !s.is_not_found() => JobError::Retry(e.to_string()),
        _ => JobError::Fatal(e.to_string()),
    }
}

fn kms_error(what: &str, e: KmsError) -> JobError {
    match e {
        KmsError::Unreachable(_) => JobError::Retry(format!("{what}: {e}")),
        _ => JobError::Fatal(format!("{what}: {e}")),
    }
}

fn block_error(addr: &str, e: &ClientError) -> JobError {
    JobError::Retry(format!("block server {addr}: {e}"))
}

/// How long a block server may take to answer before its replica counts as out for this job.
const REPLICA_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The replicas of `volume` as one volume, over the pool's connections.
async fn replicas(
    pool: &BlockPool,
    volume: &VolumeId,
    addrs: &[String],
    size: u64,
) -> ReplicatedVolume {
    let clients = futures::future::join_all(
        addrs
            .iter()
            .map(|a| async move { (a.clone(), pool.get(a).await) }),
    )
    .await;
    ReplicatedVolume::from_clients(volume.clone(), clients, size, REPLICA_TIMEOUT)
}

pub struct Target {
    pub volume: VolumeId,
    pub addr: String,
    client: ReplicatedVolume,
    xts: Option<Xts>,
    chunks: u64,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("volume", &self.volume)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Where source chunks come from.
enum Source {
    Snapshot {
        manifest: Manifest,
        archive: Archive,
    },
    /// A volume as it was at `mark`, read from its replicas.
    Volume {
        volume: VolumeId,
        addr: String,
        client: Box<ReplicatedVolume>,
        mark: u64,
        chunks: u64,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Snapshot { manifest, .. } => write!(f, "snapshot {}", manifest.snapshot_id),
            Source::Volume { volume, mark, .. } => write!(f, "volume {volume} at mark {mark}"),
        }
    }
}

#[derive(Debug)]
pub struct JobContext {
    pub job_id: String,
    source: Source,
    source_xts: Option<Xts>,
    pub targets: Vec<Target>,
    metrics: Arc<Metrics>,
}

async fn unwrap_key(kms: &Kms, wrapped_hex: &str, volume: &VolumeId) -> Result<Xts, JobError> {
    let wrapped = hex::decode(wrapped_hex)
        .map_err(|e| JobError::Fatal(format!("wrapped key of {volume} is not hex: {e}")))?;
    let key = kms
        .decrypt_key(&wrapped, volume)
        .await
        .map_err(|e| kms_error(&format!("data key of {volume}"), e))?;
    Ok(Xts::new(&key))
}

impl JobContext {
    /// Reads and checks the manifest, unwraps the keys, connects to the targets' block servers.
    pub async fn load(
        job: &Job,
        archive: &Archive,
        kms: &Kms,
        pool: &BlockPool,
        metrics: Arc<Metrics>,
    ) -> Result<Self, JobError> {
        // The block servers serve this job's volumes to connections holding its capabilities.
        for g in &job.block_grants {
            pool.grant(g.clone()).await;
        }
        let (source, source_xts) = match &job.source {
            JobSource::Snapshot { snapshot_id } => {
                let manifest = archive
                    .get_manifest(snapshot_id)
                    .await
                    .map_err(snapshot_error)?;
                let xts = match &manifest.encryption {
                    None => None,
                    Some(h) => {
                        let volume = h.context_volume.as_ref().ok_or_else(|| {
                            JobError::Fatal(format!(
                                "snapshot {snapshot_id} is encrypted but names no context volume for its key"
                            ))
                        })?;
                        Some(unwrap_key(kms, &hex::encode(&h.wrapped_key), volume).await?)
                    }
                };
                let source = Source::Snapshot {
                    manifest,
                    archive: archive.clone(),
                };
                (source, xts)
            }
            JobSource::Volume { volume_id, mark } => {
                let sv = job.source_volume.as_ref().ok_or_else(|| {
                    JobError::Fatal(format!("source volume {volume_id} no longer exists"))
                })?;
                let xts = match &sv.wrapped_key {
                    Some(w) => Some(unwrap_key(kms, w, volume_id).await?),
                    None => None,
                };
                let addr = sv.replicas.join(",");
                let client = Box::new(replicas(pool, volume_id, &sv.replicas, sv.size).await);
                let source = Source::Volume {
                    volume: volume_id.clone(),
                    addr,
                    client,
                    mark: *mark,
                    chunks: chunk_count(sv.size),
                };
                (source, xts)
            }
        };
        let mut targets = Vec::new();
        for t in &job.targets {
            targets.push(Self::target(t, kms, pool).await?);
        }
        Ok(JobContext {
            job_id: job.job_id.clone(),
            source,
            source_xts,
            targets,
            metrics,
        })
    }

    async fn target(t: &JobTarget, kms: &Kms, pool: &BlockPool) -> Result<Target, JobError> {
        let xts = match &t.wrapped_key {
            Some(w) => Some(unwrap_key(kms, w, &t.volume_id).await?),
            None => None,
        };
        let addr = t.replicas.join(",");
        let client = replicas(pool, &t.volume_id, &t.replicas, t.size).await;
        Ok(Target {
            volume: t.volume_id.clone(),
            addr,
            client,
            xts,
            chunks: chunk_count(t.size),
        })
    }

    pub fn target_index(&self, volume: &VolumeId) -> Option<usize> {
        self.targets.iter().position(|t| &t.volume == volume)
    }

    pub fn chunks_of(&self, target: usize) -> u64 {
        self.targets[target].chunks
    }

    /// Reads source chunk `c` as stored (`None`: a zero chunk): from a snapshot verified, from
    /// a volume as it was at the mark.
    async fn source_chunk(&self, c: u64) -> Result<Option<BytesMut>, JobError> {
        let data = match &self.source {
            Source::Snapshot { manifest, archive } => {
                let Some(hash) = manifest.chunks.get(&c) else {
                    return Ok(None);
                };
                archive.get_chunk(hash).await.map_err(|e| match e {
                    SnapshotError::Store(ref s) if s.is_not_found() => JobError::Fatal(format!(
                        "chunk {c} of snapshot {} is missing from the store: {e}",
                        manifest.snapshot_id
                    )),
                    other => match snapshot_error(other) {
                        JobError::Fatal(m) => JobError::Fatal(format!(
                            "chunk {c} of snapshot {}: {m}",
                            manifest.snapshot_id
                        )),
                        r => r,
                    },
                })?
            }
            Source::Volume {
                volume,
                addr,
                client,
                mark,
                chunks,
            } => {
                if c >= *chunks {
                    return Ok(None);
                }
                let (info, data) = client
                    .read_mark(*mark, c)
                    .await
                    .map_err(|e| match e.code() {
                        Some(ErrorCode::NoSuchMark) | Some(ErrorCode::NoSuchVolume) => {
                            JobError::Fatal(format!(
                                "source volume {volume} lost its mark {mark} (its block server restarted, or the volume is gone): create the copy again"
                            ))
                        }
                        _ => block_error(addr, &e),
                    })?;
                if !info.has_data() {
                    return Ok(None);
                }
                data
            }
        };
        self.metrics.source_chunks.fetch_add(1, Ordering::Relaxed);
        // Decrypted and encrypted in place: no copy when the buffer is ours alone.
        Ok(Some(
            data.try_into_mut()
                .unwrap_or_else(|b| BytesMut::from(&b[..])),
        ))
    }

    /// Hydrates chunk `c` of the targets `which` (indices into `targets`). A target deleted
    /// meanwhile is skipped.
    pub async fn hydrate(self: &Arc<Self>, c: u64, which: &[usize]) -> Result<(), JobError> {
        let plain = self.source_chunk(c).await?;
        let payloads: Vec<Bytes> = match plain {
            None => vec![Bytes::new(); which.len()],
            Some(mut p) => {
                let me = Arc::clone(self);
                let which = which.to_vec();
                tokio::task::spawn_blocking(move || {
                    let first_unit = c * SECTORS_PER_CHUNK;
                    if let Some(x) = &me.source_xts {
                        x.decrypt_stored(&mut p, first_unit)
                            .map_err(|e| JobError::Fatal(e.to_string()))?;
                    }
                    // Every target but the last gets a copy; the last takes the buffer itself.
                    let mut out = Vec::with_capacity(which.len());
                    for (i, &t) in which.iter().enumerate() {
                        let mut buf = if i + 1 == which.len() {
                            std::mem::take(&mut p)
                        } else {
                            p.clone()
                        };
                        if let Some(x) = &me.targets[t].xts {
                            x.encrypt(&mut buf, first_unit)
                                .map_err(|e| JobError::Fatal(e.to_string()))?;
                        }
                        out.push(buf.freeze());
                    }
                    Ok::<_, JobError>(out)
                })
                .await
                .map_err(|e| JobError::Retry(e.to_string()))??
            }
        };
        let writes = which.iter().zip(payloads).map(|(&t, data)| {
            let target = &self.targets[t];
            async move {
                match target.client.write_if_unwritten(c, data).await {
                    Ok(_) => {
                        self.metrics.chunks_written.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    Err(e) if e.code() == Some(ErrorCode::NoSuchVolume) => {
                        tracing::info!(volume = %target.volume, "target deleted: skipped");
                        Ok(())
                    }
                    Err(e) => Err(block_error(&target.addr, &e)),
                }
            }
        });
        futures::future::try_join_all(writes).await?;
        Ok(())
    }

    /// Chunk -> targets still missing it, read from the block servers (where progress lives).
    pub async fn remaining(&self) -> Result<BTreeMap<u64, Vec<usize>>, JobError> {
        let mut todo: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, t) in self.targets.iter().enumerate() {
            let mut from = 0;
            loop {
                let page = match t.client.unhydrated_chunks(from, 65536).await {
                    Ok(p) => p,
                    Err(e) if e.code() == Some(ErrorCode::NoSuchVolume) => break,
                    Err(e) => return Err(block_error(&t.addr, &e)),
                };
                let Some(&last) = page.last() else { break };
                for c in page {
                    todo.entry(c).or_default().push(i);
                }
                from = last + 1;
            }
        }
        Ok(todo)
    }

    /// Makes the targets' hydration durable.
    pub async fn flush(&self) -> Result<(), JobError> {
        for t in &self.targets {
            match t.client.flush().await {
                Ok(()) => {}
                Err(e) if e.code() == Some(ErrorCode::NoSuchVolume) => {}
                Err(e) => return Err(block_error(&t.addr, &e)),
            }
        }
        Ok(())
    }
}
