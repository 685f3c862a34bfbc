//! `blockfleet snapshot import|export|ls|show` (the store directly) and
//! `snapshot create|set|rm|diff` (through the control plane).

use anyhow::{bail, Context};
use blockfleet_api::{
    ControlPlaneClient, CreateSnapshotsRequest, ListChangedBlocksRequest, SnapshotSet,
    SnapshotState,
};
use blockfleet_core::config::Config;
use blockfleet_core::ids::SnapshotId;
use blockfleet_core::units::CHUNK;
use blockfleet_snapshot_format::{Archive, Manifest};
use blockfleet_snapshot_service::{
    export_image, import_image, ExportOptions, ImportOptions, Progress,
};
use serde::Serialize;

use crate::cli::{Output, SnapshotCommand};
use crate::output::{emit, mb_per_s, Bar};

/// Opens the configured store (proving it answers) and the manifest key: from the KMS when
/// `snapshot.manifest_key_kms_key_id` is set, else from the key file.
pub async fn open_archive(config: &Config) -> anyhow::Result<Archive> {
    Ok(blockfleet_snapshot_format::manifest_key::open_archive(
        &config.store,
        &config.snapshot,
        &config.kms,
    )
    .await?)
}

fn parse_id(s: &str) -> anyhow::Result<SnapshotId> {
    Ok(s.parse()?)
}

#[derive(Debug, Serialize)]
struct Summary {
    snapshot_id: String,
    volume_size: u64,
    stored_chunks: usize,
    parent: Option<String>,
    created_at: String,
    description: String,
    encryption: Option<serde_json::Value>,
}

impl From<&Manifest> for Summary {
    fn from(m: &Manifest) -> Self {
        Summary {
            snapshot_id: m.snapshot_id.to_string(),
            volume_size: m.volume_size,
            stored_chunks: m.chunks.len(),
            parent: m.parent.as_ref().map(ToString::to_string),
            created_at: humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(m.created_at),
            )
            .to_string(),
            description: m.description.clone(),
            encryption: m.encryption.as_ref().map(|e| {
                serde_json::json!({ "kms_key_id": e.kms_key_id.to_string(), "cipher": e.cipher })
            }),
        }
    }
}

