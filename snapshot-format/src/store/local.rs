//! The local-directory object store, the embedded default. An object is a file under the root;
//! a put writes `<root>/.tmp/<random>`, fsyncs it, renames it into place and fsyncs the parent
//! directory, so a crash leaves either the old object or the whole new one.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use super::{validate_key, validate_prefix, ObjectStore, StoreError};
use blockfleet_core::fsutil::{create_dir_all_durable, replace_via, sync_dir, temp_sibling};

const TMP_DIR: &str = ".tmp";
/// Temp files older than this are debris of a crashed writer and are removed at open.
const STALE_TMP_AGE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Opens (creating if missing) a store rooted at `root`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let store = LocalStore {
            root: root.to_path_buf(),
        };
        let io_err = |source| StoreError::Io {
            store: store.describe(),
            op: "open",
            key: String::new(),
            source,
        };
        create_dir_all_durable(&root.join(TMP_DIR)).map_err(io_err)?;
        store.remove_stale_temps().map_err(io_err)?;
        Ok(store)
    }

    fn remove_stale_temps(&self) -> io::Result<()> {
        let now = SystemTime::now();
        for entry in fs::read_dir(self.root.join(TMP_DIR))? {
            let entry = entry?;
            let age = entry
                .metadata()?
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if age > STALE_TMP_AGE {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    fn io(&self, op: &'static str, key: &str, source: io::Error) -> StoreError {
        if source.kind() == io::ErrorKind::NotFound {
            StoreError::NotFound {
                store: self.describe(),
                key: key.to_owned(),
            }
        } else {
            StoreError::Io {
                store: self.describe(),
                op,
                key: key.to_owned(),
                source,
            }
        }
    }

    fn put_blocking(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        create_dir_all_durable(path.parent().unwrap_or(&self.root))?;
        let tmp = temp_sibling(&self.root.join(TMP_DIR).join("obj"));
        replace_via(&tmp, path, data, 0o644)
    }

    fn list_blocking(&self, prefix: &str) -> io::Result<Vec<String>> {
        // Walk only the deepest directory the prefix names in full.
        let dir_part = prefix.rfind('/').map_or("", |i| &prefix[..i]);
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.root.join(dir_part)
        };
        let mut keys = Vec::new();
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with('.') {
                    continue;
                }
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(&self.root) {
                    if let Some(key) = rel.to_str() {
                        if key.starts_with(prefix) {
                            keys.push(key.to_owned());
                        }
                    }
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        key: &str,
        f: impl FnOnce(LocalStore) -> io::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || f(this)).await {
            Ok(r) => r.map_err(|e| self.io(op, key, e)),
            Err(join) => Err(StoreError::Backend {
                store: self.describe(),
                op,
                key: key.to_owned(),
                reason: format!("I/O task failed: {join}"),
            }),
        }
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!("local:{}", self.root.display())
    }

    async fn check(&self) -> Result<(), StoreError> {
        let root = self.root.clone();
        self.blocking("check", "", move |_| {
            if fs::metadata(&root)?.is_dir() {
                Ok(())
            } else {
                Err(io::Error::other("store root is not a directory"))
            }
        })
        .await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        self.blocking("put", key, move |s| s.put_blocking(&path, &data))
            .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.path_of(key)?;
        self.blocking("get", key, move |_| fs::read(path).map(Bytes::from))
            .await
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let path = self.path_of(key)?;
        self.blocking("head", key, move |_| match fs::metadata(path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        validate_prefix(prefix)?;
        let p = prefix.to_owned();
        self.blocking("list", prefix, move |s| s.list_blocking(&p))
            .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        self.blocking("delete", key, move |s| match fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().unwrap_or(&s.root)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
        .await
    }
}
