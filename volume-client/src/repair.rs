//! Bringing back replicas that are out: the repair loop, the rejoin of one replica, and the
//! repair of one chunk on it.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;

use blockfleet_core::units::CHUNK;
use blockfleet_proto::wire::MAX_CHUNK_LIST;

use crate::*;

/// Chunks repaired at once on one replica (unpaced).
const REPAIR_BATCH: usize = 8;

/// Which side of a chunk repair failed.
enum Side {
    Source(ClientError),
    Target(ClientError),
}

impl ReplicatedVolume {
    /// One pass of the repair loop: marks out replicas whose connection closed (a restarted
    /// server: found now, not by the next write), finishes repairs left unfinished (their
    /// source failed), then tries to bring back every replica that is out.
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
        let (repairing, out): (Vec<_>, Vec<_>) = self
            .lock()
            .iter()
            .enumerate()
            .filter(|(_, m)| m.health != Health::InSync && !m.retired)
            .map(|(i, m)| (i, m.health, m.addr.clone()))
            .partition(|(_, h, _)| *h == Health::Repairing);
        for (i, _, addr) in repairing {
            if let Err(e) = self.finish_repair(i).await {
                tracing::warn!(volume = %self.volume, replica = %addr, error = %e, "repair interrupted: resumed on the next pass");
            }
        }
        for (i, _, addr) in out {
            let c = match connect(&addr, self.timeout, self.grant().as_ref()).await {
                Ok(c) => c,
                Err(e) => {
                    self.rejoin_failed(i, &format!("cannot reconnect: {e}"));
                    continue;
                }
            };
            let done = match self.rejoin(i, c).await {
                Ok(()) => self.finish_repair(i).await,
                Err(e) => {
                    self.rejoin_failed(i, &format!("rejoin failed: {e}"));
                    continue;
                }
            };
            if let Err(e) = done {
                tracing::warn!(volume = %self.volume, replica = %addr, error = %e, "repair interrupted: resumed on the next pass");
            }
        }
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

    /// Lets replica `i` back through `client` (see the module doc): with writes held, finds
    /// the chunks whose version differs from the in-sync replicas', resets them on it, and
    /// marks it repairing with those chunks pending; writes then reach it again.
    pub(crate) async fn rejoin(
        &self,
        i: usize,
        client: Arc<BlockClient>,
    ) -> Result<(), ClientError> {
        let addr = client.addr().to_owned();
        let _gate = self.gate.write().await;
        let sources = self.members_in(&[Health::InSync]);
        if sources.is_empty() {
            return Err(self.quorum_error(0, "no replica in sync to repair from"));
        }
        let theirs = self
            .within(&addr, all_versions(&client, &self.volume, 0, self.chunks))
            .await?;
        let got =
            join_all(sources.iter().map(|(_, _, c)| {
                self.within(c.addr(), all_versions(c, &self.volume, 0, self.chunks))
            }))
            .await;
        let mut ours: Vec<Vec<u64>> = Vec::new();
        for ((j, _, _), r) in sources.into_iter().zip(got) {
            match r {
                Ok(v) => ours.push(v),
                Err(e) => self.mark_out(j, &e.to_string()),
            }
        }
        if ours.is_empty() || theirs.len() as u64 != self.chunks {
            return Err(self.quorum_error(0, "could not compare versions"));
        }
        let todo: BTreeSet<u64> = (0..self.chunks as usize)
            .filter(|&c| ours.iter().map(|v| v[c]).max().unwrap_or(0) != theirs[c])
            .map(|c| c as u64)
            .collect();
        let list: Vec<u64> = todo.iter().copied().collect();
        for page in list.chunks(MAX_CHUNK_LIST as usize) {
            self.within(&addr, client.reset_chunks(&self.volume, page.to_vec()))
                .await?;
        }
        let mut m = self.lock();
        let m = &mut m[i];
        if m.retired {
            return Err(lost(&addr, "no longer a replica"));
        }
        tracing::info!(volume = %self.volume, replica = %addr, chunks = todo.len(), "replica rejoining: repairing");
        m.client = Some(client);
        m.health = Health::Repairing;
        m.reason = None;
        m.repair_total = todo.len() as u64;
        m.pending = todo;
        Ok(())
    }

