//! The transform fleet's side: hydration jobs under leases, and what host agents need.

use std::collections::HashMap;
use std::time::SystemTime;

use blockfleet_core::ids::VolumeId;
use blockfleet_core::token;
use blockfleet_proto::Grant;
use std::sync::{Arc, Mutex};

use blockfleet_api::{
    AttachInfo, ClaimJobRequest, HydrationState, Job, JobOutcome, JobReport, JobSource, JobTarget,
    SourceVolume, VolumeIdRequest,
};
use blockfleet_core::httpjson::{parse, ApiError, Clients, Reply};
use blockfleet_core::tls::Role;
use serde_json::json;

use super::{now_ms, ControlPlane};
use crate::state::{JobRecord, Lease};

/// Transform workers as the control plane knows them.
#[derive(Debug)]
pub(crate) struct Workers {
    /// Fetch endpoints by worker name, with when each last reported.
    pub(super) seen: Mutex<HashMap<String, (String, u64)>>,
    /// HTTP clients by endpoint (EBS block transforms reuse their kept-alive connections).
    pub(super) clients: Clients,
}

impl Default for Workers {
    fn default() -> Self {
        Workers {
            seen: Mutex::default(),
            clients: Clients::new(Role::Transform, std::time::Duration::from_secs(30)),
        }
    }
}

impl ControlPlane {
    /// Fetch endpoints of workers heard from within a lease period.
    pub(super) fn live_workers(&self) -> Vec<String> {
        let horizon = now_ms().saturating_sub(self.config.job_lease_ms);
        let w = self.workers.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(u64, String)> = w
            .values()
            .filter(|(_, seen)| *seen >= horizon)
            .map(|(e, seen)| (*seen, e.clone()))
            .collect();
        v.sort_by(|a, b| b.cmp(a));
        v.into_iter().map(|(_, e)| e).collect()
    }

