//! The control plane (`blockfleet control-plane`): the HTTP JSON API of docs/api.md over
//! volumes, attachments and instances, placement of volumes on block servers, and the
//! hydration jobs transform workers claim.
//!
//! - [`auth`]: SigV4 authentication of every call and the role policy table.
//! - [`volumes`]: CreateVolume, DescribeVolumes, DeleteVolume, AttachVolume, DetachVolume,
//!   DescribeInstances.
//! - [`jobs`]: the transform fleet's side: ClaimJob, ReportJob, JobForVolume, AttachInfo.
//! - [`snapshots`]: CreateSnapshots, DescribeSnapshotSet, DescribeSnapshots, DeleteSnapshot,
//!   ListChangedBlocks.
//! - [`servers`]: DescribeBlockServers, DrainBlockServer, and host agents' replica reports.
//! - [`ebs`]: the EBS direct APIs (StartSnapshot .. GetSnapshotBlock) on `ebs_listen`.
//! - [`coordinator`]: the cut across a set's volumes, their uploads, failure cleanup and
//!   chunk garbage collection.
//!
//! The control plane holds wrapped data keys only: it asks the KMS for
//! GenerateDataKeyWithoutPlaintext and grants, never for Decrypt (the KMS policy denies it).

mod auth;
mod coordinator;
mod ebs;
mod ec2;
mod jobs;
mod servers;
mod snapshots;
mod volumes;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockfleet_api::ReplicaReport;
use blockfleet_core::config::{ControlPlaneConfig, KmsClientConfig};
use blockfleet_core::httpjson::{self, ApiError, Reply};
use blockfleet_core::ids::{SnapshotId, VolumeId};
use blockfleet_core::metrics::OpMetrics;
use blockfleet_core::tls::Role;
use blockfleet_core::token::TokenKey;
use blockfleet_keys::kms::{Kms, KmsError};
use blockfleet_proto::{BlockPool, ClientError};
use blockfleet_snapshot_format::Archive;
use blockfleet_volume_client::{Health, ReplicatedVolume};
use bytes::Bytes;
use hyper::http::request::Parts;
use hyper::Method;
use thiserror::Error;
use tokio::net::TcpListener;

use crate::state::{State, StateError};

#[derive(Debug, Error)]
pub enum ControlPlaneError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("control plane: {0}")]
    Config(String),
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        tracing::error!(error = %e, "control plane state");
        ApiError::internal(e.to_string())
    }
}

pub(crate) fn kms_error(e: KmsError) -> ApiError {
    match &e {
        KmsError::NotFound(_) => ApiError::bad_request("InvalidKmsKey.NotFound", e.to_string()),
        KmsError::Unreachable(_) => ApiError::unavailable("KmsUnavailable", e.to_string()),
        KmsError::AccessDenied(_) => ApiError::new(403, "KmsAccessDenied", e.to_string()),
        _ => ApiError::new(502, "KmsError", e.to_string()),
    }
}

/// A failure of a volume's replica set (the error names the volume and the replicas).
pub(crate) fn replicas_error(e: &ClientError) -> ApiError {
    ApiError::unavailable("BlockServerUnavailable", e.to_string())
}

/// How long a block server may take to answer the control plane before its replica counts as
/// out for that call.
/// How often pending EBS-direct snapshots past their Timeout are looked for.
const EBS_EXPIRY_EVERY: Duration = Duration::from_secs(10);

pub(crate) const REPLICA_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn block_error(addr: &str, e: &ClientError) -> ApiError {
    ApiError::unavailable(
        "BlockServerUnavailable",
        format!("block server {addr}: {e}"),
    )
}

