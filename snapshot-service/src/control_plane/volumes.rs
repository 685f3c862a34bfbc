//! Volume, attachment and instance actions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use blockfleet_api::{
    validate_tags, AttachVolumeRequest, Attachment, CreateVolumeRequest, DescribeInstancesRequest,
    DescribeVolumesRequest, Hydration, HydrationState, Instance, InstanceVolume, JobSource, Volume,
    VolumeIdRequest, VolumeState,
};
use blockfleet_core::httpjson::{parse, ApiError, Reply};
use blockfleet_core::ids::{KmsKeyId, VolumeId};
use blockfleet_core::units::{chunk_count, CHUNK};
use blockfleet_proto::ErrorCode;
use blockfleet_snapshot_format::SnapshotError;
use serde_json::json;

use super::{block_error, kms_error, now_ms, replicas_error, ControlPlane};
use crate::state::{AttachmentRecord, JobRecord, VolumeRecord};

const MAX_COUNT: u32 = 64;
const MAX_SIZE: u64 = 64 << 40;
const DEFAULT_KEY_SETTING: &str = "default_kms_key_id";

fn volume_not_found(id: &VolumeId) -> ApiError {
    ApiError::not_found(
        "InvalidVolume.NotFound",
        format!("volume {id} does not exist"),
    )
}

impl ControlPlane {
    pub(super) fn get_volume(&self, id: &VolumeId) -> Result<VolumeRecord, ApiError> {
        self.state.volume(id)?.ok_or_else(|| volume_not_found(id))
    }

    /// The fleet's default volume key, created on first use (like AWS's `aws/ebs`).
    pub(super) async fn default_key(&self) -> Result<String, ApiError> {
        if let Some(k) = self.state.setting(DEFAULT_KEY_SETTING)? {
            return Ok(k);
        }
        let k = self
            .kms
            .create_key("blockfleet default volume key")
            .await
            .map_err(kms_error)?;
        self.state.put_setting(DEFAULT_KEY_SETTING, &k)?;
        self.state.flush()?;
        Ok(k)
    }

    /// Where the next volume's replicas go: the least loaded block servers (by replicas held,
    /// counting `planned` ones not recorded yet), each on a host no other replica uses while
    /// hosts allow, else on distinct servers.
    fn place(&self, planned: &BTreeMap<String, usize>) -> Result<Vec<String>, ApiError> {
        let mut load: BTreeMap<&str, usize> = self
            .config
            .block_servers
            .iter()
            .map(|b| (b.as_str(), planned.get(b).copied().unwrap_or(0)))
            .collect();
        for v in self.state.volumes()? {
            for p in &v.placement {
                if let Some(n) = load.get_mut(p.as_str()) {
                    *n += 1;
                }
            }
        }
        let draining = self.draining()?;
        let mut order: Vec<(usize, usize, &String)> = self
            .config
            .block_servers
            .iter()
            .filter(|b| !draining.contains(*b))
            .enumerate()
            .map(|(i, b)| (load[b.as_str()], i, b))
            .collect();
        order.sort();
        let picked = pick_replicas(
            order.into_iter().map(|(_, _, b)| b.clone()),
            self.config.replicas,
        );
        if picked.len() < self.config.replicas {
            return Err(ApiError::unavailable(
                "InsufficientCapacity",
                format!(
                    "{} replicas needed, {} block servers take new volumes (others are draining)",
                    self.config.replicas,
                    picked.len()
                ),
            ));
        }
        Ok(picked)
    }

    /// A volume that can be copied: whole (hydration done), not impaired, not being deleted.
    fn check_source_volume(&self, id: &VolumeId) -> Result<VolumeRecord, ApiError> {
        let src = self.get_volume(id)?;
        if !matches!(src.state, VolumeState::Available | VolumeState::InUse) {
            return Err(ApiError::conflict(
                "IncorrectState",
                format!("source volume {id} is {:?}", src.state),
            ));
        }
        self.check_whole(&src, "copied")?;
        Ok(src)
    }

