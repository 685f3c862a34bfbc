//! The snapshot coordinator: one crash-consistent cut across every volume of a set, then the
//! upload of each volume from its mark, all or nothing.
//!
//! The cut: Pause on every volume (each block server stops acknowledging new writes once
//! in-flight ones finish), then Mark on every volume, then Resume. A write acknowledged before
//! any volume paused is in every snapshot that could depend on it; a write issued after a
//! Resume is in none. So if a write W2 present in B's snapshot was issued after W1 on A was
//! acknowledged, W1 was acknowledged before A paused and is in A's snapshot.
//!
//! The upload reads the chunks changed since the volume's last snapshot (`ListChangedChunks`
//! between marks) through `ReadMark`, stores those the store lacks (content-addressed, so
//! shared chunks are stored once) and writes every manifest only when every volume is done.
//! A failure anywhere deletes what the set stored that no manifest took, and releases the
//! marks. A coordinator that restarts resumes its pending sets (the block servers keep their
//! marks), or fails them if a mark is gone.
//!
//! Garbage collection is safe against uploads: an upload registers a chunk as pending and
//! checks the store under a shared hold of `gc`; collection takes it exclusively, so a chunk
//! is never deleted between an upload finding it present and its manifest being written.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockfleet_api::SnapshotState;
use blockfleet_core::httpjson::ApiError;
use blockfleet_core::ids::SnapshotId;
use blockfleet_proto::{ClientError, ErrorCode};
use blockfleet_snapshot_format::manifest::CIPHER_XTS_4K;
use blockfleet_snapshot_format::{ChunkHash, EncryptionHeader, Manifest, SnapshotError};
use blockfleet_volume_client::ReplicatedVolume;
use futures::StreamExt;

use super::{replicas_error, ControlPlane};
use crate::state::{SnapshotRecord, VolumeRecord};

/// What chunk garbage collection must keep, and its lock.
#[derive(Debug, Default)]
pub(crate) struct ChunkGc {
    /// Shared by uploads checking whether the store has a chunk; exclusive for collection.
    pub(super) lock: tokio::sync::RwLock<()>,
    /// Chunks each uploading snapshot set (or EBS upload) references but has not put in a
    /// manifest yet: collection never deletes them.
    pub(super) pending: std::sync::Mutex<HashMap<String, HashSet<ChunkHash>>>,
}

/// Chunks of one volume read and stored at once.
const UPLOAD_CONCURRENCY: usize = 8;

/// Metrics ops.
pub(super) const PAUSE_WINDOW: usize = 0;
pub(super) const SNAPSHOT_SET: usize = 1;

fn cut_error(v: &VolumeRecord, e: &ClientError) -> ApiError {
    match e.code() {
        Some(ErrorCode::MarkOpen) => ApiError::conflict(
            "VolumeBusy",
            format!(
                "volume {} has every cut slot taken (snapshot sets uploading, copies running); retry when one finishes",
                v.id
            ),
        ),
        _ => replicas_error(e),
    }
}

impl ControlPlane {
    /// Pauses every volume of `vols` (a majority of each one's replicas), then marks and
    /// resumes each; returns each one's mark and how long writes were held (first Pause sent
    /// to last Resume acknowledged). On any failure every mark taken is released and every
    /// pause resumed.
    pub(super) async fn cut(
        &self,
        vols: &[VolumeRecord],
    ) -> Result<(Vec<u64>, Duration), ApiError> {
        let mut sets: Vec<ReplicatedVolume> = Vec::new();
        for v in vols {
            sets.push(self.replicas(&v.id, &v.placement, v.size).await);
        }
        let id = self.next_mark_id();
        let start = Instant::now();
        let paused = futures::future::join_all(sets.iter().map(|r| r.pause())).await;
        let t_paused = start.elapsed();
        let mut failure: Option<ApiError> = None;
        for (v, r) in vols.iter().zip(&paused) {
            if let Err(e) = r {
                failure.get_or_insert_with(|| cut_error(v, e));
            }
        }
        // Once every volume is paused, each is marked and resumed on its own: no write can
        // be acknowledged anywhere between the last pause and its volume's mark, which is all
        // consistency needs, and no volume waits for another's mark.
        let all_paused = failure.is_none();
        let steps = futures::future::join_all(sets.iter().zip(&paused).map(|(r, p)| async move {
            match (p, all_paused) {
                (Err(_), _) => None,
                // One round trip: each block server resumes whatever the mark did.
                (Ok(()), true) => Some(r.mark_resume(id).await),
                (Ok(()), false) => {
                    r.resume().await;
                    None
                }
            }
        }))
        .await;
        let mut marks: Vec<Option<u64>> = vec![None; vols.len()];
        for (i, step) in steps.into_iter().enumerate() {
            match step {
                Some(Ok(m)) => marks[i] = Some(m),
                Some(Err(e)) => {
                    failure.get_or_insert_with(|| cut_error(&vols[i], &e));
                }
                None => {}
            }
        }
        let window = start.elapsed();
        tracing::debug!(
            volumes = vols.len(),
            paused_us = t_paused.as_micros() as u64,
            resumed_us = window.as_micros() as u64,
            "cut"
        );
        for r in &sets {
            self.forget_out(r);
        }
        if let Some(f) = failure {
            for (r, m) in sets.iter().zip(&marks) {
                if let Some(m) = m {
                    r.release_mark(*m).await;
                }
            }
            return Err(f);
        }
        Ok((marks.into_iter().flatten().collect(), window))
    }

