//! `blockfleet-volume-client`: a volume's replicas on several block servers, used as one volume
//! (docs/architecture.md, "Replication"). The host agent, the transform fleet and the control
//! plane all reach volumes through it.
//!
//! - **Writes and flushes** go to every replica taking writes (in sync or repairing) at once
//!   and return when each has answered or timed out; they succeed when a majority of the
//!   placement *in sync* has them. A replica that errors or times out is marked out and gets
//!   nothing more until it rejoins. Callers order overlapping writes (the host agent locks the
//!   units it writes), and a write returns only when every replica took it, so replicas apply
//!   writes to one unit in the same order.
//! - **Versions**: every write bumps a chunk's generation by one on each replica, hydration
//!   sets `hydrated`; [`ChunkInfo::version`] orders them. A replica that missed a write has a
//!   lower version for that chunk, since an out replica takes no writes until it rejoins.
//! - **Rejoin** (the writer, [`ReplicatedVolume::spawn_repair`]): writes held for a moment,
//!   the returning replica's versions compared with the in-sync ones', the chunks that differ
//!   reset on it (durably: no later write can make them look current), writes let through to
//!   it again, then each differing chunk copied from an in-sync replica under that chunk's
//!   lock. Then it is in sync and serves reads.
//! - **Reads** go to one in-sync replica (round robin), the next on failure.
//! - **Marks**: Pause and MarkResume need a majority; a chunk at a mark is read from a
//!   replica with the highest version at that mark among a majority's (which includes one
//!   that had every acknowledged write), so a stale replica's cut is never used.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;

use blockfleet_core::ids::VolumeId;
use blockfleet_core::units::CHUNK;
use blockfleet_proto::wire::{ChunkInfo, ErrorCode, Request, Response, VolumeStat, MAX_CHUNK_LIST};
use blockfleet_proto::{BlockClient, ClientError};

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
    repair_done: u64,
    /// No longer placed (moved away): kept so member indices stay put, never used again.
    retired: bool,
}

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
}

/// Whether an error means the replica, not the request, is at fault.
fn replica_fault(e: &ClientError) -> bool {
    matches!(
        e.code(),
        None | Some(ErrorCode::Io | ErrorCode::ShuttingDown | ErrorCode::NoSuchVolume)
    )
}

fn lost(addr: &str, reason: &str) -> ClientError {
    ClientError::ConnectionLost {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    }
}