    /// Refuses a volume that cannot be read whole at a mark: impaired, or still hydrating
    /// (`doing`: what the caller would do with it).
    pub(super) fn check_whole(&self, v: &VolumeRecord, doing: &str) -> Result<(), ApiError> {
        if let Some(r) = &v.impaired_reason {
            return Err(ApiError::conflict(
                "IncorrectState",
                format!("volume {} is impaired ({r}): it cannot be {doing}", v.id),
            ));
        }
        if let Some(j) = &v.job_id {
            if self
                .state
                .job(j)?
                .is_some_and(|j| j.state != HydrationState::Done)
            {
                return Err(ApiError::conflict(
                    "IncorrectState",
                    format!(
                        "volume {} is still hydrating (job {j}): it can be {doing} when that is done",
                        v.id
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Takes the cut a copy reproduces: pause, mark, resume on the source's replicas. The
    /// block servers keep the marked chunks aside as the user writes on.
    async fn mark_source(&self, src: &VolumeRecord) -> Result<u64, ApiError> {
        let r = self.replicas(&src.id, &src.placement, src.size).await;
        let mark = r.take_mark(self.next_mark_id()).await;
        self.forget_out(&r);
        mark.map_err(|e| match e.code() {
            Some(ErrorCode::MarkOpen) => ApiError::conflict(
                "VolumeBusy",
                format!(
                    "source volume {} has every cut slot taken (snapshot sets uploading, copies running); retry when one finishes",
                    src.id
                ),
            ),
            _ => replicas_error(&e),
        })
    }

    /// The unfinished job reading `id` as its source, if any.
    fn job_reading(&self, id: &VolumeId) -> Result<Option<JobRecord>, ApiError> {
        Ok(self.state.jobs()?.into_iter().find(|j| {
            matches!(&j.source, JobSource::Volume { volume_id, .. } if volume_id == id)
                && matches!(j.state, HydrationState::Pending | HydrationState::Running)
        }))
    }

    /// Lets a source volume's block server drop the cut a finished job read (best effort: a
    /// restarted block server has dropped it already).
    pub(super) async fn release_source(&self, source: &JobSource) {
        let JobSource::Volume { volume_id, mark } = source else {
            return;
        };
        let Ok(Some(src)) = self.state.volume(volume_id) else {
            return;
        };
        self.replicas(volume_id, &src.placement, src.size)
            .await
            .release_mark(*mark)
            .await;
        tracing::info!(volume = %volume_id, mark, "source mark released");
    }

    pub(super) async fn create_volume(self: &Arc<Self>, body: &[u8]) -> Reply {
        let req: CreateVolumeRequest = parse(body)?;
        validate_tags(&req.tags).map_err(|m| ApiError::bad_request("InvalidParameterValue", m))?;
        let count = req.count.unwrap_or(1);
        if !(1..=MAX_COUNT).contains(&count) {
            return Err(ApiError::bad_request(
                "InvalidParameterValue",
                format!("count must be 1 to {MAX_COUNT}, got {count}"),
            ));
        }
        if req.snapshot_id.is_some() && req.source_volume_id.is_some() {
            return Err(ApiError::bad_request(
                "InvalidParameterCombination",
                "give a snapshot_id or a source_volume_id, not both",
            ));
        }
        let source_size = match &req.source_volume_id {
            Some(s) => Some(self.check_source_volume(s)?.size),
            None => None,
        };
        let snapshot_size = match &req.snapshot_id {
            Some(s) => Some(
                self.archive
                    .get_manifest(s)
                    .await
                    .map_err(|e| match e {
                        SnapshotError::NotFound(_) => ApiError::not_found(
                            "InvalidSnapshot.NotFound",
                            format!("snapshot {s} does not exist"),
                        ),
                        SnapshotError::Store(ref se) if !se.is_not_found() => {
                            ApiError::unavailable("StoreUnavailable", e.to_string())
                        }
                        other => {
                            ApiError::bad_request("InvalidSnapshot.Corrupt", other.to_string())
                        }
                    })?
                    .volume_size,
            ),
            None => source_size,
        };
        let size = match (req.size, snapshot_size) {
            (Some(s), Some(min)) if s < min => {
                let of = if req.snapshot_id.is_some() {
                    "the snapshot's"
                } else {
                    "the source volume's"
                };
                return Err(ApiError::bad_request(
                    "InvalidParameterValue",
                    format!("size {s} is smaller than {of} {min} bytes"),
                ));
            }
            (Some(s), _) => s,
            (None, Some(min)) => min.div_ceil(CHUNK) * CHUNK,
            (None, None) => {
                return Err(ApiError::bad_request(
                    "MissingParameter",
                    "give a size, a snapshot_id or source_volume_id, or both",
                ))
            }
        };
        if size == 0 || size % CHUNK != 0 || size > MAX_SIZE {
            return Err(ApiError::bad_request(
                "InvalidParameterValue",
                format!("size {size}: must be a positive multiple of {CHUNK} bytes (512 KiB), at most {MAX_SIZE}"),
            ));
        }
        if let Some(t) = &req.client_token {
            if t.is_empty() || t.len() > 64 {
                return Err(ApiError::bad_request(
                    "InvalidParameterValue",
                    "client_token: 1 to 64 characters",
                ));
            }
        }
        let _changes = self.changes.lock().await;
        // A retried call with its client token: the volumes the first call made.
        let token = req.client_token.as_ref().map(|t| {
            let fingerprint = serde_json::to_vec(&req).unwrap_or_default();
            (
                format!("create-volume:{t}"),
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&fingerprint)),
            )
        });
        if let Some((key, fingerprint)) = &token {
            if let Some(earlier) = self.state.token(key)? {
                let (fp, ids) = earlier.split_once('|').unwrap_or(("", ""));
                if fp != fingerprint {
                    return Err(ApiError::conflict(
                        "IdempotentParameterMismatch",
                        "this client token was used for a CreateVolume with other parameters",
                    ));
                }
                let mut out = Vec::new();
                for id in ids.split(',').filter(|s| !s.is_empty()) {
                    if let Some(v) = self.state.volume(&id.parse().map_err(|e| {
                        ApiError::internal(format!("stored token names a bad id: {e}"))
                    })?)? {
                        out.push(self.describe(&v).await?);
                    }
                }
                return Ok(json!({ "volumes": out }));
            }
        }
        let key = if req.encrypted || req.kms_key_id.is_some() {
            let asked = match &req.kms_key_id {
                Some(k) => k.clone(),
                None => self
                    .default_key()
                    .await?
                    .parse()
                    .map_err(|e| ApiError::internal(format!("stored default key id: {e}")))?,
            };
            let resolved = self.kms.describe_key(&asked).await.map_err(kms_error)?;
            Some(resolved)
        } else {
            None
        };
        let mut planned: BTreeMap<String, usize> = BTreeMap::new();
        let source = match (&req.snapshot_id, &req.source_volume_id) {
            (Some(snap), _) => Some(JobSource::Snapshot {
                snapshot_id: snap.clone(),
            }),
            (None, Some(vol)) => {
                // Checked again under the lock: it may have changed since.
                let src = self.check_source_volume(vol)?;
                Some(JobSource::Volume {
                    volume_id: vol.clone(),
                    mark: self.mark_source(&src).await?,
                })
            }
            (None, None) => None,
        };
        let job_id = source
            .as_ref()
            .map(|_| format!("job-{}", &VolumeId::generate().as_str()[4..]));
        let mut made: Vec<VolumeRecord> = Vec::new();
        let result = async {
            for _ in 0..count as usize {
                let id = VolumeId::generate();
                let wrapped = match &key {
                    Some(k) => {
                        let kid: KmsKeyId = k
                            .parse()
                            .map_err(|e| ApiError::internal(format!("KMS key id {k}: {e}")))?;
                        Some(hex::encode(
                            self.kms
                                .generate_wrapped_key(&kid, &id)
                                .await
                                .map_err(kms_error)?,
                        ))
                    }
                    None => None,
                };
                let placement = self.place(&planned)?;
                for p in &placement {
                    *planned.entry(p.clone()).or_default() += 1;
                }
                let mut rec = VolumeRecord {
                    id: id.clone(),
                    size,
                    state: VolumeState::Creating,
                    kms_key_id: key.clone(),
                    wrapped_key: wrapped,
                    snapshot_id: req.snapshot_id.clone(),
                    source_volume_id: req.source_volume_id.clone(),
                    placement: placement.clone(),
                    placement_generation: 1,
                    moving: None,
                    job_id: job_id.clone(),
                    attachment: None,
                    created_at: now_ms() / 1000,
                    impaired_reason: None,
                    last_snapshot: None,
                    tags: req.tags.clone(),
                };
                // Recorded before the block server hears of it: a crash in between leaves a
                // visible `creating` volume, never an orphan extent nobody knows about.
                self.state.put_volume(&rec)?;
                made.push(rec.clone());
                for server in &placement {
                    let client = self
                        .blocks
                        .get(server)
                        .await
                        .map_err(|e| block_error(server, &e))?;
                    client
                        .create_volume(&id, size, job_id.is_some())
                        .await
                        .map_err(|e| {
                            self.blocks.forget_if_broken(server, &e);
                            block_error(server, &e)
                        })?;
                }
                rec.state = VolumeState::Available;
                self.state.put_volume(&rec)?;
                *made
                    .last_mut()
                    .ok_or_else(|| ApiError::internal("lost a record"))? = rec;
            }
            if let (Some(job), Some(source)) = (&job_id, &source) {
                self.state.put_job(&JobRecord {
                    id: job.clone(),
                    source: source.clone(),
                    targets: made.iter().map(|v| v.id.clone()).collect(),
                    state: HydrationState::Pending,
                    lease: None,
                    attempts: 0,
                    error: None,
                })?;
            }
            if let Some((key, fingerprint)) = &token {
                let ids: Vec<&str> = made.iter().map(|v| v.id.as_str()).collect();
                self.state
                    .put_token(key, &format!("{fingerprint}|{}", ids.join(",")))?;
            }
            self.state.flush()?;
            Ok::<_, ApiError>(())
        }
        .await;
        if let Err(e) = result {
            // All or nothing: undo the volumes made so far.
            for v in &made {
                for addr in &v.placement {
                    if let Ok(c) = self.blocks.get(addr).await {
                        let _ = c.delete_volume(&v.id).await;
                    }
                }
                let _ = self.state.remove_volume(&v.id);
            }
            if let Some((key, _)) = &token {
                let _ = self.state.remove_token(key);
            }
            let _ = self.state.flush();
            if let Some(s) = &source {
                self.release_source(s).await;
            }
            return Err(e);
        }
        tracing::info!(count, size, job = ?job_id, "volumes created");
        let mut out = Vec::new();
        for v in &made {
            out.push(self.describe(v).await?);
        }
        Ok(json!({ "volumes": out }))
    }

    /// The API view of a volume, with hydration progress read live from its block server.
    pub(super) async fn describe(&self, v: &VolumeRecord) -> Result<Volume, ApiError> {
        let hydration = match &v.job_id {
            None => None,
            Some(job_id) => {
                let job = self.state.job(job_id)?;
                let total = chunk_count(v.size);
                let (state, attempts, error) = match &job {
                    Some(j) => (j.state, j.attempts, j.error.clone()),
                    // A finished job is dropped with its last target; its volumes are whole.
                    None => (HydrationState::Done, 0, None),
                };
                let hydrated = if state == HydrationState::Done {
                    Some(total)
                } else {
                    self.unhydrated(v).await.map(|u| total.saturating_sub(u))
                };
                Some(Hydration {
                    state,
                    job_id: job_id.clone(),
                    total_chunks: total,
                    hydrated_chunks: hydrated,
                    attempts,
                    error,
                })
            }
        };
        Ok(Volume {
            volume_id: v.id.clone(),
            size: v.size,
            state: v.state,
            encrypted: v.kms_key_id.is_some(),
            kms_key_id: v.kms_key_id.clone(),
            snapshot_id: v.snapshot_id.clone(),
            source_volume_id: v.source_volume_id.clone(),
            placement: v.placement.clone(),
            hydration,
            attachment: v.attachment.as_ref().map(|a| a.attachment.clone()),
            created_at: v.created_at,
            status: if v.impaired_reason.is_some() {
                "impaired".into()
            } else {
                "ok".into()
            },
            impaired_reason: v.impaired_reason.clone(),
            tags: v.tags.clone(),
        })
    }

    async fn unhydrated(&self, v: &VolumeRecord) -> Option<u64> {
        let ask = async {
            let r = self.replicas(&v.id, &v.placement, v.size).await;
            let stat = r.stat().await;
            self.forget_out(&r);
            stat.ok()
        };
        match tokio::time::timeout(Duration::from_secs(2), ask).await {
            Ok(Some(stat)) => Some(stat.unhydrated),
            _ => None,
        }
    }

    pub(super) async fn describe_volumes(&self, body: &[u8]) -> Reply {
        let req: DescribeVolumesRequest = parse(body)?;
        let records = if req.volume_ids.is_empty() {
            self.state.volumes()?
        } else {
            req.volume_ids
                .iter()
                .map(|id| self.get_volume(id))
                .collect::<Result<_, _>>()?
        };
        let mut out = Vec::with_capacity(records.len());
        for v in &records {
            out.push(self.describe(v).await?);
        }
        Ok(json!({ "volumes": out }))
    }

    pub(super) async fn delete_volume(&self, body: &[u8]) -> Reply {
        let req: VolumeIdRequest = parse(body)?;
        let _changes = self.changes.lock().await;
        let mut v = self.get_volume(&req.volume_id)?;
        if let Some(a) = &v.attachment {
            return Err(ApiError::conflict(
                "VolumeInUse",
                format!(
                    "volume {} is attached to {}: detach it first",
                    v.id, a.attachment.instance_id
                ),
            ));
        }
        if let Some(j) = self.job_reading(&v.id)? {
            return Err(ApiError::conflict(
                "VolumeInUse",
                format!(
                    "volume {} is the source of hydration job {}: wait for it or delete its volumes first",
                    v.id, j.id
                ),
            ));
        }
        v.state = VolumeState::Deleting;
        self.state.put_volume(&v)?;
        self.state.flush()?;
        for addr in &v.placement {
            let c = self
                .blocks
                .get(addr)
                .await
                .map_err(|e| block_error(addr, &e))?;
            match c.delete_volume(&v.id).await {
                Ok(()) => {}
                Err(e) if e.code() == Some(ErrorCode::NoSuchVolume) => {}
                Err(e) => {
                    self.blocks.forget_if_broken(addr, &e);
                    return Err(block_error(addr, &e));
                }
            }
        }
        if let Some(job_id) = &v.job_id {
            if let Some(mut job) = self.state.job(job_id)? {
                job.targets.retain(|t| t != &v.id);
                if job.targets.is_empty() {
                    self.state.remove_job(job_id)?;
                    self.release_source(&job.source).await;
                } else {
                    self.state.put_job(&job)?;
                }
            }
        }
        self.state.remove_volume(&v.id)?;
        self.state.flush()?;
        tracing::info!(volume = %v.id, "volume deleted");
        Ok(json!({}))
    }

    pub(super) async fn attach_volume(&self, body: &[u8]) -> Reply {
        let req: AttachVolumeRequest = parse(body)?;
        let device = req.device.clone().unwrap_or_else(|| "/dev/sdf".into());
        if !device.starts_with("/dev/") || device.len() > 64 || device.len() < 6 {
            return Err(ApiError::bad_request(
                "InvalidParameterValue",
                format!("device {device:?}: give a name like /dev/sdf"),
            ));
        }
        let host = req
            .host
            .clone()
            .unwrap_or_else(|| self.config.default_host.clone());
        if host.is_empty() || host.len() > 128 {
            return Err(ApiError::bad_request(
                "InvalidParameterValue",
                "host: 1 to 128 characters",
            ));
        }
        let _changes = self.changes.lock().await;
        let mut v = self.get_volume(&req.volume_id)?;
        if let Some(a) = &v.attachment {
            return Err(ApiError::conflict(
                "VolumeInUse",
                format!(
                    "volume {} is already attached to {}",
                    v.id, a.attachment.instance_id
                ),
            ));
        }
        if v.state != VolumeState::Available {
            return Err(ApiError::conflict(
                "IncorrectState",
                format!("volume {} is {:?}, not available", v.id, v.state),
            ));
        }
        if let Some((from, _)) = &v.moving {
            return Err(ApiError::conflict(
                "IncorrectState",
                format!(
                    "volume {} is moving off block server {from} (a drain); attach it when that is done",
                    v.id
                ),
            ));
        }
        for other in self.state.volumes()? {
            if let Some(a) = &other.attachment {
                let a = &a.attachment;
                if a.instance_id == req.instance_id && (a.device == device || (req.boot && a.boot))
                {
                    return Err(ApiError::conflict(
                        "InvalidParameterValue",
                        format!(
                            "instance {} already has {} at {}{}",
                            a.instance_id,
                            other.id,
                            a.device,
                            if a.boot { " (boot)" } else { "" }
                        ),
                    ));
                }
            }
        }
        let grant_id = match &v.kms_key_id {
            Some(k) => {
                let kid: KmsKeyId = k
                    .parse()
                    .map_err(|e| ApiError::internal(format!("KMS key id {k}: {e}")))?;
                let (grant, _token) = self
                    .kms
                    .create_grant(&kid, &host, &v.id)
                    .await
                    .map_err(kms_error)?;
                Some(grant)
            }
            None => None,
        };
        let attachment = Attachment {
            instance_id: req.instance_id.clone(),
            device,
            boot: req.boot,
            host,
            attached_at: now_ms() / 1000,
        };
        v.attachment = Some(AttachmentRecord {
            attachment: attachment.clone(),
            grant_id,
        });
        v.state = VolumeState::InUse;
        self.state.put_volume(&v)?;
        self.state.flush()?;
        tracing::info!(volume = %v.id, instance = %attachment.instance_id, "attached");
        serde_json::to_value(attachment).map_err(|e| ApiError::internal(e.to_string()))
    }

    pub(super) async fn detach_volume(&self, body: &[u8]) -> Reply {
        let req: VolumeIdRequest = parse(body)?;
        let _changes = self.changes.lock().await;
        let mut v = self.get_volume(&req.volume_id)?;
        let Some(a) = v.attachment.clone() else {
            return Err(ApiError::conflict(
                "IncorrectState",
                format!("volume {} is not attached", v.id),
            ));
        };
        if let (Some(k), Some(grant)) = (&v.kms_key_id, &a.grant_id) {
            let kid: KmsKeyId = k
                .parse()
                .map_err(|e| ApiError::internal(format!("KMS key id {k}: {e}")))?;
            match self.kms.retire_grant(&kid, grant).await {
                Ok(()) | Err(blockfleet_keys::kms::KmsError::NotFound(_)) => {}
                Err(e) => return Err(kms_error(e)),
            }
        }
        v.attachment = None;
        v.state = VolumeState::Available;
        self.state.put_volume(&v)?;
        self.state.flush()?;
        // The host's block capability stops now on every replica; one that cannot be told
        // keeps honouring it on connections already open until they close (at most an hour
        // for new ones: the capability expires).
        for addr in &v.placement {
            let revoked = match self.blocks.get(addr).await {
                Ok(c) => c.revoke(&v.id, &a.attachment.host).await,
                Err(e) => Err(e),
            };
            if let Err(e) = revoked {
                tracing::warn!(volume = %v.id, replica = %addr, error = %e, "block capability not revoked");
            }
        }
        tracing::info!(volume = %v.id, instance = %a.attachment.instance_id, "detached");
        Ok(json!({}))
    }

    pub(super) fn describe_instances(&self, body: &[u8]) -> Reply {
        let req: DescribeInstancesRequest = parse(body)?;
        let mut by: BTreeMap<String, Instance> = BTreeMap::new();
        for v in self.state.volumes()? {
            let Some(a) = v.attachment else { continue };
            let a = a.attachment;
            if !req.instance_ids.is_empty() && !req.instance_ids.contains(&a.instance_id) {
                continue;
            }
            by.entry(a.instance_id.as_str().to_owned())
                .or_insert_with(|| Instance {
                    instance_id: a.instance_id.clone(),
                    host: a.host.clone(),
                    volumes: Vec::new(),
                })
                .volumes
                .push(InstanceVolume {
                    volume_id: v.id.clone(),
                    device: a.device.clone(),
                    boot: a.boot,
                });
        }
        for i in &req.instance_ids {
            if !by.contains_key(i.as_str()) {
                return Err(ApiError::not_found(
                    "InvalidInstanceID.NotFound",
                    format!("instance {i} has no volumes attached"),
                ));
            }
        }
        Ok(json!({ "instances": by.into_values().collect::<Vec<_>>() }))
    }
}

/// The first `n` of `servers` (in preference order) on distinct hosts, then distinct servers
/// to make up the number.
pub(super) fn pick_replicas(servers: impl Iterator<Item = String>, n: usize) -> Vec<String> {
    let servers: Vec<String> = servers.collect();
    let host = |s: &str| s.rsplit_once(':').map_or(s, |(h, _)| h).to_owned();
    let mut out: Vec<String> = Vec::new();
    for s in &servers {
        if out.len() < n && !out.iter().any(|o| host(o) == host(s)) {
            out.push(s.clone());
        }
    }
    for s in &servers {
        if out.len() < n && !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::pick_replicas;

    #[test]
    fn replicas_spread_over_hosts_first() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let servers = s(&["10.0.0.1:1", "10.0.0.1:2", "10.0.0.2:1", "10.0.0.3:1"]);
        assert_eq!(
            pick_replicas(servers.clone().into_iter(), 3),
            s(&["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"])
        );
        let local = s(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        assert_eq!(pick_replicas(local.clone().into_iter(), 3), local);
        assert_eq!(
            pick_replicas(servers.into_iter().take(3), 3),
            s(&["10.0.0.1:1", "10.0.0.2:1", "10.0.0.1:2"])
        );
    }
}
