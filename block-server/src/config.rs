//! The block server's config is the `[block_server]` section of the fleet config.

pub use blockfleet_core::config::BlockServerConfig;
