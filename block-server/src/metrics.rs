//! Prometheus metrics: request counts, errors and latency histograms per operation, bytes,
//! fsyncs, flushes, marks, volumes. Served as text at `GET /metrics` on `metrics_listen`.
//!
//! Names are stable and documented in docs/operations.md.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use blockfleet_core::metrics::{counter, gauge, OpMetrics};
use blockfleet_proto::Request;
use tokio::net::TcpListener;

use crate::store::Store;

pub const OPS: [&str; 23] = [
    "create_volume",
    "delete_volume",
    "stat_volume",
    "read",
    "write",
    "flush",
    "write_if_unwritten",
    "chunk_state",
    "pause",
    "mark",
    "resume",
    "read_mark",
    "list_changed_chunks",
    "release_mark",
    "unhydrated_chunks",
    "mark_resume",
    "chunk_versions",
    "reset_chunks",
    "put_chunk",
    "authorize",
    "revoke",
    "chunk_digest",
    "adopt_chunk",
];

/// Index of a request's operation in [`OPS`].
pub fn op_index(req: &Request) -> usize {
    match req {
        Request::CreateVolume { .. } => 0,
        Request::DeleteVolume { .. } => 1,
        Request::StatVolume { .. } => 2,
        Request::Read { .. } => 3,
        Request::Write { .. } => 4,
        Request::Flush { .. } => 5,
        Request::WriteIfUnwritten { .. } => 6,
        Request::ChunkState { .. } => 7,
        Request::Pause { .. } => 8,
        Request::Mark { .. } => 9,
        Request::Resume { .. } => 10,
        Request::ReadMark { .. } => 11,
        Request::ListChangedChunks { .. } => 12,
        Request::ReleaseMark { .. } => 13,
        Request::UnhydratedChunks { .. } => 14,
        Request::MarkResume { .. } => 15,
        Request::ChunkVersions { .. } => 16,
        Request::ResetChunks { .. } => 17,
        Request::PutChunk { .. } => 18,
        Request::Authorize { .. } => 19,
        Request::Revoke { .. } => 20,
        Request::ChunkDigest { .. } => 21,
        Request::AdoptChunk { .. } => 22,
    }
}

#[derive(Debug)]
pub struct Metrics {
    ops: OpMetrics<{ OPS.len() }>,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub fsyncs: AtomicU64,
    pub flushes: AtomicU64,
    pub marks: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            ops: OpMetrics::new(OPS),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            marks: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn record(&self, op: usize, ok: bool, elapsed: Duration) {
        self.ops.record(op, ok, elapsed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, volumes: usize) -> String {
        let mut out = String::new();
        self.ops.render(&mut out, "blockfleet_bs");
        counter(
            &mut out,
            "blockfleet_bs_read_bytes_total",
            "Bytes returned by Read.",
            &self.bytes_read,
        );
        counter(
            &mut out,
            "blockfleet_bs_written_bytes_total",
            "Bytes stored by Write and WriteIfUnwritten.",
            &self.bytes_written,
        );
        counter(
            &mut out,
            "blockfleet_bs_fsyncs_total",
            "fdatasync calls on extent files.",
            &self.fsyncs,
        );
        counter(
            &mut out,
            "blockfleet_bs_flushes_total",
            "Flush and FUA requests (group commit shares fsyncs among them).",
            &self.flushes,
        );
        counter(
            &mut out,
            "blockfleet_bs_marks_total",
            "Snapshot marks taken.",
            &self.marks,
        );
        gauge(
            &mut out,
            "blockfleet_bs_volumes",
            "Volumes on this server.",
            volumes as u64,
        );
        out
    }
}

/// Serves `GET /metrics` until the task is dropped.
pub async fn serve(store: Arc<Store>, listener: TcpListener) {
    let render = move || store.metrics.render(store.volume_count());
    blockfleet_core::metrics::serve(listener, Arc::new(render)).await;
}
