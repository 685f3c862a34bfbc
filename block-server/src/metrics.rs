//! Prometheus metrics: request counts, errors and latency histograms per operation, bytes,
//! fsyncs, flushes, marks, volumes. Served as text at `GET /metrics` on `metrics_listen`.
//!
//! Names are stable and documented in docs/operations.md.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockfleet_core::blockproto::Request;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use tokio::net::TcpListener;

use crate::store::Store;

pub const OPS: [&str; 14] = [
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
    }
}

/// Latency bucket upper bounds, seconds.
const BUCKETS: [f64; 12] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5,
];

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| s <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    requests: [AtomicU64; OPS.len()],
    errors: [AtomicU64; OPS.len()],
    latency: [Histogram; OPS.len()],
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub fsyncs: AtomicU64,
    pub flushes: AtomicU64,
    pub marks: AtomicU64,
}

impl Metrics {
    pub fn record(&self, op: usize, ok: bool, elapsed: Duration) {
        self.requests[op].fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors[op].fetch_add(1, Ordering::Relaxed);
        }
        self.latency[op].observe(elapsed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, volumes: usize) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        };
        let _ = writeln!(out, "# HELP blockfleet_bs_requests_total Requests served, by operation.\n# TYPE blockfleet_bs_requests_total counter");
        for (i, op) in OPS.iter().enumerate() {
            let _ = writeln!(
                out,
                "blockfleet_bs_requests_total{{op=\"{op}\"}} {}",
                self.requests[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP blockfleet_bs_request_errors_total Requests refused or failed, by operation.\n# TYPE blockfleet_bs_request_errors_total counter");
        for (i, op) in OPS.iter().enumerate() {
            let _ = writeln!(
                out,
                "blockfleet_bs_request_errors_total{{op=\"{op}\"}} {}",
                self.errors[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP blockfleet_bs_request_seconds Request latency in the server, by operation.\n# TYPE blockfleet_bs_request_seconds histogram");
        for (i, op) in OPS.iter().enumerate() {
            let h = &self.latency[i];
            let mut cumulative = 0;
            for (b, bound) in BUCKETS.iter().enumerate() {
                cumulative += h.buckets[b].load(Ordering::Relaxed);
                let _ = writeln!(out, "blockfleet_bs_request_seconds_bucket{{op=\"{op}\",le=\"{bound}\"}} {cumulative}");
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "blockfleet_bs_request_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "blockfleet_bs_request_seconds_sum{{op=\"{op}\"}} {}",
                h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "blockfleet_bs_request_seconds_count{{op=\"{op}\"}} {count}"
            );
        }
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
        let _ = writeln!(out, "# HELP blockfleet_bs_volumes Volumes on this server.\n# TYPE blockfleet_bs_volumes gauge\nblockfleet_bs_volumes {volumes}");
        out
    }
}

/// Serves `GET /metrics` until the task is dropped.
pub async fn serve(store: Arc<Store>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let store = Arc::clone(&store);
                    async move {
                        let resp = if req.uri().path() == "/metrics" {
                            Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(Full::new(Bytes::from(
                                    store.metrics.render(store.volume_count()),
                                )))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"not found\n")))
                        };
                        resp
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}
