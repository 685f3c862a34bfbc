//! The agent's view of one volume: plaintext in, ciphertext to the block server. Every 4 KiB
//! unit is XTS-encrypted with tweak = unit number before it leaves and decrypted after it
//! arrives; an unencrypted volume passes through. Requests that do not cover whole units are
//! read-modify-write of the units they touch, serialised per unit (striped locks), so
//! concurrent writes never tear a unit. Never-written units (zero ciphertext, the block
//! server's holes) read as zeros.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use blockfleet_api::{ControlPlaneClient, FetchReply, FetchRequest};
use blockfleet_core::httpjson::HttpError;
use blockfleet_core::ids::VolumeId;
use blockfleet_core::metrics::{counter, OpMetrics};
use blockfleet_core::units::CHUNK;
use blockfleet_keys::xts::Xts;
use blockfleet_proto::{ClientError, ErrorCode};
use blockfleet_volume_client::{Health, ReplicatedVolume};
use bytes::Bytes;

use blockfleet_nbd::{EINVAL, EIO, ENOSPC};

const UNIT: u64 = 4096;
/// Block-protocol requests are split at this size.
const PIECE: u64 = 4 << 20;
const STRIPES: u64 = 256;

/// An NBD error number.
pub type Errno = u32;

fn errno(e: ClientError) -> Errno {
    tracing::warn!(error = %e, "block server request failed");
    match e.code() {
        Some(ErrorCode::OutOfRange | ErrorCode::Unaligned | ErrorCode::BadRequest) => EINVAL,
        _ => EIO,
    }
}

/// NBD operations, as metric labels.
pub const OPS: [&str; 7] = [
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "cache",
    "other",
];

/// The agent's metrics: per-operation counts, errors and latency, bytes, connections.
#[derive(Debug)]
pub struct AgentMetrics {
    /// The replica set, for its health and repair counters.
    replicas: Arc<ReplicatedVolume>,
    pub ops: OpMetrics<{ OPS.len() }>,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub connections: AtomicU64,
}

impl AgentMetrics {
    fn new(replicas: Arc<ReplicatedVolume>) -> Self {
        AgentMetrics {
            replicas,
            ops: OpMetrics::new(OPS),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.ops.render(&mut out, "blockfleet_agent");
        counter(
            &mut out,
            "blockfleet_agent_read_bytes_total",
            "Plaintext bytes returned to NBD clients.",
            &self.bytes_read,
        );
        counter(
            &mut out,
            "blockfleet_agent_written_bytes_total",
            "Plaintext bytes written by NBD clients.",
            &self.bytes_written,
        );
        counter(
            &mut out,
            "blockfleet_agent_connections_total",
            "NBD connections accepted.",
            &self.connections,
        );
        self.render_replicas(&mut out);
        out
    }

    fn render_replicas(&self, out: &mut String) {
        use std::fmt::Write;
        let r = &self.replicas;
        let _ = writeln!(
            out,
            "# HELP blockfleet_agent_replica_state Replica health: 2 in sync, 1 repairing, 0 out.\n# TYPE blockfleet_agent_replica_state gauge"
        );
        let status = r.status();
        for s in &status {
            let v = match s.health {
                Health::InSync => 2,
                Health::Repairing => 1,
                Health::Out => 0,
            };
            let _ = writeln!(
                out,
                "blockfleet_agent_replica_state{{replica=\"{}\"}} {v}",
                s.addr
            );
        }
        let _ = writeln!(
            out,
            "# HELP blockfleet_agent_replica_repair_remaining_chunks Chunks a rejoining replica still needs.\n# TYPE blockfleet_agent_replica_repair_remaining_chunks gauge"
        );
        for s in &status {
            let _ = writeln!(
                out,
                "blockfleet_agent_replica_repair_remaining_chunks{{replica=\"{}\"}} {}",
                s.addr,
                s.repair_total.saturating_sub(s.repair_done)
            );
        }
        counter(
            out,
            "blockfleet_agent_replica_failures_total",
            "Replicas marked out after an error or a timeout.",
            &r.metrics.failures,
        );
        counter(
            out,
            "blockfleet_agent_repair_bytes_total",
            "Bytes copied to rejoining replicas.",
            &r.metrics.repair_bytes,
        );
        counter(
            out,
            "blockfleet_agent_repair_adopted_chunks_total",
            "Chunks a rejoining replica already held (same digest), so not copied.",
            &r.metrics.repair_adopted,
        );
        counter(
            out,
            "blockfleet_agent_repairs_total",
            "Replicas brought back in sync.",
            &r.metrics.repairs,
        );
    }
}

/// Asks the transform fleet to hydrate chunks a read needs now (lazy hydration). The worker
/// list and the fetch capability (`AttachInfo.fetch_token`) come from the control plane and are
/// asked again when no worker answers (workers come and go) or the capability is refused
/// (it expires).
#[derive(Debug)]
pub struct Fetcher {
    /// Worker endpoints and the capability they take.
    workers: std::sync::Mutex<(Vec<String>, Option<String>)>,
    /// The host the volume is attached on (the capability's holder).
    host: String,
    /// One kept-alive client per worker endpoint.
    clients: blockfleet_core::httpjson::Clients,
    control_plane: Option<ControlPlaneClient>,
}

impl Fetcher {
    pub fn new(
        endpoints: Vec<String>,
        token: Option<String>,
        host: String,
        control_plane: Option<ControlPlaneClient>,
    ) -> Self {
        Fetcher {
            workers: std::sync::Mutex::new((endpoints, token)),
            host,
            clients: blockfleet_core::httpjson::Clients::new(
                blockfleet_core::tls::Role::Transform,
                std::time::Duration::from_secs(30),
            ),
            control_plane,
        }
    }

