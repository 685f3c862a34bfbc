//! Wire format of the block protocol (all integers little-endian).
//!
//! ```text
//! frame     = u32 length of body, body                  (length <= MAX_FRAME)
//! hello     = "BFBLOCK\0", u16 version                 client -> server, first frame
//! hello-ok  = "BFBLOCK\0", u16 version                 server -> client; or an error frame, then close
//! request   = u64 request id, u8 opcode, fields
//! response  = u64 request id, u8 status (0 = ok, else ErrorCode), fields | u16 len + message
//! ```
//!
//! Versions (bump on every change, one line each):
//! - V1: the first protocol: volumes, Read/Write(FUA)/Flush, WriteIfUnwritten, ChunkState,
//!   Pause/Mark/Resume/MarkResume/ReadMark/ListChangedChunks/ReleaseMark.
//! - V2: lazy hydration: `NotHydrated` error, `UnhydratedChunks`, `VolumeStat.unhydrated`,
//!   an empty `WriteIfUnwritten` hydrates a chunk as zeros.
//! - V3: replication: `Mark`/`MarkResume` carry the mark id the client wants (0: the server
//!   picks), `ReadMark` of mark 0 reads the live chunk, `ChunkInfo.last_epoch`,
//!   `ChunkVersions`, `ResetChunks`, `PutChunk` and the `VersionMismatch` error; hydration no
//!   longer bumps a chunk's generation (it sets `hydrated`).
//!
//! Every decoder is total: any byte string yields a message or a [`DecodeError`], never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use blockfleet_core::ids::VolumeId;

pub const PROTOCOL_VERSION: u16 = 3;
pub const MAGIC: &[u8; 8] = b"BFBLOCK\0";
/// Largest data payload of one Read or Write.
pub const MAX_IO: u32 = 8 << 20;
/// Largest frame body: a maximal write plus its header.
pub const MAX_FRAME: u32 = MAX_IO + 4096;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame truncated: needed {needed} more bytes")]
    Truncated { needed: usize },
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    #[error("unknown status {0}")]
    UnknownStatus(u8),
    #[error("bad field {field}: {reason}")]
    BadField { field: &'static str, reason: String },
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("frame of {0} bytes is larger than the limit")]
    TooLarge(u32),
}

/// Why a request failed; stable codes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorCode {
    BadRequest = 1,
    UnknownOpcode = 2,
    Unaligned = 3,
    OutOfRange = 4,
    NoSuchVolume = 5,
    VolumeExists = 6,
    MarkOpen = 7,
    NoSuchMark = 8,
    NotPaused = 9,
    AlreadyPaused = 10,
    Io = 11,
    ShuttingDown = 12,
    /// A read touched units of a hydrating volume that hydration has not filled yet.
    NotHydrated = 13,
    /// A `PutChunk` found the chunk at another version than it expected.
    VersionMismatch = 14,
}

