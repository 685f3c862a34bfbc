//! `blockfleet-transform-fleet`: transform workers (`blockfleet transform`).
//!
//! A worker claims hydration jobs from the control plane under a lease it renews while it
//! works, fills every target volume of the job from the one source (see [`job`]), and serves
//! on-demand fetches: a host agent reading a chunk not hydrated yet asks a worker to hydrate
//! that chunk now, ahead of the background work (which is paced by
//! `transform.background_mib_per_sec`; fetches are not).
//!
//! Progress lives on the block servers (which chunks are hydrated), so a job whose worker is
//! killed is claimed again after its lease runs out and resumes where it stopped: chunks
//! already hydrated are not rewritten, and `WriteIfUnwritten` keeps user writes.
//!
//! - [`job`]: one job's source, targets and keys; hydrating a chunk.
//! - [`metrics`]: Prometheus metrics.

pub mod job;
pub mod metrics;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use blockfleet_api::{
    BlockTransformReply, BlockTransformRequest, ClaimJobRequest, ControlPlaneClient, FetchReply,
    FetchRequest, Job, JobOutcome, JobReport,
};
use blockfleet_core::config::Config;
use blockfleet_core::httpjson::{self, ApiError, Reply};
use blockfleet_core::ids::VolumeId;
use blockfleet_core::tls::Role;
use blockfleet_core::token::{self, TokenKey};
use blockfleet_core::units::CHUNK;
use blockfleet_keys::kms::Kms;
use blockfleet_proto::BlockPool;
use blockfleet_snapshot_format::Archive;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use hyper::http::request::Parts;
use thiserror::Error;
use tokio::net::TcpListener;

use job::{JobContext, JobError};
use metrics::Metrics;

