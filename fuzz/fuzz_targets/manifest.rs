//! The snapshot manifest decoder on arbitrary bytes (with a fixed key): never a panic.
#![no_main]

use blockfleet_core::ids::SnapshotId;
use blockfleet_snapshot_format::{Manifest, ManifestKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let id: SnapshotId = "snap-0123456789abcdef0".parse().expect("valid id");
    let key = ManifestKey::from_bytes([7u8; 32]);
    let _ = Manifest::decode(data, &key, &id);
});
