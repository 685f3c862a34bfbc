//! The `blockfleet` package's library half: services that live in the root package rather than
//! a crate of their own, so the binary runs them and tests start them in-process.
//!
//! - [`kms_server`]: the embedded KMS (`blockfleet kms`).
//! - [`host_agent`]: the NBD front end that holds a volume's key (`blockfleet attach`).

pub mod host_agent;
pub mod kms_server;
