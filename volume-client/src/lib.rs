//! `blockfleet-volume-client`: a volume's replicas on several block servers, used as one volume
//! (docs/architecture.md, "Replication"). The host agent, the transform fleet and the control
//! plane all reach volumes through it.
//!
//! - **Writes and flushes** go to every replica taking writes (in sync or repairing) at once
//!   and return when each has answered or timed out; they succeed when a majority of the
//!   placement holds them: replicas in sync, and repairing ones for a write whose chunks they
//!   already hold at the current version (for a flush: once they hold every chunk). A write
//!   that lacks a majority without a repairing replica first has its chunks repaired on it.
//!   A replica that errors or times out is marked out and gets nothing more until it rejoins. Callers order overlapping writes (the host agent locks the
//!   units it writes), and a write returns only when every replica took it, so replicas apply
//!   writes to one unit in the same order.
//! - **Versions**: every write bumps a chunk's generation by one on each replica, hydration
//!   sets `hydrated`; [`ChunkInfo::version`] orders them. A replica that missed a write has a
//!   lower version for that chunk, since an out replica takes no writes until it rejoins.
//! - **Rejoin** (the writer, [`ReplicatedVolume::spawn_repair`]): writes held for a moment,
//!   the returning replica's versions compared with the in-sync ones', the chunks that differ
//!   reset on it (durably: no later write can make them look current), writes let through to
//!   it again, then each differing chunk repaired from an in-sync replica under that chunk's
//!   lock: adopted where its data already match (same SHA-256: a server killed before its
//!   chunk states reached disk), else copied. Then it is in sync and serves reads.
//! - **Reads** go to one in-sync replica (round robin), the next on failure.
//! - **Marks**: Pause and MarkResume need a majority; a chunk at a mark is read from a
//!   replica with the highest version at that mark among a majority's (which includes one
//!   that had every acknowledged write), so a stale replica's cut is never used.
//!
//! Modules: [`io`] (the data path), [`marks`] (snapshot cuts), [`repair`] (rejoin).

use std::collections::BTreeSet;
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;

use blockfleet_core::ids::VolumeId;
use blockfleet_core::units::CHUNK;

use blockfleet_proto::wire::{ErrorCode, Request, Response, MAX_CHUNK_LIST};
use blockfleet_proto::{BlockClient, ClientError, Grant};

mod io;
mod marks;
mod repair;

/// A replica's health as this client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Holds every acknowledged write: takes writes, serves reads.
    InSync,
    /// Rejoining: takes writes, not reads, while missed chunks are copied to it.
    Repairing,
    /// Failed or unreachable: takes nothing.
    Out,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::InSync => "in_sync",
            Health::Repairing => "repairing",
            Health::Out => "out",
        }
    }
}

#[derive(Debug)]
struct Member {
    addr: String,
    client: Option<Arc<BlockClient>>,
    health: Health,
    reason: Option<String>,
    repair_total: u64,
    /// Repairing: chunks it does not hold at the current version yet (reset on it).
    pending: BTreeSet<u64>,
    /// No longer placed (moved away): kept so member indices stay put, never used again.
    retired: bool,
    /// Rejoins tried and failed since it was last in sync, and when that was last logged.
    failed_rejoins: u64,
    logged_at: Option<std::time::Instant>,
    /// Why it was last marked out.
    cause: Option<String>,
}

/// How often a replica whose rejoin keeps failing is logged again.
const REJOIN_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// One replica as reported: address, health, why it is out, repair progress (chunks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub addr: String,
    pub health: Health,
    pub reason: Option<String>,
    pub repair_done: u64,
    pub repair_total: u64,
}

/// Counters for the replicated path.
#[derive(Debug, Default)]
pub struct ReplicaMetrics {
    /// Replicas marked out.
    pub failures: AtomicU64,
    /// Bytes copied to rejoining replicas.
    pub repair_bytes: AtomicU64,
    /// Chunks copied to rejoining replicas.
    pub repair_chunks: AtomicU64,
    /// Chunks a rejoining replica turned out to hold already (same data), so not copied.
    pub repair_adopted: AtomicU64,
    /// Rejoins completed.
    pub repairs: AtomicU64,
}

