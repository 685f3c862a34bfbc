//! `blockfleet-core`: what every blockfleet service shares.
//!
//! - `aws`: the one AWS SDK client setup (TLS, region, endpoint, credentials, retries).
//! - [`blockproto`]: the block protocol (versioned binary frames) and its pipelined client.
//! - [`units`]: sector and chunk sizes, offset and range arithmetic with overflow and alignment checks.
//! - [`ids`]: AWS-shaped volume, snapshot and instance ids, and KMS key ids.
//! - [`crypto`]: AES-256-XTS over 4096-byte data units and the zeroizing key type.
//! - [`kms`]: the KMS client (any AWS KMS API) for envelope encryption, and the key cache.
//! - [`metrics`]: Prometheus text metrics (per-op counters and histograms) and `/metrics`.
//! - [`nbd`]: the NBD protocol (fixed newstyle): constants, pure parsers, reply framing.
//! - [`snapshot`]: the snapshot format: content-addressed chunks, the MAC'd manifest, the manifest key.
//! - [`store`]: the object-store trait with its local-directory and S3 backends.
//! - [`config`]: the TOML configuration shared by the binary and the services.
//! - [`sigv4`]: AWS SigV4 request verification for the AWS-shaped APIs blockfleet serves.
//! - [`fsutil`]: crash-safe file writes (temp file, fsync, rename, fsync directory).

pub mod api;
#[cfg(any(feature = "s3", feature = "kms"))]
pub mod aws;
pub mod blockproto;
pub mod config;
pub mod crypto;
pub mod fsutil;
pub mod httpjson;
pub mod ids;
#[cfg(feature = "kms")]
pub mod kms;
pub mod metrics;
pub mod nbd;
pub mod sigv4;
pub mod snapshot;
pub mod store;
pub mod units;
