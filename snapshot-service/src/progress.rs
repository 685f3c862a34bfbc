//! Progress reporting for long transfers, kept abstract so the library draws nothing itself.

/// Receives progress of a transfer; called from many tasks at once.
pub trait Progress: Send + Sync {
    /// The transfer will cover `total_bytes`.
    fn start(&self, total_bytes: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
}

/// Progress that goes nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
}
