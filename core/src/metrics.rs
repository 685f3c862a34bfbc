//! Prometheus text metrics shared by the services: per-operation request and error counters
//! with latency histograms, plain counters, and a tiny HTTP server for `GET /metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use tokio::net::TcpListener;

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

/// Requests, errors and latency for each of `N` named operations.
#[derive(Debug)]
pub struct OpMetrics<const N: usize> {
    ops: [&'static str; N],
    requests: [AtomicU64; N],
    errors: [AtomicU64; N],
    latency: [Histogram; N],
}

impl<const N: usize> OpMetrics<N> {
    pub fn new(ops: [&'static str; N]) -> Self {
        OpMetrics {
            ops,
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: std::array::from_fn(|_| Histogram::default()),
        }
    }

    pub fn name(&self, op: usize) -> &'static str {
        self.ops[op]
    }

    pub fn record(&self, op: usize, ok: bool, elapsed: Duration) {
        self.requests[op].fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors[op].fetch_add(1, Ordering::Relaxed);
        }
        self.latency[op].observe(elapsed);
    }

    /// Appends `<prefix>_requests_total`, `<prefix>_request_errors_total` and
    /// `<prefix>_request_seconds` (histogram), labelled by `op`.
    pub fn render(&self, out: &mut String, prefix: &str) {
        let _ = writeln!(out, "# HELP {prefix}_requests_total Requests served, by operation.\n# TYPE {prefix}_requests_total counter");
        for (i, op) in self.ops.iter().enumerate() {
            let _ = writeln!(
                out,
                "{prefix}_requests_total{{op=\"{op}\"}} {}",
                self.requests[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP {prefix}_request_errors_total Requests refused or failed, by operation.\n# TYPE {prefix}_request_errors_total counter");
        for (i, op) in self.ops.iter().enumerate() {
            let _ = writeln!(
                out,
                "{prefix}_request_errors_total{{op=\"{op}\"}} {}",
                self.errors[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP {prefix}_request_seconds Request latency, by operation.\n# TYPE {prefix}_request_seconds histogram");
        for (i, op) in self.ops.iter().enumerate() {
            let h = &self.latency[i];
            let mut cumulative = 0;
            for (b, bound) in BUCKETS.iter().enumerate() {
                cumulative += h.buckets[b].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "{prefix}_request_seconds_bucket{{op=\"{op}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{prefix}_request_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "{prefix}_request_seconds_sum{{op=\"{op}\"}} {}",
                h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(out, "{prefix}_request_seconds_count{{op=\"{op}\"}} {count}");
        }
    }
}

/// Appends one counter.
pub fn counter(out: &mut String, name: &str, help: &str, value: &AtomicU64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
        value.load(Ordering::Relaxed)
    );
}

/// Appends one gauge.
pub fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// Serves `GET /metrics` (the text `render` returns) on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let render = Arc::clone(&render);
                    async move {
                        if req.uri().path() == "/metrics" {
                            Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(Full::new(Bytes::from(render())))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"not found\n")))
                        }
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}
