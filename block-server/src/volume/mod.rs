//! One volume: a sparse extent file read and written at offsets, its per-chunk state, the pause
//! gate, and the open marks, each with its copy-on-write area.
//!
//! Write path (numbered as in docs/architecture.md):
//! 1. check alignment and range;
//! 2. pass the pause gate (a shared hold on a RwLock that `Pause` takes exclusively, so a pause
//!    waits for in-flight writes and holds back new ones);
//! 3. lock the stripes of the chunks touched (serialises against hydration and copy-on-write of
//!    the same chunk);
//! 4. for each open mark that has not copied a touched chunk aside yet, copy it (data and
//!    state) to that mark's area;
//! 5. pwrite; 6. update the chunk state in memory (staged to sled at the next flush);
//! 7. with FUA, flush (group commit) before acknowledging.
//!
//! Marks do not survive a restart: a restarted server has dropped its open marks and their
//! copy-on-write areas (the snapshot coordinator then fails the snapshot and retries). Mark ids
//! and each chunk's last-written epoch do persist, so change lists keep working.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use blockfleet_core::ids::VolumeId;
use blockfleet_core::units::{
    check_range, chunk_count, chunks_covering, CHUNK, SECTOR, SECTORS_PER_CHUNK,
};
use blockfleet_proto::wire::MAX_IO;
use blockfleet_proto::{ChunkInfo, ErrorCode, VolumeStat};
use bytes::Bytes;
use thiserror::Error;
use tokio::sync::{OwnedRwLockWriteGuard, RwLock};

use crate::meta::{ChunkMeta, VolumeRecord};

mod marks;
mod replica;

/// A refused or failed operation, as it goes on the wire.
#[derive(Debug, Error)]
#[error("{message}")]
pub struct OpError {
    pub code: ErrorCode,
    pub message: String,
}

pub fn op_err(code: ErrorCode, message: impl Into<String>) -> OpError {
    OpError {
        code,
        message: message.into(),
    }
}

impl From<io::Error> for OpError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::StorageFull => op_err(
                ErrorCode::NoSpace,
                format!("no space left on the block server's disk ({e})"),
            ),
            _ => op_err(ErrorCode::Io, e.to_string()),
        }
    }
}

const STRIPES: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn info(m: &ChunkMeta) -> ChunkInfo {
    ChunkInfo {
        hydrated: m.hydrated,
        user_written: m.user_written,
        generation: m.generation,
        last_epoch: m.last_epoch,
    }
}

fn meta_of(i: &ChunkInfo) -> ChunkMeta {
    ChunkMeta {
        hydrated: i.hydrated,
        user_written: i.user_written,
        generation: i.generation,
        last_epoch: i.last_epoch,
    }
}

/// Bits of the units of `chunk` that `offset..offset+len` covers.
fn unit_bits(chunk: u64, offset: u64, len: u64) -> u128 {
    let start = chunk * CHUNK;
    let from = offset.max(start);
    let to = (offset + len).min(start + CHUNK);
    let (a, b) = ((from - start) / SECTOR, (to - start) / SECTOR);
    let ones = |n: u64| {
        if n >= 128 {
            u128::MAX
        } else {
            (1u128 << n) - 1
        }
    };
    ones(b) & !ones(a)
}

struct OpenMark {
    id: u64,
    cow_path: PathBuf,
    cow_file: Arc<File>,
    /// Chunk -> (its state at the mark, its slot in the cow file).
    cow: HashMap<u64, (ChunkMeta, u64)>,
    next_slot: u64,
}

struct VolState {
    chunks: Vec<ChunkMeta>,
    dirty_chunks: BTreeSet<u64>,
    epoch: u64,
    unclean_epoch: Option<u64>,
    /// Open marks, oldest first (at most `MAX_MARKS`).
    open: Vec<OpenMark>,
}

/// Open marks per volume: a snapshot set uploading and a copy of the volume (or two) can hold
/// cuts at once; each costs a copy of every chunk first written after it.
pub const MAX_MARKS: usize = 4;

struct Pause {
    id: u64,
    _gate: OwnedRwLockWriteGuard<()>,
    /// The mark taken during this pause, dropped if the pause times out.
    mark: Option<u64>,
}

pub struct Volume {
    pub id: VolumeId,
    pub size: u64,
    pub hydrating: bool,
    dir: PathBuf,
    file: Arc<File>,
    /// The extent file opened with O_DIRECT for hydration writes (None where the filesystem
    /// refuses it, e.g. tmpfs): bulk hydration bypasses the page cache, which it would only
    /// churn, and whose fresh-page copy was most of the hydration's CPU (docs/benchmarks.md).
    direct: Option<Arc<File>>,
    state: Mutex<VolState>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    gate: Arc<RwLock<()>>,
    pause: tokio::sync::Mutex<Option<Pause>>,
    pause_ids: AtomicU64,
    /// Written since the last fdatasync.
    dirty: AtomicBool,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Volume({}, {} bytes)", self.id, self.size)
    }
}

