//! `blockfleet-proto`: the block protocol between block servers and their clients (host agent,
//! transform fleet, control plane), and the client library. Ciphertext only: no key type here.
//!
//! - [`wire`]: frames, the versioned handshake, request and response messages, their encoding.
//! - [`client`]: a pipelined client: many requests in flight on one connection, answered out of
//!   order and matched by request id.
//! - [`pool`]: one shared connection per block server.
//! - [`transport`]: plain TCP or mutual TLS with the process's fleet certificate.
//! - [`grant`]: capabilities a client presents so a block server lets it act on a volume.

pub mod client;
pub mod grant;
pub mod pool;
pub mod transport;
pub mod wire;

pub use client::{BlockClient, ClientError};
pub use grant::Grant;
pub use pool::BlockPool;
pub use transport::Transport;
pub use wire::{ChunkInfo, ErrorCode, Request, Response, VolumeStat, PROTOCOL_VERSION};
