//! Raw disk images in and out of the snapshot archive.
//!
//! Import reads the image chunk by chunk (512 KiB, pread at the chunk's offset), skips all-zero
//! chunks, hashes the rest, and uploads each chunk the store does not hold yet; at most
//! `concurrency` chunks are in flight, which bounds memory. The manifest is written last, and
//! only if every chunk is stored: a failed import leaves no snapshot (at most some unreferenced
//! chunks, which are whole objects and which garbage collection removes).
//!
//! Export writes to a temporary file beside the target, verifies every chunk's sha256 as it
//! arrives, leaves never-written and zero chunks as holes, then fsyncs and renames: the target
//! is the whole snapshot or untouched.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blockfleet_core::fsutil::{sync_dir, temp_sibling};
use blockfleet_core::ids::SnapshotId;
use blockfleet_core::units::{check_volume_size, chunk_count, UnitError, CHUNK};
use blockfleet_snapshot_format::chunk::is_zero;
use blockfleet_snapshot_format::{Archive, ChunkHash, Manifest, SnapshotError};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use thiserror::Error;

use crate::progress::Progress;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("cannot open image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("image {path}: {source}")]
    Size {
        path: PathBuf,
        #[source]
        source: UnitError,
    },
    #[error("reading image {path} at offset {offset}: {source}")]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists (pass --force to replace it)")]
    Exists { path: PathBuf },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("chunk {index} of snapshot {snapshot_id}: {source}")]
    Chunk {
        snapshot_id: SnapshotId,
        index: u64,
        #[source]
        source: SnapshotError,
    },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("internal task failed: {0}")]
    Task(String),
}

#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Chunks already in the parent are not looked up or uploaded again.
    pub parent: Option<SnapshotId>,
    pub description: String,
    /// Chunks in flight at once.
    pub concurrency: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub snapshot_id: SnapshotId,
    pub volume_size: u64,
    /// Chunk slots in the image.
    pub chunks: u64,
    /// All-zero chunks, not stored.
    pub zero_chunks: u64,
    /// Chunks written to the store by this import.
    pub uploaded_chunks: u64,
    /// Non-zero chunks the store already held (from the parent, another snapshot, or earlier
    /// in this image).
    pub deduplicated_chunks: u64,
    pub elapsed: Duration,
}

