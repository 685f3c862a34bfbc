//! Block tokens, ListSnapshotBlocks, ListChangedBlocks and GetSnapshotBlock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use blockfleet_core::ids::SnapshotId;
use blockfleet_snapshot_format::{ChunkHash, Manifest, SnapshotError};
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::control_plane::{now_ms, ControlPlane};
use crate::state::EbsKey;

use super::http::*;
use super::{BLOCK, MANIFEST_CACHE, TOKEN_KEY_SETTING, TOKEN_LIFETIME_S};

impl ControlPlane {
    /// The key block tokens are made under, created on first use.
    pub(super) fn token_key(&self) -> Result<Vec<u8>, EbsError> {
        if let Some(k) = self.ebs.token_key.get() {
            return Ok(k.clone());
        }
        if let Some(k) = self.state.setting(TOKEN_KEY_SETTING)? {
            let k = hex::decode(k).map_err(|e| internal(format!("stored token key: {e}")))?;
            return Ok(self.ebs.token_key.get_or_init(|| k).clone());
        }
        let mut k = vec![0u8; 32];
        getrandom::fill(&mut k).map_err(|e| internal(e.to_string()))?;
        self.state
            .put_setting(TOKEN_KEY_SETTING, &hex::encode(&k))?;
        self.state.flush()?;
        Ok(self.ebs.token_key.get_or_init(|| k).clone())
    }

    pub(super) fn block_token(
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
    pub(super) fn open_token(
        &self,
        id: &SnapshotId,
        index: u64,
        token: &str,
    ) -> Result<ChunkHash, EbsError> {
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
}

impl ControlPlane {
    /// A completed snapshot's manifest (`missing`: the reason when there is none).
    pub(super) async fn ebs_manifest(
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

    pub(super) fn manifest_cache(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<SnapshotId, Arc<Manifest>>> {
        self.ebs.manifests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets a deleted snapshot's cached manifest.
    pub(crate) fn forget_manifest(&self, id: &SnapshotId) {
        self.manifest_cache().remove(id);
    }

    /// Paging: `maxResults` (100 to 10000, default 10000), `pageToken` (the next block
    /// index, as this server hands it out), `startingBlockIndex`.
    pub(super) fn page(q: &HashMap<String, String>) -> Result<(u64, usize), EbsError> {
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

    pub(super) async fn list_snapshot_blocks(
        &self,
        id: SnapshotId,
        q: &HashMap<String, String>,
    ) -> Reply {
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

    pub(super) async fn list_changed_blocks_ebs(
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

    pub(super) async fn get_snapshot_block(
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
}
