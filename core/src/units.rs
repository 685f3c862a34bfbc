//! Sizes and offsets: the XTS data unit (sector), the chunk, and checked arithmetic between them.
//!
//! Every offset that reaches these helpers may come from a client, so each conversion checks
//! alignment and overflow and says which number was wrong.

use thiserror::Error;

/// The XTS data unit and the smallest I/O the block path deals in.
pub const SECTOR: u64 = 4096;
/// The unit of snapshot storage, hydration and changed-block tracking (the EBS direct-API block).
pub const CHUNK: u64 = 512 * 1024;
/// Sectors in one chunk.
pub const SECTORS_PER_CHUNK: u64 = CHUNK / SECTOR;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UnitError {
    #[error("{what} {value} is not a multiple of {align} bytes")]
    Unaligned {
        what: &'static str,
        value: u64,
        align: u64,
    },
    #[error("{what} overflows: offset {offset} + length {len} does not fit in 64 bits")]
    Overflow {
        what: &'static str,
        offset: u64,
        len: u64,
    },
    #[error("range {offset}..{end} lies outside the volume of {size} bytes")]
    OutOfRange { offset: u64, end: u64, size: u64 },
    #[error("size must be greater than zero")]
    Empty,
}

/// Index of a chunk within a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkIndex(pub u64);

impl ChunkIndex {
    /// The chunk holding byte `offset`.
    pub fn containing(offset: u64) -> Self {
        ChunkIndex(offset / CHUNK)
    }

    /// Byte offset of the chunk's first byte.
    pub fn offset(self) -> Result<u64, UnitError> {
        self.0.checked_mul(CHUNK).ok_or(UnitError::Overflow {
            what: "chunk offset",
            offset: self.0,
            len: CHUNK,
        })
    }
}

impl std::fmt::Display for ChunkIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Fails unless `value` is a whole multiple of `align`.
pub fn check_aligned(what: &'static str, value: u64, align: u64) -> Result<(), UnitError> {
    if value % align == 0 {
        Ok(())
    } else {
        Err(UnitError::Unaligned { what, value, align })
    }
}

/// The XTS data-unit number of a sector-aligned byte offset (the tweak).
pub fn unit_number(offset: u64) -> Result<u64, UnitError> {
    check_aligned("offset", offset, SECTOR)?;
    Ok(offset / SECTOR)
}

/// Checks that `offset..offset+len` is non-overflowing and inside a volume of `size` bytes;
/// returns the exclusive end.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<u64, UnitError> {
    let end = offset.checked_add(len).ok_or(UnitError::Overflow {
        what: "range",
        offset,
        len,
    })?;
    if end > size {
        return Err(UnitError::OutOfRange { offset, end, size });
    }
    Ok(end)
}

/// The chunks a byte range touches, as a half-open index range. An empty range touches none.
pub fn chunks_covering(offset: u64, len: u64) -> Result<std::ops::Range<u64>, UnitError> {
    let end = offset.checked_add(len).ok_or(UnitError::Overflow {
        what: "range",
        offset,
        len,
    })?;
    if len == 0 {
        return Ok(offset / CHUNK..offset / CHUNK);
    }
    Ok(offset / CHUNK..end.div_ceil(CHUNK))
}

/// Number of chunks needed to hold `size` bytes (the last one may be partly beyond `size`).
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK)
}

/// Checks a volume or image size: non-zero and a whole number of sectors.
pub fn check_volume_size(size: u64) -> Result<(), UnitError> {
    if size == 0 {
        return Err(UnitError::Empty);
    }
    check_aligned("size", size, SECTOR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn constants_agree() {
        assert_eq!(SECTORS_PER_CHUNK, 128);
        assert_eq!(CHUNK % SECTOR, 0);
    }

    #[test]
    fn alignment_and_units() {
        assert_eq!(unit_number(8192), Ok(2));
        assert!(matches!(
            unit_number(4095),
            Err(UnitError::Unaligned { value: 4095, .. })
        ));
        assert_eq!(check_volume_size(0), Err(UnitError::Empty));
        assert!(check_volume_size(512).is_err());
        assert!(check_volume_size(4096).is_ok());
    }

    #[test]
    fn overflow_is_an_error() {
        assert!(matches!(
            check_range(u64::MAX - 10, 4096, u64::MAX),
            Err(UnitError::Overflow { .. })
        ));
        assert!(matches!(
            chunks_covering(u64::MAX, 1),
            Err(UnitError::Overflow { .. })
        ));
        assert!(ChunkIndex(u64::MAX / CHUNK + 1).offset().is_err());
        assert!(ChunkIndex(u64::MAX / CHUNK).offset().is_ok());
    }

    #[test]
    fn out_of_range() {
        assert_eq!(check_range(0, CHUNK, CHUNK), Ok(CHUNK));
        assert_eq!(
            check_range(CHUNK, 1, CHUNK),
            Err(UnitError::OutOfRange {
                offset: CHUNK,
                end: CHUNK + 1,
                size: CHUNK
            })
        );
    }

    proptest! {
        #[test]
        fn covering_chunks_contain_every_byte(offset in 0u64..(1 << 50), len in 1u64..(1 << 24)) {
            let r = chunks_covering(offset, len).unwrap();
            prop_assert_eq!(r.start, ChunkIndex::containing(offset).0);
            prop_assert_eq!(r.end - 1, ChunkIndex::containing(offset + len - 1).0);
            // The first chunk starts at or before the range; the last ends at or after it.
            prop_assert!(ChunkIndex(r.start).offset().unwrap() <= offset);
            prop_assert!(ChunkIndex(r.end).offset().unwrap() >= offset + len);
        }

        #[test]
        fn chunk_count_holds_size(size in 1u64..(1 << 50)) {
            let n = chunk_count(size);
            prop_assert!(n * CHUNK >= size);
            prop_assert!((n - 1) * CHUNK < size);
        }

        #[test]
        fn range_check_matches_arithmetic(offset: u64, len: u64, size: u64) {
            match check_range(offset, len, size) {
                Ok(end) => prop_assert!(end == offset + len && end <= size),
                Err(UnitError::Overflow { .. }) => prop_assert!(offset.checked_add(len).is_none()),
                Err(UnitError::OutOfRange { end, .. }) => prop_assert!(end > size),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }
}