fn data_path(dir: &Path) -> PathBuf {
    dir.join("data")
}

/// I/O up to this size runs inline: a page-cache copy is cheaper than a hop to the blocking
/// pool (measured: the hop cost most of the 4 KiB random-write rate; 1 MiB inline hurt
/// sequential reads on two cores). Larger I/O moves off.
const INLINE_IO: usize = 256 * 1024;

/// Runs file I/O of `len` bytes: inline when small, else on the blocking pool.
async fn file_io<T: Send + 'static>(
    len: usize,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, OpError> {
    if len <= INLINE_IO {
        return f().map_err(OpError::from);
    }
    blocking(f).await
}

/// Memory and offset alignment O_DIRECT needs (the logical block size is at most a page).
const DIRECT_ALIGN: usize = 4096;

/// The file opened for O_DIRECT writes, or None where the filesystem does not support it.
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Writes each run of units of a chunk not set in `skip` at `chunk`'s place in `file`.
fn write_runs(file: &File, chunk: u64, data: &[u8], skip: u128) -> io::Result<()> {
    let mut u = 0u64;
    while u < SECTORS_PER_CHUNK {
        if skip >> u & 1 == 1 {
            u += 1;
            continue;
        }
        let start = u;
        while u < SECTORS_PER_CHUNK && skip >> u & 1 == 0 {
            u += 1;
        }
        let (a, b) = ((start * SECTOR) as usize, (u * SECTOR) as usize);
        file.write_all_at(&data[a..b], chunk * CHUNK + start * SECTOR)?;
    }
    Ok(())
}

/// A whole chunk's data, or none (zeros).
fn check_whole_chunk(data: &[u8], what: &str) -> Result<(), OpError> {
    if !data.is_empty() && data.len() as u64 != CHUNK {
        return Err(op_err(
            ErrorCode::BadRequest,
            format!(
                "{what} whole chunks of {CHUNK} bytes (or none, for zeros), got {}",
                data.len()
            ),
        ));
    }
    Ok(())
}

/// Runs blocking file I/O off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| op_err(ErrorCode::Io, format!("I/O task failed: {e}")))?
        .map_err(OpError::from)
}

