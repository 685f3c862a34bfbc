//! Keeps a host agent's replica set in step with the control plane: a drain adds a replica
//! (filled by the agent's repair loop while writes go to it too) and later drops the old one;
//! the agent reports its replicas' health back, which is how the drain knows the new one is
//! in sync.

use std::sync::Arc;
use std::time::Duration;

use blockfleet_api::{ControlPlaneClient, ReplicaHealth, ReplicaReport};
use blockfleet_volume_client::ReplicatedVolume;

/// Every `every` (until the volume is dropped): asks the control plane for the placement,
/// applies it, and reports the replicas' health.
pub fn follow_placement(
    cp: ControlPlaneClient,
    replicas: &Arc<ReplicatedVolume>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(replicas);
    tokio::spawn(async move {
        // A refusal (credentials, host) is an operator's problem: said once, not every second.
        let mut refused = false;
        loop {
            tokio::time::sleep(every).await;
            let Some(r) = weak.upgrade() else { return };
            match cp.attach_info(r.volume()).await {
                Ok(info) => {
                    refused = false;
                    // A fresh capability for the connections repairs open from now on.
                    r.set_grant(info.block_grant);
                    r.set_members(&info.replicas, info.joining.as_deref());
                }
                Err(e) if matches!(e.code(), Some("AuthFailure" | "AccessDenied")) => {
                    if !refused {
                        tracing::warn!(volume = %r.volume(), error = %e, "the control plane refuses this host agent: placement not followed");
                    }
                    refused = true;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(volume = %r.volume(), error = %e, "placement not refreshed");
                    continue;
                }
            }
            let report = ReplicaReport {
                volume_id: r.volume().clone(),
                replicas: r
                    .status()
                    .into_iter()
                    .map(|s| ReplicaHealth {
                        address: s.addr,
                        health: s.health.as_str().into(),
                        repair_done: s.repair_done,
                        repair_total: s.repair_total,
                        reason: s.reason,
                    })
                    .collect(),
            };
            if let Err(e) = cp.report_replicas(&report).await {
                tracing::debug!(volume = %r.volume(), error = %e, "replica report not sent");
            }
        }
    })
}
