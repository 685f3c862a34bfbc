//! `blockfleet-block-server`: the user-facing store of ciphertext blocks. It never holds a key.
//!
//! Nothing is built here yet: the store, wire protocol and snapshot marks arrive with the
//! "Block server" issue. Until then this crate holds no code, so nothing can call it by mistake.
