//! Secret files: a 32-byte secret kept as hex in a file of mode 0600, created on first use
//! (the manifest key file, the embedded KMS's root key).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::fsutil::{create_dir_all_durable, write_new};
use zeroize::Zeroizing;

/// Bytes in a secret file's key.
pub const KEY_LEN: usize = 32;

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