/// Everything a handler needs.
#[derive(Debug)]
pub(crate) struct ControlPlane {
    config: ControlPlaneConfig,
    state: State,
    kms: Kms,
    archive: Archive,
    blocks: BlockPool,
    /// Serialises changes (they span KMS and block-server calls); reads do not wait on it.
    changes: tokio::sync::Mutex<()>,
    /// Transform workers heard from, and HTTP clients to them (jobs).
    workers: jobs::Workers,
    /// What chunk garbage collection must keep, and its lock (coordinator).
    gc: coordinator::ChunkGc,
    /// Uploading snapshots: chunks done, and how many changed (once known).
    progress: Mutex<HashMap<SnapshotId, (u64, Option<u64>)>>,
    /// `pause_window` (the cut's write hold) and `snapshot_set` (cut to completed or error).
    metrics: OpMetrics<2>,
    /// The last mark id handed out (see `next_mark_id`).
    last_mark: AtomicU64,
    /// Host agents' latest views of their volumes' replicas, with when each came.
    replica_reports: Mutex<HashMap<VolumeId, (ReplicaReport, u64)>>,
    /// Fills of new replicas the control plane runs itself (drains of unattached volumes):
    /// chunks done of chunks to copy.
    fills: Mutex<HashMap<VolumeId, (u64, u64)>>,
    /// The EBS direct APIs' locks, token key and manifest cache.
    ebs: ebs::EbsState,
    /// Signs requests to transform workers and host agents' fetch capabilities.
    token_key: TokenKey,
    /// Signs block-protocol capabilities (the block servers' key).
    block_key: Arc<TokenKey>,
}

/// How long a block-protocol capability handed out may wait before it is presented (it is
/// checked then, and holds for that connection's life; holders ask again for new connections).
pub(crate) const BLOCK_GRANT_TTL: Duration = blockfleet_proto::wire::MAX_CAPABILITY_TTL;

/// How long a fetch capability handed out with AttachInfo lasts (the host agent asks again).
pub(crate) const FETCH_TOKEN_TTL: Duration = Duration::from_secs(600);
/// How long a signed block-transform request stays good.
pub(crate) const TRANSFORM_TOKEN_TTL: Duration = Duration::from_secs(60);

impl ControlPlane {
    /// The replicas of volume `id` (`size` bytes) as one volume, over the pool's connections.
    pub(crate) async fn replicas(
        &self,
        id: &VolumeId,
        placement: &[String],
        size: u64,
    ) -> ReplicatedVolume {
        let clients = futures::future::join_all(
            placement
                .iter()
                .map(|a| async move { (a.clone(), self.blocks.get(a).await) }),
        )
        .await;
        ReplicatedVolume::from_clients(id.clone(), clients, size, REPLICA_TIMEOUT)
    }

    /// Drops pooled connections to replicas a call found out (they reconnect next time).
    pub(crate) fn forget_out(&self, r: &ReplicatedVolume) {
        for s in r.status() {
            if s.health == Health::Out {
                self.blocks.forget(&s.addr);
            }
        }
    }

    /// A mark id for a cut: replicas of a volume share mark ids, and each must be above every
    /// mark the volume has seen, so ids are microseconds since the epoch, kept increasing.
    pub(crate) fn next_mark_id(&self) -> u64 {
        let now = now_ms().saturating_mul(1000);
        let mut last = self.last_mark.load(Ordering::Relaxed);
        loop {
            let id = now.max(last + 1);
            match self
                .last_mark
                .compare_exchange(last, id, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return id,
                Err(l) => last = l,
            }
        }
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.config.job_lease_ms)
    }

    async fn route(self: Arc<Self>, parts: Parts, body: Bytes) -> Reply {
        let path = parts.uri.path();
        if parts.method != Method::POST {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "every action is POST /v1/<Action> with a JSON body",
            ));
        }
        let action = path.strip_prefix("/v1/").unwrap_or("");
        let caller = match self.authorize(&parts, &body, action) {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(action, code = %e.code, error = %e.message, "refused");
                return Err(e);
            }
        };
        let reply = match action {
            "CreateVolume" => self.create_volume(&body).await,
            "DescribeVolumes" => self.describe_volumes(&body).await,
            "DeleteVolume" => self.delete_volume(&body).await,
            "AttachVolume" => self.attach_volume(&body).await,
            "DetachVolume" => self.detach_volume(&body).await,
            "DescribeInstances" => self.describe_instances(&body),
            "CreateSnapshots" => self.create_snapshots(&body).await,
            "DescribeSnapshotSet" => self.describe_snapshot_set(&body),
            "DescribeSnapshots" => self.describe_snapshots(&body),
            "DeleteSnapshot" => self.delete_snapshot(&body).await,
            "ListChangedBlocks" => self.list_changed_blocks(&body).await,
            "DescribeBlockServers" => self.describe_block_servers(&body).await,
            "DrainBlockServer" => self.drain_block_server(&body).await,
            "internal/ReportReplicas" => self.report_replicas(&body, &caller),
            "internal/AttachInfo" => self.attach_info(&body, &caller),
            "internal/ClaimJob" => self.claim_job(&body).await,
            "internal/ReportJob" => self.report_job(&body).await,
            "internal/JobForVolume" => self.job_for_volume(&body),
            _ => Err(ApiError::not_found(
                "InvalidAction",
                format!("no action at {path}"),
            )),
        };
        match &reply {
            Ok(_) => tracing::debug!(action, "served"),
            Err(e) => tracing::info!(action, code = %e.code, error = %e.message, "refused"),
        }
        reply
    }
}