/// Polls a set until it is no longer pending, drawing one bar over its chunks.
async fn wait_set(
    cp: &ControlPlaneClient,
    output: Output,
    set_id: &str,
) -> anyhow::Result<SnapshotSet> {
    let bar = Bar::new(output, "uploading");
    let mut started = false;
    let mut shown = 0u64;
    loop {
        let set = cp.describe_snapshot_set(set_id).await?;
        let total: u64 = set.snapshots.iter().filter_map(|s| s.changed_chunks).sum();
        let done: u64 = set.snapshots.iter().map(|s| s.done_chunks).sum();
        let known = set.snapshots.iter().all(|s| s.changed_chunks.is_some());
        if known && !started {
            bar.start(total * CHUNK);
            started = true;
        }
        if started {
            bar.advance((done * CHUNK).saturating_sub(shown));
            shown = shown.max(done * CHUNK);
        }
        if set.state != SnapshotState::Pending {
            bar.finish();
            return Ok(set);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn set_table(set: &SnapshotSet) -> String {
    let mut out = format!(
        "{}  {}  {:?}  pause {} us{}\nSNAPSHOT                VOLUME                 STATE      CHANGED  UPLOADED  PARENT",
        set.set_id,
        set.instance_id,
        set.state,
        set.pause_window_us,
        set.error
            .as_ref()
            .map(|e| format!("  error: {e}"))
            .unwrap_or_default()
    );
    for s in &set.snapshots {
        out.push_str(&format!(
            "\n{:<23} {:<22} {:<10} {:>7} {:>9}  {}",
            s.snapshot_id,
            s.volume_id
                .as_ref()
                .map_or("(EBS direct)".into(), ToString::to_string),
            format!("{:?}", s.state).to_lowercase(),
            s.changed_chunks.map_or("-".into(), |c| c.to_string()),
            s.uploaded_chunks,
            s.parent.as_ref().map_or("-".into(), ToString::to_string)
        ));
    }
    out
}

pub async fn run(
    config: &Config,
    cp: ControlPlaneClient,
    output: Output,
    cmd: SnapshotCommand,
) -> anyhow::Result<()> {
    // Parse ids before touching the store: bad input changes nothing.
    match cmd {
        SnapshotCommand::Import {
            image,
            parent,
            description,
        } => {
            let parent = parent.as_deref().map(parse_id).transpose()?;
            let archive = open_archive(config).await?;
            let bar = Bar::new(output, "import");
            let opts = ImportOptions {
                parent,
                description,
                concurrency: config.snapshot.concurrency,
            };
            let report = import_image(&archive, &image, &opts, &bar).await;
            bar.finish();
            let r = report?;
            let secs = r.elapsed.as_secs_f64();
            let json = serde_json::json!({
                "snapshot_id": r.snapshot_id.to_string(),
                "volume_size": r.volume_size,
                "chunks": r.chunks,
                "zero_chunks": r.zero_chunks,
                "uploaded_chunks": r.uploaded_chunks,
                "deduplicated_chunks": r.deduplicated_chunks,
                "seconds": secs,
                "mb_per_s": mb_per_s(r.volume_size, secs),
            });
            if output == Output::Text {
                eprintln!(
                    "imported {} in {secs:.2} s ({:.0} MB/s): {} chunks uploaded, {} already stored, {} zero",
                    crate::output::human_bytes(r.volume_size),
                    mb_per_s(r.volume_size, secs),
                    r.uploaded_chunks,
                    r.deduplicated_chunks,
                    r.zero_chunks
                );
            }
            emit(output, &json, || r.snapshot_id.to_string())
        }
        SnapshotCommand::Export {
            snapshot_id,
            out,
            force,
        } => {
            let id = parse_id(&snapshot_id)?;
            let archive = open_archive(config).await?;
            let bar = Bar::new(output, "export");
            let opts = ExportOptions {
                force,
                concurrency: config.snapshot.concurrency,
            };
            let report = export_image(&archive, &id, &out, &opts, &bar).await;
            bar.finish();
            let r = report?;
            let secs = r.elapsed.as_secs_f64();
            let json = serde_json::json!({
                "snapshot_id": id.to_string(),
                "path": out.display().to_string(),
                "volume_size": r.volume_size,
                "chunks_written": r.chunks_written,
                "seconds": secs,
            });
            emit(output, &json, || {
                format!(
                    "exported {id} to {} ({}, {} chunks, {secs:.2} s)",
                    out.display(),
                    crate::output::human_bytes(r.volume_size),
                    r.chunks_written
                )
            })
        }
        SnapshotCommand::Ls => {
            let archive = open_archive(config).await?;
            let mut rows = Vec::new();
            for id in archive.list_snapshots().await? {
                // One unreadable manifest must not hide the others: show it with its error.
                rows.push(match archive.get_manifest(&id).await {
                    Ok(m) => serde_json::to_value(Summary::from(&m))?,
                    Err(e) => {
                        serde_json::json!({ "snapshot_id": id.to_string(), "error": e.to_string() })
                    }
                });
            }
            emit(output, &rows, || {
                let mut s = format!(
                    "{:<22} {:>14} {:>8}  {:<20} {:<22} {}",
                    "SNAPSHOT", "SIZE", "CHUNKS", "CREATED", "PARENT", "DESCRIPTION"
                );
                for r in &rows {
                    let f = |k: &str| {
                        r.get(k)
                            .map(|v| {
                                v.as_str()
                                    .map(str::to_owned)
                                    .unwrap_or_else(|| v.to_string())
                            })
                            .unwrap_or_default()
                    };
                    if let Some(err) = r.get("error") {
                        s += &format!(
                            "\n{:<22} ERROR: {}",
                            f("snapshot_id"),
                            err.as_str().unwrap_or_default()
                        );
                    } else {
                        let parent = r.get("parent").and_then(|p| p.as_str()).unwrap_or("-");
                        s += &format!(
                            "\n{:<22} {:>14} {:>8}  {:<20} {:<22} {}",
                            f("snapshot_id"),
                            r.get("volume_size")
                                .and_then(serde_json::Value::as_u64)
                                .map(crate::output::human_bytes)
                                .unwrap_or_default(),
                            f("stored_chunks"),
                            f("created_at"),
                            parent,
                            f("description")
                        );
                    }
                }
                s
            })
        }
        SnapshotCommand::Show { snapshot_id } => {
            let id = parse_id(&snapshot_id)?;
            let archive = open_archive(config).await?;
            let m = archive
                .get_manifest(&id)
                .await
                .with_context(|| format!("in {}", archive.store().describe()))?;
            let summary = Summary::from(&m);
            emit(output, &summary, || {
                format!(
                    "snapshot     {}\nvolume size  {}\nchunks       {} stored of {} ({})\nparent       {}\ncreated      {}\ndescription  {}\nencryption   {}",
                    summary.snapshot_id,
                    crate::output::human_bytes(m.volume_size),
                    m.chunks.len(),
                    m.chunk_slots(),
                    crate::output::human_bytes(m.stored_bytes()),
                    summary.parent.as_deref().unwrap_or("-"),
                    summary.created_at,
                    summary.description,
                    m.encryption.as_ref().map_or("none".to_owned(), |e| format!("{} under {}", e.cipher, e.kms_key_id)),
                )
            })
        }
        SnapshotCommand::Create {
            instance,
            exclude_boot,
            exclude,
            description,
            tags,
            copy_tags,
            client_token,
            wait,
        } => {
            let req = CreateSnapshotsRequest {
                instance_id: instance.parse()?,
                exclude_boot_volume: exclude_boot,
                exclude_volume_ids: exclude
                    .iter()
                    .map(|v| v.parse())
                    .collect::<Result<_, _>>()?,
                description,
                tags: crate::volume_cmd::parse_tags(&tags)?,
                copy_tags_from_source: copy_tags,
                client_token,
            };
            let mut set = cp.create_snapshots(&req).await?;
            if wait {
                set = wait_set(&cp, output, &set.set_id).await?;
                if set.state == SnapshotState::Error {
                    emit(output, &set, || set_table(&set))?;
                    bail!(
                        "snapshot set {} failed: {}",
                        set.set_id,
                        set.error.clone().unwrap_or_default()
                    );
                }
            }
            emit(output, &set, || set_table(&set))
        }
        SnapshotCommand::Set { set_id } => {
            let set = cp.describe_snapshot_set(&set_id).await?;
            emit(output, &set, || set_table(&set))
        }
        SnapshotCommand::Rm { snapshot_id } => {
            let id = parse_id(&snapshot_id)?;
            cp.delete_snapshot(&id).await?;
            emit(
                output,
                &serde_json::json!({ "deleted": snapshot_id }),
                || format!("deleted {snapshot_id}"),
            )
        }
        SnapshotCommand::Diff { first, second } => {
            let (first, second) = match second {
                Some(s) => (Some(parse_id(&first)?), parse_id(&s)?),
                None => (None, parse_id(&first)?),
            };
            let req = ListChangedBlocksRequest {
                first_snapshot_id: first,
                second_snapshot_id: second,
            };
            let d = cp.list_changed_blocks(&req).await?;
            emit(output, &d, || {
                let mut out = format!(
                    "{} of {} blocks of {} bytes differ",
                    d.blocks.len(),
                    d.volume_size.div_ceil(d.block_size),
                    d.block_size
                );
                for b in &d.blocks {
                    out.push_str(&format!("\n{b}"));
                }
                out
            })
        }
    }
}
