//! Block servers as operators see them: `DescribeBlockServers` (reachability, the replicas
//! each holds and whether each is in sync, from the replicas' chunk versions and the host
//! agents' reports) and `DrainBlockServer`, which moves every replica off one server while
//! the volumes serve: a new replica is placed, filled from the others (by the volume's host
//! agent when attached, which writes to it meanwhile; by the control plane otherwise), and
//! only then does the placement switch to it and the old replica go.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockfleet_api::{BlockServerView, DrainReply, DrainRequest, ReplicaReport, ReplicaView};
use blockfleet_core::httpjson::{parse, ApiError, Reply};
use blockfleet_core::ids::VolumeId;
use blockfleet_core::units::CHUNK;
use blockfleet_volume_client::{Health, ReplicatedVolume};
use serde_json::json;

use super::{block_error, now_ms, replicas_error, ControlPlane, REPLICA_TIMEOUT};
use crate::state::VolumeRecord;

const DRAINING_SETTING: &str = "draining_block_servers";
/// How long a move waits for an attached volume's host agent to fill the new replica.
const AGENT_FILL_TIMEOUT: Duration = Duration::from_secs(300);
/// An agent report older than this is not used.
const REPORT_FRESH_MS: u64 = 5000;

/// How long `DescribeBlockServers` waits for one server's answer.
const QUERY_BOUND: Duration = Duration::from_secs(2);
/// A replica found behind is read again up to this many times, this far apart, before it is
/// shown behind: writes in flight are not lag.
const CONFIRM_READS: usize = 5;
const CONFIRM_EVERY: Duration = Duration::from_millis(100);

/// A block server as one query found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Answers,
    /// Connected, but no answer within the bound (stopped or overloaded).
    Unresponsive,
    Unreachable,
}

