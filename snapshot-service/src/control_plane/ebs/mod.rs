//! The EBS direct APIs on `control_plane.ebs_listen` (REST-JSON, SigV4 service `ebs`, the AWS
//! API reference as the spec), so tools built on them (the AWS SDKs, the AWS CLI) upload and
//! download blockfleet snapshots:
//!
//! - `POST /snapshots` StartSnapshot, `PUT /snapshots/{id}/blocks/{index}` PutSnapshotBlock,
//!   `POST /snapshots/completion/{id}` CompleteSnapshot;
//! - `GET /snapshots/{id}/blocks` ListSnapshotBlocks, `GET /snapshots/{id}/blocks/{index}`
//!   GetSnapshotBlock, `GET /snapshots/{id}/changedblocks` ListChangedBlocks.
//!
//! A block is a chunk (512 KiB): PutSnapshotBlock checks its SHA-256 and stores it
//! content-addressed (registered as pending so garbage collection keeps it); CompleteSnapshot
//! checks the block count and the linear aggregate checksum, then writes an ordinary manifest
//! (the parent's chunks overlaid with the new blocks), restorable with CreateVolume and deleted
//! and collected like any snapshot. Block tokens are `<chunk hash>.<HMAC>` under a key the
//! control plane keeps, so a token opens one block of one snapshot.
//!
//! - [`http`]: AWS-shaped errors and request parsing.
//! - [`upload`]: StartSnapshot, PutSnapshotBlock, CompleteSnapshot.
//! - [`download`]: block tokens, ListSnapshotBlocks, ListChangedBlocks, GetSnapshotBlock.
//! - [`encryption`]: data keys of encrypted snapshots and block transforms through the transform fleet.
//! - [`expiry`]: pending snapshots past their Timeout; pending blocks kept from GC across restarts.

mod download;
mod encryption;
mod expiry;
mod http;
mod upload;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use blockfleet_core::ids::SnapshotId;
use blockfleet_core::sigv4::{self, SigV4Error};
use blockfleet_core::units::CHUNK;
use blockfleet_snapshot_format::Manifest;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::control_plane::ControlPlane;
use crate::state::EbsRecord;

use self::http::*;

pub(super) const BLOCK: u64 = CHUNK;
/// A block plus room for nothing else: PutSnapshotBlock bodies are exactly one block.
pub(super) const MAX_BODY: usize = BLOCK as usize + 4096;
pub(super) const MAX_VOLUME_GIB: u64 = 64 * 1024;
pub(super) const TOKEN_KEY_SETTING: &str = "ebs_block_token_key";
/// Manifests kept in memory for block reads.
pub(super) const MANIFEST_CACHE: usize = 16;
/// Lifetime a listing states for its block tokens (the key does not rotate yet).
pub(super) const TOKEN_LIFETIME_S: u64 = 3600;

/// What the EBS direct APIs keep in memory.
#[derive(Debug, Default)]
pub(crate) struct EbsState {
    /// Per pending snapshot: puts shared, completion exclusive.
    pub(super) locks: Mutex<HashMap<SnapshotId, Arc<tokio::sync::RwLock<()>>>>,
    /// The block-token key, once loaded.
    pub(super) token_key: std::sync::OnceLock<Vec<u8>>,
    /// Recently read manifests, for block reads.
    pub(super) manifests: Mutex<HashMap<SnapshotId, Arc<Manifest>>>,
}

/// Serves the EBS direct APIs on `listener` until `shutdown`.
pub(super) async fn serve(
    cp: Arc<ControlPlane>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) {
    let inflight = Arc::new(tokio::sync::Semaphore::new(cp.config.ebs_max_inflight));
    blockfleet_core::httpjson::serve_http(listener, shutdown, move |req: Request<Incoming>| {
        let cp = Arc::clone(&cp);
        let permit = Arc::clone(&inflight).try_acquire_owned();
        async move {
            let Ok(_permit) = permit else {
                // Read the body anyway: a reply before the upload is read makes the client
                // see a reset connection instead of the throttling error.
                let _ = Limited::new(req.into_body(), MAX_BODY).collect().await;
                return error_reply(&EbsError {
                    status: 400,
                    code: "RequestThrottledException",
                    reason: Some("RESOURCE_LEVEL_THROTTLE"),
                    message: "too many requests at once; retry with backoff".into(),
                });
            };
            match cp.ebs_request(req).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::info!(code = e.code, error = %e.message, "ebs request refused");
                    error_reply(&e)
                }
            }
        }
    })
    .await;
}

impl ControlPlane {
    pub(super) async fn ebs_request(self: &Arc<Self>, req: Request<Incoming>) -> Reply {
        let (parts, body) = req.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|_| {
                invalid(
                    "INVALID_PARAMETER_VALUE",
                    format!("request body larger than {MAX_BODY} bytes or unreadable"),
                )
            })?
            .to_bytes();
        // One endpoint serves the EC2 Query API too (POST / with a form body).
        if super::ec2::is_ec2(&parts) {
            return Ok(self.ec2_request(parts, body).await);
        }
        let headers: Vec<(String, String)> = parts
            .headers
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        sigv4::verify_request(&parts, &body, "ebs", SystemTime::now(), |akid| {
            self.config
                .ebs_principals
                .iter()
                .find(|p| p.access_key_id == akid)
                .map(|p| p.secret_access_key.expose().to_owned())
        })
        .map_err(|e| EbsError {
            status: 403,
            code: "AccessDeniedException",
            reason: Some(match e {
                SigV4Error::UnknownAccessKey => "UNAUTHORIZED_ACCOUNT",
                _ => "INVALID_SIGNATURE",
            }),
            message: e.to_string(),
        })?;
        let path: Vec<&str> = parts.uri.path().trim_matches('/').split('/').collect();
        let q = query(parts.uri.query().unwrap_or(""));
        match (&parts.method, path.as_slice()) {
            (&Method::POST, ["snapshots"]) => self.start_snapshot(&body).await,
            (&Method::PUT, ["snapshots", id, "blocks", index]) => {
                self.put_snapshot_block(snapshot_id(id)?, block_index(index)?, &headers, body)
                    .await
            }
            (&Method::POST, ["snapshots", "completion", id]) => {
                self.complete_snapshot(snapshot_id(id)?, &headers).await
            }
            (&Method::GET, ["snapshots", id, "blocks"]) => {
                self.list_snapshot_blocks(snapshot_id(id)?, &q).await
            }
            (&Method::GET, ["snapshots", id, "blocks", index]) => {
                self.get_snapshot_block(snapshot_id(id)?, block_index(index)?, &q)
                    .await
            }
            (&Method::GET, ["snapshots", id, "changedblocks"]) => {
                self.list_changed_blocks_ebs(snapshot_id(id)?, &q).await
            }
            _ => Err(invalid(
                "INVALID_PARAMETER_VALUE",
                format!("no EBS direct API at {} {}", parts.method, parts.uri.path()),
            )),
        }
    }
}

pub(super) fn start_view(r: &EbsRecord) -> Value {
    let mut v = json!({
        "SnapshotId": r.id,
        "OwnerId": "blockfleet",
        "Status": "pending",
        "StartTime": r.started_at,
        "VolumeSize": r.volume_size_gib,
        "BlockSize": BLOCK,
        "Tags": r.tags.iter().map(|(k, v)| json!({"Key": k, "Value": v})).collect::<Vec<_>>(),
        "Description": r.description,
    });
    if let Some(p) = &r.parent {
        v["ParentSnapshotId"] = json!(p);
    }
    v
}
