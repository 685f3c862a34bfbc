//! The control plane's HTTP JSON API (docs/api.md): request and reply shapes shared by the
//! control plane, the CLI, the host agent and the transform fleet, and a typed client.
//!
//! Every call is `POST /v1/<Action>` with a JSON body; errors are
//! `{"error": {"code", "message"}}` (see [`blockfleet_core::httpjson`]).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use blockfleet_core::httpjson::{HttpError, JsonClient};
use blockfleet_core::ids::{InstanceId, KmsKeyId, SnapshotId, VolumeId};
use blockfleet_core::tls::Role;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    /// Bytes; a whole number of 512 KiB chunks. Default: the snapshot's or source volume's size.
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub snapshot_id: Option<SnapshotId>,
    #[serde(default)]
    pub source_volume_id: Option<VolumeId>,
    #[serde(default)]
    pub encrypted: bool,
    /// Implies `encrypted`; default: the fleet's default volume key.
    #[serde(default)]
    pub kms_key_id: Option<KmsKeyId>,
    /// Volumes to create from the one source (1 to 64); they share one hydration job.
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Idempotency (1 to 64 characters): a retry with the same token and parameters returns
    /// the volumes the first call made; other parameters get `IdempotentParameterMismatch`.
    #[serde(default)]
    pub client_token: Option<String>,
}

