//! The manifest MAC key: 32 random bytes kept as hex in a file of mode 0600, created on first
//! use. (A later step moves it into the KMS, wrapped; the file stays the single-node default.)

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use zeroize::{Zeroize, Zeroizing};

use super::SnapshotError;
use crate::fsutil::{create_dir_all_durable, write_new};

const KEY_LEN: usize = 32;

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

    pub(crate) fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
    /// Loads the key file, creating it (mode 0600) if it does not exist. A file readable by
    /// group or others, or not holding exactly one key, is refused.
    pub fn load_or_create(path: &Path) -> Result<Self, SnapshotError> {
        load_or_create_secret(path, true)
            .map(|k| ManifestKey(*k))
            .map_err(|reason| SnapshotError::ManifestKey {
                path: path.display().to_string(),
                reason,
            })
    }
}

/// Loads a 32-byte secret kept as hex in a file of mode 0600. With `create`, a missing file is
/// created (never replacing one another process created at the same moment). A file readable
/// by group or others, or not holding exactly one key, is refused with the reason.
pub fn load_or_create_secret(
    path: &Path,
    create: bool,
) -> Result<Zeroizing<[u8; KEY_LEN]>, String> {
    match fs::metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
            let mut fresh = Zeroizing::new([0u8; KEY_LEN]);
            getrandom::fill(&mut fresh[..]).map_err(|e| e.to_string())?;
            create_new(path, &fresh).map_err(|e| format!("cannot create: {e}"))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err("missing".into()),
        Err(e) => return Err(e.to_string()),
    }
    let mode = fs::metadata(path)
        .map_err(|e| e.to_string())?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "mode {:o} lets others read it; run chmod 600 on it",
            mode & 0o777
        ));
    }
    let text = Zeroizing::new(fs::read_to_string(path).map_err(|e| e.to_string())?);
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    hex::decode_to_slice(text.trim_end(), &mut key[..])
        .map_err(|_| format!("does not hold a key ({} hex digits expected)", KEY_LEN * 2))?;
    Ok(key)
}

/// Writes a new key file without ever replacing one: two processes starting at once agree on
/// one key (the loser of the race reads the winner's).
fn create_new(path: &Path, key: &[u8; KEY_LEN]) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_dir_all_durable(dir)?;
    }
    let text = Zeroizing::new(hex::encode(key) + "\n");
    write_new(path, text.as_bytes(), 0o600)
}

#[cfg(test)]
mod tests {
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