    pub(super) fn spawn_set(self: &Arc<Self>, set_id: String) {
        let me = Arc::clone(self);
        tokio::spawn(async move { me.finish_set(&set_id).await });
    }

    /// Uploads every snapshot of a pending set, then completes it or fails it whole.
    async fn finish_set(self: &Arc<Self>, set_id: &str) {
        let started = Instant::now();
        let snaps = match self.set_snapshots(set_id) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(set = set_id, error = %e.message, "cannot read the set");
                return;
            }
        };
        let results =
            futures::future::join_all(snaps.iter().map(|s| self.upload_snapshot(set_id, s))).await;
        let outcome = match results.into_iter().collect::<Result<Vec<_>, String>>() {
            Ok(done) => match self.flush_sources(&snaps).await {
                Ok(()) => self.write_manifests(&done).await.map(|()| done),
                Err(e) => Err(e),
            },
            Err(reason) => Err(reason),
        };
        // Released before the set shows as finished, so a caller who sees it finished can
        // cut again at once.
        for s in &snaps {
            self.release_mark(s).await;
        }
        let ok = match outcome {
            Ok(done) => match self.complete_set(set_id, done).await {
                Ok(()) => true,
                Err(e) => {
                    // Left pending: the next start resumes it (and fails it, its marks gone).
                    tracing::error!(set = set_id, error = %e, "could not record the completed set");
                    false
                }
            },
            Err(reason) => {
                self.fail_set(set_id, &reason).await;
                false
            }
        };
        self.gc
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(set_id);
        self.metrics.record(SNAPSHOT_SET, ok, started.elapsed());
    }

    fn set_snapshots(&self, set_id: &str) -> Result<Vec<SnapshotRecord>, ApiError> {
        let set = self
            .state
            .set(set_id)?
            .ok_or_else(|| ApiError::internal(format!("set {set_id} is gone")))?;
        let mut out = Vec::new();
        for id in &set.snapshots {
            if let Some(s) = self.state.snapshot(id)? {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// Lets the replicas drop a snapshot's mark (best effort: a restarted block server has
    /// dropped it already, and a pause's mark times out).
    async fn release_mark(&self, s: &SnapshotRecord) {
        self.replicas(&s.volume_id, &s.replicas, s.volume_size)
            .await
            .release_mark(s.mark)
            .await;
    }

    /// Reads one volume's changed chunks at its mark and stores the missing ones; returns the
    /// manifest to write and how many chunks changed and were uploaded.
    async fn upload_snapshot(
        &self,
        set_id: &str,
        s: &SnapshotRecord,
    ) -> Result<(Manifest, u64, u64), String> {
        let fail = |what: String| format!("volume {}: {what}", s.volume_id);
        let client = Arc::new(
            self.replicas(&s.volume_id, &s.replicas, s.volume_size)
                .await,
        );
        // Incremental from the base snapshot's map when its manifest is still there.
        let (base_mark, parent, mut chunks) = match &s.base {
            Some((pid, bm)) => match self.archive.get_manifest(pid).await {
                Ok(m) => (*bm, Some(pid.clone()), m.chunks),
                Err(SnapshotError::NotFound(_)) => (0, None, BTreeMap::new()),
                Err(e) => return Err(fail(format!("base snapshot {pid}: {e}"))),
            },
            None => (0, None, BTreeMap::new()),
        };
        let changed = client
            .list_changed_chunks(base_mark, s.mark)
            .await
            .map_err(|e| fail(format!("listing changed chunks: {e}")))?;
        let total = changed.len() as u64;
        self.set_progress(&s.id, 0, Some(total));
        let mut uploaded = 0u64;
        let mut done = 0u64;
        let mut reads = futures::stream::iter(changed.into_iter().map(|c| {
            let client = Arc::clone(&client);
            async move { (c, self.store_chunk(set_id, s, &client, c).await) }
        }))
        .buffer_unordered(UPLOAD_CONCURRENCY);
        while let Some((c, r)) = reads.next().await {
            match r.map_err(|e| fail(format!("chunk {c}: {e}")))? {
                None => {
                    chunks.remove(&c);
                }
                Some((h, new)) => {
                    chunks.insert(c, h);
                    uploaded += u64::from(new);
                }
            }
            done += 1;
            self.set_progress(&s.id, done, None);
        }
        let encryption = match (&s.wrapped_key, &s.kms_key_id) {
            (Some(w), Some(k)) => Some(EncryptionHeader {
                kms_key_id: k
                    .parse()
                    .map_err(|e| fail(format!("stored KMS key id {k}: {e}")))?,
                wrapped_key: hex::decode(w)
                    .map_err(|e| fail(format!("stored wrapped key: {e}")))?,
                cipher: CIPHER_XTS_4K.into(),
                context_volume: Some(s.volume_id.clone()),
            }),
            _ => None,
        };
        let manifest = Manifest {
            snapshot_id: s.id.clone(),
            volume_size: s.volume_size,
            parent,
            created_at: s.created_at,
            description: s.description.clone(),
            encryption,
            chunks,
        };
        Ok((manifest, total, uploaded))
    }

    /// Reads chunk `c` at the mark; `None` for a zero chunk, else its hash and whether this
    /// call stored it.
    async fn store_chunk(
        &self,
        set_id: &str,
        s: &SnapshotRecord,
        client: &ReplicatedVolume,
        c: u64,
    ) -> Result<Option<(ChunkHash, bool)>, String> {
        let (info, data) = client
            .read_mark(s.mark, c)
            .await
            .map_err(|e| match e.code() {
                Some(ErrorCode::NoSuchMark) => format!(
                    "mark {} is gone (the block server restarted or dropped it)",
                    s.mark
                ),
                _ => e.to_string(),
            })?;
        let hashed = tokio::task::spawn_blocking(move || {
            if !info.has_data() || data.iter().all(|&b| b == 0) {
                None
            } else {
                Some((ChunkHash::of(&data), data))
            }
        })
        .await
        .map_err(|e| e.to_string())?;
        let Some((h, data)) = hashed else {
            return Ok(None);
        };
        let present = {
            let _gc = self.gc.lock.read().await;
            self.gc
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(set_id.to_owned())
                .or_default()
                .insert(h);
            self.archive
                .has_chunk(&h)
                .await
                .map_err(|e| e.to_string())?
        };
        if present {
            return Ok(Some((h, false)));
        }
        // Recorded (durably) before the put, so a failed set can find what it stored even
        // after a coordinator crash.
        self.state
            .record_upload(set_id, &h.to_string())
            .and_then(|()| self.state.flush())
            .map_err(|e| e.to_string())?;
        self.archive
            .put_chunk(&h, data)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Some((h, true)))
    }

    fn set_progress(&self, id: &SnapshotId, done: u64, total: Option<u64>) {
        let mut p = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        let e = p.entry(id.clone()).or_insert((0, None));
        e.0 = done;
        if total.is_some() {
            e.1 = total;
        }
    }

    /// Flushes each snapshotted volume: its mark's epoch (the base of its next incremental
    /// snapshot) is durable on the block server before the snapshot completes.
    async fn flush_sources(&self, snaps: &[SnapshotRecord]) -> Result<(), String> {
        for s in snaps {
            let r = self
                .replicas(&s.volume_id, &s.replicas, s.volume_size)
                .await;
            r.flush()
                .await
                .map_err(|e| format!("volume {}: flush: {e}", s.volume_id))?;
        }
        Ok(())
    }

    async fn write_manifests(&self, done: &[(Manifest, u64, u64)]) -> Result<(), String> {
        for (m, _, _) in done {
            self.archive
                .put_manifest(m)
                .await
                .map_err(|e| format!("writing the manifest of {}: {e}", m.snapshot_id))?;
        }
        Ok(())
    }

    /// Marks the set and its snapshots completed (their manifests are written) and makes each
    /// the base of its volume's next snapshot.
    async fn complete_set(
        &self,
        set_id: &str,
        done: Vec<(Manifest, u64, u64)>,
    ) -> Result<(), String> {
        let _changes = self.changes.lock().await;
        let r = (|| {
            let mut set = self
                .state
                .set(set_id)?
                .ok_or_else(|| ApiError::internal("set gone"))?;
            for (m, changed, uploaded) in &done {
                if let Some(mut s) = self.state.snapshot(&m.snapshot_id)? {
                    s.state = SnapshotState::Completed;
                    s.changed_chunks = Some(*changed);
                    s.uploaded_chunks = *uploaded;
                    if let Some(mut v) = self.state.volume(&s.volume_id)? {
                        v.last_snapshot = Some((s.id.clone(), s.mark));
                        self.state.put_volume(&v)?;
                    }
                    self.state.put_snapshot(&s)?;
                }
            }
            set.state = SnapshotState::Completed;
            self.state.put_set(&set)?;
            self.state.forget_uploads(set_id)?;
            self.state.flush()?;
            Ok::<_, ApiError>(())
        })();
        r.map_err(|e| e.message)?;
        tracing::info!(
            set = set_id,
            snapshots = done.len(),
            "snapshot set completed"
        );
        Ok(())
    }

    /// The set and its snapshots to `error`; their manifests and every chunk the set stored
    /// that no other manifest references are deleted.
    async fn fail_set(&self, set_id: &str, reason: &str) {
        tracing::warn!(
            set = set_id,
            reason,
            "snapshot set failed: deleting what it made"
        );
        let snaps = self.set_snapshots(set_id).unwrap_or_default();
        for s in &snaps {
            if let Err(e) = self.archive.delete_manifest(&s.id).await {
                tracing::warn!(snapshot = %s.id, error = %e, "could not delete a manifest");
            }
        }
        self.gc
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(set_id);
        let cleaned = self.clean_up_uploads(set_id).await;
        let _changes = self.changes.lock().await;
        let r = (|| {
            for mut s in snaps {
                s.state = SnapshotState::Error;
                s.error = Some(reason.to_owned());
                self.state.put_snapshot(&s)?;
            }
            if let Some(mut set) = self.state.set(set_id)? {
                set.state = SnapshotState::Error;
                set.error = Some(if cleaned {
                    reason.to_owned()
                } else {
                    format!("{reason} (cleanup pending)")
                });
                self.state.put_set(&set)?;
            }
            self.state.flush()
        })();
        if let Err(e) = r {
            tracing::error!(set = set_id, error = %e, "could not record the failed set");
        }
    }

    /// Deletes each of `candidates` that no manifest and no pending upload references;
    /// returns how many it deleted.
    pub(super) async fn collect_garbage(
        &self,
        candidates: HashSet<ChunkHash>,
    ) -> Result<usize, SnapshotError> {
        if candidates.is_empty() {
            return Ok(0);
        }
        let _gc = self.gc.lock.write().await;
        let mut garbage = candidates;
        for ids in self
            .gc
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            garbage.retain(|h| !ids.contains(h));
        }
        for id in self.archive.list_snapshots().await? {
            if garbage.is_empty() {
                break;
            }
            let m = match self.archive.get_manifest(&id).await {
                Ok(m) => m,
                // Deleted meanwhile: it references nothing.
                Err(SnapshotError::NotFound(_)) => continue,
                // Unreadable: it may reference anything, so nothing is deleted.
                Err(e) => return Err(e),
            };
            for h in m.chunks.values() {
                garbage.remove(h);
            }
        }
        for h in &garbage {
            self.archive.delete_chunk(h).await?;
        }
        Ok(garbage.len())
    }

    /// Resumes the sets a previous run left pending.
    /// Resumes the sets a previous run left pending, and retries the cleanup of failed sets
    /// whose chunks could not all be deleted then.
    pub(super) fn resume_pending_sets(self: &Arc<Self>) -> Result<(), ApiError> {
        for set in self.state.sets()? {
            if set.state == SnapshotState::Pending {
                tracing::info!(set = %set.id, "resuming a pending snapshot set");
                self.spawn_set(set.id);
            } else if set.state == SnapshotState::Error && !self.state.uploads(&set.id)?.is_empty()
            {
                let me = Arc::clone(self);
                tokio::spawn(async move { me.retry_cleanup(&set.id).await });
            }
        }
        Ok(())
    }

    async fn retry_cleanup(&self, set_id: &str) {
        for s in self.set_snapshots(set_id).unwrap_or_default() {
            if self.archive.delete_manifest(&s.id).await.is_err() {
                return;
            }
        }
        if self.clean_up_uploads(set_id).await {
            if let Ok(Some(mut set)) = self.state.set(set_id) {
                if let Some(e) = &set.error {
                    set.error = Some(e.replace(" (cleanup pending)", ""));
                }
                let _ = self.state.put_set(&set).and_then(|()| self.state.flush());
            }
        }
    }

    /// Deletes the chunks a failed set stored that nothing references; true when done.
    async fn clean_up_uploads(&self, set_id: &str) -> bool {
        let stored: HashSet<ChunkHash> = self
            .state
            .uploads(set_id)
            .unwrap_or_default()
            .iter()
            .filter_map(|h| h.parse().ok())
            .collect();
        match self.collect_garbage(stored).await {
            Ok(n) => {
                tracing::info!(set = set_id, deleted_chunks = n, "failed set cleaned up");
                let _ = self
                    .state
                    .forget_uploads(set_id)
                    .and_then(|()| self.state.flush());
                true
            }
            Err(e) => {
                tracing::error!(set = set_id, error = %e, "failed set's chunks not cleaned up (retried at the next start)");
                false
            }
        }
    }
}