impl ErrorCode {
    fn from_u8(v: u8) -> Option<Self> {
        use ErrorCode::*;
        Some(match v {
            1 => BadRequest,
            2 => UnknownOpcode,
            3 => Unaligned,
            4 => OutOfRange,
            5 => NoSuchVolume,
            6 => VolumeExists,
            7 => MarkOpen,
            8 => NoSuchMark,
            9 => NotPaused,
            10 => AlreadyPaused,
            11 => Io,
            12 => ShuttingDown,
            13 => NotHydrated,
            14 => VersionMismatch,
            _ => return None,
        })
    }
}

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `hydrating`: the volume is filled from a source by `WriteIfUnwritten`; user writes to
    /// chunks not yet hydrated are tracked per 4 KiB unit so hydration never overwrites them.
    CreateVolume {
        volume: VolumeId,
        size: u64,
        hydrating: bool,
    },
    DeleteVolume {
        volume: VolumeId,
    },
    StatVolume {
        volume: VolumeId,
    },
    Read {
        volume: VolumeId,
        offset: u64,
        len: u32,
    },
    Write {
        volume: VolumeId,
        offset: u64,
        fua: bool,
        data: Bytes,
    },
    /// Makes every write acknowledged before it durable.
    Flush {
        volume: VolumeId,
    },
    /// Writes a whole chunk except the 4 KiB units the user has written; replies with those.
    /// Empty `data` hydrates the chunk as zeros (a chunk the source does not store).
    WriteIfUnwritten {
        volume: VolumeId,
        chunk: u64,
        data: Bytes,
    },
    ChunkState {
        volume: VolumeId,
        chunk: u64,
    },
    /// Stops acknowledging new writes (in-flight ones finish) until Resume or the pause timeout.
    Pause {
        volume: VolumeId,
    },
    /// Records a cut; replies with the mark id: `id` if not 0 (it must be above every mark
    /// the volume has seen: replicas of a volume share mark ids), else the next one.
    Mark {
        volume: VolumeId,
        id: u64,
    },
    Resume {
        volume: VolumeId,
    },
    /// Mark, then Resume, in one round trip (the coordinator's step once every volume of a
    /// set is paused). Resumes even when the mark fails, then reports that failure.
    MarkResume {
        volume: VolumeId,
        id: u64,
    },
    /// A chunk as it was at the open mark (mark 0: as it is now), with its state.
    ReadMark {
        volume: VolumeId,
        mark: u64,
        chunk: u64,
    },
    /// Chunks written after mark `base` (0: ever written) up to mark `target` (0: now).
    ListChangedChunks {
        volume: VolumeId,
        base: u64,
        target: u64,
    },
    ReleaseMark {
        volume: VolumeId,
        mark: u64,
    },
    /// Up to `limit` chunks at or after `from` that hydration has not filled, ascending.
    UnhydratedChunks {
        volume: VolumeId,
        from: u64,
        limit: u32,
    },
    /// [`ChunkInfo::version`] of chunks `from..from+limit` (fewer at the volume's end) as at
    /// the open mark `mark` (0: now): how replicas tell which chunks one of them missed.
    ChunkVersions {
        volume: VolumeId,
        mark: u64,
        from: u64,
        limit: u32,
    },
    /// Forgets the state of these chunks (version 0), durably: a replica rejoining marks what
    /// it missed before it takes writes again, so no later write can make it look current.
    ResetChunks {
        volume: VolumeId,
        chunks: Vec<u64>,
    },
    /// Sets a whole chunk and its state as another replica has them (repair). With `expect`
    /// not `u64::MAX`, refused with `VersionMismatch` unless the chunk is at that version.
    /// Empty `data`: zeros.
    PutChunk {
        volume: VolumeId,
        chunk: u64,
        expect: u64,
        info: ChunkInfo,
        data: Bytes,
    },
}

/// Most chunks one `ChunkVersions` or `ResetChunks` covers.
pub const MAX_CHUNK_LIST: u32 = 65536;

/// Per-chunk state as the server keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkInfo {
    /// Filled by `WriteIfUnwritten`.
    pub hydrated: bool,
    /// 4 KiB units the user wrote before the chunk was hydrated (bit i = unit i of the chunk).
    pub user_written: u128,
    /// Bumped on every user write to the chunk (hydration does not); 0 = never written.
    pub generation: u64,
    /// The mark epoch when the user last wrote the chunk.
    pub last_epoch: u64,
}

impl ChunkInfo {
    /// Orders a chunk's states on the replicas of a volume: every write bumps it, so a replica
    /// that missed a write has a lower one; at equal generations, hydrated is newer.
    pub fn version(&self) -> u64 {
        self.generation << 1 | u64::from(self.hydrated)
    }

