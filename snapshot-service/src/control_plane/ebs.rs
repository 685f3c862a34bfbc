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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use blockfleet_api::{BlockTransformReply, BlockTransformRequest, SnapshotState};
use blockfleet_core::httpjson::JsonClient;
use blockfleet_core::ids::SnapshotId;
use blockfleet_core::ids::{KmsKeyId, VolumeId};
use blockfleet_core::sigv4::{self, SigV4Error};
use blockfleet_core::units::CHUNK;
use blockfleet_keys::kms::KmsError;
use blockfleet_snapshot_format::manifest::CIPHER_XTS_4K;
use blockfleet_snapshot_format::EncryptionHeader;
use blockfleet_snapshot_format::{ChunkHash, Manifest, SnapshotError};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use super::{now_ms, ControlPlane};
use crate::state::{EbsKey, EbsRecord};

const BLOCK: u64 = CHUNK;
/// A block plus room for nothing else: PutSnapshotBlock bodies are exactly one block.
const MAX_BODY: usize = BLOCK as usize + 4096;
const MAX_VOLUME_GIB: u64 = 64 * 1024;
const TOKEN_KEY_SETTING: &str = "ebs_block_token_key";
/// Manifests kept in memory for block reads.
const MANIFEST_CACHE: usize = 16;
/// Lifetime a listing states for its block tokens (the key does not rotate yet).
const TOKEN_LIFETIME_S: u64 = 3600;

/// An AWS-shaped error: HTTP status, `x-amzn-ErrorType`, and a JSON body with a message and,
/// for `ValidationException`, a reason.
#[derive(Debug)]
pub(crate) struct EbsError {
    status: u16,
    code: &'static str,
    reason: Option<&'static str>,
    message: String,
}

fn invalid(reason: &'static str, message: impl Into<String>) -> EbsError {
    EbsError {
        status: 400,
        code: "ValidationException",
        reason: Some(reason),
        message: message.into(),
    }
}

fn not_found(reason: &'static str, message: impl Into<String>) -> EbsError {
    EbsError {
        status: 404,
        code: "ResourceNotFoundException",
        reason: Some(reason),
        message: message.into(),
    }
}

fn conflict(message: impl Into<String>) -> EbsError {
    EbsError {
        status: 409,
        code: "ConflictException",
        reason: None,
        message: message.into(),
    }
}

fn internal(message: impl Into<String>) -> EbsError {
    EbsError {
        status: 500,
        code: "InternalServerException",
        reason: None,
        message: message.into(),
    }
}

fn kms_ebs_error(e: KmsError) -> EbsError {
    match e {
        KmsError::NotFound(_) => invalid("INVALID_PARAMETER_VALUE", format!("KmsKeyArn: {e}")),
        KmsError::AccessDenied(_) => EbsError {
            status: 403,
            code: "AccessDeniedException",
            reason: Some("UNAUTHORIZED_ACCOUNT"),
            message: e.to_string(),
        },
        _ => internal(format!("KMS: {e}")),
    }
}

impl From<crate::state::StateError> for EbsError {
    fn from(e: crate::state::StateError) -> Self {
        internal(e.to_string())
    }
}

type Reply = Result<Response<Full<Bytes>>, EbsError>;

