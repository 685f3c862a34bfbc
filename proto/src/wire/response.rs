//! Encoding and decoding of replies.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::*;
use super::*;

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
                Response::Digest { info, digest } => {
                    b.put_u8(reply::DIGEST);
                    put_chunk_info(&mut b, info);
                    b.put_slice(digest);
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
    decode_response_from(Reader::from_bytes(body))
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
        reply::DIGEST => Response::Digest {
            info: chunk_info(&mut r)?,
            digest: r.digest()?,
        },
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
