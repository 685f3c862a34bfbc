//! The embedded KMS's keys: master keys in sled (tree `keys`), each sealed with AES-256-GCM
//! under the root key file; grants (tree `grants`). Data keys are wrapped with AES-256-GCM under
//! their master key, with the encryption context as associated data, so a wrapped key only
//! opens with the context it was made for.
//!
//! Wrapped data key (`CiphertextBlob`): `"BFK1"`, the 36-byte key id, a 12-byte nonce, then the
//! ciphertext and tag.

use std::collections::BTreeMap;
use std::path::Path;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use blockfleet_core::secret_file::load_or_create_secret;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

const BLOB_MAGIC: &[u8; 4] = b"BFK1";
const KEY_ID_LEN: usize = 36;
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    #[error("root key file {path}: {reason}")]
    RootKey { path: String, reason: String },
    #[error("key store: {0}")]
    Db(#[from] sled::Error),
    #[error("key store is corrupt: {0}")]
    Corrupt(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    pub description: String,
    pub created: u64,
    /// The master key, sealed under the root key: nonce then ciphertext, hex.
    sealed: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub key_id: String,
    pub grantee: String,
    pub operations: Vec<String>,
    /// The request's encryption context must contain these pairs.
    pub context_subset: BTreeMap<String, String>,
    pub name: String,
    pub token: String,
}

/// An unwrapped data key: its master key's id and the plaintext.
pub type Unwrapped = (String, Zeroizing<Vec<u8>>);

pub struct Keystore {
    db: sled::Db,
    keys: sled::Tree,
    grants: sled::Tree,
    root: Aes256Gcm,
}

impl std::fmt::Debug for Keystore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keystore(<sealed>)")
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the OS random source failed");
    b
}

pub use blockfleet_core::ids::new_uuid;

/// Associated data for a context: sorted pairs, each part length-prefixed (unambiguous).
fn context_aad(context: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in context {
        for part in [k, v] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part.as_bytes());
        }
    }
    out
}

fn seal(cipher: &Aes256Gcm, plain: &[u8], aad: &[u8]) -> Vec<u8> {
    let nonce = random::<NONCE_LEN>();
    let ct = cipher
        .encrypt(&Nonce::from(nonce), Payload { msg: plain, aad })
        .expect("AES-GCM encryption cannot fail for these sizes");
    [&nonce[..], &ct].concat()
}