impl ControlPlane {
    /// Block servers being drained: nothing new is placed on them.
    pub(super) fn draining(&self) -> Result<BTreeSet<String>, ApiError> {
        Ok(self
            .state
            .setting(DRAINING_SETTING)?
            .map(|s| {
                s.split(',')
                    .filter(|x| !x.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default())
    }

    fn set_draining(&self, set: &BTreeSet<String>) -> Result<(), ApiError> {
        let v: Vec<&str> = set.iter().map(String::as_str).collect();
        self.state.put_setting(DRAINING_SETTING, &v.join(","))?;
        self.state.flush()?;
        Ok(())
    }

    /// `internal/ReportReplicas`: a host agent's view of its volume's replicas.
    pub(super) fn report_replicas(&self, body: &[u8], caller: &super::auth::Caller) -> Reply {
        let r: ReplicaReport = parse(body)?;
        super::auth::check_host(caller, &self.get_volume(&r.volume_id)?)?;
        self.replica_reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(r.volume_id.clone(), (r, now_ms()));
        Ok(json!({}))
    }

    fn fresh_report(&self, id: &VolumeId, since: u64) -> Option<ReplicaReport> {
        let reports = self
            .replica_reports
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (r, at) = reports.get(id)?;
        (*at >= since && now_ms().saturating_sub(*at) <= REPORT_FRESH_MS).then(|| r.clone())
    }

    pub(super) async fn describe_block_servers(&self, _body: &[u8]) -> Reply {
        let draining = self.draining()?;
        // Every server asked at once, each within QUERY_BOUND: one stopped or slow server
        // shows as unresponsive instead of holding the whole answer.
        let probes =
            futures::future::join_all(self.config.block_servers.iter().map(|b| self.probe(b)))
                .await;
        let health: HashMap<String, Probe> = self
            .config
            .block_servers
            .iter()
            .cloned()
            .zip(probes)
            .collect();
        let mut views: HashMap<String, Vec<ReplicaView>> = HashMap::new();
        for v in self.state.volumes()? {
            let behind = self.behind_chunks(&v, &health).await;
            let report = self.fresh_report(&v.id, 0);
            let members = v
                .placement
                .iter()
                .chain(v.moving.as_ref().map(|(_, to)| to));
            for addr in members {
                let state = match (&v.moving, behind.get(addr)) {
                    (Some((_, to)), _) if to == addr => "joining",
                    (Some((from, _)), _) if from == addr => "leaving",
                    (_, Some(0)) => "in_sync",
                    (_, Some(_)) => "behind",
                    (_, None) => "unreachable",
                };
                let seen = report
                    .as_ref()
                    .and_then(|r| r.replicas.iter().find(|x| &x.address == addr));
                let joining = state == "joining";
                let fill = match seen {
                    Some(x) if x.repair_total > 0 && x.health != Health::InSync.as_str() => {
                        Some((x.repair_done, x.repair_total))
                    }
                    _ if joining => self.fill_of(&v.id),
                    _ => None,
                };
                views.entry(addr.clone()).or_default().push(ReplicaView {
                    volume_id: v.id.clone(),
                    state: state.into(),
                    behind_chunks: behind.get(addr).copied(),
                    agent_health: seen.map(|x| x.health.clone()),
                    reason: seen.and_then(|x| x.reason.clone()),
                    fill,
                });
            }
        }
        let servers: Vec<BlockServerView> = self
            .config
            .block_servers
            .iter()
            .map(|b| BlockServerView {
                address: b.clone(),
                reachable: health[b] != Probe::Unreachable,
                unresponsive: health[b] == Probe::Unresponsive,
                draining: draining.contains(b),
                volumes: views.remove(b).unwrap_or_default(),
            })
            .collect();
        Ok(json!({ "servers": servers }))
    }

    fn fill_of(&self, id: &VolumeId) -> Option<(u64, u64)> {
        self.fills
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
    }

    /// Whether block server `addr` answers a request within [`QUERY_BOUND`].
    async fn probe(&self, addr: &str) -> Probe {
        let Ok(Ok(c)) = tokio::time::timeout(QUERY_BOUND, self.blocks.get(addr)).await else {
            self.blocks.forget(addr);
            return Probe::Unreachable;
        };
        // Any answer (a volume that does not exist: NotFound) shows the server working.
        let probe = VolumeId::generate();
        match tokio::time::timeout(QUERY_BOUND, c.stat_volume(&probe)).await {
            Ok(Err(e)) if e.code().is_none() => {
                self.blocks.forget_if_broken(addr, &e);
                Probe::Unreachable
            }
            Ok(_) => Probe::Answers,
            Err(_) => Probe::Unresponsive,
        }
    }

    /// Per replica address: how many chunks it holds at a lower version than the newest any
    /// replica held (absent: unreachable, unresponsive, or no answer within the bound).
    ///
    /// Replicas are read one after another, so a write in flight shows as a difference on a
    /// replica in sync. A chunk counts as behind only if a second read, after the first, still
    /// finds it below the first read's newest version: writes in flight land by then, a
    /// replica that is really behind (out, repairing) stays below.
    async fn behind_chunks(
        &self,
        v: &VolumeRecord,
        health: &HashMap<String, Probe>,
    ) -> HashMap<String, u64> {
        let addrs: Vec<&String> = v
            .placement
            .iter()
            .chain(v.moving.as_ref().map(|(_, to)| to))
            .filter(|a| health.get(*a).is_none_or(|h| *h == Probe::Answers))
            .collect();
        let first = self.chunk_versions(v, &addrs).await;
        let n = first.values().map(Vec::len).max().unwrap_or(0);
        let best: Vec<u64> = (0..n)
            .map(|c| {
                first
                    .values()
                    .filter_map(|v| v.get(c))
                    .max()
                    .copied()
                    .unwrap_or(0)
            })
            .collect();
        let behind_in = |v: &[u64]| -> Vec<usize> {
            best.iter()
                .enumerate()
                .filter(|(c, b)| v.get(*c).is_none_or(|x| x < *b))
                .map(|(c, _)| c)
                .collect()
        };
        // Per replica, the chunks the first read found behind; later reads drop those that
        // caught up (a write in flight, or queued behind a flush, lands within moments).
        let mut behind: HashMap<String, Vec<usize>> = first
            .iter()
            .map(|(a, v)| (a.clone(), behind_in(v)))
            .collect();
        for _ in 0..CONFIRM_READS {
            let suspects: Vec<&String> = behind
                .iter()
                .filter(|(_, c)| !c.is_empty())
                .map(|(a, _)| a)
                .collect();
            if suspects.is_empty() {
                break;
            }
            tokio::time::sleep(CONFIRM_EVERY).await;
            let again = self.chunk_versions(v, &suspects).await;
            for (a, chunks) in behind.iter_mut() {
                // A replica that stopped answering meanwhile keeps its count.
                if let Some(now) = again.get(a) {
                    chunks.retain(|c| now.get(*c).is_none_or(|x| *x < best[*c]));
                }
            }
        }
        behind
            .into_iter()
            .map(|(a, c)| (a, c.len() as u64))
            .collect()
    }

    /// Every chunk's version on each of `addrs` (those that answer within the bound).
    async fn chunk_versions(
        &self,
        v: &VolumeRecord,
        addrs: &[&String],
    ) -> HashMap<String, Vec<u64>> {
        let n = v.size.div_ceil(CHUNK);
        let got = futures::future::join_all(addrs.iter().map(|a| async move {
            let c = self.blocks.get(a).await.ok()?;
            let all = async {
                let mut all = Vec::new();
                while (all.len() as u64) < n {
                    match c.chunk_versions(&v.id, 0, all.len() as u64, 65536).await {
                        Ok(p) if !p.is_empty() => all.extend(p),
                        Ok(_) => break,
                        Err(e) => {
                            self.blocks.forget_if_broken(a, &e);
                            return None;
                        }
                    }
                }
                Some(all)
            };
            tokio::time::timeout(QUERY_BOUND, all).await.ok().flatten()
        }))
        .await;
        addrs
            .iter()
            .zip(got)
            .filter_map(|(a, v)| Some(((*a).clone(), v?)))
            .collect()
    }

    /// `DrainBlockServer`: no new replicas on `server`; every replica it holds moves to
    /// another server in the background (`DescribeBlockServers` shows progress).
    pub(super) async fn drain_block_server(self: &Arc<Self>, body: &[u8]) -> Reply {
        let req: DrainRequest = parse(body)?;
        if !self.config.block_servers.contains(&req.server) {
            return Err(ApiError::bad_request(
                "InvalidParameterValue",
                format!(
                    "{} is not one of the configured block servers ({})",
                    req.server,
                    self.config.block_servers.join(", ")
                ),
            ));
        }
        let volumes = {
            let _changes = self.changes.lock().await;
            let mut draining = self.draining()?;
            let others = self
                .config
                .block_servers
                .iter()
                .filter(|b| **b != req.server && !draining.contains(*b))
                .count();
            if others < self.config.replicas {
                return Err(ApiError::conflict(
                    "InsufficientCapacity",
                    format!(
                        "draining {} would leave {others} block servers for {} replicas per volume",
                        req.server, self.config.replicas
                    ),
                ));
            }
            draining.insert(req.server.clone());
            self.set_draining(&draining)?;
            self.state
                .volumes()?
                .iter()
                .filter(|v| v.placement.contains(&req.server))
                .count() as u64
        };
        let me = Arc::clone(self);
        let server = req.server.clone();
        tokio::spawn(async move { me.drain(&server).await });
        serde_json::to_value(DrainReply {
            server: req.server,
            volumes,
        })
        .map_err(|e| ApiError::internal(e.to_string()))
    }

    /// Moves each replica off `server`, one volume at a time; a failed move is logged and
    /// retried on the next pass (every 2 s) until none is left.
    async fn drain(self: Arc<Self>, server: &str) {
        loop {
            let Ok(vols) = self.state.volumes() else {
                return;
            };
            let todo: Vec<VolumeRecord> = vols
                .into_iter()
                .filter(|v| v.placement.iter().any(|p| p == server))
                .collect();
            if todo.is_empty() {
                tracing::info!(server, "block server drained");
                return;
            }
            for v in todo {
                if let Err(e) = self.move_replica(&v.id, server).await {
                    tracing::warn!(volume = %v.id, server, error = %e.message, "replica move failed; will retry");
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// Moves volume `id`'s replica on `from` to another block server.
    async fn move_replica(&self, id: &VolumeId, from: &str) -> Result<(), ApiError> {
        let started = now_ms();
        let (v, to) = {
            let _changes = self.changes.lock().await;
            let v = self.get_volume(id)?;
            if !v.placement.iter().any(|p| p == from) {
                return Ok(());
            }
            self.check_whole(&v, "moved")?;
            let to = match &v.moving {
                Some((f, to)) if f == from => to.clone(),
                _ => self.move_target(&v)?,
            };
            let r = self.replicas(id, &v.placement, v.size).await;
            let stat = r.stat().await.map_err(|e| replicas_error(&e))?;
            let c = self
                .blocks
                .get(&to)
                .await
                .map_err(|e| block_error(&to, &e))?;
            match c.create_volume(id, v.size, stat.hydrating).await {
                Ok(()) => {}
                Err(e) if e.code() == Some(blockfleet_proto::ErrorCode::VolumeExists) => {}
                Err(e) => return Err(block_error(&to, &e)),
            }
            let mut v = v;
            v.moving = Some((from.to_owned(), to.clone()));
            self.state.put_volume(&v)?;
            self.state.flush()?;
            (v, to)
        };
        tracing::info!(volume = %id, from, to = %to, "moving a replica");
        if v.attachment.is_some() {
            // The host agent writes to the new replica and fills it; wait for its word.
            let deadline = Instant::now() + AGENT_FILL_TIMEOUT;
            loop {
                let done = self.fresh_report(id, started).is_some_and(|r| {
                    r.replicas
                        .iter()
                        .any(|x| x.address == to && x.health == Health::InSync.as_str())
                });
                if done {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(ApiError::unavailable(
                        "DrainTimedOut",
                        format!("the host agent of {id} did not fill {to} in time"),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        } else {
            // Nobody writes an unattached volume (attaching waits for the move): fill it here.
            let grant = blockfleet_proto::Grant::issue(
                &self.block_key,
                Some(id),
                blockfleet_proto::wire::rights::ALL,
                "control-plane",
                super::BLOCK_GRANT_TTL,
            );
            let r = ReplicatedVolume::open(id.clone(), &v.placement, REPLICA_TIMEOUT, Some(grant))
                .await
                .map_err(|e| replicas_error(&e))?;
            r.set_members(&v.placement, Some(&to));
            // Progress for `server ls` / `server drain --wait` while the fill runs.
            let note = || {
                if let Some(s) = r.status().iter().find(|s| s.addr == to) {
                    self.fills
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id.clone(), (s.repair_done, s.repair_total));
                }
            };
            let fill = async {
                r.repair_out().await;
                r.repair_out().await;
            };
            tokio::pin!(fill);
            loop {
                tokio::select! {
                    () = &mut fill => break,
                    () = tokio::time::sleep(Duration::from_millis(250)) => note(),
                }
            }
            self.fills
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
            let filled = r.status().iter().all(|s| s.health == Health::InSync);
            if !filled {
                return Err(ApiError::unavailable(
                    "BlockServerUnavailable",
                    format!("could not fill {to} for {id}: {:?}", r.status()),
                ));
            }
        }
        {
            let _changes = self.changes.lock().await;
            let mut v = self.get_volume(id)?;
            v.placement = v
                .placement
                .iter()
                .map(|p| if p == from { to.clone() } else { p.clone() })
                .collect();
            v.moving = None;
            v.placement_generation += 1;
            self.state.put_volume(&v)?;
            self.state.flush()?;
        }
        // The old replica goes last; a server that is down keeps it until it is wiped.
        match self.blocks.get(from).await {
            Ok(c) => {
                if let Err(e) = c.delete_volume(id).await {
                    tracing::warn!(volume = %id, server = from, error = %e, "could not delete the moved-off replica")
                }
            }
            Err(e) => {
                tracing::warn!(volume = %id, server = from, error = %e, "could not delete the moved-off replica")
            }
        }
        tracing::info!(volume = %id, from, to = %to, "replica moved");
        Ok(())
    }

    /// The least loaded block server not holding `v` and not draining.
    fn move_target(&self, v: &VolumeRecord) -> Result<String, ApiError> {
        let draining = self.draining()?;
        let mut load: HashMap<&str, usize> = HashMap::new();
        let vols = self.state.volumes()?;
        for x in &vols {
            for p in &x.placement {
                *load.entry(p.as_str()).or_default() += 1;
            }
        }
        self.config
            .block_servers
            .iter()
            .filter(|b| !v.placement.contains(b) && !draining.contains(*b))
            .min_by_key(|b| load.get(b.as_str()).copied().unwrap_or(0))
            .cloned()
            .ok_or_else(|| {
                ApiError::conflict(
                    "InsufficientCapacity",
                    format!("no block server to move a replica of {} to", v.id),
                )
            })
    }
}