#[derive(Debug, Error)]
pub enum TransformError {
    #[error("transform: {0}")]
    Config(String),
    #[error("transform: {0}")]
    Archive(#[from] blockfleet_snapshot_format::manifest_key::OpenArchiveError),
    #[error("transform: {0}")]
    Io(#[from] std::io::Error),
    #[error("transform: {0}")]
    TokenKey(#[from] blockfleet_core::token::TokenError),
}

/// Refuses a request the control plane did not sign for (docs/architecture.md, "Threat model").
fn check_token(
    key: &TokenKey,
    parts: &Parts,
    purpose: &str,
    subject: &str,
) -> Result<(), ApiError> {
    let token = parts
        .headers
        .get(httpjson::TOKEN_HEADER)
        .and_then(|v| v.to_str().ok());
    key.check(token, purpose, subject, SystemTime::now())
        .map_err(|e| {
            tracing::info!(purpose, error = %e, "request refused");
            ApiError::new(403, "AccessDenied", format!("{purpose}: {e}"))
        })
}

/// Over TLS, a host agent's certificate must name the host a fetch is for: a capability
/// taken from another host is no use to it.
fn check_host_certificate(parts: &Parts, host: &str) -> Result<(), ApiError> {
    match parts.extensions.get::<blockfleet_core::tls::Peer>() {
        Some(p) if p.role == Role::HostAgent && !p.is(host) => {
            tracing::info!(host, "fetch for another host refused");
            Err(ApiError::new(
                403,
                "AccessDenied",
                format!("this host agent's certificate is not host {host}'s"),
            ))
        }
        _ => Ok(()),
    }
}

/// Spaces background chunk reads to a byte rate.
#[derive(Debug)]
struct Pacer {
    per_chunk: Option<Duration>,
    next: tokio::sync::Mutex<Instant>,
}

impl Pacer {
    fn new(mib_per_sec: u64) -> Self {
        Pacer {
            per_chunk: (mib_per_sec > 0)
                .then(|| Duration::from_secs_f64(CHUNK as f64 / (mib_per_sec as f64 * 1048576.0))),
            next: tokio::sync::Mutex::new(Instant::now()),
        }
    }

    async fn wait(&self) {
        let Some(step) = self.per_chunk else { return };
        let at = {
            let mut next = self.next.lock().await;
            let at = (*next).max(Instant::now());
            *next = at + step;
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

/// One transform worker.
#[derive(Debug)]
pub struct Worker {
    name: String,
    endpoint: String,
    control_plane: ControlPlaneClient,
    archive: Archive,
    kms: Kms,
    pool: BlockPool,
    pub metrics: Arc<Metrics>,
    /// Loaded jobs by target volume (background jobs and on-demand fetches share them).
    contexts: Mutex<HashMap<VolumeId, Arc<JobContext>>>,
    /// Data keys for block transforms (EBS direct APIs), zeroized when evicted.
    keys: blockfleet_keys::kms::cache::KeyCache,
    pacer: Pacer,
    concurrency: usize,
    poll: Duration,
}

impl Worker {
    fn contexts(&self) -> std::sync::MutexGuard<'_, HashMap<VolumeId, Arc<JobContext>>> {
        self.contexts.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn load(&self, job: &Job) -> Result<Arc<JobContext>, JobError> {
        JobContext::load(
            job,
            &self.archive,
            &self.kms,
            &self.pool,
            Arc::clone(&self.metrics),
        )
        .await
        .map(Arc::new)
    }

    async fn report(&self, job: &str, outcome: JobOutcome, error: Option<String>) -> bool {
        let r = self
            .control_plane
            .report_job(&JobReport {
                job_id: job.to_owned(),
                worker: self.name.clone(),
                outcome,
                error,
            })
            .await;
        match r {
            Ok(r) => r.keep_going,
            Err(e) => {
                // Keep working through a control-plane blip; the lease decides.
                tracing::warn!(job, error = %e, "cannot report to the control plane");
                true
            }
        }
    }

    /// Hydrates every chunk every target still misses, then flushes the targets.
    async fn hydrate_all(&self, ctx: &Arc<JobContext>) -> Result<(), JobError> {
        loop {
            let todo = ctx.remaining().await?;
            if todo.is_empty() {
                break;
            }
            tracing::info!(job = %ctx.job_id, chunks = todo.len(), targets = ctx.targets.len(), "hydrating");
            futures::stream::iter(todo)
                .map(|(c, which)| async move {
                    self.pacer.wait().await;
                    ctx.hydrate(c, &which).await
                })
                .buffer_unordered(self.concurrency)
                .try_collect::<()>()
                .await?;
        }
        ctx.flush().await
    }

    async fn run_job(&self, job: Job) {
        let id = job.job_id.clone();
        tracing::info!(job = %id, attempt = job.attempt, targets = job.targets.len(), "job claimed");
        let ctx = match self.load(&job).await {
            Ok(c) => c,
            Err(e) => return self.finish(&id, Err(e)).await,
        };
        {
            let mut map = self.contexts();
            for t in &ctx.targets {
                map.insert(t.volume.clone(), Arc::clone(&ctx));
            }
        }
        let heartbeat = async {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if !self.report(&id, JobOutcome::Running, None).await {
                    return;
                }
            }
        };
        let result = tokio::select! {
            r = self.hydrate_all(&ctx) => Some(r),
            () = heartbeat => None,
        };
        {
            let mut map = self.contexts();
            for t in &ctx.targets {
                map.remove(&t.volume);
            }
        }
        match result {
            Some(r) => self.finish(&id, r).await,
            None => {
                tracing::warn!(job = %id, "job taken away (lease lost or volumes deleted): stopped")
            }
        }
    }

    async fn finish(&self, id: &str, result: Result<(), JobError>) {
        let (outcome, error) = match result {
            Ok(()) => {
                self.metrics.jobs_done.fetch_add(1, Ordering::Relaxed);
                tracing::info!(job = %id, "job done");
                (JobOutcome::Done, None)
            }
            Err(JobError::Retry(m)) => {
                self.metrics.jobs_retried.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(job = %id, error = %m, "job attempt failed; giving it back");
                (JobOutcome::Retry, Some(m))
            }
            Err(JobError::Fatal(m)) => {
                self.metrics.jobs_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(job = %id, error = %m, "job failed");
                (JobOutcome::Failed, Some(m))
            }
        };
        self.report(id, outcome, error).await;
    }

    async fn claim_loop(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let req = ClaimJobRequest {
            worker: self.name.clone(),
            endpoint: self.endpoint.clone(),
        };
        while !*stop.borrow() {
            let idle = match self.control_plane.claim_job(&req).await {
                Ok(Some(job)) => {
                    tokio::select! {
                        () = self.run_job(job) => {}
                        _ = stop.changed() => break,
                    }
                    false
                }
                Ok(None) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim jobs");
                    true
                }
            };
            if idle {
                tokio::select! {
                    () = tokio::time::sleep(self.poll) => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }

    /// The job context that fills `volume`, loaded through the control plane if needed.
    async fn context_for(&self, volume: &VolumeId) -> Result<Option<Arc<JobContext>>, ApiError> {
        if let Some(c) = self.contexts().get(volume) {
            return Ok(Some(Arc::clone(c)));
        }
        let job = match self.control_plane.job_for_volume(volume).await {
            Ok(j) => j,
            Err(e) if e.code() == Some("NotHydrating") => return Ok(None),
            Err(blockfleet_core::httpjson::HttpError::Api(a)) => return Err(a),
            Err(e) => {
                return Err(ApiError::unavailable(
                    "ControlPlaneUnavailable",
                    e.to_string(),
                ))
            }
        };
        let ctx = self.load(&job).await.map_err(fetch_error)?;
        self.contexts().insert(volume.clone(), Arc::clone(&ctx));
        Ok(Some(ctx))
    }

    async fn fetch(&self, req: FetchRequest) -> Reply {
        if req.chunks.len() > 4096 {
            return Err(ApiError::bad_request(
                "InvalidParameterValue",
                "at most 4096 chunks per fetch",
            ));
        }
        let Some(ctx) = self.context_for(&req.volume_id).await? else {
            return Ok(serde_json::json!(FetchReply { hydrated: vec![] }));
        };
        let t = ctx.target_index(&req.volume_id).ok_or_else(|| {
            ApiError::not_found(
                "InvalidVolume.NotFound",
                format!("{} is not a target of this job", req.volume_id),
            )
        })?;
        if let Some(bad) = req.chunks.iter().find(|&&c| c >= ctx.chunks_of(t)) {
            return Err(ApiError::bad_request(
                "InvalidParameterValue",
                format!("chunk {bad} is past the end of {}", req.volume_id),
            ));
        }
        let which = [t];
        futures::future::try_join_all(req.chunks.iter().map(|&c| ctx.hydrate(c, &which)))
            .await
            .map_err(fetch_error)?;
        Ok(serde_json::json!(FetchReply {
            hydrated: req.chunks
        }))
    }
}

impl Worker {
    /// Encrypts or decrypts one 512 KiB block under a wrapped data key (EBS direct APIs).
    async fn transform_block(&self, body: Bytes) -> Reply {
        use base64::Engine;
        let req: BlockTransformRequest = httpjson::parse(&body)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let bad = |m: String| ApiError::bad_request("InvalidParameterValue", m);
        let wrapped =
            hex::decode(&req.wrapped_key).map_err(|e| bad(format!("wrapped_key: {e}")))?;
        let mut data = b64
            .decode(&req.data)
            .map_err(|e| bad(format!("data: {e}")))?;
        if data.len() as u64 != CHUNK {
            return Err(bad(format!("a block is {CHUNK} bytes, got {}", data.len())));
        }
        let xts = self
            .keys
            .get(&wrapped, &req.context_volume, || {
                self.kms.decrypt_key(&wrapped, &req.context_volume)
            })
            .await
            .map_err(|e| match e {
                blockfleet_keys::kms::KmsError::Unreachable(_) => {
                    ApiError::unavailable("KmsUnavailable", e.to_string())
                }
                _ => ApiError::new(403, "KeyUnavailable", e.to_string()),
            })?;
        let first_unit = req.block * blockfleet_core::units::SECTORS_PER_CHUNK;
        let r = tokio::task::spawn_blocking(move || {
            let r = if req.encrypt {
                xts.encrypt(&mut data, first_unit)
            } else {
                xts.decrypt_stored(&mut data, first_unit)
            };
            r.map(|()| data)
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(serde_json::json!(BlockTransformReply {
            data: b64.encode(&r)
        }))
    }
}

fn fetch_error(e: JobError) -> ApiError {
    match e {
        JobError::Fatal(m) => ApiError::conflict("HydrationFailed", m),
        JobError::Retry(m) => ApiError::unavailable("SourceUnavailable", m),
    }
}

/// Runs a transform worker: claims jobs from `[transform].control_plane` and serves on-demand
/// fetches on `listener`, until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), TransformError> {
    let tc = config.transform.clone();
    tc.validate()
        .map_err(|e| TransformError::Config(e.to_string()))?;
    let kms_config = tc.kms.clone().unwrap_or_else(|| config.kms.clone());
    let archive = blockfleet_snapshot_format::manifest_key::open_archive(
        &config.store,
        &config.snapshot,
        &kms_config,
    )
    .await?;
    let token_key = TokenKey::load_or_create(&config.fleet.token_key_file)?;
    // With [tls], HTTPS only, for the control plane (block transforms) and host agents
    // (fetches): plaintext and fetch capabilities never cross the network in the clear.
    let tls = match &config.tls {
        Some(t) => Some(httpjson::ServerTls {
            config: blockfleet_core::tls::server_config(&t.dir, Role::Transform)
                .map_err(|e| TransformError::Config(e.to_string()))?,
            allow: vec![Role::ControlPlane, Role::HostAgent],
            anonymous: false,
        }),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = format!("{scheme}://{}", listener.local_addr()?);
    let worker = Arc::new(Worker {
        name: format!("transform@{}", listener.local_addr()?),
        endpoint,
        control_plane: ControlPlaneClient::new(&tc.control_plane, tc.credentials.as_ref()),
        archive,
        kms: Kms::connect(&kms_config).await,
        pool: BlockPool::new(),
        metrics: Arc::new(Metrics::default()),
        contexts: Mutex::new(HashMap::new()),
        keys: blockfleet_keys::kms::cache::KeyCache::new(Default::default()),
        pacer: Pacer::new(tc.background_mib_per_sec),
        concurrency: tc.concurrency,
        poll: Duration::from_millis(tc.poll_ms),
    });
    if let Some(addr) = &tc.metrics_listen {
        let l = TcpListener::bind(addr).await?;
        let m = Arc::clone(&worker.metrics);
        tokio::spawn(blockfleet_core::metrics::serve(
            l,
            Arc::new(move || m.render()),
        ));
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let claimer = {
        let w = Arc::clone(&worker);
        tokio::spawn(async move { w.claim_loop(stop_rx).await })
    };
    let w = Arc::clone(&worker);
    let token_key = Arc::new(token_key);
    httpjson::serve_tls(listener, tls, shutdown, move |parts: Parts, body| {
        let w = Arc::clone(&w);
        let key = Arc::clone(&token_key);
        async move {
            match (parts.method.as_str(), parts.uri.path()) {
                ("POST", "/v1/transform-block") => {
                    // Only the control plane, for exactly this request.
                    check_token(
                        &key,
                        &parts,
                        token::TRANSFORM_BLOCK,
                        &token::body_digest(&body),
                    )?;
                    w.transform_block(body).await
                }
                ("POST", "/v1/fetch") => {
                    // Only the host agent of the attached instance holds this volume's token,
                    // and over TLS only that host's certificate may present it.
                    let req: FetchRequest = httpjson::parse(&body)?;
                    let subject = blockfleet_api::fetch_subject(&req.volume_id, &req.host);
                    check_token(&key, &parts, token::FETCH, &subject)?;
                    check_host_certificate(&parts, &req.host)?;
                    let start = Instant::now();
                    let r = w.fetch(req).await;
                    w.metrics.fetch.record(0, r.is_ok(), start.elapsed());
                    r
                }
                (_, path) => Err(ApiError::not_found(
                    "InvalidAction",
                    format!("no action at {path}"),
                )),
            }
        }
    })
    .await;
    let _ = stop_tx.send(true);
    let _ = claimer.await;
    Ok(())
}
