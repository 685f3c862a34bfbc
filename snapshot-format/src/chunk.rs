//! Chunks are stored under the sha256 of their stored bytes; every chunk read is checked
//! against that hash, and all-zero chunks are never stored.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The sha256 of a chunk's stored bytes: its address in the store.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(data: &[u8]) -> Self {
        ChunkHash(Sha256::digest(data).into())
    }

    /// The object key of the chunk with this hash.
    pub fn key(&self) -> String {
        format!("chunks/{self}")
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({self})")
    }
}

impl FromStr for ChunkHash {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| format!("{s:?} is not a sha256 in hex (64 lowercase hex digits)"))?;
        Ok(ChunkHash(out))
    }
}

impl TryFrom<String> for ChunkHash {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<ChunkHash> for String {
    fn from(h: ChunkHash) -> String {
        h.to_string()
    }
}

/// True if every byte is zero. Such chunks are left out of the store and the manifest.
pub fn is_zero(data: &[u8]) -> bool {
    let words = data.chunks_exact(16);
    let rest = words.remainder();
    rest.iter().all(|&b| b == 0)
        && words
            .into_iter()
            .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_key() {
        let h = ChunkHash::of(b"abc");
        assert_eq!(
            h.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(h.key(), format!("chunks/{h}"));
        assert_eq!(h.to_string().parse::<ChunkHash>().unwrap(), h);
        assert!("xyz".parse::<ChunkHash>().is_err());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 524288]));
        assert!(is_zero(&[]));
        for pos in [0, 15, 16, 524287] {
            let mut v = vec![0u8; 524288];
            v[pos] = 1;
            assert!(!is_zero(&v), "{pos}");
        }
        assert!(!is_zero(&[0, 0, 0, 1]));
    }
}
