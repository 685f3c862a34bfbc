//! The pause gate and snapshot marks: pause, mark, resume, reads at a mark, change lists.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use blockfleet_core::units::CHUNK;
use blockfleet_proto::wire::MAX_CHUNK_LIST;
use blockfleet_proto::{ChunkInfo, ErrorCode};
use bytes::Bytes;

use super::*;

impl Volume {
    /// Stops acknowledging writes: waits for in-flight ones, holds back new ones until
    /// `resume` or `timeout`, after which it resumes by itself and drops a mark it took.
    pub async fn pause(self: &Arc<Self>, timeout: Duration) -> Result<(), OpError> {
        let mut slot = self.pause.lock().await;
        if slot.is_some() {
            return Err(op_err(
                ErrorCode::AlreadyPaused,
                format!("{} is already paused", self.id),
            ));
        }
        let gate = Arc::clone(&self.gate).write_owned().await;
        let id = self.pause_ids.fetch_add(1, Ordering::Relaxed);
        *slot = Some(Pause {
            id,
            _gate: gate,
            mark: None,
        });
        let this = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let mut slot = this.pause.lock().await;
            if slot.as_ref().is_some_and(|p| p.id == id) {
                let p = slot.take();
                tracing::warn!(volume = %this.id, "pause not resumed in time: resuming and dropping its mark");
                if let Some(mark) = p.and_then(|p| p.mark) {
                    let _ = this.release_mark(mark);
                }
            }
        });
        Ok(())
    }

    pub async fn resume(&self) -> Result<(), OpError> {
        match self.pause.lock().await.take() {
            Some(_) => Ok(()),
            None => Err(op_err(
                ErrorCode::NotPaused,
                format!("{} is not paused", self.id),
            )),
        }
    }

    /// Records a cut. Paused or not, no write is in flight while the mark is taken. The new
    /// mark id goes to sled through `persist` without an fsync (which would stretch the pause
    /// window): it is durable with the next Flush, which the snapshot coordinator sends before
    /// a snapshot completes. A crash before that loses the mark anyway (marks do not survive
    /// a restart) and fails its snapshot; the unclean restart's `unclean_epoch` then makes the
    /// next change list whole, so a reused mark id cannot hide a change.
    /// `want`: the mark id (0: the next one); replicas of a volume take the same ids, so it
    /// must be above every mark this volume has seen.
    pub async fn mark(
        &self,
        want: u64,
        persist: impl FnOnce(VolumeRecord) -> Result<(), OpError>,
    ) -> Result<u64, OpError> {
        let mut slot = self.pause.lock().await;
        let _own_gate = match slot.is_some() {
            true => None,
            false => Some(self.gate.write().await),
        };
        let mut st = lock(&self.state);
        if st.open.len() >= MAX_MARKS {
            return Err(op_err(
                ErrorCode::MarkOpen,
                format!(
                    "{} already has {MAX_MARKS} open marks; release one first",
                    self.id
                ),
            ));
        }
        let id = match want {
            0 => st.epoch + 1,
            w if w > st.epoch => w,
            w => {
                return Err(op_err(
                    ErrorCode::BadRequest,
                    format!(
                        "mark {w} is not above mark {} that {} has seen",
                        st.epoch, self.id
                    ),
                ))
            }
        };
        let cow_path = self.dir.join(format!("cow-{id}"));
        let cow_file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&cow_path)?;
        persist(VolumeRecord {
            size: self.size,
            hydrating: self.hydrating,
            epoch: id,
            unclean_epoch: st.unclean_epoch,
        })?;
        st.epoch = id;
        st.open.push(OpenMark {
            id,
            cow_path,
            cow_file: Arc::new(cow_file),
            cow: HashMap::new(),
            next_slot: 0,
        });
        if let Some(p) = slot.as_mut() {
            p.mark = Some(id);
        }
        Ok(id)
    }

    fn open_mark<'a>(&self, st: &'a VolState, mark: u64) -> Result<&'a OpenMark, OpError> {
        st.open.iter().find(|m| m.id == mark).ok_or_else(|| {
            op_err(
                ErrorCode::NoSuchMark,
                format!("mark {mark} is not open on {}", self.id),
            )
        })
    }

    /// A chunk as it was at the open mark `mark` (0: as it is now).
    pub async fn read_mark(&self, mark: u64, chunk: u64) -> Result<(ChunkInfo, Bytes), OpError> {
        self.check_chunk(chunk)?;
        let _stripe = self.lock_stripes(chunk..chunk + 1).await;
        let (meta, file, offset) = {
            let st = lock(&self.state);
            let cow = match mark {
                0 => None,
                m => Some(self.open_mark(&st, m)?),
            };
            match cow.and_then(|m| m.cow.get(&chunk).map(|c| (m, c))) {
                Some((m, (meta, slot))) => (*meta, Arc::clone(&m.cow_file), slot * CHUNK),
                None => (
                    st.chunks[chunk as usize],
                    Arc::clone(&self.file),
                    chunk * CHUNK,
                ),
            }
        };
        if !info(&meta).has_data() {
            return Ok((info(&meta), Bytes::from(vec![0u8; CHUNK as usize])));
        }
        let data = blocking(move || {
            let mut buf = vec![0u8; CHUNK as usize];
            file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
        .await?;
        Ok((info(&meta), data))
    }

    pub fn release_mark(&self, mark: u64) -> Result<(), OpError> {
        let mut st = lock(&self.state);
        self.open_mark(&st, mark)?;
        if let Some(i) = st.open.iter().position(|m| m.id == mark) {
            let m = st.open.remove(i);
            let _ = fs::remove_file(&m.cow_path);
        }
        Ok(())
    }

    /// Chunks written by the user after mark `base` (0: ever written or hydrated) up to the open mark
    /// `target` (0: now). After an unclean restart, a list reaching back before it is every chunk.
    pub fn changed_chunks(&self, base: u64, target: u64) -> Result<Vec<u64>, OpError> {
        let st = lock(&self.state);
        if base > st.epoch {
            return Err(op_err(
                ErrorCode::NoSuchMark,
                format!("mark {base} was never taken on {}", self.id),
            ));
        }
        let cow = match target {
            0 => None,
            t => Some(&self.open_mark(&st, t)?.cow),
        };
        if st.unclean_epoch.is_some_and(|e| base <= e) {
            return Ok((0..st.chunks.len() as u64).collect());
        }
        Ok(st
            .chunks
            .iter()
            .enumerate()
            .filter_map(|(c, now)| {
                let at = cow.and_then(|m| m.get(&(c as u64))).map_or(now, |(m, _)| m);
                // Hydration sets no epoch: it changes no content.
                (info(at).has_data() && (base == 0 || at.last_epoch >= base)).then_some(c as u64)
            })
            .collect())
    }

    /// Versions (`ChunkInfo::version`) of chunks `from..from+limit` at mark `mark` (0: now).
    pub fn chunk_versions(&self, mark: u64, from: u64, limit: u32) -> Result<Vec<u64>, OpError> {
        let st = lock(&self.state);
        let cow = match mark {
            0 => None,
            m => Some(&self.open_mark(&st, m)?.cow),
        };
        let n = st.chunks.len() as u64;
        let end = from
            .saturating_add(u64::from(limit.min(MAX_CHUNK_LIST)))
            .min(n);
        Ok((from.min(end)..end)
            .map(|c| {
                let now = &st.chunks[c as usize];
                let at = cow.and_then(|m| m.get(&c)).map_or(now, |(m, _)| m);
                info(at).version()
            })
            .collect())
    }
}