/// At most 50 tags, keys 1-128 characters, values at most 256 (AWS's limits).
pub fn validate_tags(tags: &BTreeMap<String, String>) -> Result<(), String> {
    if tags.len() > 50 {
        return Err(format!("{} tags: at most 50", tags.len()));
    }
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > 128 {
            return Err(format!("tag key {k:?}: 1 to 128 characters"));
        }
        if v.chars().count() > 256 {
            return Err(format!("tag {k:?}: value longer than 256 characters"));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// Being placed on block servers.
    Creating,
    /// Usable (reads of chunks not hydrated yet are fetched on demand).
    Available,
    InUse,
    Deleting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HydrationState {
    /// Waiting for a transform worker.
    Pending,
    Running,
    Done,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hydration {
    pub state: HydrationState,
    pub job_id: String,
    pub total_chunks: u64,
    /// Read live from the block server; absent if it could not be asked.
    pub hydrated_chunks: Option<u64>,
    pub attempts: u32,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub instance_id: InstanceId,
    pub device: String,
    pub boot: bool,
    /// The KMS principal of the host agent serving it (the grantee of the volume key).
    pub host: String,
    pub attached_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub volume_id: VolumeId,
    pub size: u64,
    pub state: VolumeState,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    pub snapshot_id: Option<SnapshotId>,
    pub source_volume_id: Option<VolumeId>,
    /// Block servers holding the volume.
    pub placement: Vec<String>,
    pub hydration: Option<Hydration>,
    pub attachment: Option<Attachment>,
    pub created_at: u64,
    /// `ok`, or `impaired`: hydration failed for good (e.g. a corrupt source chunk), and reads
    /// of chunks it did not fill fail rather than return wrong data.
    pub status: String,
    pub impaired_reason: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumesReply {
    pub volumes: Vec<Volume>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescribeVolumesRequest {
    /// Empty: every volume.
    #[serde(default)]
    pub volume_ids: Vec<VolumeId>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeIdRequest {
    pub volume_id: VolumeId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachVolumeRequest {
    pub volume_id: VolumeId,
    pub instance_id: InstanceId,
    /// Default `/dev/sdf`; unique per instance.
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub boot: bool,
    /// The host agent's KMS principal; default: `control_plane.default_host`.
    #[serde(default)]
    pub host: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescribeInstancesRequest {
    #[serde(default)]
    pub instance_ids: Vec<InstanceId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceVolume {
    pub volume_id: VolumeId,
    pub device: String,
    pub boot: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub instance_id: InstanceId,
    pub host: String,
    pub volumes: Vec<InstanceVolume>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstancesReply {
    pub instances: Vec<Instance>,
}

/// What a host agent needs to serve an attached volume (never a plaintext key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachInfo {
    pub volume_id: VolumeId,
    pub size: u64,
    /// The block servers holding the volume's replicas.
    pub replicas: Vec<String>,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    /// The KMS-wrapped data key, hex.
    pub wrapped_key: Option<String>,
    pub attachment: Attachment,
    /// Transform workers that fetch unhydrated chunks on demand (empty: none needed).
    pub fetch_endpoints: Vec<String>,
    /// The capability that lets this host agent ask transform workers for on-demand fetches
    /// of this volume (header `x-blockfleet-token`); short-lived: ask again when refused.
    #[serde(default)]
    pub fetch_token: Option<String>,
    /// The block-protocol capability (read and write this volume) the host agent presents to
    /// each replica's block server.
    #[serde(default)]
    pub block_grant: Option<blockfleet_proto::Grant>,
    /// A block server being filled to take over from one of `replicas` (a drain): the host
    /// agent writes to it too, and reports when it is in sync.
    #[serde(default)]
    pub joining: Option<String>,
}

/// `DrainBlockServer`: moves every replica off `server`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    pub server: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReply {
    pub server: String,
    /// Replicas to move.
    pub volumes: u64,
}

/// One replica of a volume on a block server, as `DescribeBlockServers` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaView {
    pub volume_id: VolumeId,
    /// `in_sync`, `behind` (chunks at a lower version than another replica's), `joining`
    /// (being filled by a drain), `leaving` (being drained), or `unreachable`.
    pub state: String,
    /// Chunks this replica lacks the newest version of (repair still to do).
    pub behind_chunks: Option<u64>,
    /// What the volume's host agent last reported for this replica (attached volumes).
    pub agent_health: Option<String>,
    /// Why the host agent has this replica out (its block server's or the connection's
    /// word), when it has.
    #[serde(default)]
    pub reason: Option<String>,
    /// A joining replica's fill: chunks done of chunks to copy (drains, repairs).
    #[serde(default)]
    pub fill: Option<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockServerView {
    pub address: String,
    pub reachable: bool,
    /// Reachable, but it did not answer within the query's bound (stopped, or overloaded).
    #[serde(default)]
    pub unresponsive: bool,
    pub draining: bool,
    pub volumes: Vec<ReplicaView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockServersReply {
    pub servers: Vec<BlockServerView>,
}

/// A host agent's view of its volume's replicas (`internal/ReportReplicas`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaReport {
    pub volume_id: VolumeId,
    pub replicas: Vec<ReplicaHealth>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaHealth {
    pub address: String,
    /// `in_sync`, `repairing` or `out`.
    pub health: String,
    pub repair_done: u64,
    pub repair_total: u64,
    /// Why the replica is out, as its block server or the connection said (e.g. no space
    /// left, the volume missing, a timeout).
    #[serde(default)]
    pub reason: Option<String>,
}

// ---- snapshots (the coordinator) ----

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotsRequest {
    pub instance_id: InstanceId,
    #[serde(default)]
    pub exclude_boot_volume: bool,
    #[serde(default)]
    pub exclude_volume_ids: Vec<VolumeId>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Adds each volume's tags to its snapshot (the request's tags win on a clash).
    #[serde(default)]
    pub copy_tags_from_source: bool,
    /// A repeated call with the same token and arguments returns the same set.
    #[serde(default)]
    pub client_token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotState {
    Pending,
    Completed,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub snapshot_id: SnapshotId,
    /// The CreateSnapshots set it belongs to (none: uploaded through the EBS direct APIs).
    pub set_id: Option<String>,
    /// The volume it was taken of (none: uploaded through the EBS direct APIs).
    pub volume_id: Option<VolumeId>,
    pub volume_size: u64,
    pub state: SnapshotState,
    /// The volume's previous snapshot this one was taken incrementally from.
    pub parent: Option<SnapshotId>,
    /// Chunks changed since the parent (all written chunks without one).
    pub changed_chunks: Option<u64>,
    /// Of those, chunks read and stored so far.
    pub done_chunks: u64,
    /// Chunks actually uploaded (not already in the store, not zero).
    pub uploaded_chunks: u64,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    pub created_at: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSet {
    pub set_id: String,
    pub instance_id: InstanceId,
    pub state: SnapshotState,
    pub snapshots: Vec<Snapshot>,
    /// From the first Pause sent to the last Resume acknowledged.
    pub pause_window_us: u64,
    pub created_at: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescribeSnapshotsRequest {
    #[serde(default)]
    pub snapshot_ids: Vec<SnapshotId>,
    #[serde(default)]
    pub volume_id: Option<VolumeId>,
    #[serde(default)]
    pub set_id: Option<String>,
    #[serde(default)]
    pub state: Option<SnapshotState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotsReply {
    pub snapshots: Vec<Snapshot>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotIdRequest {
    pub snapshot_id: SnapshotId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescribeSnapshotSetRequest {
    pub set_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListChangedBlocksRequest {
    /// Absent: every non-zero block of the second snapshot.
    #[serde(default)]
    pub first_snapshot_id: Option<SnapshotId>,
    pub second_snapshot_id: SnapshotId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedBlocks {
    pub block_size: u64,
    pub volume_size: u64,
    /// Block indexes whose content differs, ascending.
    pub blocks: Vec<u64>,
}

// ---- the transform fleet's side (`/v1/internal/...`) ----

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSource {
    Snapshot {
        snapshot_id: SnapshotId,
    },
    /// A volume as it was at `mark`, a cut taken on its block server when the copy was asked
    /// for and released when the job ends.
    Volume {
        volume_id: VolumeId,
        mark: u64,
    },
}

/// Where a job reads a source volume from (filled in by the control plane per claim).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceVolume {
    pub volume_id: VolumeId,
    pub replicas: Vec<String>,
    pub size: u64,
    pub mark: u64,
    /// Hex; absent for an unencrypted volume.
    pub wrapped_key: Option<String>,
}

/// One volume a job fills.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTarget {
    pub volume_id: VolumeId,
    pub replicas: Vec<String>,
    pub size: u64,
    pub kms_key_id: Option<String>,
    /// Hex; absent for an unencrypted volume.
    pub wrapped_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub job_id: String,
    pub source: JobSource,
    /// Set when `source` is a volume.
    #[serde(default)]
    pub source_volume: Option<SourceVolume>,
    pub targets: Vec<JobTarget>,
    pub attempt: u32,
    /// Block-protocol capabilities for the job: read and hydrate each target, read the source
    /// volume.
    #[serde(default)]
    pub block_grants: Vec<blockfleet_proto::Grant>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimJobRequest {
    pub worker: String,
    /// The worker's on-demand fetch endpoint.
    pub endpoint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimJobReply {
    pub job: Option<Job>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobOutcome {
    /// Still working: renews the lease.
    Running,
    Done,
    /// Worth another attempt (something was unreachable).
    Retry,
    /// Will not succeed (corrupt or missing source): the targets become impaired.
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobReport {
    pub job_id: String,
    pub worker: String,
    pub outcome: JobOutcome,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobReportReply {
    /// False: the job is no longer this worker's (lease lost, or its volumes deleted).
    pub keep_going: bool,
    /// Targets deleted since the claim: stop writing them.
    #[serde(default)]
    pub dropped_targets: Vec<VolumeId>,
}

/// On-demand fetch, sent by a host agent to a transform worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    pub volume_id: VolumeId,
    /// The host the volume is attached on (the holder its fetch capability names; over TLS
    /// the caller's host-agent certificate must name it too).
    pub host: String,
    pub chunks: Vec<u64>,
}

/// What a fetch capability signs: the volume and the host whose agent may use it.
pub fn fetch_subject(volume: &VolumeId, host: &str) -> String {
    format!("{volume}@{host}")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FetchReply {
    pub hydrated: Vec<u64>,
}

/// One block encrypted or decrypted by a transform worker for the EBS direct APIs (the
/// control plane never holds a plaintext key): `POST /v1/transform-block`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockTransformRequest {
    /// The KMS-wrapped data key, hex.
    pub wrapped_key: String,
    /// The volume id the data key's encryption context names.
    pub context_volume: VolumeId,
    /// The block's index: its units' XTS tweaks follow from it.
    pub block: u64,
    /// Encrypt (plaintext in) or decrypt (ciphertext in; all-zero units stay holes).
    pub encrypt: bool,
    /// The block's bytes, base64.
    pub data: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockTransformReply {
    /// base64.
    pub data: String,
}

/// A typed client of the control plane API.
#[derive(Debug, Clone)]
pub struct ControlPlaneClient {
    http: JsonClient,
}

impl ControlPlaneClient {
    /// A client of the control plane at `base`, signing with `credentials` (every call needs
    /// them; without, the control plane refuses). An `https://` base is verified as the fleet's
    /// control plane, and this process's fleet certificate (if any) is presented.
    pub fn new(base: &str, credentials: Option<&blockfleet_core::config::Credentials>) -> Self {
        ControlPlaneClient {
            http: JsonClient::new(base, Duration::from_secs(60))
                .expect_role(Role::ControlPlane)
                .with_credentials(credentials),
        }
    }

    /// As [`new`](Self::new), presenting `identity` instead of the process's certificate.
    pub fn with_identity(
        base: &str,
        credentials: Option<&blockfleet_core::config::Credentials>,
        identity: std::sync::Arc<rustls::ClientConfig>,
    ) -> Self {
        ControlPlaneClient {
            http: JsonClient::new(base, Duration::from_secs(60))
                .with_identity(identity, Role::ControlPlane)
                .with_credentials(credentials),
        }
    }

    pub fn base(&self) -> &str {
        self.http.base()
    }

    pub async fn create_volume(&self, req: &CreateVolumeRequest) -> Result<Vec<Volume>, HttpError> {
        let r: VolumesReply = self.http.post("/v1/CreateVolume", req).await?;
        Ok(r.volumes)
    }

    pub async fn describe_volumes(&self, ids: &[VolumeId]) -> Result<Vec<Volume>, HttpError> {
        let req = DescribeVolumesRequest {
            volume_ids: ids.to_vec(),
        };
        let r: VolumesReply = self.http.post("/v1/DescribeVolumes", &req).await?;
        Ok(r.volumes)
    }

    pub async fn delete_volume(&self, id: &VolumeId) -> Result<(), HttpError> {
        let _: serde_json::Value = self
            .http
            .post(
                "/v1/DeleteVolume",
                &VolumeIdRequest {
                    volume_id: id.clone(),
                },
            )
            .await?;
        Ok(())
    }

    pub async fn attach_volume(&self, req: &AttachVolumeRequest) -> Result<Attachment, HttpError> {
        self.http.post("/v1/AttachVolume", req).await
    }

    pub async fn detach_volume(&self, id: &VolumeId) -> Result<(), HttpError> {
        let _: serde_json::Value = self
            .http
            .post(
                "/v1/DetachVolume",
                &VolumeIdRequest {
                    volume_id: id.clone(),
                },
            )
            .await?;
        Ok(())
    }

    pub async fn create_snapshots(
        &self,
        req: &CreateSnapshotsRequest,
    ) -> Result<SnapshotSet, HttpError> {
        self.http.post("/v1/CreateSnapshots", req).await
    }

    pub async fn describe_snapshot_set(&self, set_id: &str) -> Result<SnapshotSet, HttpError> {
        let req = DescribeSnapshotSetRequest {
            set_id: set_id.to_owned(),
        };
        self.http.post("/v1/DescribeSnapshotSet", &req).await
    }

    pub async fn describe_snapshots(
        &self,
        req: &DescribeSnapshotsRequest,
    ) -> Result<Vec<Snapshot>, HttpError> {
        let r: SnapshotsReply = self.http.post("/v1/DescribeSnapshots", req).await?;
        Ok(r.snapshots)
    }

    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), HttpError> {
        let req = SnapshotIdRequest {
            snapshot_id: id.clone(),
        };
        let _: serde_json::Value = self.http.post("/v1/DeleteSnapshot", &req).await?;
        Ok(())
    }

    pub async fn list_changed_blocks(
        &self,
        req: &ListChangedBlocksRequest,
    ) -> Result<ChangedBlocks, HttpError> {
        self.http.post("/v1/ListChangedBlocks", req).await
    }

    pub async fn describe_instances(&self, ids: &[InstanceId]) -> Result<Vec<Instance>, HttpError> {
        let req = DescribeInstancesRequest {
            instance_ids: ids.to_vec(),
        };
        let r: InstancesReply = self.http.post("/v1/DescribeInstances", &req).await?;
        Ok(r.instances)
    }

    pub async fn describe_block_servers(&self) -> Result<Vec<BlockServerView>, HttpError> {
        let r: BlockServersReply = self
            .http
            .post("/v1/DescribeBlockServers", &serde_json::json!({}))
            .await?;
        Ok(r.servers)
    }

    pub async fn drain_block_server(&self, server: &str) -> Result<DrainReply, HttpError> {
        self.http
            .post(
                "/v1/DrainBlockServer",
                &DrainRequest {
                    server: server.to_owned(),
                },
            )
            .await
    }

    pub async fn report_replicas(&self, report: &ReplicaReport) -> Result<(), HttpError> {
        let _: serde_json::Value = self
            .http
            .post("/v1/internal/ReportReplicas", report)
            .await?;
        Ok(())
    }

    pub async fn attach_info(&self, id: &VolumeId) -> Result<AttachInfo, HttpError> {
        self.http
            .post(
                "/v1/internal/AttachInfo",
                &VolumeIdRequest {
                    volume_id: id.clone(),
                },
            )
            .await
    }

    pub async fn claim_job(&self, req: &ClaimJobRequest) -> Result<Option<Job>, HttpError> {
        let r: ClaimJobReply = self.http.post("/v1/internal/ClaimJob", req).await?;
        Ok(r.job)
    }

    pub async fn report_job(&self, req: &JobReport) -> Result<JobReportReply, HttpError> {
        self.http.post("/v1/internal/ReportJob", req).await
    }

    /// The hydration job that fills `volume` (for on-demand fetches).
    pub async fn job_for_volume(&self, id: &VolumeId) -> Result<Job, HttpError> {
        self.http
            .post(
                "/v1/internal/JobForVolume",
                &VolumeIdRequest {
                    volume_id: id.clone(),
                },
            )
            .await
    }
}