const STRIPES: usize = 256;

/// Chunk versions at one mark, per member (`None`: that member does not hold the mark).
type MarkVersions = Arc<Vec<Option<Vec<u64>>>>;

/// The replicas of one volume.
#[derive(Debug)]
pub struct ReplicatedVolume {
    volume: VolumeId,
    members: Mutex<Vec<Member>>,
    /// Majority of the placement (a replica joining during a move is not counted).
    quorum: AtomicUsize,
    timeout: Duration,
    chunks: u64,
    /// Writes hold it shared; a rejoin's compare-and-reset holds it exclusively.
    gate: tokio::sync::RwLock<()>,
    /// Per chunk stripe: writes shared, the repair of a chunk exclusive.
    stripes: Vec<tokio::sync::RwLock<()>>,
    next_read: AtomicUsize,
    /// Set for the volume's writer (`spawn_repair`): only it may repair replicas.
    writer: std::sync::atomic::AtomicBool,
    /// One repair pass at a time (the loop's, or a write's that lacks a majority).
    repairing: tokio::sync::Mutex<()>,
    /// Versions at a mark per member (`None`: the member lacks the mark), for reads at marks.
    mark_versions: Mutex<Option<(u64, MarkVersions)>>,
    pub metrics: ReplicaMetrics,
    /// Presented on connections opened here (see `set_grant`).
    grant: Mutex<Option<Grant>>,
    /// Pause between repaired chunks, in microseconds (0: none): a throttle on repair.
    repair_pace_us: AtomicU64,
    /// Check digests before copying a chunk (off: copy every chunk whose version differs).
    adopt: AtomicBool,
}

/// Whether an error means the replica, not the request, is at fault.
fn replica_fault(e: &ClientError) -> bool {
    matches!(
        e.code(),
        None | Some(
            ErrorCode::Io | ErrorCode::ShuttingDown | ErrorCode::NoSuchVolume | ErrorCode::NoSpace
        )
    )
}

