//! Replication support: forgetting missed chunks on a rejoining replica, telling whether a
//! chunk's data already match another replica's (digest), and putting repaired ones.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use blockfleet_core::units::CHUNK;
use blockfleet_proto::{ChunkInfo, ErrorCode};
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::*;

impl Volume {
    /// Forgets the state of `chunks` (a rejoining replica's missed chunks) until repair puts
    /// them; open marks keep their view. Durable with the caller's flush.
    pub async fn reset_chunks(&self, chunks: &[u64]) -> Result<(), OpError> {
        for &c in chunks {
            self.check_chunk(c)?;
        }
        let _gate = self.gate.read().await;
        for &c in chunks {
            let _stripe = self.lock_stripes(c..c + 1).await;
            self.copy_on_write(c..c + 1).await?;
            let mut st = lock(&self.state);
            st.chunks[c as usize] = ChunkMeta::default();
            st.dirty_chunks.insert(c);
        }
        Ok(())
    }

    /// The chunk's state and the SHA-256 of its data as stored (holes read as zeros).
    pub async fn chunk_digest(&self, chunk: u64) -> Result<(ChunkInfo, [u8; 32]), OpError> {
        self.check_chunk(chunk)?;
        let _stripe = self.lock_stripes(chunk..chunk + 1).await;
        let digest = self.digest_of(chunk).await?;
        Ok((info(&lock(&self.state).chunks[chunk as usize]), digest))
    }

    async fn digest_of(&self, chunk: u64) -> Result<[u8; 32], OpError> {
        let file = Arc::clone(&self.file);
        blocking(move || {
            let mut buf = vec![0u8; CHUNK as usize];
            file.read_exact_at(&mut buf, chunk * CHUNK)?;
            Ok(Sha256::digest(&buf).into())
        })
        .await
    }

    /// Gives chunk `chunk` state `to` if its data hash to `digest` (a replica's chunk whose
    /// state was lost or reset but whose data are current): repair without a copy. The data
    /// reach disk, before the state, at the next flush.
    pub async fn adopt_chunk(
        &self,
        chunk: u64,
        digest: [u8; 32],
        to: ChunkInfo,
    ) -> Result<(), OpError> {
        self.check_chunk(chunk)?;
        let _gate = self.gate.read().await;
        let _stripe = self.lock_stripes(chunk..chunk + 1).await;
        if self.digest_of(chunk).await? != digest {
            return Err(op_err(
                ErrorCode::VersionMismatch,
                format!("chunk {chunk} of {} holds other data", self.id),
            ));
        }
        self.copy_on_write(chunk..chunk + 1).await?;
        let mut st = lock(&self.state);
        st.chunks[chunk as usize] = meta_of(&to);
        st.dirty_chunks.insert(chunk);
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Sets chunk `chunk` to `data` (empty: zeros) with state `to` (repair from a replica);
    /// with `expect` not `u64::MAX`, only if the chunk is at that version now.
    pub async fn put_chunk(
        &self,
        chunk: u64,
        expect: u64,
        to: ChunkInfo,
        data: Bytes,
    ) -> Result<(), OpError> {
        self.check_chunk(chunk)?;
        check_whole_chunk(&data, "PutChunk takes")?;
        let _gate = self.gate.read().await;
        let _stripe = self.lock_stripes(chunk..chunk + 1).await;
        let now = info(&lock(&self.state).chunks[chunk as usize]);
        if expect != u64::MAX && now.version() != expect {
            return Err(op_err(
                ErrorCode::VersionMismatch,
                format!(
                    "chunk {chunk} of {} is at version {}, not {expect}",
                    self.id,
                    now.version()
                ),
            ));
        }
        self.copy_on_write(chunk..chunk + 1).await?;
        let file = Arc::clone(&self.file);
        blocking(move || {
            // A chunk of zeros (never written, or written as zeros) becomes a hole: a repair
            // or a drain's new replica allocates only what holds data.
            if data.iter().all(|b| *b == 0) {
                zero_chunk(&file, chunk)
            } else {
                file.write_all_at(&data, chunk * CHUNK)
            }
        })
        .await?;
        let mut st = lock(&self.state);
        st.chunks[chunk as usize] = meta_of(&to);
        st.dirty_chunks.insert(chunk);
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }
}

/// Zeros chunk `chunk` of `file` by punching a hole (no blocks left allocated), or by writing
/// zeros where the filesystem cannot punch holes.
fn zero_chunk(file: &std::fs::File, chunk: u64) -> std::io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    match fallocate(file, flags, chunk * CHUNK, CHUNK) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP => {
            file.write_all_at(&vec![0u8; CHUNK as usize], chunk * CHUNK)
        }
        Err(e) => Err(e.into()),
    }
}