    pub(super) fn saw_worker(&self, worker: &str, endpoint: &str) {
        self.workers
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(worker.to_owned(), (endpoint.to_owned(), now_ms()));
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Reply {
    serde_json::to_value(v).map_err(|e| ApiError::internal(e.to_string()))
}

impl ControlPlane {
    /// The job as a worker sees it: its live targets with their placement and wrapped keys.
    fn job_spec(&self, j: &JobRecord) -> Result<Job, ApiError> {
        let mut targets = Vec::new();
        for id in &j.targets {
            let Some(v) = self.state.volume(id)? else {
                continue;
            };
            targets.push(JobTarget {
                volume_id: v.id.clone(),
                replicas: v.placement.clone(),
                size: v.size,
                kms_key_id: v.kms_key_id.clone(),
                wrapped_key: v.wrapped_key.clone(),
            });
        }
        let source_volume = match &j.source {
            JobSource::Snapshot { .. } => None,
            // Absent once the source is deleted, which only a finished job allows.
            JobSource::Volume { volume_id, mark } => {
                self.state.volume(volume_id)?.map(|v| SourceVolume {
                    volume_id: v.id.clone(),
                    replicas: v.placement.clone(),
                    size: v.size,
                    mark: *mark,
                    wrapped_key: v.wrapped_key.clone(),
                })
            }
        };
        use blockfleet_proto::wire::rights;
        let grant = |v: &VolumeId, r: u8| {
            Grant::issue(
                &self.block_key,
                Some(v),
                r,
                "transform",
                super::BLOCK_GRANT_TTL,
            )
        };
        let mut block_grants: Vec<Grant> = targets
            .iter()
            .map(|t| grant(&t.volume_id, rights::READ | rights::HYDRATE))
            .collect();
        if let Some(s) = &source_volume {
            block_grants.push(grant(&s.volume_id, rights::READ));
        }
        Ok(Job {
            job_id: j.id.clone(),
            source: j.source.clone(),
            source_volume,
            targets,
            attempt: j.attempts,
            block_grants,
        })
    }

    /// Marks a job failed for good and its volumes impaired.
    fn fail_job(&self, j: &mut JobRecord, reason: String) -> Result<(), ApiError> {
        tracing::warn!(job = %j.id, reason, "hydration job failed");
        j.state = HydrationState::Failed;
        j.lease = None;
        j.error = Some(reason.clone());
        for id in &j.targets {
            if let Some(mut v) = self.state.volume(id)? {
                v.impaired_reason = Some(format!("hydration failed: {reason}"));
                self.state.put_volume(&v)?;
            }
        }
        self.state.put_job(j)?;
        Ok(())
    }

    pub(super) async fn claim_job(self: &Arc<Self>, body: &[u8]) -> Reply {
        let req: ClaimJobRequest = parse(body)?;
        if req.worker.is_empty() || req.endpoint.is_empty() {
            return Err(ApiError::bad_request(
                "MissingParameter",
                "worker and endpoint are required",
            ));
        }
        self.saw_worker(&req.worker, &req.endpoint);
        let _changes = self.changes.lock().await;
        let now = now_ms();
        for mut j in self.state.jobs()? {
            let claimable = match j.state {
                HydrationState::Pending => true,
                HydrationState::Running => j.lease.as_ref().is_none_or(|l| l.until_ms < now),
                HydrationState::Done | HydrationState::Failed => false,
            };
            if !claimable {
                continue;
            }
            if j.attempts >= self.config.job_max_attempts {
                let reason = format!(
                    "gave up after {} attempts; last error: {}",
                    j.attempts,
                    j.error.clone().unwrap_or_else(|| "worker lost".into())
                );
                self.fail_job(&mut j, reason)?;
                self.state.flush()?;
                self.release_source(&j.source).await;
                continue;
            }
            if let Some(l) = &j.lease {
                tracing::warn!(job = %j.id, worker = %l.worker, "lease expired: the job moves to another claim");
            }
            j.state = HydrationState::Running;
            j.attempts += 1;
            j.lease = Some(Lease {
                worker: req.worker.clone(),
                endpoint: req.endpoint.clone(),
                until_ms: now + self.lease().as_millis() as u64,
            });
            self.state.put_job(&j)?;
            self.state.flush()?;
            tracing::info!(job = %j.id, worker = %req.worker, attempt = j.attempts, "job claimed");
            return Ok(json!({ "job": self.job_spec(&j)? }));
        }
        Ok(json!({ "job": null }))
    }

    pub(super) async fn report_job(self: &Arc<Self>, body: &[u8]) -> Reply {
        let req: JobReport = parse(body)?;
        let _changes = self.changes.lock().await;
        let Some(mut j) = self.state.job(&req.job_id)? else {
            return Ok(json!({ "keep_going": false }));
        };
        let holder = j.lease.as_ref().map(|l| l.worker.as_str());
        if j.state != HydrationState::Running || holder != Some(req.worker.as_str()) {
            return Ok(json!({ "keep_going": false }));
        }
        if let Some(l) = &j.lease {
            let endpoint = l.endpoint.clone();
            self.saw_worker(&req.worker, &endpoint);
        }
        match req.outcome {
            JobOutcome::Running => {
                if let Some(l) = j.lease.as_mut() {
                    l.until_ms = now_ms() + self.lease().as_millis() as u64;
                }
                self.state.put_job(&j)?;
            }
            JobOutcome::Done => {
                j.state = HydrationState::Done;
                j.lease = None;
                j.error = None;
                self.state.put_job(&j)?;
                tracing::info!(job = %j.id, "hydration done");
            }
            JobOutcome::Retry => {
                j.state = HydrationState::Pending;
                j.lease = None;
                j.error = req.error.clone();
                self.state.put_job(&j)?;
                tracing::warn!(job = %j.id, error = ?req.error, "hydration attempt failed; will retry");
            }
            JobOutcome::Failed => {
                self.fail_job(
                    &mut j,
                    req.error.clone().unwrap_or_else(|| "unknown".into()),
                )?;
            }
        }
        self.state.flush()?;
        if matches!(j.state, HydrationState::Done | HydrationState::Failed) {
            self.release_source(&j.source).await;
        }
        let live = self.job_spec(&j)?;
        let dropped: Vec<_> = j
            .targets
            .iter()
            .filter(|t| !live.targets.iter().any(|l| &l.volume_id == *t))
            .cloned()
            .collect();
        Ok(json!({
            "keep_going": j.state == HydrationState::Running,
            "dropped_targets": dropped,
        }))
    }

    pub(super) fn job_for_volume(&self, body: &[u8]) -> Reply {
        let req: VolumeIdRequest = parse(body)?;
        let v = self.get_volume(&req.volume_id)?;
        let Some(job_id) = &v.job_id else {
            return Err(ApiError::conflict(
                "NotHydrating",
                format!("volume {} is not filled from a source", v.id),
            ));
        };
        let Some(j) = self.state.job(job_id)? else {
            return Err(ApiError::conflict(
                "NotHydrating",
                format!("the hydration of {} is finished", v.id),
            ));
        };
        if j.state == HydrationState::Failed {
            return Err(ApiError::conflict(
                "HydrationFailed",
                format!(
                    "volume {} is impaired: {}",
                    v.id,
                    j.error.unwrap_or_default()
                ),
            ));
        }
        let mut spec = self.job_spec(&j)?;
        spec.targets.retain(|t| t.volume_id == v.id);
        to_value(&spec)
    }

    pub(super) fn attach_info(&self, body: &[u8], caller: &super::auth::Caller) -> Reply {
        let req: VolumeIdRequest = parse(body)?;
        let v = self.get_volume(&req.volume_id)?;
        if v.attachment.is_some() {
            super::auth::check_host(caller, &v)?;
        }
        let Some(a) = &v.attachment else {
            return Err(ApiError::conflict(
                "IncorrectState",
                format!("volume {} is not attached: AttachVolume first", v.id),
            ));
        };
        let hydrating = match &v.job_id {
            Some(j) => self
                .state
                .job(j)?
                .is_some_and(|j| j.state != HydrationState::Done),
            None => false,
        };
        to_value(&AttachInfo {
            volume_id: v.id.clone(),
            size: v.size,
            replicas: v.placement.clone(),
            encrypted: v.kms_key_id.is_some(),
            kms_key_id: v.kms_key_id.clone(),
            wrapped_key: v.wrapped_key.clone(),
            attachment: a.attachment.clone(),
            fetch_endpoints: if hydrating {
                self.live_workers()
            } else {
                Vec::new()
            },
            joining: v.moving.as_ref().map(|(_, to)| to.clone()),
            block_grant: Some(Grant::writer(&self.block_key, &v.id, &caller.name)),
            fetch_token: Some(self.token_key.issue(
                token::FETCH,
                &blockfleet_api::fetch_subject(&v.id, &a.attachment.host),
                SystemTime::now(),
                super::FETCH_TOKEN_TTL,
            )),
        })
    }
}
