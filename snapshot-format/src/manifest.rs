//! The snapshot manifest: every non-zero chunk of the snapshot (not only the delta from the
//! parent, so a restore never walks a chain), the volume size, the parent, and an optional
//! encryption header.
//!
//! Encoding, format 1 (all integers little-endian):
//!
//! ```text
//! "BFMANIF\0"            8 bytes  magic
//! format                 u32      1
//! header_len             u32      length of the JSON header
//! header                 JSON     ManifestHeader (ids, size, parent, encryption, chunk_count)
//! entries                chunk_count x (u64 chunk index, 32-byte sha256), strictly increasing index
//! mac                    32 bytes HMAC-SHA256 under the manifest key over everything before it
//! ```
//!
//! The chunk table is binary because it is the bulk: 40 bytes a chunk, 80 MB for a full 1 TiB
//! volume, where JSON would be twice that. The MAC stops someone who can write the bucket from
//! swapping a chunk and its hash together; the snapshot id inside stops a manifest being moved
//! to another snapshot's path.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{ChunkHash, ManifestKey, SnapshotError};
use blockfleet_core::ids::{KmsKeyId, SnapshotId};
use blockfleet_core::units::{check_volume_size, chunk_count, CHUNK};

/// The manifest format this build writes and reads. V1: the first format.
pub const MANIFEST_FORMAT: u32 = 1;
const MAGIC: &[u8; 8] = b"BFMANIF\0";
const PREFIX_LEN: usize = 8 + 4 + 4;
const ENTRY_LEN: usize = 8 + 32;
const MAC_LEN: usize = 32;
/// A header is a few hundred bytes; anything this large is corruption, not data.
const MAX_HEADER_LEN: usize = 1 << 20;

/// How the stored chunks of an encrypted snapshot are encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionHeader {
    /// The KMS key that wraps the data key.
    pub kms_key_id: KmsKeyId,
    /// The data key, wrapped by the KMS (never the plaintext key), hex.
    #[serde(with = "hex_bytes")]
    pub wrapped_key: Vec<u8>,
    /// Always `aes-256-xts-plain64-4k` for now.
    pub cipher: String,
    /// The volume whose encryption context (`blockfleet:volume`) the data key is bound to:
    /// the volume the snapshot was taken of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_volume: Option<blockfleet_core::ids::VolumeId>,
}

/// Cipher name for AES-256-XTS over 4096-byte units with the plain64 tweak.
pub const CIPHER_XTS_4K: &str = "aes-256-xts-plain64-4k";

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub snapshot_id: SnapshotId,
    /// Bytes in the volume (a whole number of sectors); the last chunk may extend past it.
    pub volume_size: u64,
    pub parent: Option<SnapshotId>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub description: String,
    pub encryption: Option<EncryptionHeader>,
    /// Chunk index -> hash of its stored bytes, for every non-zero chunk.
    pub chunks: BTreeMap<u64, ChunkHash>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestHeader {
    snapshot_id: SnapshotId,
    volume_size: u64,
    chunk_size: u64,
    parent: Option<SnapshotId>,
    created_at: u64,
    description: String,
    encryption: Option<EncryptionHeader>,
    chunk_count: u64,
}

fn mac(key: &ManifestKey, body: &[u8]) -> Hmac<Sha256> {
    let mut m = key.hmac();
    m.update(body);
    m
}

impl Manifest {
    /// Number of chunk slots the volume spans.
    pub fn chunk_slots(&self) -> u64 {
        chunk_count(self.volume_size)
    }

    /// Bytes held in the store (non-zero chunks).
    pub fn stored_bytes(&self) -> u64 {
        self.chunks.len() as u64 * CHUNK
    }