    /// Whether the chunk holds anything but zeros-by-absence.
    pub fn has_data(&self) -> bool {
        self.generation > 0 || self.hydrated
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeStat {
    pub size: u64,
    pub hydrating: bool,
    /// Id of the open mark, 0 if none.
    pub open_mark: u64,
    pub paused: bool,
    /// Chunks hydration has not filled yet (0 for a volume that is not hydrating).
    pub unhydrated: u64,
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Done,
    Stat(VolumeStat),
    Data(Bytes),
    /// Units of the chunk left alone because the user wrote them (all ones: already hydrated).
    Skipped(u128),
    Chunk(ChunkInfo),
    MarkId(u64),
    MarkChunk {
        info: ChunkInfo,
        data: Bytes,
    },
    Chunks(Vec<u64>),
}

mod op {
    pub const CREATE: u8 = 1;
    pub const DELETE: u8 = 2;
    pub const STAT: u8 = 3;
    pub const READ: u8 = 4;
    pub const WRITE: u8 = 5;
    pub const FLUSH: u8 = 6;
    pub const WRITE_IF_UNWRITTEN: u8 = 7;
    pub const CHUNK_STATE: u8 = 8;
    pub const PAUSE: u8 = 9;
    pub const MARK: u8 = 10;
    pub const RESUME: u8 = 11;
    pub const READ_MARK: u8 = 12;
    pub const LIST_CHANGED: u8 = 13;
    pub const RELEASE_MARK: u8 = 14;
    pub const UNHYDRATED: u8 = 15;
    pub const MARK_RESUME: u8 = 16;
    pub const CHUNK_VERSIONS: u8 = 17;
    pub const RESET_CHUNKS: u8 = 18;
    pub const PUT_CHUNK: u8 = 19;
}

mod reply {
    pub const DONE: u8 = 1;
    pub const STAT: u8 = 2;
    pub const DATA: u8 = 3;
    pub const SKIPPED: u8 = 4;
    pub const CHUNK: u8 = 5;
    pub const MARK_ID: u8 = 6;
    pub const MARK_CHUNK: u8 = 7;
    pub const CHUNKS: u8 = 8;
}

/// Reads fields off a frame body, turning a short body into `Truncated`. With the body as
/// `Bytes` (`origin`), data fields are zero-copy slices of it.
struct Reader<'a>(&'a [u8], Option<&'a Bytes>);

impl<'a> Reader<'a> {
    fn new(body: &'a [u8]) -> Self {
        Reader(body, None)
    }

    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.0.len() < n {
            Err(DecodeError::Truncated {
                needed: n - self.0.len(),
            })
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.0.get_u16_le())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.0.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.0.get_u64_le())
    }
    fn u128(&mut self) -> Result<u128, DecodeError> {
        self.need(16)?;
        Ok(self.0.get_u128_le())
    }
    fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::BadField {
                field,
                reason: format!("{v} is not a boolean"),
            }),
        }
    }
    fn bytes(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        self.need(len)?;
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head)
    }
    fn volume(&mut self) -> Result<VolumeId, DecodeError> {
        let len = self.u8()? as usize;
        let raw = self.bytes(len)?;
        std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| DecodeError::BadField {
                field: "volume",
                reason: format!("{:?} is not a volume id", String::from_utf8_lossy(raw)),
            })
    }
    /// Data with a u32 length prefix, at most MAX_IO.
    fn data(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u32()?;
        if len > MAX_IO {
            return Err(DecodeError::TooLarge(len));
        }
        let origin = self.1;
        let raw = self.bytes(len as usize)?;
        Ok(match origin {
            Some(o) => o.slice_ref(raw),
            None => Bytes::copy_from_slice(raw),
        })
    }
    fn end(self) -> Result<(), DecodeError> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

fn put_volume(b: &mut BytesMut, v: &VolumeId) {
    b.put_u8(v.as_str().len() as u8);
    b.put_slice(v.as_str().as_bytes());
}

fn put_data(b: &mut BytesMut, d: &[u8]) {
    b.put_u32_le(d.len() as u32);
    b.put_slice(d);
}

fn put_chunk_info(b: &mut BytesMut, i: &ChunkInfo) {
    b.put_u8(u8::from(i.hydrated));
    b.put_u128_le(i.user_written);
    b.put_u64_le(i.generation);
    b.put_u64_le(i.last_epoch);
}

fn put_u64_list(b: &mut BytesMut, list: &[u64]) {
    b.put_u32_le(list.len() as u32);
    for c in list {
        b.put_u64_le(*c);
    }
}

fn chunk_info(r: &mut Reader<'_>) -> Result<ChunkInfo, DecodeError> {
    Ok(ChunkInfo {
        hydrated: r.bool("hydrated")?,
        user_written: r.u128()?,
        generation: r.u64()?,
        last_epoch: r.u64()?,
    })
}

