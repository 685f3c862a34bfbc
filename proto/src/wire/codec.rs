//! Field encoding shared by requests and replies: opcodes, the bounds-checked reader, writers.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{ChunkInfo, DecodeError, MAX_IO};
use blockfleet_core::ids::VolumeId;

pub(super) mod op {
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
    pub const AUTHORIZE: u8 = 20;
    pub const REVOKE: u8 = 21;
    pub const CHUNK_DIGEST: u8 = 22;
    pub const ADOPT_CHUNK: u8 = 23;
}

pub(super) mod reply {
    pub const DONE: u8 = 1;
    pub const STAT: u8 = 2;
    pub const DATA: u8 = 3;
    pub const SKIPPED: u8 = 4;
    pub const CHUNK: u8 = 5;
    pub const MARK_ID: u8 = 6;
    pub const MARK_CHUNK: u8 = 7;
    pub const CHUNKS: u8 = 8;
    pub const DIGEST: u8 = 9;
}

/// Reads fields off a frame body, turning a short body into `Truncated`. With the body as
/// `Bytes` (`origin`), data fields are zero-copy slices of it.
pub(super) struct Reader<'a>(&'a [u8], Option<&'a Bytes>);

impl<'a> Reader<'a> {
    pub(super) fn new(body: &'a [u8]) -> Self {
        Reader(body, None)
    }

    /// A reader whose data fields are zero-copy slices of `body`.
    pub(super) fn from_bytes(body: &'a Bytes) -> Self {
        Reader(body, Some(body))
    }

    pub(super) fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.0.len() < n {
            Err(DecodeError::Truncated {
                needed: n - self.0.len(),
            })
        } else {
            Ok(())
        }
    }
    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    pub(super) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.0.get_u16_le())
    }
    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.0.get_u32_le())
    }
    pub(super) fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.0.get_u64_le())
    }
    pub(super) fn u128(&mut self) -> Result<u128, DecodeError> {
        self.need(16)?;
        Ok(self.0.get_u128_le())
    }
    pub(super) fn digest(&mut self) -> Result<[u8; 32], DecodeError> {
        let mut d = [0u8; 32];
        d.copy_from_slice(self.bytes(32)?);
        Ok(d)
    }
    pub(super) fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::BadField {
                field,
                reason: format!("{v} is not a boolean"),
            }),
        }
    }
    pub(super) fn bytes(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        self.need(len)?;
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head)
    }
    pub(super) fn volume(&mut self) -> Result<VolumeId, DecodeError> {
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
    /// A UTF-8 string with a u16 length prefix, at most `max` bytes.
    pub(super) fn string(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        if len > max {
            return Err(DecodeError::BadField {
                field,
                reason: format!("{len} bytes, at most {max}"),
            });
        }
        let raw = self.bytes(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::BadField {
            field,
            reason: "not UTF-8".into(),
        })
    }
    /// Data with a u32 length prefix, at most MAX_IO.
    pub(super) fn data(&mut self) -> Result<Bytes, DecodeError> {
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
    pub(super) fn end(self) -> Result<(), DecodeError> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

pub(super) fn put_volume(b: &mut BytesMut, v: &VolumeId) {
    b.put_u8(v.as_str().len() as u8);
    b.put_slice(v.as_str().as_bytes());
}

/// A string as `Reader::string` reads it (callers keep it within its limit).
pub(super) fn put_string(b: &mut BytesMut, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    b.put_u16_le(s.len() as u16);
    b.put_slice(s);
}

pub(super) fn put_data(b: &mut BytesMut, d: &[u8]) {
    b.put_u32_le(d.len() as u32);
    b.put_slice(d);
}

pub(super) fn put_chunk_info(b: &mut BytesMut, i: &ChunkInfo) {
    b.put_u8(u8::from(i.hydrated));
    b.put_u128_le(i.user_written);
    b.put_u64_le(i.generation);
    b.put_u64_le(i.last_epoch);
}

pub(super) fn put_u64_list(b: &mut BytesMut, list: &[u64]) {
    b.put_u32_le(list.len() as u32);
    for c in list {
        b.put_u64_le(*c);
    }
}

pub(super) fn chunk_info(r: &mut Reader<'_>) -> Result<ChunkInfo, DecodeError> {
    Ok(ChunkInfo {
        hydrated: r.bool("hydrated")?,
        user_written: r.u128()?,
        generation: r.u64()?,
        last_epoch: r.u64()?,
    })
}

pub(super) fn u64_list(r: &mut Reader<'_>, max: u32) -> Result<Vec<u64>, DecodeError> {
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
pub(super) fn frame(body: BytesMut) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + body.len());
    out.put_u32_le(body.len() as u32);
    out.extend_from_slice(&body);
    out.freeze()
}
