//! The data path: writes and flushes to every replica taking writes, reads from one in sync.

use std::collections::BTreeSet;
use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;

use blockfleet_core::units::CHUNK;
use blockfleet_proto::wire::{ChunkInfo, Request, Response, VolumeStat};

use crate::*;

/// The longest a flush waits for a repairing replica to hold every chunk.
const FLUSH_WAIT: Duration = Duration::from_secs(30);

/// Chunks `offset..offset+len` touches.
fn chunk_range(offset: u64, len: u64) -> Range<u64> {
    offset / CHUNK..(offset + len.max(1)).div_ceil(CHUNK)
}

impl ReplicatedVolume {
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        self.ensure_quorum().await;
        let _gate = self.gate.read().await;
        let chunks = chunk_range(offset, data.len() as u64);
        self.change(
            Request::Write {
                volume: self.volume.clone(),
                offset,
                fua,
                data,
            },
            chunks,
        )
        .await
    }

    /// A flush counts a repairing replica once it holds every chunk: until then it may lack
    /// chunks whose acknowledged writes are durable only elsewhere. Short of a majority
    /// without it, the flush waits (bounded) for its repair.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.ensure_quorum().await;
        let deadline = tokio::time::Instant::now() + FLUSH_WAIT;
        while self.holders(None) < self.quorum()
            && self
                .lock()
                .iter()
                .any(|m| m.health == Health::Repairing && m.client.is_some())
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.replicate(
            Request::Flush {
                volume: self.volume.clone(),
            },
            None,
        )
        .await
        .map(drop)
    }

    /// Hydrates a chunk on every replica taking writes (a majority must take it).
    pub async fn write_if_unwritten(&self, chunk: u64, data: Bytes) -> Result<(), ClientError> {
        self.change(
            Request::WriteIfUnwritten {
                volume: self.volume.clone(),
                chunk,
                data,
            },
            chunk..chunk + 1,
        )
        .await
    }

    /// Replicates a change to `chunks` under their locks. When it would lack a majority, or
    /// did, without a repairing replica that lacks those chunks (one failure while another
    /// replica repairs), those chunks are repaired on that replica first, or after the
    /// change (from a replica that took it, so the repaired copy holds it too): the change
    /// waits for that repair rather than failing.
    async fn change(&self, req: Request, chunks: Range<u64>) -> Result<(), ClientError> {
        self.repair_for(&chunks).await;
        let r = {
            let _locks = self
                .lock_chunks(chunks.start * CHUNK, (chunks.end - chunks.start) * CHUNK)
                .await;
            self.replicate(req, Some(chunks.clone())).await
        };
        match r {
            Ok(_) => Ok(()),
            Err(ClientError::Quorum { .. }) if self.repair_for(&chunks).await => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Repairs `chunks` on repairing replicas that lack them when those replicas are needed
    /// for a majority; returns whether a majority holds them now.
    async fn repair_for(&self, chunks: &Range<u64>) -> bool {
        if self.holders(Some(chunks)) >= self.quorum() {
            return true;
        }
        let waiting: Vec<(usize, Vec<u64>)> = self
            .lock()
            .iter()
            .enumerate()
            .filter(|(_, m)| m.health == Health::Repairing)
            .map(|(i, m)| (i, m.pending.range(chunks.clone()).copied().collect()))
            .collect();
        for (i, list) in waiting {
            for c in list {
                if let Err(e) = self.repair_chunk(i, c).await {
                    tracing::debug!(volume = %self.volume, chunk = c, error = %e, "repair for a write failed");
                    break;
                }
            }
        }
        self.holders(Some(chunks)) >= self.quorum()
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
}