fn u64_list(r: &mut Reader<'_>, max: u32) -> Result<Vec<u64>, DecodeError> {
    let n = r.u32()?;
    if n > max {
        return Err(DecodeError::BadField {
            field: "list",
            reason: format!("{n} entries, at most {max}"),
        });
    }
    r.need((n as usize).saturating_mul(8))?;
    (0..n).map(|_| r.u64()).collect()
}

/// Prefixes a frame body with its length.
fn frame(body: BytesMut) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + body.len());
    out.put_u32_le(body.len() as u32);
    out.extend_from_slice(&body);
    out.freeze()
}

/// The hello frame (both directions).
pub fn encode_hello(version: u16) -> Bytes {
    let mut b = BytesMut::new();
    b.put_slice(MAGIC);
    b.put_u16_le(version);
    frame(b)
}

/// Decodes a hello body into its version.
pub fn decode_hello(body: &[u8]) -> Result<u16, DecodeError> {
    let mut r = Reader::new(body);
    if r.bytes(8)? != MAGIC {
        return Err(DecodeError::BadField {
            field: "magic",
            reason: "not a blockfleet block-protocol peer".into(),
        });
    }
    let v = r.u16()?;
    r.end()?;
    Ok(v)
}

impl Request {
    /// Encodes the request as a whole frame.
    pub fn encode(&self, id: u64) -> Bytes {
        let (head, payload) = self.encode_parts(id);
        match payload {
            None => head,
            Some(p) => {
                let mut b = BytesMut::with_capacity(head.len() + p.len());
                b.extend_from_slice(&head);
                b.extend_from_slice(&p);
                b.freeze()
            }
        }
    }

    /// Encodes the request as a frame whose trailing data payload (of Write and
    /// WriteIfUnwritten) is a separate buffer, so large writes are sent without a copy.
    pub fn encode_parts(&self, id: u64) -> (Bytes, Option<Bytes>) {
        let payload = match self {
            Request::Write { data, .. }
            | Request::WriteIfUnwritten { data, .. }
            | Request::PutChunk { data, .. } => Some(data.clone()),
            _ => None,
        };
        let head = self.encode_head(id);
        // The length prefix covers the payload too.
        let mut framed = BytesMut::with_capacity(4 + head.len());
        let total = head.len() + payload.as_ref().map_or(0, |p| p.len());
        framed.put_u32_le(total as u32);
        framed.extend_from_slice(&head);
        (framed.freeze(), payload)
    }

