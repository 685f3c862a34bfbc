//! Data keys of encrypted EBS snapshots and block transforms through the transform fleet.

use base64::Engine;
use blockfleet_api::{BlockTransformReply, BlockTransformRequest};
use blockfleet_core::ids::{KmsKeyId, VolumeId};
use blockfleet_snapshot_format::EncryptionHeader;
use bytes::Bytes;

use crate::control_plane::ControlPlane;
use crate::state::EbsKey;

use super::http::*;

impl ControlPlane {
    /// The data key of a new snapshot: its encrypted parent's (a child reads its parent's
    /// blocks, so one key), or a new one under `KmsKeyArn` (the fleet default when only
    /// `Encrypted`), bound to a fresh context id; none for an unencrypted one.
    pub(super) async fn ebs_key(
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
    pub(super) async fn transform_block(
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
        // The worker serves only requests the control plane signed, each for its own body.
        let sign = |body: &[u8]| {
            self.token_key.issue(
                blockfleet_core::token::TRANSFORM_BLOCK,
                &blockfleet_core::token::body_digest(body),
                std::time::SystemTime::now(),
                crate::control_plane::TRANSFORM_TOKEN_TTL,
            )
        };
        // A worker reports within its poll interval of starting: wait briefly for one rather
        // than fail an upload during a worker's (re)start.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut workers = self.live_workers();
        while workers.is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            workers = self.live_workers();
        }
        for w in workers {
            // One client per worker, so blocks reuse its kept-alive connections.
            let client = self.workers.clients.get(&w);
            match client
                .post_with::<_, BlockTransformReply>("/v1/transform-block", &req, Some(&sign))
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
}