/// Serves the control plane on `listener` until `shutdown` resolves.
///
/// `archive` reads snapshot manifests (to check a snapshot exists and its size); `kms` is the
/// control plane's own principal; `token_key` the fleet token key (`[fleet]`); `block_key`
/// the block servers' token key, under which it holds an admin capability on each of them.
pub async fn run(
    config: ControlPlaneConfig,
    kms: &KmsClientConfig,
    archive: Archive,
    token_key: TokenKey,
    block_key: TokenKey,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ControlPlaneError> {
    let block_key = Arc::new(block_key);
    config
        .validate()
        .map_err(|e| ControlPlaneError::Config(e.to_string()))?;
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        ControlPlaneError::Config(format!("data_dir {}: {e}", config.data_dir.display()))
    })?;
    let state = State::open(&config.data_dir)?;
    let cp = Arc::new(ControlPlane {
        kms: Kms::connect(kms).await,
        config,
        state,
        archive,
        blocks: BlockPool::with_admin(Arc::clone(&block_key), "control-plane"),
        block_key,
        changes: tokio::sync::Mutex::new(()),
        workers: jobs::Workers::default(),
        gc: coordinator::ChunkGc::default(),
        progress: Mutex::new(HashMap::new()),
        metrics: OpMetrics::new(["pause_window", "snapshot_set"]),
        last_mark: AtomicU64::new(0),
        replica_reports: Mutex::new(HashMap::new()),
        fills: Mutex::new(HashMap::new()),
        ebs: ebs::EbsState::default(),
        token_key,
    });
    if let Some(addr) = &cp.config.metrics_listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| ControlPlaneError::Config(format!("metrics_listen {addr}: {e}")))?;
        let m = Arc::clone(&cp);
        tokio::spawn(blockfleet_core::metrics::serve(
            l,
            Arc::new(move || {
                let mut out = String::new();
                m.metrics.render(&mut out, "blockfleet_coordinator");
                out
            }),
        ));
    }
    cp.resume_pending_sets()
        .map_err(|e| ControlPlaneError::Config(e.message))?;
    cp.register_pending_ebs()?;
    let expiry = {
        let cp = Arc::clone(&cp);
        tokio::spawn(async move {
            loop {
                cp.expire_ebs().await;
                let minute = Duration::from_millis(cp.config.ebs_timeout_minute_ms);
                tokio::time::sleep(EBS_EXPIRY_EVERY.min(minute)).await;
            }
        })
    };
    let ebs = match &cp.config.ebs_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| ControlPlaneError::Config(format!("ebs_listen {addr}: {e}")))?;
            tracing::info!(addr = %l.local_addr().map_or(addr.clone(), |a| a.to_string()), "EBS direct APIs listening");
            Some(tokio::spawn(ebs::serve(
                Arc::clone(&cp),
                l,
                std::future::pending(),
            )))
        }
        None => None,
    };
    // With [tls], HTTPS only: fleet roles present their certificates (checked per call with
    // the principal, auth.rs), users and operators may present none (SigV4 alone).
    let tls = match &cp.config.tls {
        Some(t) => Some(httpjson::ServerTls {
            config: blockfleet_core::tls::server_config_optional_client(&t.dir, Role::ControlPlane)
                .map_err(|e| ControlPlaneError::Config(e.to_string()))?,
            allow: vec![Role::ControlPlane, Role::Transform, Role::HostAgent],
            anonymous: true,
        }),
        None => None,
    };
    let handler_cp = Arc::clone(&cp);
    httpjson::serve_tls(listener, tls, shutdown, move |parts, body| {
        Arc::clone(&handler_cp).route(parts, body)
    })
    .await;
    if let Some(e) = ebs {
        e.abort();
    }
    expiry.abort();
    cp.state.flush()?;
    Ok(())
}
