//! A pipelined block-protocol client: any number of tasks call it at once; each request gets an
//! id, goes out as one frame, and its reply (which may come back in any order) is matched by id.

use blockfleet_core::token::TokenKey;

use crate::grant::Grant;

/// How long a capability the client issues itself may wait before it is presented (it is checked once, when
/// presented; the connection keeps the right until it closes).
pub const ADMIN_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(60);

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot};

use crate::transport::{default_transport, BoxRead, BoxWrite, Transport};

use super::wire::{
    check_frame_len, decode_hello, decode_response, decode_response_bytes, encode_hello, ChunkInfo,
    ErrorCode, Request, Response, VolumeStat, PROTOCOL_VERSION,
};
use blockfleet_core::ids::VolumeId;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to block server {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("block server {addr} refused the handshake: {reason}")]
    Handshake { addr: String, reason: String },
    #[error("block server: {code:?}: {message}")]
    Server { code: ErrorCode, message: String },
    #[error("connection to block server {addr} lost: {reason}")]
    ConnectionLost { addr: String, reason: String },
    /// Too few replicas of a volume answered for the request to be safe.
    #[error("{volume}: {have} of the {need} replicas needed answered: {detail}")]
    Quorum {
        volume: String,
        have: usize,
        need: usize,
        detail: String,
    },
    #[error("block server sent {got} in reply to {request}")]
    UnexpectedReply {
        request: &'static str,
        got: &'static str,
    },
}

impl ClientError {
    /// The server's error code, if the server refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

type Reply = Result<Response, ClientError>;

#[derive(Debug)]
struct Shared {
    addr: String,
    next_id: AtomicU64,
    /// Waiting callers by request id; `None` once the connection is gone, with the reason.
    pending: Mutex<Result<HashMap<u64, oneshot::Sender<Reply>>, String>>,
}

impl Shared {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Result<HashMap<u64, oneshot::Sender<Reply>>, String>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lost(&self, reason: String) -> ClientError {
        ClientError::ConnectionLost {
            addr: self.addr.clone(),
            reason,
        }
    }

