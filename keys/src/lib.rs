//! `blockfleet-keys`: the only crate with plaintext key types. The block server does not link it
//! (checked in CI with `cargo tree`), so it can hold no key by construction.
//!
//! - [`xts`]: AES-256-XTS over 4096-byte data units and the zeroizing key type.
//! - `kms` (feature `kms`): the KMS client (any AWS KMS API) for envelope encryption, and the key cache.
//! - [`manifest_key`]: the HMAC key that authenticates snapshot manifests.
//! - [`locked`]: pages of their own for key material: `mlock`ed, `MADV_DONTDUMP`, zeroed on free.
//! - [`harden`]: key-holding processes made non-dumpable, without core files.

pub mod harden;
#[cfg(feature = "kms")]
pub mod kms;
pub mod locked;
pub mod manifest_key;
pub mod xts;

pub use manifest_key::{KeyFileError, ManifestKey};
pub use xts::{CryptoError, Xts, XtsKey};
