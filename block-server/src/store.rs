//! Every volume of one block server, startup recovery, and group-committed flush.
//!
//! Layout under `data_dir`: `meta.sled/` (the metadata database) and `volumes/<vol-id>/data`
//! (the extent file; `cow-<mark>` beside it while a mark is open).
//!
//! Flush is group commit: a flush that arrives while another is syncing waits for it and then
//! returns at once if a sync that began after its arrival has completed, so any number of
//! concurrent flushes cost one fdatasync per dirty volume and one metadata flush.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use blockfleet_core::ids::VolumeId;
use blockfleet_core::units::CHUNK;
use blockfleet_proto::{ErrorCode, Request, Response};

use crate::config::BlockServerConfig;
use crate::meta::{Meta, MetaError, VolumeRecord};
use crate::metrics::{op_index, Metrics};
use crate::volume::{op_err, OpError, Volume};
use crate::BlockServerError;

/// Largest volume a server accepts (64 TiB, as EBS).
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    meta: Meta,
    volumes: RwLock<HashMap<VolumeId, Arc<Volume>>>,
    pause_timeout: Duration,
    admin: tokio::sync::Mutex<()>,
    flush_lock: tokio::sync::Mutex<()>,
    syncs_started: AtomicU64,
    syncs_done: AtomicU64,
    pub metrics: Metrics,
    /// Set when the disk is found full: the server then shuts down cleanly.
    full: tokio::sync::watch::Sender<bool>,
}

fn meta_err(e: impl std::fmt::Display) -> OpError {
    let message = format!("metadata: {e}");
    // sled reports a full disk as an I/O error of its own.
    let code = if message.contains("os error 28") {
        ErrorCode::NoSpace
    } else {
        ErrorCode::Io
    };
    op_err(code, message)
}

impl Store {
    /// Resolves once the disk has been found full.
    pub fn disk_full(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.full.subscribe();
        async move {
            let _ = rx.wait_for(|f| *f).await;
        }
    }

    pub fn is_disk_full(&self) -> bool {
        *self.full.borrow()
    }

