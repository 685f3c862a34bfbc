//! StartSnapshot, PutSnapshotBlock and CompleteSnapshot.

use std::collections::BTreeMap;
use std::sync::Arc;

use blockfleet_api::SnapshotState;
use blockfleet_core::ids::SnapshotId;
use blockfleet_snapshot_format::manifest::CIPHER_XTS_4K;
use blockfleet_snapshot_format::EncryptionHeader;
use blockfleet_snapshot_format::{ChunkHash, Manifest};
use bytes::Bytes;
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::control_plane::{now_ms, ControlPlane};
use crate::state::EbsRecord;

use super::http::*;
use super::{start_view, BLOCK, MAX_VOLUME_GIB};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct Tag {
    key: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct StartSnapshot {
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

impl ControlPlane {
    pub(super) async fn start_snapshot(&self, body: &[u8]) -> Reply {
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

    pub(super) fn pending_ebs(&self, id: &SnapshotId) -> Result<EbsRecord, EbsError> {
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

    pub(super) async fn put_snapshot_block(
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
                let _gc = self.gc.lock.read().await;
                self.gc
                    .pending
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

    pub(super) async fn complete_snapshot(
        &self,
        id: SnapshotId,
        headers: &[(String, String)],
    ) -> Reply {
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
        self.ebs
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        self.gc
            .pending
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
    pub(super) fn ebs_lock(&self, id: &SnapshotId) -> Arc<tokio::sync::RwLock<()>> {
        Arc::clone(
            self.ebs
                .locks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(id.clone())
                .or_default(),
        )
    }
}
