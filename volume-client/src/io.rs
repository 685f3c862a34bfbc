//! The data path: writes and flushes to every replica taking writes, reads from one in sync.

use std::collections::BTreeSet;

use bytes::Bytes;

use blockfleet_core::units::CHUNK;
use blockfleet_proto::wire::{ChunkInfo, Request, Response, VolumeStat};

use crate::*;

impl ReplicatedVolume {
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
}