    /// Opens the store, recovering from whatever a crash left: volume directories without a
    /// record are removed, open marks are gone, and an unclean shutdown is recorded per volume.
    pub fn open(config: &BlockServerConfig) -> Result<Self, BlockServerError> {
        let dir = config.data_dir.clone();
        let dir_err = |source| BlockServerError::DataDir {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir.join("volumes")).map_err(dir_err)?;
        let meta = Meta::open(&dir.join("meta.sled"))?;
        let clean = meta.was_clean()?;
        let corrupt =
            |volume: String, reason: String| BlockServerError::CorruptVolume { volume, reason };
        let mut volumes = HashMap::new();
        let records = meta
            .volumes()
            .map_err(|e| corrupt("(registry)".into(), e.to_string()))?;
        for (id, rec) in records {
            let chunks = meta
                .load_chunks(&id)
                .map_err(|e: MetaError| corrupt(id.to_string(), e.to_string()))?;
            let vol = Volume::open(
                id.clone(),
                dir.join("volumes").join(id.as_str()),
                &rec,
                chunks,
            )
            .map_err(|r| corrupt(id.to_string(), r))?;
            if !clean {
                vol.set_unclean();
                meta.put_volume(&id, &vol.record())?;
            }
            volumes.insert(id, Arc::new(vol));
        }
        for entry in std::fs::read_dir(dir.join("volumes"))
            .map_err(dir_err)?
            .flatten()
        {
            let registered = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<VolumeId>().ok())
                .is_some_and(|id| volumes.contains_key(&id));
            if !registered {
                tracing::warn!(path = %entry.path().display(), "removing unregistered volume directory");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        meta.set_clean(false)?;
        tracing::info!(volumes = volumes.len(), clean, dir = %dir.display(), "block store open");
        Ok(Store {
            dir,
            meta,
            volumes: RwLock::new(volumes),
            pause_timeout: Duration::from_millis(config.pause_timeout_ms),
            admin: tokio::sync::Mutex::new(()),
            flush_lock: tokio::sync::Mutex::new(()),
            syncs_started: AtomicU64::new(0),
            syncs_done: AtomicU64::new(0),
            metrics: Metrics::default(),
            full: tokio::sync::watch::channel(false).0,
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, HashMap<VolumeId, Arc<Volume>>> {
        self.volumes.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn volume(&self, id: &VolumeId) -> Result<Arc<Volume>, OpError> {
        self.map().get(id).cloned().ok_or_else(|| {
            op_err(
                ErrorCode::NoSuchVolume,
                format!("no volume {id} on this server"),
            )
        })
    }

    pub async fn create_volume(
        &self,
        id: &VolumeId,
        size: u64,
        hydrating: bool,
    ) -> Result<(), OpError> {
        if size == 0 || size % CHUNK != 0 || size > MAX_VOLUME_SIZE {
            return Err(op_err(
                ErrorCode::BadRequest,
                format!("volume size {size} must be a whole number of {CHUNK}-byte chunks, at most {MAX_VOLUME_SIZE}"),
            ));
        }
        let _admin = self.admin.lock().await;
        if self.map().contains_key(id) {
            return Err(op_err(
                ErrorCode::VolumeExists,
                format!("volume {id} already exists"),
            ));
        }
        let vdir = self.dir.join("volumes").join(id.as_str());
        let rec = VolumeRecord {
            size,
            hydrating,
            epoch: 0,
            unclean_epoch: None,
        };
        let (meta, id2, vdir2, rec2) = (self.meta.clone(), id.clone(), vdir.clone(), rec.clone());
        // Files first, then the record: a crash in between leaves a directory that startup removes.
        tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(&vdir2);
            Volume::create_files(&vdir2, size).map_err(OpError::from)?;
            meta.put_volume(&id2, &rec2).map_err(meta_err)
        })
        .await
        .map_err(meta_err)??;
        let vol = Volume::open(id.clone(), vdir, &rec, Default::default())
            .map_err(|r| op_err(ErrorCode::Io, r))?;
        self.volumes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), Arc::new(vol));
        tracing::info!(volume = %id, size, hydrating, "volume created");
        Ok(())
    }

    pub async fn delete_volume(&self, id: &VolumeId) -> Result<(), OpError> {
        let _admin = self.admin.lock().await;
        let vol = self.volume(id)?;
        let meta = self.meta.clone();
        let id2 = id.clone();
        // Record first, then files: a crash in between leaves a directory that startup removes.
        tokio::task::spawn_blocking(move || meta.delete_volume(&id2).map_err(meta_err))
            .await
            .map_err(meta_err)??;
        self.volumes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let _ = std::fs::remove_dir_all(vol.dir());
        tracing::info!(volume = %id, "volume deleted");
        Ok(())
    }

    /// Makes every write acknowledged so far durable, with their chunk state.
    pub async fn flush(&self) -> Result<(), OpError> {
        self.metrics.flushes.fetch_add(1, Ordering::Relaxed);
        let arrival = self.syncs_started.load(Ordering::Acquire);
        let _turn = self.flush_lock.lock().await;
        if self.syncs_done.load(Ordering::Acquire) > arrival {
            return Ok(()); // a sync that began after we arrived has covered us
        }
        let n = self.syncs_started.fetch_add(1, Ordering::AcqRel) + 1;
        let volumes: Vec<Arc<Volume>> = self.map().values().cloned().collect();
        let meta = self.meta.clone();
        let synced = tokio::task::spawn_blocking(move || -> Result<u64, OpError> {
            let mut fsyncs = 0;
            for v in &volumes {
                let (synced, changed) = v.sync()?;
                fsyncs += u64::from(synced);
                if !changed.is_empty() {
                    meta.stage_chunks(&v.id, &changed).map_err(meta_err)?;
                }
            }
            meta.flush().map_err(meta_err)?;
            Ok(fsyncs)
        })
        .await
        .map_err(meta_err)??;
        self.metrics.fsyncs.fetch_add(synced, Ordering::Relaxed);
        self.syncs_done.store(n, Ordering::Release);
        Ok(())
    }

    pub fn volume_count(&self) -> usize {
        self.map().len()
    }

    /// Serves one request, recording it in the metrics.
    pub async fn handle(&self, req: Request) -> Result<Response, OpError> {
        let op = op_index(&req);
        let written = match &req {
            Request::Write { data, .. }
            | Request::WriteIfUnwritten { data, .. }
            | Request::PutChunk { data, .. } => data.len() as u64,
            _ => 0,
        };
        let started = std::time::Instant::now();
        let result = self.dispatch(req).await;
        self.metrics.record(op, result.is_ok(), started.elapsed());
        if let Err(e) = &result {
            let op = crate::metrics::OPS[op];
            match e.code {
                ErrorCode::NoSpace => {
                    if !self.full.send_replace(true) {
                        tracing::error!(op, error = %e, dir = %self.dir.display(), "disk full: shutting down (in-flight requests finish, metadata is flushed as far as it fits)");
                    }
                }
                ErrorCode::Io => tracing::warn!(op, error = %e, "request failed"),
                _ => tracing::debug!(op, code = ?e.code, error = %e, "request refused"),
            }
        }
        match &result {
            Ok(Response::Data(d)) => {
                self.metrics
                    .bytes_read
                    .fetch_add(d.len() as u64, Ordering::Relaxed);
            }
            Ok(_) => {
                self.metrics
                    .bytes_written
                    .fetch_add(written, Ordering::Relaxed);
            }
            Err(_) => {}
        }
        result
    }

    async fn dispatch(&self, req: Request) -> Result<Response, OpError> {
        Ok(match req {
            Request::CreateVolume {
                volume,
                size,
                hydrating,
            } => {
                self.create_volume(&volume, size, hydrating).await?;
                Response::Done
            }
            Request::DeleteVolume { volume } => {
                self.delete_volume(&volume).await?;
                Response::Done
            }
            Request::StatVolume { volume } => Response::Stat(self.volume(&volume)?.stat().await),
            Request::Read {
                volume,
                offset,
                len,
            } => Response::Data(self.volume(&volume)?.read(offset, len).await?),
            Request::Write {
                volume,
                offset,
                fua,
                data,
            } => {
                self.volume(&volume)?.write(offset, data).await?;
                if fua {
                    self.flush().await?;
                }
                Response::Done
            }
            Request::Flush { volume } => {
                self.volume(&volume)?;
                self.flush().await?;
                Response::Done
            }
            Request::WriteIfUnwritten {
                volume,
                chunk,
                data,
            } => Response::Skipped(
                self.volume(&volume)?
                    .write_if_unwritten(chunk, data)
                    .await?,
            ),
            Request::ChunkState { volume, chunk } => {
                Response::Chunk(self.volume(&volume)?.chunk_state(chunk)?)
            }
            Request::Pause { volume } => {
                self.volume(&volume)?.pause(self.pause_timeout).await?;
                Response::Done
            }
            Request::Mark { volume, id } => {
                let vol = self.volume(&volume)?;
                let meta = &self.meta;
                let id = vol
                    .mark(id, |rec| {
                        meta.put_volume_unsynced(&volume, &rec).map_err(meta_err)
                    })
                    .await?;
                self.metrics.marks.fetch_add(1, Ordering::Relaxed);
                Response::MarkId(id)
            }
            Request::Resume { volume } => {
                self.volume(&volume)?.resume().await?;
                Response::Done
            }
            Request::MarkResume { volume, id } => {
                let vol = self.volume(&volume)?;
                let meta = &self.meta;
                let marked = vol
                    .mark(id, |rec| {
                        meta.put_volume_unsynced(&volume, &rec).map_err(meta_err)
                    })
                    .await;
                // Resumed whatever the mark did: a paused volume stalls its instance.
                let resumed = vol.resume().await;
                let id = marked?;
                if let Err(e) = resumed {
                    let _ = vol.release_mark(id);
                    return Err(e);
                }
                self.metrics.marks.fetch_add(1, Ordering::Relaxed);
                Response::MarkId(id)
            }
            Request::ReadMark {
                volume,
                mark,
                chunk,
            } => {
                let (info, data) = self.volume(&volume)?.read_mark(mark, chunk).await?;
                Response::MarkChunk { info, data }
            }
            Request::ListChangedChunks {
                volume,
                base,
                target,
            } => Response::Chunks(self.volume(&volume)?.changed_chunks(base, target)?),
            Request::ReleaseMark { volume, mark } => {
                self.volume(&volume)?.release_mark(mark)?;
                Response::Done
            }
            Request::UnhydratedChunks {
                volume,
                from,
                limit,
            } => Response::Chunks(self.volume(&volume)?.unhydrated_chunks(from, limit)),
            Request::ChunkVersions {
                volume,
                mark,
                from,
                limit,
            } => Response::Chunks(self.volume(&volume)?.chunk_versions(mark, from, limit)?),
            Request::ResetChunks { volume, chunks } => {
                self.volume(&volume)?.reset_chunks(&chunks).await?;
                self.flush().await?;
                Response::Done
            }
            Request::PutChunk {
                volume,
                chunk,
                expect,
                info,
                data,
            } => {
                self.volume(&volume)?
                    .put_chunk(chunk, expect, info, data)
                    .await?;
                Response::Done
            }
            Request::ChunkDigest { volume, chunk } => {
                let (info, digest) = self.volume(&volume)?.chunk_digest(chunk).await?;
                Response::Digest { info, digest }
            }
            Request::AdoptChunk {
                volume,
                chunk,
                digest,
                info,
            } => {
                self.volume(&volume)?
                    .adopt_chunk(chunk, digest, info)
                    .await?;
                Response::Done
            }
            // The connection answers it (server.rs): it never reaches the store.
            Request::Authorize { .. } | Request::Revoke { .. } => {
                return Err(op_err(
                    ErrorCode::BadRequest,
                    "Authorize and Revoke are answered by the connection",
                ))
            }
        })
    }

    /// Flushes everything and records a clean shutdown.
    pub async fn close(&self) -> Result<(), BlockServerError> {
        self.flush()
            .await
            .map_err(|e| BlockServerError::Io(std::io::Error::other(e.message)))?;
        self.meta.set_clean(true)?;
        tracing::info!("block store closed cleanly");
        Ok(())
    }
}