fn json_reply(status: StatusCode, v: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn error_reply(e: &EbsError) -> Response<Full<Bytes>> {
    let mut body = json!({ "Message": e.message, "message": e.message });
    if let Some(r) = e.reason {
        body["Reason"] = json!(r);
    }
    let mut r = json_reply(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body,
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(e.code) {
        r.headers_mut().insert("x-amzn-errortype", v);
    }
    r
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Percent-decoding of a query component.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
            (b'+', _, _) => out.push(b' '),
            (c, _, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn snapshot_id(s: &str) -> Result<SnapshotId, EbsError> {
    s.parse()
        .map_err(|_| invalid("INVALID_SNAPSHOT_ID", format!("{s:?} is not a snapshot id")))
}

fn block_index(s: &str) -> Result<u64, EbsError> {
    s.parse()
        .map_err(|_| invalid("INVALID_BLOCK", format!("{s:?} is not a block index")))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Tag {
    key: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StartSnapshot {
    volume_size: u64,
    parent_snapshot_id: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    tags: Vec<Tag>,
    client_token: Option<String>,
    /// Minutes.
    timeout: Option<u64>,
    #[serde(default)]
    encrypted: bool,
    kms_key_arn: Option<String>,
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
    async fn ebs_request(&self, req: Request<Incoming>) -> Reply {
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

    /// The key block tokens are made under, created on first use.
    fn token_key(&self) -> Result<Vec<u8>, EbsError> {
        if let Some(k) = self.ebs_token_key.get() {
            return Ok(k.clone());
        }
        if let Some(k) = self.state.setting(TOKEN_KEY_SETTING)? {
            let k = hex::decode(k).map_err(|e| internal(format!("stored token key: {e}")))?;
            return Ok(self.ebs_token_key.get_or_init(|| k).clone());
        }
        let mut k = vec![0u8; 32];
        getrandom::fill(&mut k).map_err(|e| internal(e.to_string()))?;
        self.state
            .put_setting(TOKEN_KEY_SETTING, &hex::encode(&k))?;
        self.state.flush()?;
        Ok(self.ebs_token_key.get_or_init(|| k).clone())
    }

    fn block_token(
        &self,
        id: &SnapshotId,
        index: u64,
        hash: &ChunkHash,
    ) -> Result<String, EbsError> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.token_key()?)
            .map_err(|e| internal(e.to_string()))?;
        mac.update(format!("{id}/{index}/{hash}").as_bytes());
        Ok(format!(
            "{hash}.{}",
            hex::encode(&mac.finalize().into_bytes()[..16])
        ))
    }

    /// The chunk a block token names, if it was made for this snapshot and block.
    fn open_token(&self, id: &SnapshotId, index: u64, token: &str) -> Result<ChunkHash, EbsError> {
        let bad = || {
            invalid(
                "INVALID_BLOCK_TOKEN",
                format!("the block token is not one for block {index} of {id}"),
            )
        };
        let (hash, _) = token.split_once('.').ok_or_else(bad)?;
        let hash: ChunkHash = hash.parse().map_err(|_| bad())?;
        let want = self.block_token(id, index, &hash)?;
        let same = want.len() == token.len()
            && want
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return Err(bad());
        }
        Ok(hash)
    }

    async fn start_snapshot(&self, body: &[u8]) -> Reply {
        let req: StartSnapshot = serde_json::from_slice(body)
            .map_err(|e| invalid("INVALID_PARAMETER_VALUE", format!("request body: {e}")))?;
        if !(1..=MAX_VOLUME_GIB).contains(&req.volume_size) {
            return Err(invalid(
                "INVALID_VOLUME_SIZE",
                format!(
                    "VolumeSize {} GiB: must be 1 to {MAX_VOLUME_GIB}",
                    req.volume_size
                ),
            ));
        }
        let timeout = req.timeout.unwrap_or(60);
        if !(10..=4320).contains(&timeout) {
            return Err(invalid(
                "INVALID_PARAMETER_VALUE",
                format!("Timeout {timeout} minutes: must be 10 to 4320"),
            ));
        }
        let description = req.description.unwrap_or_default();
        if description.len() > 255 {
            return Err(invalid(
                "INVALID_PARAMETER_VALUE",
                "Description: at most 255 characters",
            ));
        }
        let tags: Vec<(String, String)> = req.tags.into_iter().map(|t| (t.key, t.value)).collect();
        let map: BTreeMap<String, String> = tags.iter().cloned().collect();
        blockfleet_api::validate_tags(&map).map_err(|m| invalid("INVALID_TAG", m))?;
        let (parent, parent_key) = match &req.parent_snapshot_id {
            Some(p) => {
                let p = snapshot_id(p)?;
                let m = self
                    .ebs_manifest(&p, "DEPENDENCY_RESOURCE_NOT_FOUND")
                    .await?;
                if m.volume_size > req.volume_size << 30 {
                    return Err(invalid(
                        "INVALID_VOLUME_SIZE",
                        format!("VolumeSize is smaller than parent {p}'s"),
                    ));
                }
                (Some(p), m.encryption.clone())
            }
            None => (None, None),
        };
        let encryption = self
            .ebs_key(
                parent_key,
                req.encrypted,
                req.kms_key_arn.as_deref(),
                parent.is_some(),
            )
            .await?;
        let _changes = self.changes.lock().await;
        if let Some(t) = &req.client_token {
            if let Some(r) = self
                .state
                .ebs_all()?
                .into_iter()
                .find(|r| r.client_token.as_ref() == Some(t))
            {
                if r.volume_size_gib != req.volume_size || r.parent != parent {
                    return Err(conflict(format!(
                        "client token {t} was used with other parameters"
                    )));
                }
                return Ok(json_reply(StatusCode::CREATED, start_view(&r)));
            }
        }
        let now = now_ms();
        let r = EbsRecord {
            id: SnapshotId::generate(),
            volume_size_gib: req.volume_size,
            parent,
            description,
            tags,
            client_token: req.client_token,
            state: SnapshotState::Pending,
            started_at: now / 1000,
            expires_at_ms: now + timeout * self.config.ebs_timeout_minute_ms,
            blocks: BTreeMap::new(),
            error: None,
            sums: BTreeMap::new(),
            encryption,
        };
        self.state.put_ebs(&r)?;
        self.state.flush()?;
        tracing::info!(snapshot = %r.id, size_gib = r.volume_size_gib, "ebs snapshot started");
        Ok(json_reply(StatusCode::CREATED, start_view(&r)))
    }

    fn pending_ebs(&self, id: &SnapshotId) -> Result<EbsRecord, EbsError> {
        let r = self.state.ebs(id)?.ok_or_else(|| {
            not_found(
                "SNAPSHOT_NOT_FOUND",
                format!("snapshot {id} does not exist"),
            )
        })?;
        if r.state != SnapshotState::Pending || now_ms() > r.expires_at_ms {
            return Err(invalid(
                "INVALID_SNAPSHOT_ID",
                format!("snapshot {id} is not pending (completed, failed or timed out)"),
            ));
        }
        Ok(r)
    }

    async fn put_snapshot_block(
        &self,
        id: SnapshotId,
        index: u64,
        headers: &[(String, String)],
        body: Bytes,
    ) -> Reply {
        let r = self.pending_ebs(&id)?;
        let blocks = (r.volume_size_gib << 30) / BLOCK;
        if index >= blocks {
            return Err(invalid(
                "INVALID_BLOCK",
                format!("block {index} is beyond the {blocks} blocks of {id}"),
            ));
        }
        let length: u64 = header(headers, "x-amz-data-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| invalid("INVALID_PARAMETER_VALUE", "x-amz-Data-Length is missing"))?;
        if length != BLOCK || body.len() as u64 != BLOCK {
            return Err(invalid(
                "INVALID_PARAMETER_VALUE",
                format!(
                    "a block is {BLOCK} bytes; got {} (Data-Length {length})",
                    body.len()
                ),
            ));
        }
        if let Some(a) = header(headers, "x-amz-checksum-algorithm") {
            if a != "SHA256" {
                return Err(invalid(
                    "INVALID_CHECKSUM",
                    format!("checksum algorithm {a}: only SHA256"),
                ));
            }
        }
        let given = header(headers, "x-amz-checksum")
            .ok_or_else(|| invalid("INVALID_CHECKSUM", "x-amz-Checksum is missing"))?;
        let digest = Sha256::digest(&body);
        if given != b64(&digest) {
            return Err(invalid(
                "INVALID_CHECKSUM",
                format!("block {index}: the checksum does not match the data"),
            ));
        }
        let zero = body.iter().all(|&b| b == 0);
        // Encrypted snapshots store the block as a transform worker encrypts it.
        let body = match &r.encryption {
            Some(k) if !zero => self.transform_block(k, index, true, &body).await?,
            _ => body,
        };
        let hash = match &r.encryption {
            Some(_) => ChunkHash::of(&body),
            None => ChunkHash(digest.into()),
        };
        // Held shared while the block is recorded; CompleteSnapshot holds it exclusively, so
        // no put lands between its read of the blocks and the manifest.
        let lock = self.ebs_lock(&id);
        let _held = lock.read().await;
        self.pending_ebs(&id)?;
        if !zero {
            let present = {
                let _gc = self.gc.read().await;
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(format!("ebs:{id}"))
                    .or_default()
                    .insert(hash);
                self.archive
                    .has_chunk(&hash)
                    .await
                    .map_err(|e| internal(e.to_string()))?
            };
            if !present {
                self.archive
                    .put_chunk(&hash, body)
                    .await
                    .map_err(|e| internal(e.to_string()))?;
            }
        }
        self.state
            .put_ebs_block(&id, index, &hash.to_string(), &hex::encode(digest))?;
        let mut resp = json_reply(StatusCode::CREATED, json!({}));
        let h = resp.headers_mut();
        if let Ok(v) = hyper::header::HeaderValue::from_str(&b64(&digest)) {
            h.insert("x-amz-checksum", v);
        }
        h.insert(
            "x-amz-checksum-algorithm",
            hyper::header::HeaderValue::from_static("SHA256"),
        );
        Ok(resp)
    }

    async fn complete_snapshot(&self, id: SnapshotId, headers: &[(String, String)]) -> Reply {
        let lock = self.ebs_lock(&id);
        let _held = lock.write().await;
        let _changes = self.changes.lock().await;
        let mut r = self.pending_ebs(&id)?;
        for (i, (hash, sum)) in self.state.ebs_blocks(&id)? {
            r.blocks.insert(i, hash);
            r.sums.insert(i, sum);
        }
        let count: u64 = header(headers, "x-amz-changedblockscount")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                invalid(
                    "INVALID_PARAMETER_VALUE",
                    "x-amz-ChangedBlocksCount is missing",
                )
            })?;
        if count != r.blocks.len() as u64 {
            return Err(invalid(
                "INVALID_PARAMETER_VALUE",
                format!(
                    "ChangedBlocksCount {count}, but {} blocks were put",
                    r.blocks.len()
                ),
            ));
        }
        if let Some(given) = header(headers, "x-amz-checksum") {
            match header(headers, "x-amz-checksum-aggregation-method") {
                None | Some("LINEAR") => {}
                Some(m) => {
                    return Err(invalid(
                        "INVALID_CHECKSUM",
                        format!("aggregation method {m}: only LINEAR"),
                    ))
                }
            }
            // LINEAR: SHA-256 over the blocks' SHA-256 digests in block order.
            let mut agg = Sha256::new();
            for (i, h) in &r.blocks {
                let sum = r.sums.get(i).unwrap_or(h);
                agg.update(hex::decode(sum).map_err(|e| internal(e.to_string()))?);
            }
            if given != b64(&agg.finalize()) {
                return Err(invalid(
                    "INVALID_CHECKSUM",
                    "the aggregate checksum does not match the blocks put",
                ));
            }
        }
        let mut chunks = match &r.parent {
            Some(p) => self
                .ebs_manifest(p, "DEPENDENCY_RESOURCE_NOT_FOUND")
                .await?
                .chunks
                .clone(),
            None => BTreeMap::new(),
        };
        let zero = ChunkHash::of(&vec![0u8; BLOCK as usize]);
        for (i, h) in &r.blocks {
            let h: ChunkHash = h.parse().map_err(|_| internal("stored block hash"))?;
            // An all-zero block as sent is not stored (encrypted or not).
            if r.sums.get(i).map_or(h == zero, |s| *s == zero.to_string()) {
                chunks.remove(i);
            } else {
                chunks.insert(*i, h);
            }
        }
        let manifest = Manifest {
            snapshot_id: id.clone(),
            volume_size: r.volume_size_gib << 30,
            parent: r.parent.clone(),
            created_at: r.started_at,
            description: r.description.clone(),
            encryption: match &r.encryption {
                Some(k) => Some(EncryptionHeader {
                    kms_key_id: k
                        .kms_key_id
                        .parse()
                        .map_err(|e| internal(format!("stored KMS key id: {e}")))?,
                    wrapped_key: hex::decode(&k.wrapped_key)
                        .map_err(|e| internal(format!("stored wrapped key: {e}")))?,
                    cipher: CIPHER_XTS_4K.into(),
                    context_volume: Some(k.context_volume.clone()),
                }),
                None => None,
            },
            chunks,
        };
        self.archive
            .put_manifest(&manifest)
            .await
            .map_err(|e| internal(e.to_string()))?;
        r.state = SnapshotState::Completed;
        self.state.put_ebs(&r)?;
        self.state.remove_ebs_blocks(&id)?;
        self.state.flush()?;
        self.ebs_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&format!("ebs:{id}"));
        tracing::info!(snapshot = %id, blocks = r.blocks.len(), "ebs snapshot completed");
        Ok(json_reply(
            StatusCode::ACCEPTED,
            json!({ "Status": "completed" }),
        ))
    }

    /// The mutex of one EBS snapshot's puts (shared) and completion (exclusive).
    fn ebs_lock(&self, id: &SnapshotId) -> Arc<tokio::sync::RwLock<()>> {
        Arc::clone(
            self.ebs_locks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(id.clone())
                .or_default(),
        )
    }

    /// A completed snapshot's manifest (`missing`: the reason when there is none).
    async fn ebs_manifest(
        &self,
        id: &SnapshotId,
        missing: &'static str,
    ) -> Result<Arc<Manifest>, EbsError> {
        // Manifests never change once written: downloads read each one once, not per block.
        if let Some(m) = self.manifest_cache().get(id) {
            return Ok(Arc::clone(m));
        }
        let m = self.archive.get_manifest(id).await.map_err(|e| match e {
            SnapshotError::NotFound(_) => not_found(
                missing,
                format!("snapshot {id} does not exist or is not completed"),
            ),
            SnapshotError::Store(ref s) if !s.is_not_found() => internal(e.to_string()),
            other => invalid("INVALID_SNAPSHOT_ID", format!("snapshot {id}: {other}")),
        })?;
        let m = Arc::new(m);
        let mut cache = self.manifest_cache();
        if cache.len() >= MANIFEST_CACHE {
            cache.clear();
        }
        cache.insert(id.clone(), Arc::clone(&m));
        Ok(m)
    }

    fn manifest_cache(&self) -> std::sync::MutexGuard<'_, HashMap<SnapshotId, Arc<Manifest>>> {
        self.ebs_manifests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets a deleted snapshot's cached manifest.
    pub(super) fn forget_manifest(&self, id: &SnapshotId) {
        self.manifest_cache().remove(id);
    }

    /// Paging: `maxResults` (100 to 10000, default 10000), `pageToken` (the next block
    /// index, as this server hands it out), `startingBlockIndex`.
    fn page(q: &HashMap<String, String>) -> Result<(u64, usize), EbsError> {
        let max = match q.get("maxResults") {
            Some(m) => m
                .parse::<usize>()
                .ok()
                .filter(|m| (100..=10000).contains(m))
                .ok_or_else(|| invalid("INVALID_PARAMETER_VALUE", "maxResults: 100 to 10000"))?,
            None => 10000,
        };
        let from = match (q.get("pageToken"), q.get("startingBlockIndex")) {
            (Some(t), _) => t.parse().map_err(|_| {
                invalid(
                    "INVALID_PAGE_TOKEN",
                    "pageToken is not one this server gave",
                )
            })?,
            (None, Some(s)) => block_index(s)?,
            (None, None) => 0,
        };
        Ok((from, max))
    }

    async fn list_snapshot_blocks(&self, id: SnapshotId, q: &HashMap<String, String>) -> Reply {
        let m = self.ebs_manifest(&id, "SNAPSHOT_NOT_FOUND").await?;
        let (from, max) = Self::page(q)?;
        let mut blocks = Vec::new();
        let mut next = None;
        for (i, h) in m.chunks.range(from..) {
            if blocks.len() == max {
                next = Some(i.to_string());
                break;
            }
            blocks.push(json!({ "BlockIndex": i, "BlockToken": self.block_token(&id, *i, h)? }));
        }
        let mut v = json!({
            "Blocks": blocks,
            "ExpiryTime": now_ms() / 1000 + TOKEN_LIFETIME_S,
            "VolumeSize": m.volume_size >> 30,
            "BlockSize": BLOCK,
        });
        if let Some(n) = next {
            v["NextToken"] = json!(n);
        }
        Ok(json_reply(StatusCode::OK, v))
    }

    async fn list_changed_blocks_ebs(
        &self,
        second: SnapshotId,
        q: &HashMap<String, String>,
    ) -> Reply {
        let m2 = self.ebs_manifest(&second, "SNAPSHOT_NOT_FOUND").await?;
        let first = match q.get("firstSnapshotId") {
            Some(f) => {
                let f = snapshot_id(f)?;
                Some((
                    self.ebs_manifest(&f, "DEPENDENCY_RESOURCE_NOT_FOUND")
                        .await?,
                    f,
                ))
            }
            None => None,
        };
        let (from, max) = Self::page(q)?;
        let empty = BTreeMap::new();
        let c1 = first.as_ref().map_or(&empty, |(m, _)| &m.chunks);
        let indices: std::collections::BTreeSet<u64> = c1
            .keys()
            .chain(m2.chunks.keys())
            .copied()
            .filter(|i| *i >= from)
            .collect();
        let mut out = Vec::new();
        let mut next = None;
        for i in indices {
            let (a, b) = (c1.get(&i), m2.chunks.get(&i));
            if a == b {
                continue;
            }
            if out.len() == max {
                next = Some(i.to_string());
                break;
            }
            let mut e = json!({ "BlockIndex": i });
            if let (Some(h), Some((_, f))) = (a, &first) {
                e["FirstBlockToken"] = json!(self.block_token(f, i, h)?);
            }
            if let Some(h) = b {
                e["SecondBlockToken"] = json!(self.block_token(&second, i, h)?);
            }
            out.push(e);
        }
        let mut v = json!({
            "ChangedBlocks": out,
            "ExpiryTime": now_ms() / 1000 + TOKEN_LIFETIME_S,
            "VolumeSize": m2.volume_size >> 30,
            "BlockSize": BLOCK,
        });
        if let Some(n) = next {
            v["NextToken"] = json!(n);
        }
        Ok(json_reply(StatusCode::OK, v))
    }

    async fn get_snapshot_block(
        &self,
        id: SnapshotId,
        index: u64,
        q: &HashMap<String, String>,
    ) -> Reply {
        let token = q
            .get("blockToken")
            .ok_or_else(|| invalid("INVALID_BLOCK_TOKEN", "blockToken is missing"))?;
        let hash = self.open_token(&id, index, token)?;
        let m = self.ebs_manifest(&id, "SNAPSHOT_NOT_FOUND").await?;
        if m.chunks.get(&index) != Some(&hash) {
            return Err(invalid(
                "INVALID_BLOCK_TOKEN",
                format!("block {index} of {id} is not that block"),
            ));
        }
        let data = self
            .archive
            .get_chunk(&hash)
            .await
            .map_err(|e| internal(format!("block {index} of {id}: {e}")))?;
        let data = match &m.encryption {
            Some(h) => {
                let key = EbsKey {
                    kms_key_id: h.kms_key_id.to_string(),
                    wrapped_key: hex::encode(&h.wrapped_key),
                    context_volume: h
                        .context_volume
                        .clone()
                        .ok_or_else(|| internal(format!("{id} names no key context")))?,
                };
                self.transform_block(&key, index, false, &data).await?
            }
            None => data,
        };
        let digest = Sha256::digest(&data);
        let mut resp = Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/octet-stream")
            .header("x-amz-data-length", data.len().to_string())
            .header("x-amz-checksum", b64(&digest))
            .header("x-amz-checksum-algorithm", "SHA256")
            .body(Full::new(data))
            .map_err(|e| internal(e.to_string()))?;
        resp.headers_mut().remove("x-amzn-errortype");
        Ok(resp)
    }

    /// Fails every pending EBS snapshot past its Timeout and deletes the blocks it stored that
    /// nothing else references.
    pub(super) async fn expire_ebs(&self) {
        let Ok(all) = self.state.ebs_all() else {
            return;
        };
        let now = now_ms();
        for r in all {
            if r.state != SnapshotState::Pending || r.expires_at_ms > now {
                continue;
            }
            {
                let _changes = self.changes.lock().await;
                let mut r = r.clone();
                r.state = SnapshotState::Error;
                r.error = Some("not completed within its Timeout".into());
                if self
                    .state
                    .put_ebs(&r)
                    .and_then(|()| self.state.flush())
                    .is_err()
                {
                    continue;
                }
            }
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&format!("ebs:{}", r.id));
            let chunks: HashSet<ChunkHash> = match self.state.ebs_blocks(&r.id) {
                Ok(b) => b.values().filter_map(|(h, _)| h.parse().ok()).collect(),
                Err(_) => continue,
            };
            let _ = self.state.remove_ebs_blocks(&r.id);
            match self.collect_garbage(chunks).await {
                Ok(n) => {
                    tracing::info!(snapshot = %r.id, deleted = n, "ebs snapshot timed out: its blocks deleted")
                }
                Err(e) => {
                    tracing::warn!(snapshot = %r.id, error = %e, "ebs snapshot timed out; deleting its blocks failed")
                }
            }
        }
    }

    /// The data key of a new snapshot: its encrypted parent's (a child reads its parent's
    /// blocks, so one key), or a new one under `KmsKeyArn` (the fleet default when only
    /// `Encrypted`), bound to a fresh context id; none for an unencrypted one.
    async fn ebs_key(
        &self,
        parent_key: Option<EncryptionHeader>,
        encrypted: bool,
        kms_key_arn: Option<&str>,
        has_parent: bool,
    ) -> Result<Option<EbsKey>, EbsError> {
        let resolve = |arn: String| async move {
            let kid: KmsKeyId = arn
                .parse()
                .map_err(|e| invalid("INVALID_PARAMETER_VALUE", format!("KmsKeyArn: {e}")))?;
            self.kms.describe_key(&kid).await.map_err(kms_ebs_error)
        };
        match parent_key {
            Some(h) => {
                if let Some(arn) = kms_key_arn {
                    if resolve(arn.to_owned()).await? != h.kms_key_id.to_string() {
                        return Err(invalid(
                            "INVALID_PARAMETER_VALUE",
                            "a child of an encrypted snapshot is encrypted under its parent's KMS key",
                        ));
                    }
                }
                Ok(Some(EbsKey {
                    kms_key_id: h.kms_key_id.to_string(),
                    wrapped_key: hex::encode(&h.wrapped_key),
                    context_volume: h
                        .context_volume
                        .ok_or_else(|| internal("the parent names no key context"))?,
                }))
            }
            None if encrypted || kms_key_arn.is_some() => {
                if has_parent {
                    return Err(invalid(
                        "INVALID_PARAMETER_VALUE",
                        "an encrypted snapshot's parent must be encrypted (under the same key)",
                    ));
                }
                let arn = match kms_key_arn {
                    Some(a) => a.to_owned(),
                    None => self.default_key().await.map_err(|e| internal(e.message))?,
                };
                let key_id = resolve(arn).await?;
                let kid: KmsKeyId = key_id
                    .parse()
                    .map_err(|e| internal(format!("KMS key id {key_id}: {e}")))?;
                let context = VolumeId::generate();
                let wrapped = self
                    .kms
                    .generate_wrapped_key(&kid, &context)
                    .await
                    .map_err(kms_ebs_error)?;
                Ok(Some(EbsKey {
                    kms_key_id: key_id,
                    wrapped_key: hex::encode(wrapped),
                    context_volume: context,
                }))
            }
            None => Ok(None),
        }
    }

    /// One block through a transform worker's encryption path: the plaintext key stays there.
    async fn transform_block(
        &self,
        key: &EbsKey,
        block: u64,
        encrypt: bool,
        data: &[u8],
    ) -> Result<Bytes, EbsError> {
        let req = BlockTransformRequest {
            wrapped_key: key.wrapped_key.clone(),
            context_volume: key.context_volume.clone(),
            block,
            encrypt,
            data: b64(data),
        };
        let mut last = "no transform worker is up".to_owned();
        for w in self.live_workers() {
            // One client per worker, so blocks reuse its kept-alive connections.
            let client = self
                .worker_clients
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(w.clone())
                .or_insert_with(|| JsonClient::new(&w, std::time::Duration::from_secs(30)))
                .clone();
            match client
                .post::<_, BlockTransformReply>("/v1/transform-block", &req)
                .await
            {
                Ok(r) => {
                    return base64::engine::general_purpose::STANDARD
                        .decode(r.data)
                        .map(Bytes::from)
                        .map_err(|e| internal(format!("transform worker {w}: {e}")))
                }
                Err(e) => last = format!("transform worker {w}: {e}"),
            }
        }
        Err(internal(format!(
            "cannot {} block {block}: {last}; retry",
            if encrypt { "encrypt" } else { "decrypt" }
        )))
    }

    /// Registers the blocks of pending EBS snapshots with garbage collection (after a restart).
    pub(super) fn register_pending_ebs(&self) -> Result<(), crate::state::StateError> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for r in self.state.ebs_all()? {
            if r.state == SnapshotState::Pending {
                let set: HashSet<ChunkHash> = self
                    .state
                    .ebs_blocks(&r.id)?
                    .values()
                    .filter_map(|(h, _)| h.parse().ok())
                    .collect();
                pending.insert(format!("ebs:{}", r.id), set);
            }
        }
        Ok(())
    }
}

fn start_view(r: &EbsRecord) -> Value {
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