    /// The body without its length prefix; a data payload is left for the caller to append
    /// (its u32 length is included here).
    fn encode_head(&self, id: u64) -> BytesMut {
        let mut b = BytesMut::with_capacity(64);
        b.put_u64_le(id);
        match self {
            Request::CreateVolume {
                volume,
                size,
                hydrating,
            } => {
                b.put_u8(op::CREATE);
                put_volume(&mut b, volume);
                b.put_u64_le(*size);
                b.put_u8(u8::from(*hydrating));
            }
            Request::DeleteVolume { volume } => {
                b.put_u8(op::DELETE);
                put_volume(&mut b, volume);
            }
            Request::StatVolume { volume } => {
                b.put_u8(op::STAT);
                put_volume(&mut b, volume);
            }
            Request::Read {
                volume,
                offset,
                len,
            } => {
                b.put_u8(op::READ);
                put_volume(&mut b, volume);
                b.put_u64_le(*offset);
                b.put_u32_le(*len);
            }
            Request::Write {
                volume,
                offset,
                fua,
                data,
            } => {
                b.put_u8(op::WRITE);
                put_volume(&mut b, volume);
                b.put_u64_le(*offset);
                b.put_u8(u8::from(*fua));
                b.put_u32_le(data.len() as u32);
            }
            Request::Flush { volume } => {
                b.put_u8(op::FLUSH);
                put_volume(&mut b, volume);
            }
            Request::WriteIfUnwritten {
                volume,
                chunk,
                data,
            } => {
                b.put_u8(op::WRITE_IF_UNWRITTEN);
                put_volume(&mut b, volume);
                b.put_u64_le(*chunk);
                b.put_u32_le(data.len() as u32);
            }
            Request::ChunkState { volume, chunk } => {
                b.put_u8(op::CHUNK_STATE);
                put_volume(&mut b, volume);
                b.put_u64_le(*chunk);
            }
            Request::Pause { volume } => {
                b.put_u8(op::PAUSE);
                put_volume(&mut b, volume);
            }
            Request::Mark { volume, id } => {
                b.put_u8(op::MARK);
                put_volume(&mut b, volume);
                b.put_u64_le(*id);
            }
            Request::Resume { volume } => {
                b.put_u8(op::RESUME);
                put_volume(&mut b, volume);
            }
            Request::MarkResume { volume, id } => {
                b.put_u8(op::MARK_RESUME);
                put_volume(&mut b, volume);
                b.put_u64_le(*id);
            }
            Request::ReadMark {
                volume,
                mark,
                chunk,
            } => {
                b.put_u8(op::READ_MARK);
                put_volume(&mut b, volume);
                b.put_u64_le(*mark);
                b.put_u64_le(*chunk);
            }
            Request::ListChangedChunks {
                volume,
                base,
                target,
            } => {
                b.put_u8(op::LIST_CHANGED);
                put_volume(&mut b, volume);
                b.put_u64_le(*base);
                b.put_u64_le(*target);
            }
            Request::ReleaseMark { volume, mark } => {
                b.put_u8(op::RELEASE_MARK);
                put_volume(&mut b, volume);
                b.put_u64_le(*mark);
            }
            Request::UnhydratedChunks {
                volume,
                from,
                limit,
            } => {
                b.put_u8(op::UNHYDRATED);
                put_volume(&mut b, volume);
                b.put_u64_le(*from);
                b.put_u32_le(*limit);
            }
            Request::ChunkVersions {
                volume,
                mark,
                from,
                limit,
            } => {
                b.put_u8(op::CHUNK_VERSIONS);
                put_volume(&mut b, volume);
                b.put_u64_le(*mark);
                b.put_u64_le(*from);
                b.put_u32_le(*limit);
            }
            Request::ResetChunks { volume, chunks } => {
                b.put_u8(op::RESET_CHUNKS);
                put_volume(&mut b, volume);
                put_u64_list(&mut b, chunks);
            }
            Request::PutChunk {
                volume,
                chunk,
                expect,
                info,
                data,
            } => {
                b.put_u8(op::PUT_CHUNK);
                put_volume(&mut b, volume);
                b.put_u64_le(*chunk);
                b.put_u64_le(*expect);
                put_chunk_info(&mut b, info);
                b.put_u32_le(data.len() as u32);
            }
        }
        b
    }

    /// Decodes a request body. The request id is returned whenever it could be read, so an
    /// error reply can name it; `None` means the frame was too short to hold one.
    pub fn decode(body: &[u8]) -> (Option<u64>, Result<Request, DecodeError>) {
        Self::decode_from(Reader::new(body))
    }

    /// As [`Request::decode`], with written data as zero-copy slices of `body`.
    pub fn decode_bytes(body: &Bytes) -> (Option<u64>, Result<Request, DecodeError>) {
        Self::decode_from(Reader(body, Some(body)))
    }

    fn decode_from(mut r: Reader<'_>) -> (Option<u64>, Result<Request, DecodeError>) {
        let Ok(id) = r.u64() else {
            return (None, Err(DecodeError::Truncated { needed: 8 }));
        };
        (Some(id), Self::decode_fields(r))
    }