    /// Fails every waiting caller and refuses new ones.
    fn close(&self, reason: String) {
        let old = std::mem::replace(&mut *self.lock(), Err(reason.clone()));
        if let Ok(waiting) = old {
            for (_, tx) in waiting {
                let _ = tx.send(Err(self.lost(reason.clone())));
            }
        }
    }
}

/// A connection to one block server. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct BlockClient {
    shared: Arc<Shared>,
    /// Frames to send; one writer task batches whatever is queued into one syscall.
    outgoing: mpsc::UnboundedSender<(Bytes, Option<Bytes>)>,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl Drop for BlockClient {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> Result<Bytes, String> {
    let len = r.read_u32_le().await.map_err(|e| e.to_string())?;
    let len = check_frame_len(len).map_err(|e| e.to_string())?;
    let mut body = Vec::with_capacity(len);
    let got = (&mut *r)
        .take(len as u64)
        .read_to_end(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    if got != len {
        return Err(format!("truncated frame: {got} of {len} bytes"));
    }
    Ok(Bytes::from(body))
}

impl BlockClient {
    /// Connects over this process's transport (`transport::default_transport`) and
    /// completes the versioned handshake.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        Self::connect_with(addr, &default_transport()).await
    }

    /// Connects over `transport` and completes the versioned handshake.
    pub async fn connect_with(addr: &str, transport: &Transport) -> Result<Self, ClientError> {
        let (mut r, mut w) =
            transport
                .connect(addr)
                .await
                .map_err(|source| ClientError::Connect {
                    addr: addr.to_owned(),
                    source,
                })?;
        let handshake = |reason: String| ClientError::Handshake {
            addr: addr.to_owned(),
            reason,
        };
        w.write_all(&encode_hello(PROTOCOL_VERSION))
            .await
            .map_err(|e| handshake(e.to_string()))?;
        w.flush().await.map_err(|e| handshake(e.to_string()))?;
        let body = read_frame(&mut r).await.map_err(handshake)?;
        match decode_hello(&body) {
            Ok(PROTOCOL_VERSION) => {}
            Ok(v) => {
                return Err(handshake(format!(
                    "server speaks version {v}, we speak {PROTOCOL_VERSION}"
                )))
            }
            Err(_) => {
                let reason = match decode_response(&body) {
                    Ok((_, Err((_, message)))) => message,
                    _ => "not a blockfleet block server".to_owned(),
                };
                return Err(handshake(reason));
            }
        }
        let shared = Arc::new(Shared {
            addr: addr.to_owned(),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(Ok(HashMap::new())),
        });
        let reader = tokio::spawn(Self::read_loop(
            Arc::clone(&shared),
            BufReader::with_capacity(256 * 1024, r),
        ));
        let (outgoing, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(Self::write_loop(
            Arc::clone(&shared),
            BufWriter::with_capacity(256 * 1024, w),
            rx,
        ));
        Ok(BlockClient {
            shared,
            outgoing,
            reader,
            writer,
        })
    }

    async fn write_loop(
        shared: Arc<Shared>,
        mut w: BufWriter<BoxWrite>,
        mut rx: mpsc::UnboundedReceiver<(Bytes, Option<Bytes>)>,
    ) {
        while let Some((head, payload)) = rx.recv().await {
            let mut result = w.write_all(&head).await;
            if let (Ok(()), Some(p)) = (&result, payload) {
                result = w.write_all(&p).await;
            }
            if result.is_ok() && rx.is_empty() {
                result = w.flush().await;
            }
            if let Err(e) = result {
                shared.close(e.to_string());
                return;
            }
        }
    }

    async fn read_loop(shared: Arc<Shared>, mut r: BufReader<BoxRead>) {
        let reason = loop {
            let body = match read_frame(&mut r).await {
                Ok(b) => b,
                Err(e) => break e,
            };
            let (id, result) = match decode_response_bytes(&body) {
                Ok(x) => x,
                Err(e) => break format!("undecodable reply: {e}"),
            };
            let waiter = match &mut *shared.lock() {
                Ok(map) => map.remove(&id),
                Err(_) => None,
            };
            if let Some(tx) = waiter {
                let _ = tx
                    .send(result.map_err(|(code, message)| ClientError::Server { code, message }));
            }
        };
        shared.close(reason);
    }

    /// Sends one request and waits for its reply.
    pub async fn call(&self, req: Request) -> Result<Response, ClientError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match &mut *self.shared.lock() {
            Ok(map) => {
                map.insert(id, tx);
            }
            Err(reason) => return Err(self.shared.lost(reason.clone())),
        }
        if self.outgoing.send(req.encode_parts(id)).is_err() {
            self.shared.close("writer stopped".into());
        }
        rx.await
            .unwrap_or_else(|_| Err(self.shared.lost("reply channel closed".into())))
    }

    /// Presents a capability for this connection (see [`Request::Authorize`]).
    pub async fn authorize(&self, grant: &Grant) -> Result<(), ClientError> {
        self.done(grant.to_request(), "Authorize").await
    }

    /// Takes `holder`'s rights on `volume` (see [`Request::Revoke`]).
    pub async fn revoke(&self, volume: &VolumeId, holder: &str) -> Result<(), ClientError> {
        self.done(
            Request::Revoke {
                volume: volume.clone(),
                holder: holder.to_owned(),
            },
            "Revoke",
        )
        .await
    }

    /// Issues a capability for every right on every volume under `key` (the control plane's,
    /// or a test's) and presents it.
    pub async fn authorize_admin(&self, key: &TokenKey, holder: &str) -> Result<(), ClientError> {
        let grant = Grant::issue(key, None, crate::wire::rights::ALL, holder, ADMIN_TOKEN_TTL);
        self.authorize(&grant).await
    }

    pub async fn create_volume(
        &self,
        volume: &VolumeId,
        size: u64,
        hydrating: bool,
    ) -> Result<(), ClientError> {
        self.done(
            Request::CreateVolume {
                volume: volume.clone(),
                size,
                hydrating,
            },
            "CreateVolume",
        )
        .await
    }

    pub async fn delete_volume(&self, volume: &VolumeId) -> Result<(), ClientError> {
        self.done(
            Request::DeleteVolume {
                volume: volume.clone(),
            },
            "DeleteVolume",
        )
        .await
    }

    pub async fn stat_volume(&self, volume: &VolumeId) -> Result<VolumeStat, ClientError> {
        match self
            .call(Request::StatVolume {
                volume: volume.clone(),
            })
            .await?
        {
            Response::Stat(s) => Ok(s),
            other => Err(unexpected("StatVolume", &other)),
        }
    }

    pub async fn read(
        &self,
        volume: &VolumeId,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, ClientError> {
        match self
            .call(Request::Read {
                volume: volume.clone(),
                offset,
                len,
            })
            .await?
        {
            Response::Data(d) => Ok(d),
            other => Err(unexpected("Read", &other)),
        }
    }

    pub async fn write(
        &self,
        volume: &VolumeId,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), ClientError> {
        self.done(
            Request::Write {
                volume: volume.clone(),
                offset,
                fua,
                data,
            },
            "Write",
        )
        .await
    }

    pub async fn flush(&self, volume: &VolumeId) -> Result<(), ClientError> {
        self.done(
            Request::Flush {
                volume: volume.clone(),
            },
            "Flush",
        )
        .await
    }

    /// Returns the units left alone because the user wrote them.
    pub async fn write_if_unwritten(
        &self,
        volume: &VolumeId,
        chunk: u64,
        data: Bytes,
    ) -> Result<u128, ClientError> {
        match self
            .call(Request::WriteIfUnwritten {
                volume: volume.clone(),
                chunk,
                data,
            })
            .await?
        {
            Response::Skipped(s) => Ok(s),
            other => Err(unexpected("WriteIfUnwritten", &other)),
        }
    }

    /// Up to `limit` unhydrated chunks at or after `from`.
    pub async fn unhydrated_chunks(
        &self,
        volume: &VolumeId,
        from: u64,
        limit: u32,
    ) -> Result<Vec<u64>, ClientError> {
        match self
            .call(Request::UnhydratedChunks {
                volume: volume.clone(),
                from,
                limit,
            })
            .await?
        {
            Response::Chunks(c) => Ok(c),
            other => Err(unexpected("UnhydratedChunks", &other)),
        }
    }

    pub async fn chunk_state(
        &self,
        volume: &VolumeId,
        chunk: u64,
    ) -> Result<ChunkInfo, ClientError> {
        match self
            .call(Request::ChunkState {
                volume: volume.clone(),
                chunk,
            })
            .await?
        {
            Response::Chunk(i) => Ok(i),
            other => Err(unexpected("ChunkState", &other)),
        }
    }

    pub async fn pause(&self, volume: &VolumeId) -> Result<(), ClientError> {
        self.done(
            Request::Pause {
                volume: volume.clone(),
            },
            "Pause",
        )
        .await
    }

    /// Takes mark `id` (0: the server picks the next id).
    pub async fn mark(&self, volume: &VolumeId, id: u64) -> Result<u64, ClientError> {
        match self
            .call(Request::Mark {
                volume: volume.clone(),
                id,
            })
            .await?
        {
            Response::MarkId(m) => Ok(m),
            other => Err(unexpected("Mark", &other)),
        }
    }

    /// Marks a paused volume and resumes it in one round trip (resumed even if the mark fails).
    pub async fn mark_resume(&self, volume: &VolumeId, id: u64) -> Result<u64, ClientError> {
        match self
            .call(Request::MarkResume {
                volume: volume.clone(),
                id,
            })
            .await?
        {
            Response::MarkId(m) => Ok(m),
            other => Err(unexpected("MarkResume", &other)),
        }
    }

    pub async fn resume(&self, volume: &VolumeId) -> Result<(), ClientError> {
        self.done(
            Request::Resume {
                volume: volume.clone(),
            },
            "Resume",
        )
        .await
    }

    pub async fn read_mark(
        &self,
        volume: &VolumeId,
        mark: u64,
        chunk: u64,
    ) -> Result<(ChunkInfo, Bytes), ClientError> {
        match self
            .call(Request::ReadMark {
                volume: volume.clone(),
                mark,
                chunk,
            })
            .await?
        {
            Response::MarkChunk { info, data } => Ok((info, data)),
            other => Err(unexpected("ReadMark", &other)),
        }
    }

    pub async fn list_changed_chunks(
        &self,
        volume: &VolumeId,
        base: u64,
        target: u64,
    ) -> Result<Vec<u64>, ClientError> {
        match self
            .call(Request::ListChangedChunks {
                volume: volume.clone(),
                base,
                target,
            })
            .await?
        {
            Response::Chunks(c) => Ok(c),
            other => Err(unexpected("ListChangedChunks", &other)),
        }
    }

    pub async fn release_mark(&self, volume: &VolumeId, mark: u64) -> Result<(), ClientError> {
        self.done(
            Request::ReleaseMark {
                volume: volume.clone(),
                mark,
            },
            "ReleaseMark",
        )
        .await
    }

    /// Versions of chunks `from..from+limit` at mark `mark` (0: now).
    pub async fn chunk_versions(
        &self,
        volume: &VolumeId,
        mark: u64,
        from: u64,
        limit: u32,
    ) -> Result<Vec<u64>, ClientError> {
        match self
            .call(Request::ChunkVersions {
                volume: volume.clone(),
                mark,
                from,
                limit,
            })
            .await?
        {
            Response::Chunks(c) => Ok(c),
            other => Err(unexpected("ChunkVersions", &other)),
        }
    }

    pub async fn reset_chunks(
        &self,
        volume: &VolumeId,
        chunks: Vec<u64>,
    ) -> Result<(), ClientError> {
        self.done(
            Request::ResetChunks {
                volume: volume.clone(),
                chunks,
            },
            "ResetChunks",
        )
        .await
    }

    pub async fn put_chunk(
        &self,
        volume: &VolumeId,
        chunk: u64,
        expect: u64,
        info: ChunkInfo,
        data: Bytes,
    ) -> Result<(), ClientError> {
        self.done(
            Request::PutChunk {
                volume: volume.clone(),
                chunk,
                expect,
                info,
                data,
            },
            "PutChunk",
        )
        .await
    }

    /// A chunk's state and the SHA-256 of its data.
    pub async fn chunk_digest(
        &self,
        volume: &VolumeId,
        chunk: u64,
    ) -> Result<(ChunkInfo, [u8; 32]), ClientError> {
        match self
            .call(Request::ChunkDigest {
                volume: volume.clone(),
                chunk,
            })
            .await?
        {
            Response::Digest { info, digest } => Ok((info, digest)),
            other => Err(unexpected("ChunkDigest", &other)),
        }
    }

    /// Gives a chunk state `info` if its data hash to `digest` (else `VersionMismatch`).
    pub async fn adopt_chunk(
        &self,
        volume: &VolumeId,
        chunk: u64,
        digest: [u8; 32],
        info: ChunkInfo,
    ) -> Result<(), ClientError> {
        self.done(
            Request::AdoptChunk {
                volume: volume.clone(),
                chunk,
                digest,
                info,
            },
            "AdoptChunk",
        )
        .await
    }

    pub fn addr(&self) -> &str {
        &self.shared.addr
    }

    /// Whether the connection is gone (the server closed it, or a send failed).
    pub fn is_closed(&self) -> bool {
        self.shared.lock().is_err()
    }

    async fn done(&self, req: Request, name: &'static str) -> Result<(), ClientError> {
        match self.call(req).await? {
            Response::Done => Ok(()),
            other => Err(unexpected(name, &other)),
        }
    }
}

fn unexpected(request: &'static str, got: &Response) -> ClientError {
    let got = match got {
        Response::Done => "Done",
        Response::Stat(_) => "Stat",
        Response::Data(_) => "Data",
        Response::Skipped(_) => "Skipped",
        Response::Chunk(_) => "Chunk",
        Response::MarkId(_) => "MarkId",
        Response::MarkChunk { .. } => "MarkChunk",
        Response::Chunks(_) => "Chunks",
        Response::Digest { .. } => "Digest",
    };
    ClientError::UnexpectedReply { request, got }
}
