//! `blockfleet server ...`: block servers as operators see them.

use std::time::Duration;

use anyhow::Context;
use blockfleet_api::{BlockServerView, ControlPlaneClient};

use crate::cli::{Output, ServerCommand};
use crate::output::emit;

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
            let behind = match (r.state.as_str(), r.behind_chunks) {
                ("behind", Some(n)) => format!(" ({n} chunks to repair)"),
                _ => String::new(),
            };
            let agent = r
                .agent_health
                .as_ref()
                .map(|h| format!("  agent: {h}"))
                .unwrap_or_default();
            out.push(format!("  {}  {}{behind}{agent}", r.volume_id, r.state));
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
                loop {
                    let servers = cp.describe_block_servers().await?;
                    let left = servers
                        .iter()
                        .find(|s| s.address == server)
                        .map_or(0, |s| s.volumes.len());
                    if left == 0 {
                        break;
                    }
                    eprintln!("{server}: {left} replicas left");
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
