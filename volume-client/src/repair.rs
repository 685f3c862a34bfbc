//! Bringing back replicas that are out: the repair loop and the rejoin of one replica.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;

use blockfleet_core::units::CHUNK;
use blockfleet_proto::wire::MAX_CHUNK_LIST;

use crate::*;

impl ReplicatedVolume {
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
            let Ok(c) = connect(&addr, self.timeout, self.grant().as_ref()).await else {
                continue;
            };
            if let Err(e) = self.rejoin(i, c).await {
                self.mark_out(i, &format!("rejoin failed: {e}"));
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

    /// Brings replica `i` back through `client`: see the module doc.
    pub(crate) async fn rejoin(
        &self,
        i: usize,
        client: Arc<BlockClient>,
    ) -> Result<(), ClientError> {
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
