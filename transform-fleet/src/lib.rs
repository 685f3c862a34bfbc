//! `blockfleet-transform-fleet`: the isolated fleet that turns plaintext (or differently
//! encrypted) snapshot chunks into ciphertext under each target volume's own key and streams
//! it to the block servers.
//!
//! Nothing is built here yet: the workers arrive with the "Transform fleet and volumes from
//! snapshots" issue. Until then this crate holds no code, so nothing can call it by mistake.
