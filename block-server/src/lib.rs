//! `blockfleet-block-server`: the user-facing store of ciphertext blocks. It never holds, receives
//! or persists a key: it stores bytes at offsets and tracks per-chunk state.
//!
//! - [`access`]: capabilities (`Authorize`), rights per connection, revocations.
//! - [`config`]: the `[block_server]` section of the TOML config.
//! - [`meta`]: the sled metadata store (volume registry, per-chunk state, mark epochs, clean flag).
//! - [`volume`]: one volume: its sparse extent file, chunk state, pause gate, open mark and
//!   copy-on-write area.
//! - [`store`]: every volume of the server, startup recovery, and group-committed flush.
//! - [`metrics`]: Prometheus counters and latency histograms, served at `/metrics`.
//! - [`server`]: the TCP block protocol: handshake, pipelined requests, graceful shutdown.
//!
//! [`run`] serves a store on a listener until `shutdown` completes.

pub mod access;
pub mod config;
pub mod meta;
pub mod metrics;
pub mod server;
pub mod store;
pub mod volume;

use std::future::Future;

use thiserror::Error;
use tokio::net::TcpListener;

pub use config::BlockServerConfig;
pub use store::Store;

#[derive(Debug, Error)]
pub enum BlockServerError {
    #[error("block server data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata store: {0}")]
    Meta(#[from] sled::Error),
    #[error("volume {volume}: {reason}")]
    CorruptVolume { volume: String, reason: String },
    #[error("config: {0}")]
    Config(String),
    #[error(
        "block server data directory {path}: disk full; stopped cleanly (free space, then \
         start it again: its replicas are repaired from the others)"
    )]
    DiskFull { path: String },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Opens the store under `config.data_dir` and serves it on `listener` until `shutdown`
/// resolves; then stops accepting, lets in-flight requests finish, flushes and marks the store
/// cleanly shut down.
/// Revocations (detaches) kept across restarts, in the data directory.
pub const REVOCATIONS_FILE: &str = "revoked.json";

pub async fn run(
    config: BlockServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), BlockServerError> {
    config
        .validate()
        .map_err(|e| BlockServerError::Config(e.to_string()))?;
    let key = blockfleet_core::token::TokenKey::load_or_create(&config.token_key_file)
        .map_err(|e| BlockServerError::Config(e.to_string()))?;
    let tls = match &config.tls {
        Some(t) => Some(
            blockfleet_core::tls::server_config(&t.dir, blockfleet_core::tls::Role::BlockServer)
                .map_err(|e| BlockServerError::Config(e.to_string()))?,
        ),
        None => None,
    };
    let store = std::sync::Arc::new(Store::open(&config)?);
    let access = std::sync::Arc::new(
        access::Access::with_revocations(key, config.data_dir.join(REVOCATIONS_FILE))
            .map_err(BlockServerError::Config)?,
    );
    let metrics = match &config.metrics_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr).await?;
            tracing::info!(addr = %l.local_addr()?, "metrics at /metrics");
            Some(tokio::spawn(metrics::serve(store.clone(), l)))
        }
        None => None,
    };
    let full = store.disk_full();
    let stop = async move {
        tokio::select! {
            () = shutdown => {}
            () = full => {}
        }
    };
    server::serve(store.clone(), access, tls, &config, listener, stop).await;
    if let Some(m) = metrics {
        m.abort();
    }
    let closed = store.close().await;
    if store.is_disk_full() {
        return Err(BlockServerError::DiskFull {
            path: config.data_dir.display().to_string(),
        });
    }
    closed
}