impl Volume {
    /// Creates the volume's directory and sparse extent file.
    pub fn create_files(dir: &Path, size: u64) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        let f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(data_path(dir))?;
        f.set_len(size)?;
        f.sync_all()?;
        blockfleet_core::fsutil::sync_dir(dir)?;
        blockfleet_core::fsutil::sync_dir(dir.parent().unwrap_or(dir))
    }

    /// Opens a registered volume; drops copy-on-write debris of a previous run.
    pub fn open(
        id: VolumeId,
        dir: PathBuf,
        rec: &VolumeRecord,
        stored: std::collections::BTreeMap<u64, ChunkMeta>,
    ) -> Result<Self, String> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(data_path(&dir))
            .map_err(|e| format!("extent file: {e}"))?;
        let direct = if rec.hydrating {
            open_direct(&data_path(&dir)).map(Arc::new)
        } else {
            None
        };
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        if len != rec.size {
            return Err(format!(
                "extent file is {len} bytes, the volume {} bytes",
                rec.size
            ));
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("cow-") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let n = chunk_count(rec.size) as usize;
        let mut chunks = vec![ChunkMeta::default(); n];
        for (c, m) in stored {
            let slot = chunks
                .get_mut(c as usize)
                .ok_or_else(|| format!("chunk state for chunk {c} beyond the volume"))?;
            *slot = m;
        }
        Ok(Volume {
            id,
            size: rec.size,
            hydrating: rec.hydrating,
            dir,
            file: Arc::new(file),
            direct,
            state: Mutex::new(VolState {
                chunks,
                dirty_chunks: BTreeSet::new(),
                epoch: rec.epoch,
                unclean_epoch: rec.unclean_epoch,
                open: Vec::new(),
            }),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            gate: Arc::new(RwLock::new(())),
            pause: tokio::sync::Mutex::new(None),
            pause_ids: AtomicU64::new(1),
            dirty: AtomicBool::new(false),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn record(&self) -> VolumeRecord {
        let st = lock(&self.state);
        VolumeRecord {
            size: self.size,
            hydrating: self.hydrating,
            epoch: st.epoch,
            unclean_epoch: st.unclean_epoch,
        }
    }

    /// Records that this run started without a clean shutdown.
    pub fn set_unclean(&self) {
        let mut st = lock(&self.state);
        st.unclean_epoch = Some(st.epoch);
    }

    fn check_io(&self, offset: u64, len: u64) -> Result<(), OpError> {
        if offset % SECTOR != 0 || len % SECTOR != 0 {
            return Err(op_err(
                ErrorCode::Unaligned,
                format!("offset {offset} and length {len} must be multiples of {SECTOR}"),
            ));
        }
        if len == 0 || len > u64::from(MAX_IO) {
            return Err(op_err(
                ErrorCode::BadRequest,
                format!("length {len} must be 1 to {MAX_IO} bytes"),
            ));
        }
        check_range(offset, len, self.size)
            .map_err(|e| op_err(ErrorCode::OutOfRange, format!("{}: {e}", self.id)))?;
        Ok(())
    }

    fn check_chunk(&self, chunk: u64) -> Result<(), OpError> {
        if chunk >= chunk_count(self.size) {
            return Err(op_err(
                ErrorCode::OutOfRange,
                format!(
                    "chunk {chunk} beyond the {} chunks of {}",
                    chunk_count(self.size),
                    self.id
                ),
            ));
        }
        Ok(())
    }

    async fn lock_stripes(
        &self,
        chunks: std::ops::Range<u64>,
    ) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let set: BTreeSet<usize> = chunks.map(|c| (c % STRIPES as u64) as usize).collect();
        let mut guards = Vec::with_capacity(set.len());
        for s in set {
            guards.push(self.stripes[s].lock().await);
        }
        guards
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, OpError> {
        self.check_io(offset, u64::from(len))?;
        if self.hydrating {
            self.check_hydrated(offset, u64::from(len))?;
        }
        let file = Arc::clone(&self.file);
        file_io(len as usize, move || {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    /// Refuses a read of units that hydration has not filled and the user has not written: the
    /// block server does not hold their data yet (the host agent fetches it on demand).
    fn check_hydrated(&self, offset: u64, len: u64) -> Result<(), OpError> {
        let chunks = chunks_covering(offset, len)
            .map_err(|e| op_err(ErrorCode::OutOfRange, e.to_string()))?;
        let st = lock(&self.state);
        for c in chunks {
            let m = &st.chunks[c as usize];
            if !m.hydrated && unit_bits(c, offset, len) & !m.user_written != 0 {
                return Err(op_err(
                    ErrorCode::NotHydrated,
                    format!("chunk {c} of {} is not hydrated yet", self.id),
                ));
            }
        }
        Ok(())
    }

    /// Up to `limit` (at most 65536) chunks at or after `from` not hydrated yet.
    pub fn unhydrated_chunks(&self, from: u64, limit: u32) -> Vec<u64> {
        if !self.hydrating {
            return Vec::new();
        }
        let st = lock(&self.state);
        let from = from.min(st.chunks.len() as u64) as usize;
        st.chunks[from..]
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.hydrated)
            .map(|(i, _)| (from + i) as u64)
            .take(limit.min(65536) as usize)
            .collect()
    }

    /// Copies aside, for every open mark, each chunk of `chunks` it has not copied yet. The
    /// caller holds the chunks' stripe locks.
    async fn copy_on_write(&self, chunks: std::ops::Range<u64>) -> Result<(), OpError> {
        for c in chunks {
            loop {
                let (mark_id, cow_file, slot, meta) = {
                    let mut guard = lock(&self.state);
                    let st = &mut *guard;
                    let Some(m) = st.open.iter_mut().find(|m| !m.cow.contains_key(&c)) else {
                        break;
                    };
                    m.next_slot += 1;
                    (
                        m.id,
                        Arc::clone(&m.cow_file),
                        m.next_slot - 1,
                        st.chunks[c as usize],
                    )
                };
                if info(&meta).has_data() {
                    let file = Arc::clone(&self.file);
                    blocking(move || {
                        let mut buf = vec![0u8; CHUNK as usize];
                        file.read_exact_at(&mut buf, c * CHUNK)?;
                        cow_file.write_all_at(&buf, slot * CHUNK)
                    })
                    .await?;
                }
                let mut st = lock(&self.state);
                match st.open.iter_mut().find(|m| m.id == mark_id) {
                    Some(m) => {
                        m.cow.insert(c, (meta, slot));
                    }
                    // Released meanwhile: nothing to keep.
                    None => continue,
                }
            }
        }
        Ok(())
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), OpError> {
        let len = data.len() as u64;
        self.check_io(offset, len)?;
        let _gate = self.gate.read().await;
        let chunks = chunks_covering(offset, len)
            .map_err(|e| op_err(ErrorCode::OutOfRange, e.to_string()))?;
        let _stripes = self.lock_stripes(chunks.clone()).await;
        self.copy_on_write(chunks.clone()).await?;
        let file = Arc::clone(&self.file);
        file_io(data.len(), move || file.write_all_at(&data, offset)).await?;
        let mut st = lock(&self.state);
        let epoch = st.epoch;
        for c in chunks {
            let m = &mut st.chunks[c as usize];
            m.generation += 1;
            m.last_epoch = epoch;
            if self.hydrating && !m.hydrated {
                m.user_written |= unit_bits(c, offset, len);
            }
            st.dirty_chunks.insert(c);
        }
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Writes a whole chunk except the units the user has written; returns those units (all
    /// ones if the chunk was already hydrated, in which case nothing is written).
    pub async fn write_if_unwritten(&self, chunk: u64, data: Bytes) -> Result<u128, OpError> {
        if !self.hydrating {
            return Err(op_err(
                ErrorCode::BadRequest,
                format!("{} is not a hydrating volume", self.id),
            ));
        }
        self.check_chunk(chunk)?;
        check_whole_chunk(&data, "hydration writes")?;
        let _gate = self.gate.read().await;
        let _stripes = self.lock_stripes(chunk..chunk + 1).await;
        self.copy_on_write(chunk..chunk + 1).await?;
        let skip = {
            let st = lock(&self.state);
            let m = st.chunks[chunk as usize];
            if m.hydrated {
                return Ok(u128::MAX);
            }
            m.user_written
        };
        let file = Arc::clone(&self.file);
        let direct = self.direct.clone();
        // A zero chunk: the units the user has not written are holes already (a hydrating
        // chunk is written only by the user), and a hole reads as a zero unit.
        blocking(move || {
            if data.is_empty() {
                return Ok(());
            }
            if let Some(d) = direct {
                // O_DIRECT wants page-aligned memory: copy into an aligned window.
                let mut buf = vec![0u8; CHUNK as usize + DIRECT_ALIGN];
                let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
                let window = &mut buf[at..at + CHUNK as usize];
                window.copy_from_slice(&data);
                match write_runs(&d, chunk, window, skip) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    r => return r,
                }
            }
            write_runs(&file, chunk, &data, skip)
        })
        .await?;
        let mut st = lock(&self.state);
        // Hydration changes no version's order: a replica that missed it differs only in
        // `hydrated`, which `ChunkInfo::version` counts.
        st.chunks[chunk as usize].hydrated = true;
        st.dirty_chunks.insert(chunk);
        self.dirty.store(true, Ordering::Release);
        Ok(skip)
    }

    pub fn chunk_state(&self, chunk: u64) -> Result<ChunkInfo, OpError> {
        self.check_chunk(chunk)?;
        Ok(info(&lock(&self.state).chunks[chunk as usize]))
    }

    pub async fn stat(&self) -> VolumeStat {
        let paused = self.pause.lock().await.is_some();
        let st = lock(&self.state);
        VolumeStat {
            size: self.size,
            hydrating: self.hydrating,
            open_mark: st.open.last().map_or(0, |m| m.id),
            paused,
            unhydrated: if self.hydrating {
                st.chunks.iter().filter(|m| !m.hydrated).count() as u64
            } else {
                0
            },
        }
    }

    /// For a flush: fdatasyncs the extent if written since the last sync, and hands over the
    /// chunk states changed since.
    /// Returns whether it synced, and the changed states.
    pub fn sync(&self) -> io::Result<(bool, Vec<(u64, ChunkMeta)>)> {
        let synced = self.dirty.swap(false, Ordering::AcqRel);
        if synced {
            if let Err(e) = self.file.sync_data() {
                self.dirty.store(true, Ordering::Release);
                return Err(e);
            }
        }
        let mut st = lock(&self.state);
        let dirty = std::mem::take(&mut st.dirty_chunks);
        Ok((
            synced,
            dirty
                .into_iter()
                .map(|c| (c, st.chunks[c as usize]))
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_bits_cover_exactly() {
        assert_eq!(unit_bits(0, 0, SECTOR), 1);
        assert_eq!(unit_bits(0, SECTOR, 2 * SECTOR), 0b110);
        assert_eq!(unit_bits(0, 0, CHUNK), u128::MAX);
        assert_eq!(unit_bits(1, 0, 2 * CHUNK), u128::MAX);
        assert_eq!(unit_bits(1, CHUNK - SECTOR, 2 * SECTOR), 1);
        assert_eq!(unit_bits(0, CHUNK - SECTOR, 2 * SECTOR), 1 << 127);
    }
}
