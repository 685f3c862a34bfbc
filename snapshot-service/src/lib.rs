//! `blockfleet-snapshot-service`: the control plane.
//!
//! - [`control_plane`]: the HTTP JSON API (volumes, attachments, instances) and hydration jobs.
//! - [`state`]: its durable state (sled).
//! - [`image`]: import a raw disk image into the snapshot archive and export a snapshot back
//!   to a raw image (parallel hashing and transfer, dedup, zero chunks skipped).
//! - [`progress`]: the progress callback the CLI draws its bar from.
//!
//! The `CreateSnapshots` coordinator and the EBS direct APIs come with their issues.

pub mod control_plane;
pub mod image;
pub mod progress;
pub mod state;

pub use image::{
    export_image, import_image, ExportOptions, ExportReport, ImageError, ImportOptions,
    ImportReport,
};
pub use progress::{NoProgress, Progress};