    fn decode_fields(mut r: Reader<'_>) -> Result<Request, DecodeError> {
        let opcode = r.u8()?;
        let req = match opcode {
            op::CREATE => Request::CreateVolume {
                volume: r.volume()?,
                size: r.u64()?,
                hydrating: r.bool("hydrating")?,
            },
            op::DELETE => Request::DeleteVolume {
                volume: r.volume()?,
            },
            op::STAT => Request::StatVolume {
                volume: r.volume()?,
            },
            op::READ => Request::Read {
                volume: r.volume()?,
                offset: r.u64()?,
                len: r.u32()?,
            },
            op::WRITE => Request::Write {
                volume: r.volume()?,
                offset: r.u64()?,
                fua: r.bool("fua")?,
                data: r.data()?,
            },
            op::FLUSH => Request::Flush {
                volume: r.volume()?,
            },
            op::WRITE_IF_UNWRITTEN => Request::WriteIfUnwritten {
                volume: r.volume()?,
                chunk: r.u64()?,
                data: r.data()?,
            },
            op::CHUNK_STATE => Request::ChunkState {
                volume: r.volume()?,
                chunk: r.u64()?,
            },
            op::PAUSE => Request::Pause {
                volume: r.volume()?,
            },
            op::MARK => Request::Mark {
                volume: r.volume()?,
                id: r.u64()?,
            },
            op::RESUME => Request::Resume {
                volume: r.volume()?,
            },
            op::MARK_RESUME => Request::MarkResume {
                volume: r.volume()?,
                id: r.u64()?,
            },
            op::READ_MARK => Request::ReadMark {
                volume: r.volume()?,
                mark: r.u64()?,
                chunk: r.u64()?,
            },
            op::LIST_CHANGED => Request::ListChangedChunks {
                volume: r.volume()?,
                base: r.u64()?,
                target: r.u64()?,
            },
            op::RELEASE_MARK => Request::ReleaseMark {
                volume: r.volume()?,
                mark: r.u64()?,
            },
            op::UNHYDRATED => Request::UnhydratedChunks {
                volume: r.volume()?,
                from: r.u64()?,
                limit: r.u32()?,
            },
            op::CHUNK_VERSIONS => Request::ChunkVersions {
                volume: r.volume()?,
                mark: r.u64()?,
                from: r.u64()?,
                limit: r.u32()?,
            },
            op::RESET_CHUNKS => Request::ResetChunks {
                volume: r.volume()?,
                chunks: u64_list(&mut r, MAX_CHUNK_LIST)?,
            },
            op::PUT_CHUNK => Request::PutChunk {
                volume: r.volume()?,
                chunk: r.u64()?,
                expect: r.u64()?,
                info: chunk_info(&mut r)?,
                data: r.data()?,
            },
            other => return Err(DecodeError::UnknownOpcode(other)),
        };
        r.end()?;
        Ok(req)
    }
}

/// Encodes a reply frame.
pub fn encode_response(id: u64, result: &Result<Response, (ErrorCode, String)>) -> Bytes {
    let mut b = BytesMut::with_capacity(64);
    b.put_u64_le(id);
    match result {
        Err((code, message)) => {
            b.put_u8(*code as u8);
            let msg = &message.as_bytes()[..message.len().min(u16::MAX as usize)];
            b.put_u16_le(msg.len() as u16);
            b.put_slice(msg);
        }
        Ok(resp) => {
            b.put_u8(0);
            match resp {
                Response::Done => b.put_u8(reply::DONE),
                Response::Stat(s) => {
                    b.put_u8(reply::STAT);
                    b.put_u64_le(s.size);
                    b.put_u8(u8::from(s.hydrating));
                    b.put_u64_le(s.open_mark);
                    b.put_u8(u8::from(s.paused));
                    b.put_u64_le(s.unhydrated);
                }
                Response::Data(d) => {
                    b.put_u8(reply::DATA);
                    put_data(&mut b, d);
                }
                Response::Skipped(s) => {
                    b.put_u8(reply::SKIPPED);
                    b.put_u128_le(*s);
                }
                Response::Chunk(i) => {
                    b.put_u8(reply::CHUNK);
                    put_chunk_info(&mut b, i);
                }
                Response::MarkId(m) => {
                    b.put_u8(reply::MARK_ID);
                    b.put_u64_le(*m);
                }
                Response::MarkChunk { info, data } => {
                    b.put_u8(reply::MARK_CHUNK);
                    put_chunk_info(&mut b, info);
                    put_data(&mut b, data);
                }
                Response::Chunks(list) => {
                    b.put_u8(reply::CHUNKS);
                    put_u64_list(&mut b, list);
                }
            }
        }
    }
    frame(b)
}

/// A decoded reply: the request id and the result.
pub type DecodedResponse = (u64, Result<Response, (ErrorCode, String)>);

/// Decodes a reply body.
pub fn decode_response(body: &[u8]) -> Result<DecodedResponse, DecodeError> {
    decode_response_from(Reader::new(body))
}

/// As [`decode_response`], with read data as zero-copy slices of `body`.
pub fn decode_response_bytes(body: &Bytes) -> Result<DecodedResponse, DecodeError> {
    decode_response_from(Reader(body, Some(body)))
}

