//! The worker's Prometheus metrics.

use std::sync::atomic::AtomicU64;

use blockfleet_core::metrics::{counter, OpMetrics};

#[derive(Debug)]
pub struct Metrics {
    /// Source chunks read from the store (each once per job, whatever the number of targets).
    pub source_chunks: AtomicU64,
    pub chunks_written: AtomicU64,
    pub jobs_done: AtomicU64,
    pub jobs_failed: AtomicU64,
    pub jobs_retried: AtomicU64,
    /// On-demand fetches (host agents reading unhydrated chunks).
    pub fetch: OpMetrics<1>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            source_chunks: AtomicU64::new(0),
            chunks_written: AtomicU64::new(0),
            jobs_done: AtomicU64::new(0),
            jobs_failed: AtomicU64::new(0),
            jobs_retried: AtomicU64::new(0),
            fetch: OpMetrics::new(["fetch"]),
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, help, v) in [
            (
                "blockfleet_transform_source_chunks_total",
                "Source chunks read and verified.",
                &self.source_chunks,
            ),
            (
                "blockfleet_transform_chunks_written_total",
                "Target chunks written (WriteIfUnwritten).",
                &self.chunks_written,
            ),
            (
                "blockfleet_transform_jobs_done_total",
                "Hydration jobs finished.",
                &self.jobs_done,
            ),
            (
                "blockfleet_transform_jobs_failed_total",
                "Hydration jobs failed for good.",
                &self.jobs_failed,
            ),
            (
                "blockfleet_transform_jobs_retried_total",
                "Hydration attempts given back for retry.",
                &self.jobs_retried,
            ),
        ] {
            counter(&mut out, name, help, v);
        }
        self.fetch.render(&mut out, "blockfleet_transform");
        out
    }
}
