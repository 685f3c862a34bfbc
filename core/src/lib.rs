//! `blockfleet-core`: the plumbing every blockfleet service shares. It holds no key type and no
//! cipher: those live in `blockfleet-keys`, which the block server never links.
//!
//! - [`ids`]: AWS-shaped volume, snapshot and instance ids, and KMS key ids.
//! - [`units`]: sector and chunk sizes, offset and range arithmetic with overflow and alignment checks.
//! - [`config`]: the TOML configuration shared by the binary and the services.
//! - `aws` (feature `aws`): the one AWS SDK client setup (TLS, region, endpoint, credentials, retries).
//! - [`metrics`]: Prometheus text metrics (per-op counters and histograms) and `/metrics`.
//! - [`httpjson`]: the HTTP/1 JSON server loop, client and error shape of the JSON APIs.
//! - [`sigv4`]: AWS SigV4 request verification for the AWS-shaped APIs blockfleet serves.
//! - [`object_key`]: object-store key syntax.
//! - [`fsutil`]: crash-safe file writes (temp file, fsync, rename, fsync directory).
//! - [`secret_file`]: 32-byte secrets kept in 0600 files, created on first use.
//! - [`tls`]: the fleet CA and per-role certificates; rustls server and client configs.
//! - [`token`]: fleet capability tokens (HMAC) the control plane issues and transform workers check.

#[cfg(feature = "aws")]
pub mod aws;
pub mod config;
pub mod fsutil;
pub mod httpjson;
pub mod ids;
pub mod metrics;
pub mod object_key;
pub mod secret_file;
pub mod sigv4;
pub mod tls;
pub mod token;
pub mod units;