    fn workers(&self) -> (Vec<String>, Option<String>) {
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn try_endpoints(&self, req: &FetchRequest) -> Option<Result<(), Errno>> {
        let (endpoints, token) = self.workers();
        let token = token.unwrap_or_default();
        let with_token = |_: &[u8]| token.clone();
        for e in endpoints {
            let client = self.clients.get(&e);
            match client
                .post_with::<_, FetchReply>("/v1/fetch", req, Some(&with_token))
                .await
            {
                Ok(_) => return Some(Ok(())),
                Err(HttpError::Api(a)) if a.status == 403 => {
                    tracing::info!(volume = %req.volume_id, error = %a.message, "fetch capability refused; asking the control plane again");
                    return None;
                }
                Err(HttpError::Api(a)) if a.status != 503 => {
                    tracing::warn!(volume = %req.volume_id, code = %a.code, error = %a.message, "on-demand fetch refused");
                    return Some(Err(EIO));
                }
                Err(err) => {
                    tracing::warn!(volume = %req.volume_id, error = %err, "transform worker did not fetch; trying the next")
                }
            }
        }
        None
    }

    async fn fetch(&self, volume: &VolumeId, chunks: Vec<u64>) -> Result<(), Errno> {
        let req = FetchRequest {
            volume_id: volume.clone(),
            host: self.host.clone(),
            chunks,
        };
        if let Some(r) = self.try_endpoints(&req).await {
            return r;
        }
        let Some(cp) = &self.control_plane else {
            return Err(EIO);
        };
        for _ in 0..10 {
            match cp.attach_info(volume).await {
                Ok(info) => {
                    if info.fetch_endpoints.is_empty() {
                        // Hydration finished meanwhile (the read now succeeds), or no worker
                        // is alive (the read fails again, clearly).
                        return Ok(());
                    }
                    *self.workers.lock().unwrap_or_else(|p| p.into_inner()) =
                        (info.fetch_endpoints, info.fetch_token);
                    if let Some(r) = self.try_endpoints(&req).await {
                        return r;
                    }
                }
                Err(e) => {
                    tracing::warn!(volume = %volume, error = %e, "cannot ask the control plane for transform workers")
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        Err(EIO)
    }
}

#[derive(Debug)]
pub struct AgentVolume {
    pub metrics: AgentMetrics,
    client: Arc<ReplicatedVolume>,
    volume: VolumeId,
    size: u64,
    xts: Option<Arc<Xts>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    fetcher: Option<Fetcher>,
}

impl AgentVolume {
    /// Serves the volume whose replicas `client` holds.
    pub fn open(
        client: Arc<ReplicatedVolume>,
        xts: Option<Arc<Xts>>,
        fetcher: Option<Fetcher>,
    ) -> Self {
        AgentVolume {
            metrics: AgentMetrics::new(Arc::clone(&client)),
            volume: client.volume().clone(),
            size: client.size(),
            client,
            xts,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            fetcher,
        }
    }

    /// The replica set under this volume.
    pub fn replicas(&self) -> &Arc<ReplicatedVolume> {
        &self.client
    }

    /// Reads ciphertext; a range that touches chunks not hydrated yet has them fetched on
    /// demand first (then the block server holds the snapshot's data or the user's writes).
    async fn read_raw(&self, at: u64, n: u64) -> Result<Bytes, Errno> {
        for _ in 0..3 {
            match self.client.read(at, n as u32).await {
                Ok(d) => return Ok(d),
                Err(e) if e.code() == Some(ErrorCode::NotHydrated) => {
                    let Some(f) = &self.fetcher else {
                        tracing::warn!(volume = %self.volume, "read of an unhydrated chunk and no transform worker to fetch it");
                        return Err(EIO);
                    };
                    let mut missing = Vec::new();
                    for c in at / CHUNK..(at + n).div_ceil(CHUNK) {
                        let info = self.client.chunk_state(c).await.map_err(errno)?;
                        if !info.hydrated {
                            missing.push(c);
                        }
                    }
                    f.fetch(&self.volume, missing).await?;
                }
                Err(e) => return Err(errno(e)),
            }
        }
        Err(EIO)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn name(&self) -> &str {
        self.volume.as_str()
    }

    /// Checks a request range; `write` picks the error NBD wants past the end.
    pub fn check(&self, offset: u64, len: u64, write: bool) -> Result<(), Errno> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ if write => Err(ENOSPC),
            _ => Err(EINVAL),
        }
    }

    async fn lock_units(&self, first: u64, end: u64) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let stripes: BTreeSet<u64> = if end - first >= STRIPES {
            (0..STRIPES).collect()
        } else {
            (first..end).map(|u| u % STRIPES).collect()
        };
        let mut guards = Vec::with_capacity(stripes.len());
        for s in stripes {
            guards.push(self.stripes[s as usize].lock().await);
        }
        guards
    }

    /// Reads whole units `[first, end)` and decrypts them.
    async fn read_units(&self, first: u64, end: u64) -> Result<Vec<u8>, Errno> {
        let mut out = Vec::with_capacity(((end - first) * UNIT) as usize);
        let mut at = first * UNIT;
        while at < end * UNIT {
            let n = PIECE.min(end * UNIT - at);
            let data = self.read_raw(at, n).await?;
            out.extend_from_slice(&data);
            at += n;
        }
        if let Some(x) = &self.xts {
            x.decrypt_stored(&mut out, first).map_err(|_| EIO)?;
        }
        Ok(out)
    }

    /// Encrypts whole units starting at unit `first` and writes them.
    async fn write_units(&self, first: u64, mut plain: Vec<u8>, fua: bool) -> Result<(), Errno> {
        if let Some(x) = &self.xts {
            x.encrypt(&mut plain, first).map_err(|_| EIO)?;
        }
        let data = Bytes::from(plain);
        let mut at = 0u64;
        while at < data.len() as u64 {
            let n = PIECE.min(data.len() as u64 - at);
            let last = at + n == data.len() as u64;
            let piece = data.slice(at as usize..(at + n) as usize);
            self.client
                .write(first * UNIT + at, piece, fua && last)
                .await
                .map_err(errno)?;
            at += n;
        }
        Ok(())
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, Errno> {
        self.check(offset, u64::from(len), false)?;
        let (first, end) = (offset / UNIT, (offset + u64::from(len)).div_ceil(UNIT));
        let mut all = self.read_units(first, end).await?;
        let skip = (offset - first * UNIT) as usize;
        // In place: no copy at all for an aligned read.
        all.drain(..skip);
        all.truncate(len as usize);
        Ok(all)
    }

    /// Writes `data` at `offset` (`None`: zeroes of `len` bytes).
    pub async fn write(
        &self,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        fua: bool,
    ) -> Result<(), Errno> {
        self.check(offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        let (first, end) = (offset / UNIT, (offset + len).div_ceil(UNIT));
        let _locks = self.lock_units(first, end).await;
        let mut buf = vec![0u8; ((end - first) * UNIT) as usize];
        // Read back only the partly covered first and last units.
        let head = offset % UNIT != 0;
        let tail = (offset + len) % UNIT != 0;
        if head {
            let u = self.read_units(first, first + 1).await?;
            buf[..UNIT as usize].copy_from_slice(&u);
        }
        if tail && (end - 1 != first || !head) {
            let u = self.read_units(end - 1, end).await?;
            let at = ((end - 1 - first) * UNIT) as usize;
            buf[at..at + UNIT as usize].copy_from_slice(&u);
        }
        let at = (offset - first * UNIT) as usize;
        match data {
            Some(d) => buf[at..at + d.len()].copy_from_slice(d),
            None => buf[at..at + len as usize].fill(0),
        }
        self.write_units(first, buf, fua).await
    }

    pub async fn flush(&self) -> Result<(), Errno> {
        self.client.flush().await.map_err(errno)
    }
}
