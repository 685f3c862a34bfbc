//! Crash-safe file writes: a file that must survive a crash is written to a temporary file in
//! the same directory, fsynced, renamed over its final name, and the directory fsynced, so a
//! reader sees either the old file or the whole new one, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A name for a temporary sibling of `path`, unique to this process and call.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd).expect("the OS random source failed");
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        hex::encode(rnd)
    ))
}

/// Fsyncs a directory so a rename or create inside it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `data` to the new file `tmp` (mode `mode`) and fsyncs it.
fn write_synced(tmp: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Atomically replaces `path` with `data`, durably, staging it at `tmp` (same filesystem).
pub fn replace_via(tmp: &Path, path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let result = write_synced(tmp, data, mode)
        .and_then(|()| fs::rename(tmp, path))
        .and_then(|()| sync_dir(parent_of(path)));
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// Atomically replaces `path` with `data` (file mode `mode` for a new file), durably.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    replace_via(&temp_sibling(path), path, data, mode)
}

/// Creates `path` holding `data`, durably, but never replaces an existing file: if `path`
/// exists (another process won the race) it is left as it is and this is not an error.
pub fn write_new(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_sibling(path);
    let result = write_synced(&tmp, data, mode)
        .and_then(|()| match fs::hard_link(&tmp, path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            other => other,
        })
        .and_then(|()| sync_dir(parent_of(path)));
    let _ = fs::remove_file(&tmp);
    result
}

/// Creates `dir` and any missing parents, fsyncing each parent whose entry list changed.
pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(
            dir.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        ),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing-dir").join("f");
        assert!(write_atomic(&p, b"x", 0o600).is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn write_new_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_new(&p, b"first", 0o600).unwrap();
        write_new(&p, b"second", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"first");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn nested_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/c");
        create_dir_all_durable(&p).unwrap();
        assert!(p.is_dir());
        create_dir_all_durable(&p).unwrap();
    }
}
