//! The manifest MAC key: 32 random bytes kept as hex in a file of mode 0600, created on first
//! use. (A later step moves it into the KMS, wrapped; the file stays the single-node default.)

use std::fmt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;
use zeroize::Zeroize;

use blockfleet_core::secret_file::{load_or_create_secret, KEY_LEN};

/// A key file that could not be loaded or created; the reason never holds key bytes.
#[derive(Debug, Error)]
#[error("manifest key {path}: {reason}")]
pub struct KeyFileError {
    pub path: String,
    pub reason: String,
}

/// The HMAC-SHA256 key that authenticates manifests. Zeroized on drop; never printed.
pub struct ManifestKey([u8; KEY_LEN]);

impl Drop for ManifestKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for ManifestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ManifestKey(<redacted>)")
    }
}

impl ManifestKey {
    pub fn generate() -> Self {
        let mut k = [0u8; KEY_LEN];
        getrandom::fill(&mut k).expect("the OS random source failed");
        ManifestKey(k)
    }

    /// A key from raw bytes (unwrapped from the KMS, or for tests and fuzzing).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        ManifestKey(bytes)
    }

    /// An HMAC-SHA256 keyed with this key: the key bytes never leave this crate.
    pub fn hmac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.0).expect("any key length")
    }

    /// Loads the key file, creating it (mode 0600) if it does not exist. A file readable by
    /// group or others, or not holding exactly one key, is refused.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyFileError> {
        load_or_create_secret(path, true)
            .map(|k| ManifestKey(*k))
            .map_err(|reason| KeyFileError {
                path: path.display().to_string(),
                reason,
            })
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn created_once_with_mode_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/manifest.key");
        let a = ManifestKey::load_or_create(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let b = ManifestKey::load_or_create(&p).unwrap();
        assert_eq!(a.0, b.0);
        assert_eq!(format!("{a:?}"), "ManifestKey(<redacted>)");
        assert_eq!(
            fs::read_dir(p.parent().unwrap()).unwrap().count(),
            1,
            "no temp left"
        );
    }

    #[test]
    fn wide_mode_and_garbage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        ManifestKey::load_or_create(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = ManifestKey::load_or_create(&p).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&p, "abcd\n").unwrap();
        let err = ManifestKey::load_or_create(&p).unwrap_err().to_string();
        assert!(err.contains("does not hold a key"), "{err}");
    }
}
