//! The key cache of transform workers and host agents: unwrapped volume keys, ready to use, kept
//! in memory for at most `ttl` and `max_uses` uses, at most `capacity` of them. An evicted key is
//! zeroized when its last user drops it (the `aes` crate zeroizes expanded keys on drop). A
//! retired grant therefore takes effect within one TTL.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::KmsError;
use crate::xts::{Xts, XtsKey};
use blockfleet_core::ids::VolumeId;

#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    pub ttl: Duration,
    pub max_uses: u64,
    pub capacity: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            ttl: Duration::from_secs(300),
            max_uses: 1 << 32,
            capacity: 1024,
        }
    }
}

struct Entry {
    cipher: Arc<Xts>,
    loaded: Instant,
    uses: u64,
}

#[derive(Default)]
pub struct KeyCache {
    limits: CacheLimits,
    entries: Mutex<HashMap<[u8; 32], Entry>>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KeyCache({} hits, {} misses)",
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed)
        )
    }
}

/// Cache slot of a wrapped key for a volume (a hash: the wrapped key itself is not kept).
fn slot(wrapped: &[u8], volume: &VolumeId) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(volume.as_str().as_bytes());
    h.update([0]);
    h.update(wrapped);
    h.finalize().into()
}

impl KeyCache {
    pub fn new(limits: CacheLimits) -> Self {
        KeyCache {
            limits,
            ..Default::default()
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cipher for `volume`'s wrapped key: from the cache while fresh, else from `load`
    /// (which asks the KMS, and so checks the caller's grant again).
    pub async fn get<F, Fut>(
        &self,
        wrapped: &[u8],
        volume: &VolumeId,
        load: F,
    ) -> Result<Arc<Xts>, KmsError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<XtsKey, KmsError>>,
    {
        let key = slot(wrapped, volume);
        {
            let mut entries = self.entries();
            if let Some(e) = entries.get_mut(&key) {
                if e.loaded.elapsed() < self.limits.ttl && e.uses < self.limits.max_uses {
                    e.uses += 1;
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Arc::clone(&e.cipher));
                }
                entries.remove(&key);
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let cipher = Arc::new(Xts::new(&load().await?));
        let mut entries = self.entries();
        if entries.len() >= self.limits.capacity {
            // Evict the oldest entry.
            if let Some(oldest) = entries
                .iter()
                .min_by_key(|(_, e)| e.loaded)
                .map(|(k, _)| *k)
            {
                entries.remove(&oldest);
            }
        }
        entries.insert(
            key,
            Entry {
                cipher: Arc::clone(&cipher),
                loaded: Instant::now(),
                uses: 1,
            },
        );
        Ok(cipher)
    }

    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loader(calls: &AtomicU64) -> impl Future<Output = Result<XtsKey, KmsError>> + '_ {
        calls.fetch_add(1, Ordering::Relaxed);
        async { Ok(XtsKey::generate()) }
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_use_limit_and_capacity() {
        let cache = KeyCache::new(CacheLimits {
            ttl: Duration::from_secs(60),
            max_uses: 3,
            capacity: 2,
        });
        let calls = AtomicU64::new(0);
        let v = VolumeId::generate();
        let a = cache.get(b"w1", &v, || loader(&calls)).await.unwrap();
        let b = cache.get(b"w1", &v, || loader(&calls)).await.unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        cache.get(b"w1", &v, || loader(&calls)).await.unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        // Fourth use exceeds max_uses: reloaded.
        cache.get(b"w1", &v, || loader(&calls)).await.unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        // TTL: after 61 s it is loaded again.
        tokio::time::advance(Duration::from_secs(61)).await;
        cache.get(b"w1", &v, || loader(&calls)).await.unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        // Another volume with the same wrapped bytes is another slot.
        cache
            .get(b"w1", &VolumeId::generate(), || loader(&calls))
            .await
            .unwrap();
        cache.get(b"w2", &v, || loader(&calls)).await.unwrap();
        assert_eq!(cache.len(), 2, "capacity bound");
        assert_eq!(cache.hits.load(Ordering::Relaxed), 2);
        assert_eq!(cache.misses.load(Ordering::Relaxed), 5);
    }

    #[tokio::test]
    async fn failed_load_is_not_cached() {
        let cache = KeyCache::new(CacheLimits::default());
        let v = VolumeId::generate();
        let err = cache
            .get(b"w", &v, || async {
                Err(KmsError::AccessDenied("no grant".into()))
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), "AccessDeniedException");
        assert!(cache.is_empty());
    }
}
