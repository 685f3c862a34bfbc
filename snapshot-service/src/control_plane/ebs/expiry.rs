//! Pending snapshots past their Timeout, and pending blocks kept from garbage collection.

use std::collections::HashSet;

use blockfleet_api::SnapshotState;
use blockfleet_snapshot_format::ChunkHash;

use crate::control_plane::{now_ms, ControlPlane};

impl ControlPlane {
    /// Fails every pending EBS snapshot past its Timeout and deletes the blocks it stored that
    /// nothing else references.
    pub(crate) async fn expire_ebs(&self) {
        let Ok(all) = self.state.ebs_all() else {
            return;
        };
        let now = now_ms();
        for r in all {
            if r.state != SnapshotState::Pending || r.expires_at_ms > now {
                continue;
            }
            {
                let _changes = self.changes.lock().await;
                let mut r = r.clone();
                r.state = SnapshotState::Error;
                r.error = Some("not completed within its Timeout".into());
                if self
                    .state
                    .put_ebs(&r)
                    .and_then(|()| self.state.flush())
                    .is_err()
                {
                    continue;
                }
            }
            self.gc
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&format!("ebs:{}", r.id));
            let chunks: HashSet<ChunkHash> = match self.state.ebs_blocks(&r.id) {
                Ok(b) => b.values().filter_map(|(h, _)| h.parse().ok()).collect(),
                Err(_) => continue,
            };
            let _ = self.state.remove_ebs_blocks(&r.id);
            match self.collect_garbage(chunks).await {
                Ok(n) => {
                    tracing::info!(snapshot = %r.id, deleted = n, "ebs snapshot timed out: its blocks deleted")
                }
                Err(e) => {
                    tracing::warn!(snapshot = %r.id, error = %e, "ebs snapshot timed out; deleting its blocks failed")
                }
            }
        }
    }
}

impl ControlPlane {
    /// Registers the blocks of pending EBS snapshots with garbage collection (after a restart).
    pub(crate) fn register_pending_ebs(&self) -> Result<(), crate::state::StateError> {
        let mut pending = self.gc.pending.lock().unwrap_or_else(|p| p.into_inner());
        for r in self.state.ebs_all()? {
            if r.state == SnapshotState::Pending {
                let set: HashSet<ChunkHash> = self
                    .state
                    .ebs_blocks(&r.id)?
                    .values()
                    .filter_map(|(h, _)| h.parse().ok())
                    .collect();
                pending.insert(format!("ebs:{}", r.id), set);
            }
        }
        Ok(())
    }
}