enum Outcome {
    Zero,
    Uploaded(ChunkHash),
    Deduplicated(ChunkHash),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked holder cannot leave a HashSet half-updated in a way that matters here.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn task_err(e: tokio::task::JoinError) -> ImageError {
    ImageError::Task(e.to_string())
}

/// Imports the raw image at `path` as a new snapshot.
pub async fn import_image(
    archive: &Archive,
    path: &Path,
    opts: &ImportOptions,
    progress: &dyn Progress,
) -> Result<ImportReport, ImageError> {
    let started = Instant::now();
    let file = File::open(path).map_err(|source| ImageError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| ImageError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ImageError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let size = meta.len();
    check_volume_size(size).map_err(|source| ImageError::Size {
        path: path.to_path_buf(),
        source,
    })?;
    // Hashes known to be stored or claimed by a task of this import: a chunk that repeats
    // within the image is uploaded once even when its copies are in flight together.
    let known: HashSet<ChunkHash> = match &opts.parent {
        Some(parent) => archive
            .get_manifest(parent)
            .await?
            .chunks
            .into_values()
            .collect(),
        None => HashSet::new(),
    };
    let snapshot_id = SnapshotId::generate();
    tracing::info!(%snapshot_id, path = %path.display(), size, "importing image");
    progress.start(size);

    let file = Arc::new(file);
    let claimed = &Mutex::new(known);
    let mut outcomes = futures::stream::iter(0..chunk_count(size))
        .map(|index| {
            let file = Arc::clone(&file);
            async move {
                let offset = index * CHUNK;
                let len = CHUNK.min(size - offset);
                let read = tokio::task::spawn_blocking(move || {
                    // The last chunk of an image that is not a whole number of chunks is
                    // stored padded with zeros: every stored chunk is exactly CHUNK bytes.
                    let mut buf = vec![0u8; CHUNK as usize];
                    file.read_exact_at(&mut buf[..len as usize], offset)?;
                    if is_zero(&buf) {
                        return Ok(None);
                    }
                    let hash = ChunkHash::of(&buf);
                    Ok(Some((Bytes::from(buf), hash)))
                })
                .await
                .map_err(task_err)?
                .map_err(|source| ImageError::Read {
                    path: path.to_path_buf(),
                    offset,
                    source,
                })?;
                let outcome = match read {
                    None => Outcome::Zero,
                    Some((_, hash)) if !lock(claimed).insert(hash) => Outcome::Deduplicated(hash),
                    Some((data, hash)) => {
                        if archive.has_chunk(&hash).await? {
                            Outcome::Deduplicated(hash)
                        } else {
                            archive.put_chunk(&hash, data).await?;
                            Outcome::Uploaded(hash)
                        }
                    }
                };
                progress.advance(len);
                Ok::<_, ImageError>((index, outcome))
            }
        })
        .buffer_unordered(opts.concurrency.max(1));

    let mut chunks = BTreeMap::new();
    let (mut zero, mut uploaded, mut dedup) = (0, 0, 0);
    while let Some((index, outcome)) = outcomes.try_next().await? {
        match outcome {
            Outcome::Zero => zero += 1,
            Outcome::Uploaded(h) => {
                uploaded += 1;
                chunks.insert(index, h);
            }
            Outcome::Deduplicated(h) => {
                dedup += 1;
                chunks.insert(index, h);
            }
        }
    }
    drop(outcomes);

    let manifest = Manifest {
        snapshot_id: snapshot_id.clone(),
        volume_size: size,
        parent: opts.parent.clone(),
        created_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        description: opts.description.clone(),
        encryption: None,
        chunks,
    };
    archive.put_manifest(&manifest).await?;
    tracing::info!(%snapshot_id, uploaded, dedup, zero, "import complete");
    Ok(ImportReport {
        snapshot_id,
        volume_size: size,
        chunks: chunk_count(size),
        zero_chunks: zero,
        uploaded_chunks: uploaded,
        deduplicated_chunks: dedup,
        elapsed: started.elapsed(),
    })
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Replace an existing file at the target path.
    pub force: bool,
    /// Chunks in flight at once.
    pub concurrency: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportReport {
    pub volume_size: u64,
    /// Chunks fetched and written (the rest are zero and left as holes).
    pub chunks_written: u64,
    pub elapsed: Duration,
}

/// Restores snapshot `id` to a raw image at `out`, bit-identical to what was imported.
pub async fn export_image(
    archive: &Archive,
    id: &SnapshotId,
    out: &Path,
    opts: &ExportOptions,
    progress: &dyn Progress,
) -> Result<ExportReport, ImageError> {
    let started = Instant::now();
    let manifest = archive.get_manifest(id).await?;
    match fs::symlink_metadata(out) {
        Ok(m) if !opts.force => {
            let _ = m;
            return Err(ImageError::Exists {
                path: out.to_path_buf(),
            });
        }
        Ok(m) if !m.is_file() => {
            return Err(ImageError::NotAFile {
                path: out.to_path_buf(),
            })
        }
        _ => {}
    }
    let tmp = temp_sibling(out);
    let write_err = |source| ImageError::Write {
        path: out.to_path_buf(),
        source,
    };
    let result = async {
        let file = File::create_new(&tmp).map_err(write_err)?;
        file.set_len(manifest.volume_size).map_err(write_err)?;
        let file = Arc::new(file);
        progress.start(manifest.stored_bytes());
        let size = manifest.volume_size;
        futures::stream::iter(manifest.chunks.iter())
            .map(|(&index, hash)| {
                let file = Arc::clone(&file);
                async move {
                    let data =
                        archive
                            .get_chunk(hash)
                            .await
                            .map_err(|source| ImageError::Chunk {
                                snapshot_id: id.clone(),
                                index,
                                source,
                            })?;
                    let offset = index * CHUNK;
                    let len = CHUNK.min(size - offset) as usize;
                    tokio::task::spawn_blocking(move || file.write_all_at(&data[..len], offset))
                        .await
                        .map_err(task_err)?
                        .map_err(write_err)?;
                    progress.advance(CHUNK);
                    Ok::<_, ImageError>(())
                }
            })
            .buffer_unordered(opts.concurrency.max(1))
            .try_collect::<()>()
            .await?;
        file.sync_all().map_err(write_err)?;
        fs::rename(&tmp, out).map_err(write_err)?;
        sync_dir(
            out.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        )
        .map_err(write_err)
    }
    .await;
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(ExportReport {
        volume_size: manifest.volume_size,
        chunks_written: manifest.chunks.len() as u64,
        elapsed: started.elapsed(),
    })
}