fn decode_response_from(mut r: Reader<'_>) -> Result<DecodedResponse, DecodeError> {
    let id = r.u64()?;
    let status = r.u8()?;
    if status != 0 {
        let code = ErrorCode::from_u8(status).ok_or(DecodeError::UnknownStatus(status))?;
        let len = r.u16()? as usize;
        let msg = String::from_utf8_lossy(r.bytes(len)?).into_owned();
        r.end()?;
        return Ok((id, Err((code, msg))));
    }
    let resp = match r.u8()? {
        reply::DONE => Response::Done,
        reply::STAT => Response::Stat(VolumeStat {
            size: r.u64()?,
            hydrating: r.bool("hydrating")?,
            open_mark: r.u64()?,
            paused: r.bool("paused")?,
            unhydrated: r.u64()?,
        }),
        reply::DATA => Response::Data(r.data()?),
        reply::SKIPPED => Response::Skipped(r.u128()?),
        reply::CHUNK => Response::Chunk(chunk_info(&mut r)?),
        reply::MARK_ID => Response::MarkId(r.u64()?),
        reply::MARK_CHUNK => Response::MarkChunk {
            info: chunk_info(&mut r)?,
            data: r.data()?,
        },
        reply::CHUNKS => Response::Chunks(u64_list(&mut r, u32::MAX)?),
        other => {
            return Err(DecodeError::BadField {
                field: "reply kind",
                reason: format!("unknown reply kind {other}"),
            })
        }
    };
    r.end()?;
    Ok((id, Ok(resp)))
}

