//! Snapshot actions: CreateSnapshots (the coordinator's entry), DescribeSnapshotSet,
//! DescribeSnapshots, DeleteSnapshot, ListChangedBlocks.

use std::collections::HashSet;
use std::sync::Arc;

use blockfleet_api::{
    validate_tags, ChangedBlocks, CreateSnapshotsRequest, DescribeSnapshotSetRequest,
    DescribeSnapshotsRequest, HydrationState, JobSource, ListChangedBlocksRequest, Snapshot,
    SnapshotIdRequest, SnapshotSet, SnapshotState,
};
use blockfleet_core::httpjson::{parse, ApiError, Reply};
use blockfleet_core::ids::{SnapshotId, VolumeId};
use blockfleet_core::units::CHUNK;
use blockfleet_snapshot_format::{Manifest, SnapshotError};
use serde_json::json;

use super::coordinator::PAUSE_WINDOW;
use super::{now_ms, ControlPlane};
use crate::state::{SetRecord, SnapshotRecord};

fn to_value<T: serde::Serialize>(v: &T) -> Reply {
    serde_json::to_value(v).map_err(|e| ApiError::internal(e.to_string()))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request("InvalidParameterValue", msg)
}

impl ControlPlane {
    fn snapshot_view(&self, s: &SnapshotRecord) -> Snapshot {
        let (done, total) = match s.state {
            SnapshotState::Pending => self
                .progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&s.id)
                .copied()
                .unwrap_or((0, None)),
            _ => (s.changed_chunks.unwrap_or(0), s.changed_chunks),
        };
        Snapshot {
            snapshot_id: s.id.clone(),
            set_id: Some(s.set_id.clone()),
            volume_id: Some(s.volume_id.clone()),
            volume_size: s.volume_size,
            state: s.state,
            parent: s.base.as_ref().map(|(p, _)| p.clone()),
            changed_chunks: total,
            done_chunks: done,
            uploaded_chunks: s.uploaded_chunks,
            encrypted: s.wrapped_key.is_some(),
            kms_key_id: s.kms_key_id.clone(),
            description: s.description.clone(),
            tags: s.tags.clone(),
            created_at: s.created_at,
            error: s.error.clone(),
        }
    }

    fn set_view(&self, set: &SetRecord) -> Result<SnapshotSet, ApiError> {
        let mut snapshots = Vec::new();
        for id in &set.snapshots {
            if let Some(s) = self.state.snapshot(id)? {
                snapshots.push(self.snapshot_view(&s));
            }
        }
        Ok(SnapshotSet {
            set_id: set.id.clone(),
            instance_id: set.instance_id.clone(),
            state: set.state,
            snapshots,
            pause_window_us: set.pause_window_us,
            created_at: set.created_at,
            error: set.error.clone(),
        })
    }

    pub(super) async fn create_snapshots(self: &Arc<Self>, body: &[u8]) -> Reply {
        let req: CreateSnapshotsRequest = parse(body)?;
        validate_tags(&req.tags).map_err(bad)?;
        if req.description.chars().count() > 255 {
            return Err(bad("description: at most 255 characters"));
        }
        if let Some(t) = &req.client_token {
            if t.is_empty() || t.len() > 64 {
                return Err(bad("client_token: 1 to 64 characters"));
            }
        }
        let mut seen = HashSet::new();
        if let Some(dup) = req.exclude_volume_ids.iter().find(|v| !seen.insert(*v)) {
            return Err(bad(format!(
                "volume {dup} is listed twice in exclude_volume_ids"
            )));
        }
        let fingerprint =
            serde_json::to_string(&req).map_err(|e| ApiError::internal(e.to_string()))?;
        let _changes = self.changes.lock().await;
        if let Some(t) = &req.client_token {
            if let Some(set_id) = self.state.token(t)? {
                let set = self
                    .state
                    .set(&set_id)?
                    .ok_or_else(|| ApiError::internal(format!("token {t} names a lost set")))?;
                if set.request != fingerprint {
                    return Err(ApiError::conflict(
                        "IdempotentParameterMismatch",
                        format!("client token {t} was used for a different CreateSnapshots call"),
                    ));
                }
                return to_value(&self.set_view(&set)?);
            }
        }
        let attached: Vec<_> = self
            .state
            .volumes()?
            .into_iter()
            .filter(|v| {
                v.attachment
                    .as_ref()
                    .is_some_and(|a| a.attachment.instance_id == req.instance_id)
            })
            .collect();
        if attached.is_empty() {
            return Err(ApiError::not_found(
                "InvalidInstanceID.NotFound",
                format!("instance {} has no volumes attached", req.instance_id),
            ));
        }
        for x in &req.exclude_volume_ids {
            if !attached.iter().any(|v| &v.id == x) {
                return Err(bad(format!(
                    "volume {x} in exclude_volume_ids is not attached to {}",
                    req.instance_id
                )));
            }
        }
        let vols: Vec<_> = attached
            .into_iter()
            .filter(|v| {
                let boot = v.attachment.as_ref().is_some_and(|a| a.attachment.boot);
                let excluded = req.exclude_volume_ids.contains(&v.id);
                !(excluded || req.exclude_boot_volume && boot)
            })
            .collect();
        if vols.is_empty() {
            return Err(bad(format!(
                "no volumes of {} are left after the exclusions",
                req.instance_id
            )));
        }
        for v in &vols {
            self.check_whole(v, "snapshotted")?;
        }
        let cut = self.cut(&vols).await;
        let (marks, window) = match cut {
            Ok(c) => c,
            Err(e) => {
                self.metrics
                    .record(PAUSE_WINDOW, false, std::time::Duration::ZERO);
                return Err(e);
            }
        };
        self.metrics.record(PAUSE_WINDOW, true, window);
        let set_id = format!("ss-{}", &VolumeId::generate().as_str()[4..]);
        let created_at = now_ms() / 1000;
        let mut ids = Vec::new();
        let mut records = Vec::new();
        for (v, mark) in vols.iter().zip(marks) {
            let mut tags = if req.copy_tags_from_source {
                v.tags.clone()
            } else {
                Default::default()
            };
            tags.extend(req.tags.clone());
            let s = SnapshotRecord {
                id: SnapshotId::generate(),
                set_id: set_id.clone(),
                volume_id: v.id.clone(),
                volume_size: v.size,
                replicas: v.placement.clone(),
                mark,
                base: v.last_snapshot.clone(),
                state: SnapshotState::Pending,
                kms_key_id: v.kms_key_id.clone(),
                wrapped_key: v.wrapped_key.clone(),
                description: req.description.clone(),
                tags,
                created_at,
                changed_chunks: None,
                uploaded_chunks: 0,
                error: None,
            };
            ids.push(s.id.clone());
            records.push(s);
        }
        let set = SetRecord {
            id: set_id.clone(),
            instance_id: req.instance_id.clone(),
            state: SnapshotState::Pending,
            snapshots: ids,
            pause_window_us: window.as_micros() as u64,
            created_at,
            error: None,
            request: fingerprint,
        };
        let saved = (|| {
            for s in &records {
                self.state.put_snapshot(s)?;
            }
            self.state.put_set(&set)?;
            if let Some(t) = &req.client_token {
                self.state.put_token(t, &set_id)?;
            }
            self.state.flush()
        })();
        if let Err(e) = saved {
            for s in &records {
                self.replicas(&s.volume_id, &s.replicas, s.volume_size)
                    .await
                    .release_mark(s.mark)
                    .await;
            }
            return Err(e.into());
        }
        tracing::info!(set = %set_id, volumes = records.len(), pause_us = set.pause_window_us, "snapshot set cut");
        self.spawn_set(set_id);
        to_value(&self.set_view(&set)?)
    }

    pub(super) fn describe_snapshot_set(&self, body: &[u8]) -> Reply {
        let req: DescribeSnapshotSetRequest = parse(body)?;
        let set = self.state.set(&req.set_id)?.ok_or_else(|| {
            ApiError::not_found(
                "InvalidSnapshotSet.NotFound",
                format!("snapshot set {} does not exist", req.set_id),
            )
        })?;
        to_value(&self.set_view(&set)?)
    }

    pub(super) fn describe_snapshots(&self, body: &[u8]) -> Reply {
        let req: DescribeSnapshotsRequest = parse(body)?;
        let records = if req.snapshot_ids.is_empty() {
            self.state.snapshots()?
        } else {
            req.snapshot_ids
                .iter()
                .filter(|id| !matches!(self.state.ebs(id), Ok(Some(_))))
                .map(|id| {
                    self.state.snapshot(id)?.ok_or_else(|| {
                        ApiError::not_found(
                            "InvalidSnapshot.NotFound",
                            format!("snapshot {id} does not exist"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let mut out: Vec<Snapshot> = records
            .iter()
            .filter(|s| req.volume_id.as_ref().is_none_or(|v| &s.volume_id == v))
            .filter(|s| req.set_id.as_ref().is_none_or(|x| &s.set_id == x))
            .filter(|s| req.state.is_none_or(|x| s.state == x))
            .map(|s| self.snapshot_view(s))
            .collect();
        // Uploads through the EBS direct APIs belong to no volume or set.
        if req.volume_id.is_none() && req.set_id.is_none() {
            out.extend(
                self.state
                    .ebs_all()?
                    .iter()
                    .filter(|r| req.snapshot_ids.is_empty() || req.snapshot_ids.contains(&r.id))
                    .filter(|r| req.state.is_none_or(|x| r.state == x))
                    .map(|r| {
                        // A pending upload's blocks are in their own tree until completion.
                        let pending = match r.state {
                            SnapshotState::Pending => {
                                self.state.ebs_blocks(&r.id).map_or(0, |b| b.len() as u64)
                            }
                            _ => 0,
                        };
                        ebs_view(r, pending)
                    }),
            );
        }
        Ok(json!({ "snapshots": out }))
    }

    async fn manifest(&self, id: &SnapshotId) -> Result<Manifest, ApiError> {
        self.archive.get_manifest(id).await.map_err(|e| match e {
            SnapshotError::NotFound(_) => ApiError::not_found(
                "InvalidSnapshot.NotFound",
                format!("snapshot {id} does not exist"),
            ),
            SnapshotError::Store(ref se) if !se.is_not_found() => {
                ApiError::unavailable("StoreUnavailable", e.to_string())
            }
            other => ApiError::bad_request("InvalidSnapshot.Corrupt", other.to_string()),
        })
    }

    /// Removes a snapshot's manifest and every chunk no other manifest references.
    pub(super) async fn delete_snapshot(&self, body: &[u8]) -> Reply {
        let req: SnapshotIdRequest = parse(body)?;
        let id = &req.snapshot_id;
        let _changes = self.changes.lock().await;
        let record = self.state.snapshot(id)?;
        let ebs = self.state.ebs(id)?;
        if record
            .as_ref()
            .is_some_and(|s| s.state == SnapshotState::Pending)
            || ebs
                .as_ref()
                .is_some_and(|r| r.state == SnapshotState::Pending)
        {
            return Err(ApiError::conflict(
                "IncorrectState",
                format!("snapshot {id} is still being uploaded"),
            ));
        }
        if let Some(j) = self.state.jobs()?.into_iter().find(|j| {
            matches!(&j.source, JobSource::Snapshot { snapshot_id } if snapshot_id == id)
                && matches!(j.state, HydrationState::Pending | HydrationState::Running)
        }) {
            return Err(ApiError::conflict(
                "SnapshotInUse",
                format!(
                    "volumes are being hydrated from snapshot {id} (job {})",
                    j.id
                ),
            ));
        }
        let chunks: HashSet<_> = match self.manifest(id).await {
            Ok(m) => m.chunks.into_values().collect(),
            // An errored set's snapshot (or timed-out upload) has no manifest; its record goes.
            Err(e) if e.status == 404 && (record.is_some() || ebs.is_some()) => HashSet::new(),
            Err(e) => return Err(e),
        };
        self.forget_manifest(id);
        self.archive
            .delete_manifest(id)
            .await
            .map_err(|e| ApiError::unavailable("StoreUnavailable", e.to_string()))?;
        let deleted = self
            .collect_garbage(chunks)
            .await
            .map_err(|e| ApiError::unavailable("StoreUnavailable", e.to_string()))?;
        for mut v in self.state.volumes()? {
            if v.last_snapshot.as_ref().is_some_and(|(s, _)| s == id) {
                // The next snapshot of it is a full one.
                v.last_snapshot = None;
                self.state.put_volume(&v)?;
            }
        }
        self.state.remove_snapshot(id)?;
        self.state.remove_ebs(id)?;
        self.state.flush()?;
        tracing::info!(snapshot = %id, deleted_chunks = deleted, "snapshot deleted");
        Ok(json!({ "deleted_chunks": deleted }))
    }

    pub(super) async fn list_changed_blocks(&self, body: &[u8]) -> Reply {
        let req: ListChangedBlocksRequest = parse(body)?;
        let second = self.manifest(&req.second_snapshot_id).await?;
        let first = match &req.first_snapshot_id {
            Some(f) => self.manifest(f).await?.chunks,
            None => Default::default(),
        };
        let mut blocks: Vec<u64> = second
            .chunks
            .iter()
            .filter(|(c, h)| first.get(c) != Some(h))
            .map(|(c, _)| *c)
            .chain(
                first
                    .keys()
                    .filter(|c| !second.chunks.contains_key(c))
                    .copied(),
            )
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        to_value(&ChangedBlocks {
            block_size: CHUNK,
            volume_size: second.volume_size,
            blocks,
        })
    }
}

/// The API view of a snapshot uploaded through the EBS direct APIs.
fn ebs_view(r: &crate::state::EbsRecord, pending_blocks: u64) -> Snapshot {
    let blocks = r.blocks.len() as u64 + pending_blocks;
    Snapshot {
        snapshot_id: r.id.clone(),
        set_id: None,
        volume_id: None,
        volume_size: r.volume_size_gib << 30,
        state: r.state,
        parent: r.parent.clone(),
        changed_chunks: Some(blocks),
        done_chunks: blocks,
        uploaded_chunks: blocks,
        encrypted: r.encryption.is_some(),
        kms_key_id: r.encryption.as_ref().map(|k| k.kms_key_id.clone()),
        description: r.description.clone(),
        tags: r.tags.iter().cloned().collect(),
        created_at: r.started_at,
        error: r.error.clone(),
    }
}