async fn connect(addr: &str, timeout: Duration) -> Result<Arc<BlockClient>, ClientError> {
    match tokio::time::timeout(timeout, BlockClient::connect(addr)).await {
        Ok(r) => r.map(Arc::new),
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
        }
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
                    repair_done: 0,
                    retired: false,
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
    ) -> Result<Self, ClientError> {
        let conns = join_all(addrs.iter().map(|a| connect(a, timeout))).await;
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
                    repair_done: 0,
                    retired: false,
                });
            }
        }
        self.quorum
            .store(placement.len() / 2 + 1, Ordering::Relaxed);
    }

    /// One pass of the repair loop: marks out replicas whose connection closed (a restarted
    /// server: found now, not by the next write), then tries to bring back every replica
    /// that is out.
    pub async fn repair_out(&self) {
        let _one = self.repairing.lock().await;
        let closed: Vec<usize> = self
            .lock()
            .iter()
            .enumerate()
            .filter(|(_, m)| m.client.as_ref().is_some_and(|c| c.is_closed()))
            .map(|(i, _)| i)
            .collect();
        for i in closed {
            self.mark_out(i, "connection closed");
        }
        let out: Vec<(usize, String)> = self
            .lock()
            .iter()
            .enumerate()
            .filter(|(_, m)| m.health == Health::Out && !m.retired)
            .map(|(i, m)| (i, m.addr.clone()))
            .collect();
        for (i, addr) in out {
            let Ok(c) = connect(&addr, self.timeout).await else {
                continue;
            };
            if let Err(e) = self.rejoin(i, c).await {
                self.mark_out(i, &format!("rejoin failed: {e}"));
            }
        }
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
                repair_done: m.repair_done,
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
            async move {
                let r = match tokio::time::timeout(self.timeout, c.call(req)).await {
                    Ok(r) => r,
                    Err(_) => Err(lost(
                        c.addr(),
                        &format!("no answer within {} ms", self.timeout.as_millis()),
                    )),
                };
                (*i, *h, r)
            }
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

    /// A change every replica taking writes gets; succeeds when a majority in sync has it.
    async fn replicate(&self, req: Request) -> Result<Response, ClientError> {
        let targets = self.members_in(&[Health::InSync, Health::Repairing]);
        let results = self.send(&targets, &req).await;
        let mut first_ok = None;
        let mut refused = None;
        let mut in_sync_ok = 0;
        let (mut gone, mut gone_err) = (0, None);
        for (i, h, r) in results {
            match r {
                Err(e) if e.code() == Some(ErrorCode::NoSuchVolume) => {
                    gone += 1;
                    gone_err = Some(e);
                }
                Ok(resp) => {
                    in_sync_ok += usize::from(h == Health::InSync);
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

    /// For the writer: when fewer than a majority are in sync (say two servers restarted
    /// since the last request), tries to bring replicas back now rather than fail the write.
    async fn ensure_quorum(&self) {
        if !self.writer.load(Ordering::Relaxed) {
            return;
        }
        let live = self
            .lock()
            .iter()
            .filter(|m| {
                m.health == Health::InSync && m.client.as_ref().is_some_and(|c| !c.is_closed())
            })
            .count();
        if live < self.quorum() {
            self.repair_out().await;
        }
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        self.ensure_quorum().await;
        let _gate = self.gate.read().await;
        let _chunks = self.lock_chunks(offset, data.len() as u64).await;
        self.replicate(Request::Write {
            volume: self.volume.clone(),
            offset,
            fua,
            data,
        })
        .await
        .map(drop)
    }

    pub async fn flush(&self) -> Result<(), ClientError> {
        self.ensure_quorum().await;
        self.replicate(Request::Flush {
            volume: self.volume.clone(),
        })
        .await
        .map(drop)
    }

    /// Hydrates a chunk on every replica taking writes (a majority in sync must take it).
    pub async fn write_if_unwritten(&self, chunk: u64, data: Bytes) -> Result<(), ClientError> {
        let _chunks = self.lock_chunks(chunk * CHUNK, CHUNK).await;
        self.replicate(Request::WriteIfUnwritten {
            volume: self.volume.clone(),
            chunk,
            data,
        })
        .await
        .map(drop)
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        match self
            .ask_one(Request::Read {
                volume: self.volume.clone(),
                offset,
                len,
            })
            .await?
        {
            Response::Data(d) => Ok(d),
            _ => Err(unexpected("Read")),
        }
    }

    pub async fn chunk_state(&self, chunk: u64) -> Result<ChunkInfo, ClientError> {
        match self
            .ask_one(Request::ChunkState {
                volume: self.volume.clone(),
                chunk,
            })
            .await?
        {
            Response::Chunk(i) => Ok(i),
            _ => Err(unexpected("ChunkState")),
        }
    }

    pub async fn stat(&self) -> Result<VolumeStat, ClientError> {
        match self
            .ask_one(Request::StatVolume {
                volume: self.volume.clone(),
            })
            .await?
        {
            Response::Stat(s) => Ok(s),
            _ => Err(unexpected("StatVolume")),
        }
    }

    /// Chunks not hydrated on some reachable replica, ascending.
    pub async fn unhydrated_chunks(&self, from: u64, limit: u32) -> Result<Vec<u64>, ClientError> {
        let targets = self.members_in(&[Health::InSync, Health::Repairing]);
        let req = Request::UnhydratedChunks {
            volume: self.volume.clone(),
            from,
            limit,
        };
        let mut all = BTreeSet::new();
        let mut answered = 0;
        for (_, _, r) in self.send(&targets, &req).await {
            match r {
                Ok(Response::Chunks(c)) => {
                    answered += 1;
                    all.extend(c);
                }
                Ok(_) => return Err(unexpected("UnhydratedChunks")),
                Err(e) if !replica_fault(&e) => return Err(e),
                Err(_) => {}
            }
        }
        if answered == 0 {
            return Err(self.quorum_error(0, "no replica answered"));
        }
        Ok(all.into_iter().take(limit as usize).collect())
    }

    /// Pauses every replica; needs a majority (then every write waits: each waits for all).
    /// On failure resumes those paused.
    pub async fn pause(&self) -> Result<(), ClientError> {
        let targets = self.members_in(&[Health::InSync]);
        let req = Request::Pause {
            volume: self.volume.clone(),
        };
        let results = self.send(&targets, &req).await;
        let ok = results.iter().filter(|(_, _, r)| r.is_ok()).count();
        if ok >= self.quorum() {
            return Ok(());
        }
        self.resume().await;
        match results.into_iter().find_map(|(_, _, r)| r.err()) {
            Some(e) if !replica_fault(&e) => Err(e),
            _ => Err(self.quorum_error(ok, "could not pause a majority")),
        }
    }

    /// Resumes every replica (best effort: a pause also times out by itself).
    pub async fn resume(&self) {
        let targets = self.members_in(&[Health::InSync]);
        let req = Request::Resume {
            volume: self.volume.clone(),
        };
        let _ = self.send(&targets, &req).await;
    }

    /// Takes mark `id` on every paused replica and resumes it; needs a majority marked.
    pub async fn mark_resume(&self, id: u64) -> Result<u64, ClientError> {
        let targets = self.members_in(&[Health::InSync]);
        let req = Request::MarkResume {
            volume: self.volume.clone(),
            id,
        };
        let results = self.send(&targets, &req).await;
        let ok = results
            .iter()
            .filter(|(_, _, r)| matches!(r, Ok(Response::MarkId(m)) if *m == id))
            .count();
        if ok >= self.quorum() {
            return Ok(id);
        }
        self.release_mark(id).await;
        match results.into_iter().find_map(|(_, _, r)| r.err()) {
            Some(e) if !replica_fault(&e) => Err(e),
            _ => Err(self.quorum_error(ok, "could not mark a majority")),
        }
    }

    /// Pause, mark `id`, resume (resumed whatever the mark did).
    pub async fn take_mark(&self, id: u64) -> Result<u64, ClientError> {
        self.pause().await?;
        self.mark_resume(id).await
    }

    pub async fn release_mark(&self, mark: u64) {
        let targets = self.members_in(&[Health::InSync, Health::Repairing]);
        let req = Request::ReleaseMark {
            volume: self.volume.clone(),
            mark,
        };
        let _ = self.send(&targets, &req).await;
        let mut mv = self.mark_versions.lock().unwrap_or_else(|p| p.into_inner());
        if mv.as_ref().is_some_and(|(m, _)| *m == mark) {
            *mv = None;
        }
    }

    /// Chunks changed between marks on any replica holding `target` (a union: a replica
    /// that cannot say for itself makes the list longer, never shorter).
    pub async fn list_changed_chunks(
        &self,
        base: u64,
        target: u64,
    ) -> Result<Vec<u64>, ClientError> {
        let targets = self.members_in(&[Health::InSync]);
        let req = Request::ListChangedChunks {
            volume: self.volume.clone(),
            base,
            target,
        };
        let mut all = BTreeSet::new();
        let mut answered = 0;
        let mut refusal = None;
        for (_, _, r) in self.send(&targets, &req).await {
            match r {
                Ok(Response::Chunks(c)) => {
                    answered += 1;
                    all.extend(c);
                }
                Ok(_) => return Err(unexpected("ListChangedChunks")),
                Err(e) => refusal = Some(e),
            }
        }
        // A majority, for the same reason as `versions_at`.
        match (answered, refusal) {
            (0, Some(e)) if !replica_fault(&e) => Err(e),
            (n, _) if n < self.quorum() => {
                Err(self.quorum_error(n, "too few replicas listed their changes"))
            }
            _ => Ok(all.into_iter().collect()),
        }
    }

    /// Versions at `mark` of every replica holding it (fetched once per mark).
    async fn versions_at(&self, mark: u64) -> Result<MarkVersions, ClientError> {
        if let Some((m, v)) = &*self.mark_versions.lock().unwrap_or_else(|p| p.into_inner()) {
            if *m == mark {
                return Ok(Arc::clone(v));
            }
        }
        let n = self.lock().len();
        let members = self.members_in(&[Health::InSync, Health::Repairing]);
        let got = join_all(
            members
                .iter()
                .map(|(_, _, c)| all_versions(c, &self.volume, mark, self.chunks)),
        )
        .await;
        let mut out = vec![None; n];
        let mut refusal = None;
        for ((i, _, _), r) in members.iter().zip(got) {
            match r {
                Ok(v) => out[*i] = Some(v),
                Err(e) => {
                    if replica_fault(&e) {
                        self.mark_out(*i, &e.to_string());
                    }
                    refusal = Some(e);
                }
            }
        }
        // A majority must answer: it includes a replica that had every write acknowledged
        // before the cut, whose versions then lead; fewer could all be stale.
        let have = out.iter().filter(|v| v.is_some()).count();
        if have < self.quorum() {
            return Err(match refusal {
                Some(e) if !replica_fault(&e) && have == 0 => e,
                _ => self.quorum_error(have, "too few replicas hold the mark"),
            });
        }
        let v = Arc::new(out);
        *self.mark_versions.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((mark, Arc::clone(&v)));
        Ok(v)
    }

    /// Chunk `chunk` as it was at `mark`, from a replica with its highest version there.
    pub async fn read_mark(
        &self,
        mark: u64,
        chunk: u64,
    ) -> Result<(ChunkInfo, Bytes), ClientError> {
        let versions = self.versions_at(mark).await?;
        let at = |i: usize| {
            versions[i]
                .as_ref()
                .and_then(|v| v.get(chunk as usize))
                .copied()
        };
        let best = (0..versions.len()).filter_map(at).max();
        let members = self.members_in(&[Health::InSync, Health::Repairing]);
        let mut last = None;
        for (i, h, c) in members {
            if best.is_none() || at(i) != best {
                continue;
            }
            let req = Request::ReadMark {
                volume: self.volume.clone(),
                mark,
                chunk,
            };
            match self.send(&[(i, h, c)], &req).await.pop().map(|(_, _, r)| r) {
                Some(Ok(Response::MarkChunk { info, data })) => return Ok((info, data)),
                Some(Ok(_)) => return Err(unexpected("ReadMark")),
                Some(Err(e)) if !replica_fault(&e) => return Err(e),
                Some(Err(e)) => last = Some(e),
                None => {}
            }
        }
        Err(last.unwrap_or_else(|| self.quorum_error(0, "no replica holding the mark answered")))
    }

    /// Keeps bringing back replicas that are out (every `every`), for the volume's writer,
    /// until the volume is dropped.
    pub fn spawn_repair(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        self.writer.store(true, Ordering::Relaxed);
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(me) = weak.upgrade() else { return };
                me.repair_out().await;
            }
        })
    }

    /// Brings replica `i` back through `client`: see the module doc.
    async fn rejoin(&self, i: usize, client: Arc<BlockClient>) -> Result<(), ClientError> {
        let addr = client.addr().to_owned();
        let gate = self.gate.write().await;
        let sources = self.members_in(&[Health::InSync]);
        if sources.is_empty() {
            return Err(self.quorum_error(0, "no replica in sync to repair from"));
        }
        let theirs = all_versions(&client, &self.volume, 0, self.chunks).await?;
        let got = join_all(
            sources
                .iter()
                .map(|(_, _, c)| all_versions(c, &self.volume, 0, self.chunks)),
        )
        .await;
        let mut ours: Vec<(Arc<BlockClient>, Vec<u64>)> = Vec::new();
        for ((j, _, c), r) in sources.into_iter().zip(got) {
            match r {
                Ok(v) => ours.push((c, v)),
                Err(e) => self.mark_out(j, &e.to_string()),
            }
        }
        if ours.is_empty() || theirs.len() as u64 != self.chunks {
            return Err(self.quorum_error(0, "could not compare versions"));
        }
        // Per differing chunk: the in-sync replica with its newest version.
        let mut todo: Vec<(u64, usize)> = Vec::new();
        for c in 0..self.chunks as usize {
            let (k, best) = ours
                .iter()
                .enumerate()
                .map(|(k, (_, v))| (k, v[c]))
                .max_by_key(|(_, v)| *v)
                .unwrap_or((0, 0));
            if theirs[c] != best {
                todo.push((c as u64, k));
            }
        }
        for page in todo.chunks(MAX_CHUNK_LIST as usize) {
            client
                .reset_chunks(&self.volume, page.iter().map(|(c, _)| *c).collect())
                .await?;
        }
        {
            let mut m = self.lock();
            let m = &mut m[i];
            if m.retired {
                return Err(lost(&addr, "no longer a replica"));
            }
            m.client = Some(Arc::clone(&client));
            m.health = Health::Repairing;
            m.reason = None;
            m.repair_total = todo.len() as u64;
            m.repair_done = 0;
        }
        drop(gate);
        tracing::info!(volume = %self.volume, replica = %addr, chunks = todo.len(), "replica rejoining: repairing");
        for (c, k) in todo {
            let _chunk = self.stripes[(c % STRIPES as u64) as usize].write().await;
            if self.lock()[i].health != Health::Repairing {
                return Err(lost(&addr, "failed during repair"));
            }
            let (info, data) = ours[k].0.read_mark(&self.volume, 0, c).await?;
            let data = if info.has_data() { data } else { Bytes::new() };
            client
                .put_chunk(&self.volume, c, u64::MAX, info, data)
                .await?;
            self.metrics
                .repair_bytes
                .fetch_add(CHUNK, Ordering::Relaxed);
            self.lock()[i].repair_done += 1;
        }
        client.flush(&self.volume).await?;
        let mut m = self.lock();
        if m[i].health == Health::Repairing {
            m[i].health = Health::InSync;
            self.metrics.repairs.fetch_add(1, Ordering::Relaxed);
            tracing::info!(volume = %self.volume, replica = %addr, "replica in sync");
        }
        Ok(())
    }
}

fn unexpected(request: &'static str) -> ClientError {
    ClientError::UnexpectedReply {
        request,
        got: "another reply",
    }
}