/// Checks a frame length read off the wire before allocating for it.
pub fn check_frame_len(len: u32) -> Result<usize, DecodeError> {
    if len > MAX_FRAME {
        Err(DecodeError::TooLarge(len))
    } else {
        Ok(len as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vol() -> VolumeId {
        "vol-0123456789abcdef0".parse().unwrap()
    }

    fn all_requests() -> Vec<Request> {
        let v = vol();
        vec![
            Request::CreateVolume {
                volume: v.clone(),
                size: 1 << 30,
                hydrating: true,
            },
            Request::DeleteVolume { volume: v.clone() },
            Request::StatVolume { volume: v.clone() },
            Request::Read {
                volume: v.clone(),
                offset: 4096,
                len: 8192,
            },
            Request::Write {
                volume: v.clone(),
                offset: 8192,
                fua: true,
                data: Bytes::from(vec![7u8; 4096]),
            },
            Request::Flush { volume: v.clone() },
            Request::WriteIfUnwritten {
                volume: v.clone(),
                chunk: 3,
                data: Bytes::from(vec![1u8; 100]),
            },
            Request::ChunkState {
                volume: v.clone(),
                chunk: 9,
            },
            Request::Pause { volume: v.clone() },
            Request::Mark {
                volume: v.clone(),
                id: 0,
            },
            Request::Resume { volume: v.clone() },
            Request::MarkResume {
                volume: v.clone(),
                id: 99,
            },
            Request::ChunkVersions {
                volume: v.clone(),
                mark: 0,
                from: 3,
                limit: 10,
            },
            Request::ResetChunks {
                volume: v.clone(),
                chunks: vec![1, 7, 9],
            },
            Request::PutChunk {
                volume: v.clone(),
                chunk: 2,
                expect: u64::MAX,
                info: ChunkInfo {
                    hydrated: true,
                    user_written: 3,
                    generation: 8,
                    last_epoch: 2,
                },
                data: Bytes::from(vec![4u8; 64]),
            },
            Request::ReadMark {
                volume: v.clone(),
                mark: 2,
                chunk: 5,
            },
            Request::ListChangedChunks {
                volume: v.clone(),
                base: 1,
                target: 0,
            },
            Request::ReleaseMark {
                volume: v.clone(),
                mark: 2,
            },
            Request::UnhydratedChunks {
                volume: v,
                from: 4,
                limit: 100,
            },
        ]
    }

    #[test]
    fn requests_round_trip_and_truncations_fail() {
        for (i, req) in all_requests().into_iter().enumerate() {
            let frame = req.encode(i as u64);
            let body = &frame[4..];
            assert_eq!(
                u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize,
                body.len()
            );
            assert_eq!(Request::decode(body), (Some(i as u64), Ok(req.clone())));
            assert_eq!(
                Request::decode_bytes(&frame.slice(4..)),
                (Some(i as u64), Ok(req.clone()))
            );
            let (head, payload) = req.encode_parts(i as u64);
            assert_eq!(
                [&head[..], payload.as_deref().unwrap_or_default()].concat(),
                frame.to_vec()
            );
            for cut in 0..body.len() {
                assert!(
                    Request::decode(&body[..cut]).1.is_err(),
                    "{req:?} cut at {cut}"
                );
            }
            let mut long = body.to_vec();
            long.push(0);
            assert_eq!(Request::decode(&long).1, Err(DecodeError::Trailing(1)));
        }
    }

    #[test]
    fn responses_round_trip() {
        let info = ChunkInfo {
            hydrated: true,
            user_written: 1 << 100 | 5,
            generation: 42,
            last_epoch: 6,
        };
        let cases = vec![
            Ok(Response::Done),
            Ok(Response::Stat(VolumeStat {
                size: 1 << 40,
                hydrating: false,
                open_mark: 3,
                paused: true,
                unhydrated: 11,
            })),
            Ok(Response::Data(Bytes::from_static(b"abc"))),
            Ok(Response::Skipped(u128::MAX)),
            Ok(Response::Chunk(info)),
            Ok(Response::MarkId(7)),
            Ok(Response::MarkChunk {
                info,
                data: Bytes::from_static(b"xyz"),
            }),
            Ok(Response::Chunks(vec![1, 5, 9])),
            Err((ErrorCode::OutOfRange, "offset 9 beyond".to_owned())),
        ];
        for (i, c) in cases.into_iter().enumerate() {
            let f = encode_response(i as u64, &c);
            assert_eq!(decode_response(&f[4..]), Ok((i as u64, c.clone())));
            assert_eq!(
                decode_response_bytes(&f.slice(4..)),
                Ok((i as u64, c.clone()))
            );
            for cut in 0..f.len() - 4 {
                assert!(decode_response(&f[4..4 + cut]).is_err());
            }
        }
    }

    #[test]
    fn bad_fields() {
        let mut f = Request::Read {
            volume: vol(),
            offset: 0,
            len: 4096,
        }
        .encode(1)
        .to_vec();
        f[12] = 99; // opcode
        assert_eq!(
            Request::decode(&f[4..]).1,
            Err(DecodeError::UnknownOpcode(99))
        );
        let mut f = Request::StatVolume { volume: vol() }.encode(1).to_vec();
        f[15] = b'X'; // inside the volume id
        assert!(matches!(
            Request::decode(&f[4..]).1,
            Err(DecodeError::BadField {
                field: "volume",
                ..
            })
        ));
        let mut f = Request::Write {
            volume: vol(),
            offset: 0,
            fua: false,
            data: Bytes::new(),
        }
        .encode(1)
        .to_vec();
        let n = f.len();
        f[n - 5] = 2; // fua
        assert!(matches!(
            Request::decode(&f[4..]).1,
            Err(DecodeError::BadField { field: "fua", .. })
        ));
        assert_eq!(Request::decode(&[1, 2, 3]).0, None);
        assert!(check_frame_len(MAX_FRAME + 1).is_err());
        assert_eq!(
            decode_hello(&encode_hello(PROTOCOL_VERSION)[4..]),
            Ok(PROTOCOL_VERSION)
        );
        assert!(decode_hello(b"GET / HTTP/1.1\r\n").is_err());
    }

    proptest! {
        #[test]
        fn decoders_are_total(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Request::decode(&body);
            let _ = decode_response(&body);
            let _ = decode_hello(&body);
        }

        #[test]
        fn write_round_trip(offset: u64, fua: bool, data in proptest::collection::vec(any::<u8>(), 0..5000), id: u64) {
            let req = Request::Write { volume: vol(), offset, fua, data: Bytes::from(data) };
            let f = req.encode(id);
            prop_assert_eq!(Request::decode(&f[4..]), (Some(id), Ok(req)));
        }
    }
}
