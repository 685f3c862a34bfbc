//! `blockfleet server ...`: block servers as operators see them.

use std::time::Duration;

use anyhow::Context;
use blockfleet_api::{BlockServerView, ControlPlaneClient};

use blockfleet_core::units::CHUNK;

use crate::cli::{Output, ServerCommand};
use crate::output::{emit, human_bytes};

fn text(servers: &[BlockServerView]) -> String {
    let mut out = Vec::new();
    for s in servers {
        out.push(format!(
            "{}  {}{}  {} replicas",
            s.address,
            match (s.reachable, s.unresponsive) {
                (_, true) => "UNRESPONSIVE",
                (true, false) => "up",
                (false, false) => "UNREACHABLE",
            },
            if s.draining { "  draining" } else { "" },
            s.volumes.len()
        ));
        for r in &s.volumes {
            let behind = match (r.state.as_str(), r.behind_chunks, r.fill) {
                (_, _, Some((done, total))) => format!(
                    " ({done}/{total} chunks, {} of {} copied)",
                    human_bytes(done * CHUNK),
                    human_bytes(total * CHUNK)
                ),
                ("behind", Some(n), None) => format!(" ({n} chunks to repair)"),
                _ => String::new(),
            };
            let agent = r
                .agent_health
                .as_ref()
                .map(|h| format!("  agent: {h}"))
                .unwrap_or_default();
            let reason = r
                .reason
                .as_ref()
                .map(|w| format!("  reason: {w}"))
                .unwrap_or_default();
            out.push(format!(
                "  {}  {}{behind}{agent}{reason}",
                r.volume_id, r.state
            ));
        }
    }
    out.join("\n")
}

pub async fn run(cp: ControlPlaneClient, output: Output, cmd: ServerCommand) -> anyhow::Result<()> {
    match cmd {
        ServerCommand::Ls => {
            let servers = cp
                .describe_block_servers()
                .await
                .context("DescribeBlockServers")?;
            emit(output, &servers, || text(&servers))
        }
        ServerCommand::Drain { server, wait } => {
            let r = cp
                .drain_block_server(&server)
                .await
                .with_context(|| format!("cannot drain {server}"))?;
            if wait {
                // Progress: replicas left, and the fills under way with their copy rate.
                let mut last: Option<(std::time::Instant, u64)> = None;
                loop {
                    let servers = cp.describe_block_servers().await?;
                    let left = servers
                        .iter()
                        .find(|s| s.address == server)
                        .map_or(0, |s| s.volumes.len());
                    if left == 0 {
                        break;
                    }
                    let (done, total) = servers
                        .iter()
                        .flat_map(|s| &s.volumes)
                        .filter(|r| r.state == "joining")
                        .filter_map(|r| r.fill)
                        .fold((0, 0), |(d, t), (a, b)| (d + a, t + b));
                    let now = std::time::Instant::now();
                    let rate = match last {
                        Some((at, before)) if done >= before => {
                            let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                            format!(
                                ", {}/s",
                                human_bytes((((done - before) * CHUNK) as f64 / secs) as u64)
                            )
                        }
                        _ => String::new(),
                    };
                    last = Some((now, done));
                    eprintln!(
                        "{server}: {left} replicas left; copying {done}/{total} chunks ({} of {}){rate}",
                        human_bytes(done * CHUNK),
                        human_bytes(total * CHUNK)
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            emit(output, &r, || {
                format!(
                    "draining {}: {} replicas to move{}",
                    r.server,
                    r.volumes,
                    if wait { " (done)" } else { "" }
                )
            })
        }
    }
}
