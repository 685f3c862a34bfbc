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
//! - V4: `Authorize` (a control-plane capability for the connection: a volume or all, and
//!   rights) and the `AccessDenied` error: every request on a volume needs a capability with
//!   the right it takes ([`rights`]); `Revoke` (a detach) takes a holder's rights on a volume
//!   from its open connections and refuses its earlier capabilities.
//! - V5: `ChunkDigest` (a chunk's state and the SHA-256 of its data) and `AdoptChunk` (take
//!   another replica's state for a chunk whose data already match): a rejoining replica's
//!   repair copies only chunks whose data differ.
//!
//! Every decoder is total: any byte string yields a message or a [`DecodeError`], never a panic.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

use blockfleet_core::ids::VolumeId;

mod codec;
mod request;
mod response;
#[cfg(test)]
mod tests;

use codec::{frame, Reader};
pub use response::{decode_response, decode_response_bytes, encode_response, DecodedResponse};

pub const PROTOCOL_VERSION: u16 = 6;
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
    /// A `PutChunk` found the chunk at another version than it expected, or an `AdoptChunk`
    /// other data than the digest.
    VersionMismatch = 14,
    /// The connection holds no capability that allows the request.
    AccessDenied = 15,
    /// The block server's disk is full (it shuts down: see the operations guide).
    NoSpace = 16,
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
            15 => AccessDenied,
            16 => NoSpace,
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
    /// A chunk's state now and the SHA-256 of its 512 KiB of data as stored (a hole reads as
    /// zeros): how a repair tells whether a replica's stale-looking chunk already holds the
    /// data (say, a server killed before its chunk states reached disk).
    ChunkDigest {
        volume: VolumeId,
        chunk: u64,
    },
    /// Sets a chunk's state to `info` if its data hash to `digest`, else refuses with
    /// `VersionMismatch`: repair without a copy, checked where the data are.
    AdoptChunk {
        volume: VolumeId,
        chunk: u64,
        digest: [u8; 32],
        info: ChunkInfo,
    },
    /// Presents a capability the control plane issued to `holder` (`blockfleet_core::token`,
    /// purpose [`CAPABILITY`], subject [`capability_subject`]): from then on this connection
    /// has `rights` on `volume` (`None`: on every volume). Checked when presented.
    Authorize {
        volume: Option<VolumeId>,
        rights: u8,
        holder: String,
        token: String,
    },
    /// Takes `holder`'s rights on `volume` from every connection, and refuses any capability
    /// for them issued before now (the control plane's detach). Needs ADMIN.
    Revoke {
        volume: VolumeId,
        holder: String,
    },
}

/// What a capability allows, as bits.
pub mod rights {
    /// StatVolume, Read, ChunkState, ReadMark, ListChangedChunks, UnhydratedChunks,
    /// ChunkVersions, ChunkDigest.
    pub const READ: u8 = 1;
    /// Write, Flush, ResetChunks, PutChunk, AdoptChunk (a volume's writer, and its repair).
    pub const WRITE: u8 = 2;
    /// WriteIfUnwritten and Flush (hydration: never over a user's write).
    pub const HYDRATE: u8 = 4;
    /// CreateVolume, DeleteVolume, Pause, Mark, Resume, MarkResume, ReleaseMark.
    pub const ADMIN: u8 = 8;
    pub const ALL: u8 = READ | WRITE | HYDRATE | ADMIN;
}

/// The longest a block-protocol capability may be valid for: a revocation refuses every
/// capability of its holder expiring within this from then.
pub const MAX_CAPABILITY_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// The token purpose of a block-protocol capability.
pub const CAPABILITY: &str = "block";

/// What a capability's token covers: the volume (or `*`), the rights and the holder.
pub fn capability_subject(volume: Option<&VolumeId>, rights: u8, holder: &str) -> String {
    format!("{}:{rights}:{holder}", volume.map_or("*", |v| v.as_str()))
}

impl Request {
    /// The volume a request acts on and the rights that allow it (any one bit of the mask);
    /// `None` for `Authorize`, which needs none.
    pub fn needs(&self) -> Option<(&VolumeId, u8)> {
        use rights::*;
        use Request::*;
        Some(match self {
            CreateVolume { volume, .. }
            | DeleteVolume { volume }
            | Pause { volume }
            | Mark { volume, .. }
            | Resume { volume }
            | MarkResume { volume, .. }
            | ReleaseMark { volume, .. }
            | Revoke { volume, .. } => (volume, ADMIN),
            StatVolume { volume }
            | Read { volume, .. }
            | ChunkState { volume, .. }
            | ReadMark { volume, .. }
            | ListChangedChunks { volume, .. }
            | UnhydratedChunks { volume, .. }
            | ChunkVersions { volume, .. }
            | ChunkDigest { volume, .. } => (volume, READ | ADMIN),
            Write { volume, .. }
            | ResetChunks { volume, .. }
            | PutChunk { volume, .. }
            | AdoptChunk { volume, .. } => (volume, WRITE | ADMIN),
            WriteIfUnwritten { volume, .. } => (volume, HYDRATE | ADMIN),
            Flush { volume } => (volume, WRITE | HYDRATE | ADMIN),
            Authorize { .. } => return None,
        })
    }
}
/// Longest `holder` or `token` of an `Authorize`.
pub const MAX_AUTH_FIELD: usize = 256;

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
    /// A chunk's state and the SHA-256 of its data (`ChunkDigest`).
    Digest {
        info: ChunkInfo,
        digest: [u8; 32],
    },
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

/// Checks a frame length read off the wire before allocating for it.
pub fn check_frame_len(len: u32) -> Result<usize, DecodeError> {
    if len > MAX_FRAME {
        Err(DecodeError::TooLarge(len))
    } else {
        Ok(len as usize)
    }
}
