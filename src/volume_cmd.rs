//! `blockfleet volume ...`: the CLI over the control plane API.

use std::time::Duration;

use anyhow::{bail, Context};
use blockfleet_api::{
    AttachVolumeRequest, ControlPlaneClient, CreateVolumeRequest, HydrationState, Volume,
};
use blockfleet_core::ids::VolumeId;
use blockfleet_core::units::CHUNK;
use blockfleet_snapshot_service::Progress;

use crate::cli::{Output, VolumeCommand};
use crate::output::{emit, Bar};

/// `1073741824`, `512KiB`, `64MiB`, `10GiB`, `1TiB`.
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("size {s:?}: not a number"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        other => bail!("size {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB or TiB)"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} is too large"))
}

fn line(v: &Volume) -> String {
    let hydration = match &v.hydration {
        None => "-".to_owned(),
        Some(h) => match (h.state, h.hydrated_chunks) {
            (HydrationState::Done, _) => "hydrated".to_owned(),
            (HydrationState::Failed, _) => "failed".to_owned(),
            (_, Some(n)) => format!("{:.0}%", n as f64 * 100.0 / h.total_chunks.max(1) as f64),
            (_, None) => format!("{:?}", h.state).to_lowercase(),
        },
    };
    format!(
        "{}  {:>10}  {:<9}  {:<8}  {:<9}  {}  {}",
        v.volume_id,
        crate::output::human_bytes(v.size),
        serde_json::to_value(v.state)
            .ok()
            .and_then(|s| s.as_str().map(str::to_owned))
            .unwrap_or_default(),
        v.status,
        if v.encrypted { "encrypted" } else { "plain" },
        hydration,
        v.attachment
            .as_ref()
            .map(|a| format!("{}:{}", a.instance_id, a.device))
            .unwrap_or_default(),
    )
}

fn table(vols: &[Volume]) -> String {
    let mut out = String::from(
        "VOLUME                 SIZE        STATE      STATUS    ENCRYPTION HYDRATION ATTACHMENT",
    );
    for v in vols {
        out.push('\n');
        out.push_str(&line(v));
    }
    out
}

/// Polls until every volume's hydration has ended, drawing one bar over all of them.
async fn wait_hydrated(
    cp: &ControlPlaneClient,
    output: Output,
    ids: &[VolumeId],
) -> anyhow::Result<Vec<Volume>> {
    let bar = Bar::new(output, "hydrating");
    let mut started = false;
    let mut shown = 0u64;
    loop {
        let vols = cp.describe_volumes(ids).await?;
        let (mut done, mut total, mut finished) = (0u64, 0u64, true);
        for v in &vols {
            if let Some(h) = &v.hydration {
                total += h.total_chunks * CHUNK;
                done += h.hydrated_chunks.unwrap_or(0) * CHUNK;
                finished &= matches!(h.state, HydrationState::Done | HydrationState::Failed);
            }
        }
        if !started {
            bar.start(total);
            started = true;
        }
        bar.advance(done.saturating_sub(shown));
        shown = shown.max(done);
        if finished {
            bar.finish();
            return Ok(vols);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `KEY=VALUE` arguments as a tag map.
pub fn parse_tags(args: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    args.iter()
        .map(|a| match a.split_once('=') {
            Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
            None => bail!("tag {a:?}: give KEY=VALUE"),
        })
        .collect()
}

pub async fn run(cp: ControlPlaneClient, output: Output, cmd: VolumeCommand) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Create {
            from_snapshot,
            from_volume,
            size,
            encrypted,
            kms_key,
            count,
            tags,
            wait,
            client_token,
        } => {
            let req = CreateVolumeRequest {
                size: size.as_deref().map(parse_size).transpose()?,
                snapshot_id: from_snapshot.as_deref().map(str::parse).transpose()?,
                source_volume_id: from_volume.as_deref().map(str::parse).transpose()?,
                encrypted,
                kms_key_id: kms_key.as_deref().map(str::parse).transpose()?,
                count: Some(count),
                tags: parse_tags(&tags)?,
                client_token,
            };
            let mut vols = cp.create_volume(&req).await?;
            if wait && vols.iter().any(|v| v.hydration.is_some()) {
                let ids: Vec<VolumeId> = vols.iter().map(|v| v.volume_id.clone()).collect();
                vols = wait_hydrated(&cp, output, &ids).await?;
                if let Some(v) = vols.iter().find(|v| v.status != "ok") {
                    emit(output, &vols, || table(&vols))?;
                    bail!(
                        "hydration of {} failed: {}",
                        v.volume_id,
                        v.impaired_reason.clone().unwrap_or_default()
                    );
                }
            }
            emit(output, &vols, || {
                vols.iter()
                    .map(|v| v.volume_id.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        VolumeCommand::Ls => {
            let vols = cp.describe_volumes(&[]).await?;
            emit(output, &vols, || table(&vols))
        }
        VolumeCommand::Show { volume_id } => {
            let id: VolumeId = volume_id.parse()?;
            let v = cp.describe_volumes(&[id]).await?;
            emit(output, &v[0], || {
                serde_json::to_string_pretty(&v[0]).unwrap_or_default()
            })
        }
        VolumeCommand::Attach {
            volume_id,
            instance,
            device,
            boot,
            host,
        } => {
            let a = cp
                .attach_volume(&AttachVolumeRequest {
                    volume_id: volume_id.parse()?,
                    instance_id: instance.parse()?,
                    device,
                    boot,
                    host,
                })
                .await?;
            emit(output, &a, || {
                format!("{volume_id} attached to {} at {}", a.instance_id, a.device)
            })
        }
        VolumeCommand::Detach { volume_id } => {
            cp.detach_volume(&volume_id.parse()?).await?;
            emit(
                output,
                &serde_json::json!({ "detached": volume_id }),
                || format!("{volume_id} detached"),
            )
        }
        VolumeCommand::Rm { volume_id } => {
            cp.delete_volume(&volume_id.parse()?).await?;
            emit(output, &serde_json::json!({ "deleted": volume_id }), || {
                format!("{volume_id} deleted")
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert_eq!(parse_size("512KiB").ok(), Some(512 << 10));
        assert_eq!(parse_size("10GiB").ok(), Some(10 << 30));
        assert!(parse_size("10 parsecs").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }
}