fn lost(addr: &str, reason: &str) -> ClientError {
    ClientError::ConnectionLost {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Connects to a replica and presents `grant` (the volume's capability), within `timeout`.
async fn connect(
    addr: &str,
    timeout: Duration,
    grant: Option<&Grant>,
) -> Result<Arc<BlockClient>, ClientError> {
    let work = async {
        let c = BlockClient::connect(addr).await?;
        if let Some(g) = grant {
            c.authorize(g).await?;
        }
        Ok(Arc::new(c))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(lost(addr, "connect timed out")),
    }
}

/// Reads every chunk version of `volume` at `mark` from one replica.
async fn all_versions(
    c: &BlockClient,
    volume: &VolumeId,
    mark: u64,
    chunks: u64,
) -> Result<Vec<u64>, ClientError> {
    let mut out = Vec::with_capacity(chunks as usize);
    while (out.len() as u64) < chunks {
        let page = c
            .chunk_versions(volume, mark, out.len() as u64, MAX_CHUNK_LIST)
            .await?;
        if page.is_empty() {
            break;
        }
        out.extend(page);
    }
    Ok(out)
}

impl ReplicatedVolume {
    fn new(volume: VolumeId, members: Vec<Member>, timeout: Duration, chunks: u64) -> Self {
        let quorum = AtomicUsize::new(members.len() / 2 + 1);
        ReplicatedVolume {
            volume,
            members: Mutex::new(members),
            quorum,
            timeout,
            chunks,
            gate: tokio::sync::RwLock::new(()),
            stripes: (0..STRIPES).map(|_| tokio::sync::RwLock::new(())).collect(),
            next_read: AtomicUsize::new(0),
            writer: std::sync::atomic::AtomicBool::new(false),
            repairing: tokio::sync::Mutex::new(()),
            mark_versions: Mutex::new(None),
            metrics: ReplicaMetrics::default(),
            grant: Mutex::new(None),
            repair_pace_us: AtomicU64::new(0),
            adopt: AtomicBool::new(true),
        }
    }

    /// Pauses `pace` between the chunks a rejoin repairs, so repair leaves the disks and the
    /// network to the instance (0: as fast as it goes).
    pub fn set_repair_pace(&self, pace: Duration) {
        self.repair_pace_us
            .store(pace.as_micros() as u64, Ordering::Relaxed);
    }

    /// Whether repair checks a chunk's digest before copying it (on by default; off copies
    /// every chunk whose version differs, as before digests: for comparison in benchmarks).
    pub fn set_adopt_by_digest(&self, on: bool) {
        self.adopt.store(on, Ordering::Relaxed);
    }

    /// The capability presented on connections this replica set opens itself (rejoins); the
    /// host agent renews it from AttachInfo.
    pub fn set_grant(&self, grant: Option<Grant>) {
        *self.grant.lock().unwrap_or_else(|p| p.into_inner()) = grant;
    }

    fn grant(&self) -> Option<Grant> {
        self.grant.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A replica set of a volume of `size` bytes over connections the caller holds (`Err`:
    /// that replica is out), each taken to be in sync: for callers that read marks or
    /// hydrate, not for the volume's writer (see [`ReplicatedVolume::open`]).
    pub fn from_clients(
        volume: VolumeId,
        clients: Vec<(String, Result<Arc<BlockClient>, ClientError>)>,
        size: u64,
        timeout: Duration,
    ) -> Self {
        let members = clients
            .into_iter()
            .map(|(addr, c)| {
                let (client, health, reason) = match c {
                    Ok(c) => (Some(c), Health::InSync, None),
                    Err(e) => (None, Health::Out, Some(e.to_string())),
                };
                Member {
                    addr,
                    client,
                    health,
                    reason,
                    repair_total: 0,
                    pending: BTreeSet::new(),
                    retired: false,
                    failed_rejoins: 0,
                    logged_at: None,
                    cause: None,
                }
            })
            .collect();
        ReplicatedVolume::new(volume, members, timeout, size.div_ceil(CHUNK))
    }

    /// Opens the volume as its writer: connects to every replica, and before anything is
    /// served makes one reachable replica hold the newest version of every chunk found on
    /// any (copying the chunks it lacks), so the writer starts from everything any replica
    /// acknowledged. Replicas behind it start out and rejoin through `spawn_repair`. Needs a
    /// majority reachable.
    pub async fn open(
        volume: VolumeId,
        addrs: &[String],
        timeout: Duration,
        grant: Option<Grant>,
    ) -> Result<Self, ClientError> {
        let conns = join_all(addrs.iter().map(|a| connect(a, timeout, grant.as_ref()))).await;
        let mut size = None;
        for c in conns.iter().flatten() {
            match tokio::time::timeout(timeout, c.stat_volume(&volume)).await {
                Ok(Ok(s)) => {
                    size = Some(s.size);
                    break;
                }
                Ok(Err(e)) if !replica_fault(&e) => return Err(e),
                _ => {}
            }
        }
        let clients: Vec<_> = addrs.iter().cloned().zip(conns).collect();
        let rv = Self::from_clients(volume, clients, size.unwrap_or(0), timeout);
        rv.set_grant(grant);
        if size.is_none() {
            return Err(rv.quorum_error(0, "no replica answered"));
        }
        let live: Vec<(usize, Arc<BlockClient>)> = rv
            .lock()
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.client.clone().map(|c| (i, c)))
            .collect();
        let got = join_all(
            live.iter()
                .map(|(_, c)| all_versions(c, &rv.volume, 0, rv.chunks)),
        )
        .await;
        let mut versions: Vec<(usize, Arc<BlockClient>, Vec<u64>)> = Vec::new();
        for ((i, c), v) in live.into_iter().zip(got) {
            match v {
                Ok(v) if v.len() as u64 == rv.chunks => versions.push((i, c, v)),
                Ok(_) => rv.mark_out(i, "reported versions for a different size"),
                Err(e) if replica_fault(&e) => rv.mark_out(i, &e.to_string()),
                Err(e) => return Err(e),
            }
        }
        if versions.len() < rv.quorum() {
            return Err(rv.quorum_error(versions.len(), "too few replicas reachable to open"));
        }
        let best: Vec<u64> = (0..rv.chunks as usize)
            .map(|c| versions.iter().map(|(_, _, v)| v[c]).max().unwrap_or(0))
            .collect();
        // The base: the replica already holding the most newest chunks.
        let (bi, base) = versions
            .iter()
            .enumerate()
            .max_by_key(|(_, (_, _, v))| v.iter().zip(&best).filter(|(a, b)| a == b).count())
            .map(|(k, (i, c, _))| (k, (*i, Arc::clone(c))))
            .ok_or_else(|| rv.quorum_error(0, "no replica reachable"))?;
        for c in 0..rv.chunks as usize {
            if versions[bi].2[c] == best[c] {
                continue;
            }
            let holder = versions.iter().find(|(_, _, v)| v[c] == best[c]);
            let (hi, hc, _) = holder.ok_or_else(|| rv.quorum_error(0, "lost a version"))?;
            let (info, data) = hc
                .read_mark(&rv.volume, 0, c as u64)
                .await
                .inspect_err(|e| {
                    rv.mark_out(*hi, &e.to_string());
                })?;
            let data = if info.has_data() { data } else { Bytes::new() };
            base.1
                .put_chunk(&rv.volume, c as u64, u64::MAX, info, data)
                .await?;
            rv.metrics.repair_bytes.fetch_add(CHUNK, Ordering::Relaxed);
        }
        base.1.flush(&rv.volume).await?;
        for (i, _, v) in &versions {
            if *i != base.0 && *v != best {
                rv.mark_out(*i, "behind the other replicas: rejoining");
            }
        }
        Ok(rv)
    }

    fn quorum(&self) -> usize {
        self.quorum.load(Ordering::Relaxed)
    }

    /// Follows a placement change (a move off a draining server): `placement` are the
    /// replicas that count for the majority, `joining` one being filled to replace another.
    /// New replicas start out and are filled by the repair loop; replicas no longer placed
    /// are dropped.
    pub fn set_members(&self, placement: &[String], joining: Option<&str>) {
        let mut m = self.lock();
        let wanted: Vec<&str> = placement
            .iter()
            .map(String::as_str)
            .chain(joining)
            .collect();
        for x in m.iter_mut() {
            if !x.retired && !wanted.contains(&x.addr.as_str()) {
                tracing::info!(volume = %self.volume, replica = %x.addr, "replica retired");
                x.retired = true;
                x.health = Health::Out;
                x.client = None;
                x.pending.clear();
            }
        }
        for a in wanted {
            if !m.iter().any(|x| x.addr == a && !x.retired) {
                tracing::info!(volume = %self.volume, replica = a, "replica added");
                m.push(Member {
                    addr: a.to_owned(),
                    client: None,
                    health: Health::Out,
                    reason: Some("new: not filled yet".into()),
                    repair_total: 0,
                    pending: BTreeSet::new(),
                    retired: false,
                    failed_rejoins: 0,
                    logged_at: None,
                    cause: None,
                });
            }
        }
        self.quorum
            .store(placement.len() / 2 + 1, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Member>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn volume(&self) -> &VolumeId {
        &self.volume
    }

    pub fn size(&self) -> u64 {
        self.chunks * CHUNK
    }

    /// Every replica's state.
    pub fn status(&self) -> Vec<ReplicaStatus> {
        self.lock()
            .iter()
            .filter(|m| !m.retired)
            .map(|m| ReplicaStatus {
                addr: m.addr.clone(),
                health: m.health,
                reason: m.reason.clone(),
                repair_done: m.repair_total.saturating_sub(m.pending.len() as u64),
                repair_total: m.repair_total,
            })
            .collect()
    }

    fn quorum_error(&self, have: usize, detail: &str) -> ClientError {
        let reasons: Vec<String> = self
            .lock()
            .iter()
            .filter_map(|m| m.reason.as_ref().map(|r| format!("{}: {r}", m.addr)))
            .collect();
        ClientError::Quorum {
            volume: self.volume.to_string(),
            have,
            need: self.quorum(),
            detail: if reasons.is_empty() {
                detail.to_owned()
            } else {
                format!("{detail} ({})", reasons.join("; "))
            },
        }
    }

    /// A failed attempt to bring replica `i` back: its reason is kept (shown in reports), and
    /// logged at the first failure and then at most once a minute with the count, so a
    /// replica that stays out is visible without a log line every pass.
    pub(crate) fn rejoin_failed(&self, i: usize, reason: &str) {
        let mut m = self.lock();
        let Some(m) = m.get_mut(i) else { return };
        m.health = Health::Out;
        m.client = None;
        // The cause (why it went out) stays first: what each retry meets after it (e.g. a
        // refused connection from a server that stopped) says less.
        let cause = m.cause.clone();
        m.reason = Some(match cause {
            Some(c) if c != reason => format!("{c}; rejoin: {reason}"),
            _ => reason.to_owned(),
        });
        m.failed_rejoins += 1;
        let due = m.logged_at.is_none_or(|t| t.elapsed() >= REJOIN_LOG_EVERY);
        if due {
            m.logged_at = Some(std::time::Instant::now());
            tracing::warn!(volume = %self.volume, replica = %m.addr, reason, attempts = m.failed_rejoins, "replica still out: rejoin failing");
        }
    }

    fn mark_out(&self, i: usize, reason: &str) {
        let mut m = self.lock();
        let Some(m) = m.get_mut(i) else { return };
        if m.health != Health::Out {
            tracing::warn!(volume = %self.volume, replica = %m.addr, reason, "replica marked out");
            self.metrics.failures.fetch_add(1, Ordering::Relaxed);
        }
        m.health = Health::Out;
        m.client = None;
        m.reason = Some(reason.to_owned());
        m.cause = Some(reason.to_owned());
        m.pending.clear();
    }

    /// Whether member `m`'s acknowledgement of a change to `chunks` (`None`: a flush, every
    /// chunk) shows the change is on it with everything acknowledged before: in sync, or
    /// repairing and holding those chunks at the current version already.
    fn holds(m: &Member, chunks: Option<&Range<u64>>) -> bool {
        match m.health {
            Health::InSync => true,
            Health::Repairing => match chunks {
                Some(r) => r.clone().all(|c| !m.pending.contains(&c)),
                None => m.pending.is_empty(),
            },
            Health::Out => false,
        }
    }

    /// Members whose acknowledgement of a change to `chunks` counts towards the majority.
    fn holders(&self, chunks: Option<&Range<u64>>) -> usize {
        self.lock()
            .iter()
            .filter(|m| m.client.is_some() && Self::holds(m, chunks))
            .count()
    }

    /// Runs a call on a replica within the replica timeout.
    async fn within<T>(
        &self,
        addr: &str,
        call: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(lost(
                addr,
                &format!("no answer within {} ms", self.timeout.as_millis()),
            )),
        }
    }

    /// Members with one of `healths`, with their connections.
    fn members_in(&self, healths: &[Health]) -> Vec<(usize, Health, Arc<BlockClient>)> {
        self.lock()
            .iter()
            .enumerate()
            .filter(|(_, m)| healths.contains(&m.health))
            .filter_map(|(i, m)| m.client.clone().map(|c| (i, m.health, c)))
            .collect()
    }

    /// Sends `req` to `targets` at once; marks out those at fault (error or timeout).
    async fn send(
        &self,
        targets: &[(usize, Health, Arc<BlockClient>)],
        req: &Request,
    ) -> Vec<(usize, Health, Result<Response, ClientError>)> {
        let calls = targets.iter().map(|(i, h, c)| {
            let req = req.clone();
            async move { (*i, *h, self.within(c.addr(), c.call(req)).await) }
        });
        let out = join_all(calls).await;
        for (i, _, r) in &out {
            if let Err(e) = r {
                if replica_fault(e) {
                    self.mark_out(*i, &e.to_string());
                }
            }
        }
        out
    }

    /// A change to `chunks` (`None`: a flush) every replica taking writes gets; succeeds when
    /// a majority holds it ([`Self::holds`], judged when it is sent: the caller holds the
    /// chunks' locks, so no repair of them runs meanwhile).
    async fn replicate(
        &self,
        req: Request,
        chunks: Option<Range<u64>>,
    ) -> Result<Response, ClientError> {
        let (targets, counts): (Vec<_>, Vec<bool>) = {
            let m = self.lock();
            m.iter()
                .enumerate()
                .filter(|(_, x)| matches!(x.health, Health::InSync | Health::Repairing))
                .filter_map(|(i, x)| {
                    let c = x.client.clone()?;
                    Some(((i, x.health, c), Self::holds(x, chunks.as_ref())))
                })
                .unzip()
        };
        let results = self.send(&targets, &req).await;
        let mut first_ok = None;
        let mut refused = None;
        let mut in_sync_ok = 0;
        let (mut gone, mut gone_err) = (0, None);
        for ((i, _, r), counts) in results.into_iter().zip(counts) {
            match r {
                Err(e) if e.code() == Some(ErrorCode::NoSuchVolume) => {
                    gone += 1;
                    gone_err = Some(e);
                }
                Ok(resp) => {
                    in_sync_ok += usize::from(counts);
                    first_ok.get_or_insert(resp);
                }
                Err(e) if !replica_fault(&e) => refused = Some((i, e)),
                Err(_) => {}
            }
        }
        if first_ok.is_none() && gone == targets.len() && gone > 0 {
            if let Some(e) = gone_err {
                return Err(e); // deleted everywhere
            }
        }
        if let Some((i, e)) = refused {
            if first_ok.is_none() {
                return Err(e); // the request itself is wrong: every replica says so
            }
            self.mark_out(i, &format!("disagreed with the other replicas: {e}"));
        }
        match first_ok {
            Some(resp) if in_sync_ok >= self.quorum() => Ok(resp),
            _ => Err(self.quorum_error(in_sync_ok, "the change may be on fewer replicas")),
        }
    }

    /// A query one in-sync replica answers (the next on failure).
    async fn ask_one(&self, req: Request) -> Result<Response, ClientError> {
        let members = self.members_in(&[Health::InSync]);
        if members.is_empty() {
            return Err(self.quorum_error(0, "no replica in sync"));
        }
        let start = self.next_read.fetch_add(1, Ordering::Relaxed);
        for k in 0..members.len() {
            let t = &members[(start + k) % members.len()];
            let mut r = self.send(std::slice::from_ref(t), &req).await;
            match r.pop().map(|(_, _, r)| r) {
                Some(Ok(resp)) => return Ok(resp),
                Some(Err(e)) if !replica_fault(&e) => return Err(e),
                _ => {}
            }
        }
        Err(self.quorum_error(0, "no in-sync replica answered"))
    }

    async fn lock_chunks(
        &self,
        offset: u64,
        len: u64,
    ) -> Vec<tokio::sync::RwLockReadGuard<'_, ()>> {
        let first = offset / CHUNK;
        let end = (offset + len.max(1)).div_ceil(CHUNK);
        let set: BTreeSet<usize> = (first..end.min(first + STRIPES as u64))
            .map(|c| (c % STRIPES as u64) as usize)
            .collect();
        let mut g = Vec::with_capacity(set.len());
        for s in set {
            g.push(self.stripes[s].read().await);
        }
        g
    }

    /// For the writer: when fewer than a majority take writes (say two servers restarted
    /// since the last request), tries to bring replicas back now rather than fail the write.
    async fn ensure_quorum(&self) {
        if !self.writer.load(Ordering::Relaxed) {
            return;
        }
        let live = self
            .lock()
            .iter()
            .filter(|m| {
                m.health != Health::Out && m.client.as_ref().is_some_and(|c| !c.is_closed())
            })
            .count();
        if live < self.quorum() {
            self.repair_out().await;
        }
    }
}

fn unexpected(request: &'static str) -> ClientError {
    ClientError::UnexpectedReply {
        request,
        got: "another reply",
    }
}