    /// Repairs every chunk still pending on repairing replica `i` (paced), then, once it
    /// holds them all durably, puts it in sync.
    pub(crate) async fn finish_repair(&self, i: usize) -> Result<(), ClientError> {
        loop {
            let next: Vec<u64> = {
                let m = self.lock();
                match m.get(i) {
                    Some(m) if m.health == Health::Repairing => {
                        m.pending.iter().take(REPAIR_BATCH).copied().collect()
                    }
                    _ => return Ok(()),
                }
            };
            if next.is_empty() {
                break;
            }
            let pace = self.repair_pace_us.load(Ordering::Relaxed);
            if pace > 0 {
                // Paced: one chunk at a time.
                self.repair_chunk(i, next[0]).await?;
                tokio::time::sleep(Duration::from_micros(pace)).await;
                continue;
            }
            // Chunks are independent (each under its own lock): several at once hide the
            // round trips of digest, adopt and copy.
            for r in join_all(next.into_iter().map(|c| self.repair_chunk(i, c))).await {
                r?;
            }
        }
        let Some(client) = self.lock()[i].client.clone() else {
            return Ok(());
        };
        if let Err(e) = self.within(client.addr(), client.flush(&self.volume)).await {
            self.mark_out(i, &format!("flush after repair failed: {e}"));
            return Err(e);
        }
        let mut m = self.lock();
        if m[i].health == Health::Repairing && m[i].pending.is_empty() {
            m[i].health = Health::InSync;
            m[i].reason = None;
            m[i].failed_rejoins = 0;
            m[i].logged_at = None;
            m[i].cause = None;
            self.metrics.repairs.fetch_add(1, Ordering::Relaxed);
            tracing::info!(volume = %self.volume, replica = %m[i].addr, "replica in sync");
        }
        Ok(())
    }

    /// Repairs chunk `c` on repairing replica `i` from an in-sync replica (the next if one
    /// fails), under the chunk's lock. A failure of the repaired replica marks it out; with
    /// no source left it stays repairing, taking writes, and the chunk stays pending.
    pub(crate) async fn repair_chunk(&self, i: usize, c: u64) -> Result<(), ClientError> {
        let _chunk = self.stripes[(c % STRIPES as u64) as usize].write().await;
        let target = {
            let m = self.lock();
            match m.get(i) {
                Some(m) if m.health == Health::Repairing && m.pending.contains(&c) => {
                    m.client.clone()
                }
                _ => return Ok(()),
            }
        };
        let Some(target) = target else {
            return Ok(());
        };
        for (j, _, source) in self.members_in(&[Health::InSync]) {
            match self.copy_chunk(&source, &target, c).await {
                Ok(copied) => {
                    let counter = if copied {
                        self.metrics
                            .repair_bytes
                            .fetch_add(CHUNK, Ordering::Relaxed);
                        &self.metrics.repair_chunks
                    } else {
                        &self.metrics.repair_adopted
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    self.lock()[i].pending.remove(&c);
                    return Ok(());
                }
                Err(Side::Source(e)) => {
                    if replica_fault(&e) {
                        self.mark_out(j, &e.to_string());
                    } else {
                        return Err(e);
                    }
                }
                Err(Side::Target(e)) => {
                    self.mark_out(i, &format!("failed during repair: {e}"));
                    return Err(e);
                }
            }
        }
        Err(self.quorum_error(0, "no replica in sync to repair from"))
    }

    /// Makes `target`'s chunk `c` what `source` holds: adopts the source's state where the
    /// data already match, else copies. Returns whether it copied.
    async fn copy_chunk(
        &self,
        source: &BlockClient,
        target: &BlockClient,
        c: u64,
    ) -> Result<bool, Side> {
        let v = &self.volume;
        if self.adopt.load(Ordering::Relaxed) {
            let (info, digest) = self
                .within(source.addr(), source.chunk_digest(v, c))
                .await
                .map_err(Side::Source)?;
            match self
                .within(target.addr(), target.adopt_chunk(v, c, digest, info))
                .await
            {
                Ok(()) => return Ok(false),
                Err(e) if e.code() == Some(ErrorCode::VersionMismatch) => {}
                Err(e) => return Err(Side::Target(e)),
            }
        }
        let (info, data) = self
            .within(source.addr(), source.read_mark(v, 0, c))
            .await
            .map_err(Side::Source)?;
        let data = if info.has_data() { data } else { Bytes::new() };
        self.within(target.addr(), target.put_chunk(v, c, u64::MAX, info, data))
            .await
            .map_err(Side::Target)?;
        Ok(true)
    }
}
