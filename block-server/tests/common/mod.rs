//! What the block server's tests share: a server started in-process with `run` on
//! 127.0.0.1, and test data.
#![allow(dead_code, unused_imports)] // each test binary uses a part

pub use std::sync::Arc;
pub use std::time::Duration;

pub use blockfleet_block_server::{run, BlockServerConfig, Store};
pub use blockfleet_core::ids::VolumeId;
pub use blockfleet_core::token::TokenKey;
pub use blockfleet_core::units::{CHUNK, SECTOR};
pub use blockfleet_proto::{BlockClient, ErrorCode, Request, Response};
pub use bytes::Bytes;
pub use tokio::io::{AsyncReadExt, AsyncWriteExt};
pub use tokio::sync::oneshot;

pub struct Server {
    pub addr: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
    pub config: BlockServerConfig,
}

impl Server {
    pub async fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config = BlockServerConfig {
            data_dir: dir.path().join("bs"),
            ..Default::default()
        };
        let mut s = Server::start_with(config).await;
        s._dir = Some(dir);
        s
    }

    pub async fn start_with(mut config: BlockServerConfig) -> Server {
        // The key file beside the data directory (in the test's temporary directory).
        config.token_key_file = config.data_dir.with_file_name("block-token.key");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = oneshot::channel();
        let c = config.clone();
        let task = tokio::spawn(async move {
            run(c, listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Server {
            addr,
            stop: Some(tx),
            task: Some(task),
            _dir: None,
            config,
        }
    }

    /// A client holding an admin capability (as the control plane's connections do).
    pub async fn client(&self) -> BlockClient {
        let c = self.plain_client().await;
        c.authorize_admin(&self.key(), "test-admin").await.unwrap();
        c
    }

    /// A client that presented no capability.
    pub async fn plain_client(&self) -> BlockClient {
        BlockClient::connect(&self.addr).await.unwrap()
    }

    pub fn key(&self) -> TokenKey {
        TokenKey::load_or_create(&self.config.token_key_file).unwrap()
    }

    /// Graceful stop (the data directory stays while `self` lives).
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }

    /// Graceful stop, then start again on the same data directory.
    pub async fn restart(mut self) -> Server {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.take().unwrap().await.unwrap();
        let mut s = Server::start_with(self.config.clone()).await;
        s._dir = self._dir.take();
        s
    }
}

pub fn pattern(unit: u64, tag: u8) -> Vec<u8> {
    let mut v = vec![tag; SECTOR as usize];
    v[..8].copy_from_slice(&unit.to_le_bytes());
    v
}

pub fn vol() -> VolumeId {
    VolumeId::generate()
}