fn open(cipher: &Aes256Gcm, sealed: &[u8], aad: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if sealed.len() < NONCE_LEN + 16 {
        return None;
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_from(nonce).ok()?;
    cipher
        .decrypt(&nonce, Payload { msg: ct, aad })
        .ok()
        .map(Zeroizing::new)
}

impl Keystore {
    /// Opens the store. The root key file is created (0600) only when the store holds no key
    /// yet; a missing, corrupt or group/other-readable root key file is refused.
    pub fn open(data_dir: &Path, root_key_file: &Path) -> Result<Self, KeystoreError> {
        let db = sled::open(data_dir.join("keys.sled"))?;
        let keys = db.open_tree("keys")?;
        let grants = db.open_tree("grants")?;
        let root_err = |reason: String| KeystoreError::RootKey {
            path: root_key_file.display().to_string(),
            reason,
        };
        let root = load_or_create_secret(root_key_file, keys.is_empty()).map_err(|r| {
            if r == "missing" {
                root_err("missing, but the key store holds sealed keys: restore the file".into())
            } else {
                root_err(r)
            }
        })?;
        let root = Aes256Gcm::new_from_slice(&root[..]).expect("32-byte key");
        let store = Keystore {
            db,
            keys,
            grants,
            root,
        };
        // A root key that does not open the stored keys is the wrong file.
        if let Some(first) = store.keys.iter().next() {
            let (id, _) = first?;
            let id = String::from_utf8_lossy(&id).into_owned();
            if store.master(&id)?.is_none() {
                return Err(root_err(
                    "does not open the stored keys (wrong or corrupt root key)".into(),
                ));
            }
        }
        Ok(store)
    }

    pub fn create_key(&self, description: &str, created: u64) -> Result<String, KeystoreError> {
        let id = new_uuid();
        let master = Zeroizing::new(random::<32>());
        let rec = KeyRecord {
            description: description.to_owned(),
            created,
            sealed: hex::encode(seal(&self.root, &master[..], id.as_bytes())),
        };
        self.keys
            .insert(&id, serde_json::to_vec(&rec).expect("serializes"))?;
        self.db.flush()?;
        Ok(id)
    }

    pub fn key(&self, id: &str) -> Result<Option<KeyRecord>, KeystoreError> {
        match self.keys.get(id)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|_| KeystoreError::Corrupt(format!("key {id}"))),
        }
    }

    fn master(&self, id: &str) -> Result<Option<Aes256Gcm>, KeystoreError> {
        let Some(rec) = self.key(id)? else {
            return Ok(None);
        };
        let sealed =
            hex::decode(&rec.sealed).map_err(|_| KeystoreError::Corrupt(format!("key {id}")))?;
        Ok(open(&self.root, &sealed, id.as_bytes())
            .map(|k| Aes256Gcm::new_from_slice(&k).expect("32-byte key")))
    }

    /// Wraps `plain` under key `id` bound to `context`; `None` if the key does not exist.
    pub fn wrap(
        &self,
        id: &str,
        plain: &[u8],
        context: &BTreeMap<String, String>,
    ) -> Result<Option<Vec<u8>>, KeystoreError> {
        let Some(master) = self.master(id)? else {
            return Ok(None);
        };
        let mut blob = BLOB_MAGIC.to_vec();
        blob.extend_from_slice(id.as_bytes());
        blob.extend_from_slice(&seal(&master, plain, &context_aad(context)));
        Ok(Some(blob))
    }

    /// The key id a blob names, if it is one of ours.
    pub fn blob_key_id(blob: &[u8]) -> Option<String> {
        if blob.len() < 4 + KEY_ID_LEN || &blob[..4] != BLOB_MAGIC {
            return None;
        }
        String::from_utf8(blob[4..4 + KEY_ID_LEN].to_vec()).ok()
    }

    /// Unwraps a blob with its context; `None` if the key is unknown, the blob altered, or the
    /// context not the one it was made for.
    pub fn unwrap(
        &self,
        blob: &[u8],
        context: &BTreeMap<String, String>,
    ) -> Result<Option<Unwrapped>, KeystoreError> {
        let Some(id) = Self::blob_key_id(blob) else {
            return Ok(None);
        };
        let Some(master) = self.master(&id)? else {
            return Ok(None);
        };
        Ok(open(&master, &blob[4 + KEY_ID_LEN..], &context_aad(context)).map(|p| (id, p)))
    }

    pub fn put_grant(&self, grant_id: &str, grant: &Grant) -> Result<(), KeystoreError> {
        self.grants
            .insert(grant_id, serde_json::to_vec(grant).expect("serializes"))?;
        self.db.flush()?;
        Ok(())
    }

    pub fn grants(&self) -> Result<Vec<(String, Grant)>, KeystoreError> {
        self.grants
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let g = serde_json::from_slice(&v)
                    .map_err(|_| KeystoreError::Corrupt("grant".into()))?;
                Ok((String::from_utf8_lossy(&k).into_owned(), g))
            })
            .collect()
    }

    pub fn remove_grant(&self, grant_id: &str) -> Result<bool, KeystoreError> {
        let existed = self.grants.remove(grant_id)?.is_some();
        self.db.flush()?;
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn ctx(v: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("blockfleet:volume".to_owned(), v.to_owned())])
    }

    #[test]
    fn wrap_unwrap_binds_context_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root.key");
        let (id, blob) = {
            let ks = Keystore::open(dir.path(), &root).unwrap();
            let id = ks.create_key("k", 1).unwrap();
            let blob = ks.wrap(&id, &[9u8; 64], &ctx("a")).unwrap().unwrap();
            (id, blob)
        };
        let ks = Keystore::open(dir.path(), &root).unwrap();
        let (got_id, plain) = ks.unwrap(&blob, &ctx("a")).unwrap().unwrap();
        assert_eq!((got_id, &plain[..]), (id, &[9u8; 64][..]));
        assert!(
            ks.unwrap(&blob, &ctx("b")).unwrap().is_none(),
            "another volume's context"
        );
        let mut bad = blob.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(ks.unwrap(&bad, &ctx("a")).unwrap().is_none(), "tampered");
        assert!(
            !blob.windows(64).any(|w| w == [9u8; 64]),
            "plaintext in the blob"
        );
    }

    #[test]
    fn root_key_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root.key");
        {
            let ks = Keystore::open(dir.path(), &root).unwrap();
            ks.create_key("k", 1).unwrap();
        }
        assert_eq!(
            std::fs::metadata(&root).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(Keystore::open(dir.path(), &root)
            .unwrap_err()
            .to_string()
            .contains("chmod 600"));
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o600)).unwrap();
        let good = std::fs::read(&root).unwrap();
        std::fs::write(&root, "zz\n").unwrap();
        assert!(Keystore::open(dir.path(), &root)
            .unwrap_err()
            .to_string()
            .contains("does not hold a key"));
        std::fs::write(&root, format!("{}\n", "ab".repeat(32))).unwrap();
        assert!(Keystore::open(dir.path(), &root)
            .unwrap_err()
            .to_string()
            .contains("wrong or corrupt"));
        std::fs::remove_file(&root).unwrap();
        assert!(Keystore::open(dir.path(), &root)
            .unwrap_err()
            .to_string()
            .contains("missing"));
        std::fs::write(&root, good).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Keystore::open(dir.path(), &root).is_ok());
    }
}
