//! Encoding and decoding of requests.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::*;
use super::*;

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
            Request::ChunkDigest { volume, chunk } => {
                b.put_u8(op::CHUNK_DIGEST);
                put_volume(&mut b, volume);
                b.put_u64_le(*chunk);
            }
            Request::AdoptChunk {
                volume,
                chunk,
                digest,
                info,
            } => {
                b.put_u8(op::ADOPT_CHUNK);
                put_volume(&mut b, volume);
                b.put_u64_le(*chunk);
                b.put_slice(digest);
                put_chunk_info(&mut b, info);
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
            Request::Authorize {
                volume,
                rights,
                holder,
                token,
            } => {
                b.put_u8(op::AUTHORIZE);
                match volume {
                    Some(v) => {
                        b.put_u8(1);
                        put_volume(&mut b, v);
                    }
                    None => b.put_u8(0),
                }
                b.put_u8(*rights);
                put_string(&mut b, holder);
                put_string(&mut b, token);
            }
            Request::Revoke { volume, holder } => {
                b.put_u8(op::REVOKE);
                put_volume(&mut b, volume);
                put_string(&mut b, holder);
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
        Self::decode_from(Reader::from_bytes(body))
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
            op::CHUNK_DIGEST => Request::ChunkDigest {
                volume: r.volume()?,
                chunk: r.u64()?,
            },
            op::ADOPT_CHUNK => Request::AdoptChunk {
                volume: r.volume()?,
                chunk: r.u64()?,
                digest: r.digest()?,
                info: chunk_info(&mut r)?,
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
            op::AUTHORIZE => Request::Authorize {
                volume: match r.bool("volume")? {
                    true => Some(r.volume()?),
                    false => None,
                },
                rights: r.u8()?,
                holder: r.string("holder", MAX_AUTH_FIELD)?,
                token: r.string("token", MAX_AUTH_FIELD)?,
            },
            op::REVOKE => Request::Revoke {
                volume: r.volume()?,
                holder: r.string("holder", MAX_AUTH_FIELD)?,
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