    /// Encodes and MACs the manifest.
    pub fn encode(&self, key: &ManifestKey) -> Vec<u8> {
        let header = ManifestHeader {
            snapshot_id: self.snapshot_id.clone(),
            volume_size: self.volume_size,
            chunk_size: CHUNK,
            parent: self.parent.clone(),
            created_at: self.created_at,
            description: self.description.clone(),
            encryption: self.encryption.clone(),
            chunk_count: self.chunks.len() as u64,
        };
        let header = serde_json::to_vec(&header).expect("manifest header serializes");
        let mut out =
            Vec::with_capacity(PREFIX_LEN + header.len() + self.chunks.len() * ENTRY_LEN + MAC_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&MANIFEST_FORMAT.to_le_bytes());
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        for (index, hash) in &self.chunks {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&hash.0);
        }
        let tag = mac(key, &out).finalize().into_bytes();
        out.extend_from_slice(&tag);
        out
    }

    /// Decodes a manifest read from `expected_id`'s path: checks the magic, the format, the MAC
    /// (before trusting any other byte), then every field.
    pub fn decode(
        bytes: &[u8],
        key: &ManifestKey,
        expected_id: &SnapshotId,
    ) -> Result<Self, SnapshotError> {
        let corrupt = |reason: String| SnapshotError::CorruptManifest {
            snapshot_id: expected_id.to_string(),
            reason,
        };
        if bytes.len() < PREFIX_LEN + MAC_LEN {
            return Err(corrupt(format!("truncated: {} bytes", bytes.len())));
        }
        if &bytes[..8] != MAGIC {
            return Err(corrupt("not a blockfleet manifest (bad magic)".into()));
        }
        let format = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if format != MANIFEST_FORMAT {
            return Err(SnapshotError::UnsupportedFormat {
                snapshot_id: expected_id.to_string(),
                format,
                supported: MANIFEST_FORMAT,
            });
        }
        let (body, tag) = bytes.split_at(bytes.len() - MAC_LEN);
        mac(key, body)
            .verify_slice(tag)
            .map_err(|_| SnapshotError::ManifestMac {
                snapshot_id: expected_id.to_string(),
            })?;

        let header_len = u32::from_le_bytes(body[12..16].try_into().expect("4 bytes")) as usize;
        if header_len > MAX_HEADER_LEN || PREFIX_LEN + header_len > body.len() {
            return Err(corrupt(format!("header length {header_len} out of bounds")));
        }
        let header: ManifestHeader =
            serde_json::from_slice(&body[PREFIX_LEN..PREFIX_LEN + header_len])
                .map_err(|e| corrupt(format!("header: {e}")))?;
        if &header.snapshot_id != expected_id {
            return Err(corrupt(format!(
                "it names snapshot {}, not the snapshot at its path",
                header.snapshot_id
            )));
        }
        if header.chunk_size != CHUNK {
            return Err(corrupt(format!(
                "chunk size {} is not {CHUNK}",
                header.chunk_size
            )));
        }
        check_volume_size(header.volume_size).map_err(|e| corrupt(format!("volume size: {e}")))?;
        let table = &body[PREFIX_LEN + header_len..];
        if table.len() % ENTRY_LEN != 0 || (table.len() / ENTRY_LEN) as u64 != header.chunk_count {
            return Err(corrupt(format!(
                "chunk table of {} bytes does not hold {} entries",
                table.len(),
                header.chunk_count
            )));
        }
        let slots = chunk_count(header.volume_size);
        let mut chunks = BTreeMap::new();
        let mut last: Option<u64> = None;
        for entry in table.chunks_exact(ENTRY_LEN) {
            let index = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
            if last.is_some_and(|l| index <= l) || index >= slots {
                return Err(corrupt(format!(
                    "chunk index {index} out of order or beyond the volume's {slots} chunks"
                )));
            }
            last = Some(index);
            chunks.insert(index, ChunkHash(entry[8..].try_into().expect("32 bytes")));
        }
        Ok(Manifest {
            snapshot_id: header.snapshot_id,
            volume_size: header.volume_size,
            parent: header.parent,
            created_at: header.created_at,
            description: header.description,
            encryption: header.encryption,
            chunks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockfleet_core::ids::VolumeId;
    use proptest::prelude::*;

    fn sample(n: u64) -> Manifest {
        Manifest {
            snapshot_id: SnapshotId::generate(),
            volume_size: 64 * CHUNK - 4096,
            parent: Some(SnapshotId::generate()),
            created_at: 1_700_000_000,
            description: "test".into(),
            encryption: Some(EncryptionHeader {
                kms_key_id: "alias/k".parse().unwrap(),
                wrapped_key: vec![1, 2, 3],
                cipher: CIPHER_XTS_4K.into(),
                context_volume: Some(VolumeId::generate()),
            }),
            chunks: (0..n)
                .map(|i| (i * 2, ChunkHash::of(&i.to_le_bytes())))
                .collect(),
        }
    }

    #[test]
    fn round_trip() {
        let key = ManifestKey::generate();
        let m = sample(20);
        let bytes = m.encode(&key);
        assert_eq!(Manifest::decode(&bytes, &key, &m.snapshot_id).unwrap(), m);
    }

    #[test]
    fn wrong_key_or_wrong_path_is_refused() {
        let m = sample(3);
        let bytes = m.encode(&ManifestKey::generate());
        let err = Manifest::decode(&bytes, &ManifestKey::generate(), &m.snapshot_id).unwrap_err();
        assert!(matches!(err, SnapshotError::ManifestMac { .. }), "{err}");
        let key = ManifestKey::generate();
        let bytes = m.encode(&key);
        let err = Manifest::decode(&bytes, &key, &SnapshotId::generate()).unwrap_err();
        assert!(
            err.to_string().contains("not the snapshot at its path"),
            "{err}"
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let key = ManifestKey::generate();
        let m = sample(4);
        let bytes = m.encode(&key);
        for len in 0..bytes.len() {
            assert!(
                Manifest::decode(&bytes[..len], &key, &m.snapshot_id).is_err(),
                "len {len}"
            );
        }
    }

    #[test]
    fn future_format_is_named() {
        let key = ManifestKey::generate();
        let m = sample(1);
        let mut bytes = m.encode(&key);
        bytes[8] = 2;
        let err = Manifest::decode(&bytes, &key, &m.snapshot_id).unwrap_err();
        assert!(
            matches!(err, SnapshotError::UnsupportedFormat { format: 2, .. }),
            "{err}"
        );
    }

    proptest! {
        /// The decoder is total: bytes that pass the MAC (a writer holding the key, or a bug)
        /// but are otherwise arbitrary give an error or a manifest, never a panic.
        #[test]
        fn authenticated_garbage_never_panics(
            header_len in 0u32..400,
            body in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let key = ManifestKey::generate();
            let id = SnapshotId::generate();
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&MANIFEST_FORMAT.to_le_bytes());
            bytes.extend_from_slice(&header_len.to_le_bytes());
            bytes.extend_from_slice(&body);
            let tag = mac(&key, &bytes).finalize().into_bytes();
            bytes.extend_from_slice(&tag);
            let _ = Manifest::decode(&bytes, &key, &id);
        }

        /// Any single flipped bit anywhere is caught.
        #[test]
        fn bit_flips_are_caught(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let key = ManifestKey::generate();
            let m = sample(5);
            let mut bytes = m.encode(&key);
            let i = pos.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert!(Manifest::decode(&bytes, &key, &m.snapshot_id).is_err());
        }
    }
}
