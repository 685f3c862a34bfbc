//! One shared connection per block server, reconnected after it breaks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockfleet_core::token::TokenKey;

use super::{BlockClient, ClientError, Grant};

/// Capabilities a pool keeps for new connections.
const MAX_GRANTS: usize = 4096;

/// Connections by block-server address.
#[derive(Debug, Default)]
pub struct BlockPool {
    clients: Mutex<HashMap<String, Arc<BlockClient>>>,
    /// Presented on every new connection: the control plane's admin capability.
    admin: Option<(Arc<TokenKey>, String)>,
    /// Capabilities given with [`BlockPool::grant`], one per scope, presented on every
    /// connection (a transform worker's).
    grants: Mutex<Vec<Grant>>,
}

impl BlockPool {
    pub fn new() -> Self {
        Self::default()
    }

    /// A pool whose every connection holds an admin capability issued under `key` to `holder`.
    pub fn with_admin(key: Arc<TokenKey>, holder: &str) -> Self {
        BlockPool {
            clients: Mutex::default(),
            admin: Some((key, holder.to_owned())),
            grants: Mutex::default(),
        }
    }

    /// Keeps `grant` (replacing one of the same scope) for every connection: presented now on
    /// the open ones, and on each new one.
    pub async fn grant(&self, grant: Grant) {
        {
            let mut g = self.grants.lock().unwrap_or_else(|p| p.into_inner());
            g.retain(|x| x.volume != grant.volume);
            // Bounded: the oldest go first (their jobs are long done, or ask again).
            if g.len() >= MAX_GRANTS {
                g.remove(0);
            }
            g.push(grant.clone());
        }
        let open: Vec<Arc<BlockClient>> = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for c in open {
            // A connection that refuses or is gone is replaced at its next use.
            if c.authorize(&grant).await.is_err() {
                self.forget(c.addr());
            }
        }
    }

    /// The connection to `addr`, opened (within 5 s) if there is none.
    pub async fn get(&self, addr: &str) -> Result<Arc<BlockClient>, ClientError> {
        if let Some(c) = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(addr)
        {
            if !c.is_closed() {
                return Ok(Arc::clone(c));
            }
        }
        let c = tokio::time::timeout(Duration::from_secs(5), BlockClient::connect(addr))
            .await
            .map_err(|_| ClientError::ConnectionLost {
                addr: addr.to_owned(),
                reason: "connect timed out after 5 s".into(),
            })??;
        if let Some((key, holder)) = &self.admin {
            c.authorize_admin(key, holder).await?;
        }
        let grants = self
            .grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for g in &grants {
            // One that no longer holds (expired) is given again with the job that needs it.
            if let Err(e) = c.authorize(g).await {
                tracing::debug!(addr, volume = ?g.volume, error = %e, "capability not renewed");
            }
        }
        let c = Arc::new(c);
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.to_owned(), Arc::clone(&c));
        Ok(c)
    }

    /// Forgets the connection to `addr`.
    pub fn forget(&self, addr: &str) {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(addr);
    }

    /// Forgets a connection after an error that may mean it is broken.
    pub fn forget_if_broken(&self, addr: &str, e: &ClientError) {
        if e.code().is_none() {
            self.clients
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(addr);
        }
    }
}
