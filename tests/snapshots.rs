//! The snapshot coordinator over real processes (KMS, three block servers, control plane,
//! transform worker): crash consistency of sets under dependent writes, incremental uploads,
//! restores identical to the cut, all-or-nothing failure cleanup, a coordinator killed
//! mid-upload, and bad input.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockfleet_api::{
    CreateSnapshotsRequest, CreateVolumeRequest, HydrationState, SnapshotSet, SnapshotState,
};
use blockfleet_core::ids::{InstanceId, SnapshotId, VolumeId};
use blockfleet_core::units::CHUNK;
use blockfleet_host_agent::AgentVolume;
use blockfleet_keys::kms::Kms;
use blockfleet_keys::xts::Xts;
use blockfleet_snapshot_format::{Archive, ManifestKey};
use common::{Fleet, FleetOptions};

const UNIT: u64 = 4096;
const VOLUME: u64 = 32 << 20;
const MAGIC: u64 = 0xb10c_f1ee_7c0f_fee5;

async fn archive(f: &Fleet) -> Archive {
    let store = blockfleet_snapshot_format::store::open(
        &blockfleet_core::config::StoreConfig::Local(blockfleet_core::config::LocalStoreConfig {
            path: f.dir.path().join("objects"),
        }),
    )
    .await
    .unwrap();
    let key = ManifestKey::load_or_create(&f.dir.path().join("manifest.key")).unwrap();
    Archive::new(store, Arc::new(key))
}

/// A write's 4 KiB: magic, its sequence number, then filler derived from it.
fn record(seq: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(UNIT as usize);
    v.extend_from_slice(&MAGIC.to_le_bytes());
    v.extend_from_slice(&seq.to_le_bytes());
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while v.len() < UNIT as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

async fn wait_set(f: &Fleet, set_id: &str) -> SnapshotSet {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = f.cp.describe_snapshot_set(set_id).await.unwrap();
        if s.state != SnapshotState::Pending {
            return s;
        }
        assert!(Instant::now() < deadline, "set did not finish: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A snapshot's contents as plaintext, from the store (decrypted with the transform
/// principal, as a restore would).
async fn snapshot_bytes(archive: &Archive, tf_kms: &Kms, id: &SnapshotId) -> Vec<u8> {
    let m = archive.get_manifest(id).await.unwrap();
    let xts = match &m.encryption {
        Some(e) => Some(Xts::new(
            &tf_kms
                .decrypt_key(&e.wrapped_key, e.context_volume.as_ref().unwrap())
                .await
                .unwrap(),
        )),
        None => None,
    };
    let mut out = vec![0u8; m.volume_size as usize];
    for (c, h) in &m.chunks {
        let mut data = archive.get_chunk(h).await.unwrap().to_vec();
        if let Some(x) = &xts {
            x.decrypt_stored(&mut data, c * (CHUNK / UNIT)).unwrap();
        }
        out[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize].copy_from_slice(&data);
    }
    out
}

async fn read_all(v: &AgentVolume) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < v.size() {
        out.extend(v.read(at, 1 << 20).await.unwrap());
        at += 1 << 20;
    }
    out
}

/// Chunk objects in the store.
async fn stored_chunks(archive: &Archive) -> BTreeSet<String> {
    archive
        .store()
        .list("chunks/")
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Chunk objects referenced by some manifest.
async fn referenced_chunks(archive: &Archive) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for id in archive.list_snapshots().await.unwrap() {
        for h in archive.get_manifest(&id).await.unwrap().chunks.values() {
            out.insert(h.key());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_consistent_incremental_sets_under_dependent_writes() {
    let f = Fleet::start(FleetOptions::default());
    let (instance, vols, agents) = f.instance_with_volumes(3, 2, VOLUME).await;
    let units_per_volume = VOLUME / UNIT;

    // Write i goes to volume i % 3 at its own unit, issued only once write i-1 is
    // acknowledged: it depends on every earlier write.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let (agents, stop, acked) = (agents.clone(), Arc::clone(&stop), Arc::clone(&acked));
        tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) && seq / 3 < units_per_volume {
                let v = &agents[(seq % 3) as usize];
                v.write((seq / 3) * UNIT, UNIT, Some(&record(seq)), false)
                    .await
                    .unwrap();
                seq += 1;
                acked.store(seq, Ordering::Relaxed);
                // Paced so the writes span all the sets.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    let sets_wanted = 50;
    let mut sets = Vec::new();
    while sets.len() < sets_wanted {
        let set =
            f.cp.create_snapshots(&CreateSnapshotsRequest {
                instance_id: instance.clone(),
                exclude_boot_volume: false,
                exclude_volume_ids: vec![],
                description: format!("set {}", sets.len()),
                tags: BTreeMap::from([("run".to_owned(), "checker".to_owned())]),
                copy_tags_from_source: true,
                client_token: None,
            })
            .await
            .unwrap();
        assert_eq!(set.snapshots.len(), 3);
        let done = wait_set(&f, &set.set_id).await;
        assert_eq!(done.state, SnapshotState::Completed, "{done:?}");
        sets.push(done);
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let written = acked.load(Ordering::Relaxed);

    // Every set: the writes present are exactly a prefix of the write order, each whole.
    let archive = archive(&f).await;
    let tf_kms = f.kms("AKTF", "tf-secret-0123").await;
    let mut violations = 0;
    let mut prefixes = BTreeSet::new();
    for set in &sets {
        let mut present = BTreeSet::new();
        for s in &set.snapshots {
            let which = vols
                .iter()
                .position(|v| Some(&v.volume_id) == s.volume_id.as_ref())
                .unwrap() as u64;
            let data = snapshot_bytes(&archive, &tf_kms, &s.snapshot_id).await;
            for (u, unit) in data.chunks_exact(UNIT as usize).enumerate() {
                if unit.iter().all(|&b| b == 0) {
                    continue;
                }
                let seq = u64::from_le_bytes(unit[8..16].try_into().unwrap());
                let ok = unit[..8] == MAGIC.to_le_bytes()
                    && seq % 3 == which
                    && seq / 3 == u as u64
                    && unit == record(seq).as_slice();
                if !ok {
                    violations += 1;
                    eprintln!(
                        "set {}: volume {which} unit {u} is not a whole write",
                        set.set_id
                    );
                    continue;
                }
                present.insert(seq);
            }
        }
        let n = present.len() as u64;
        if present.last().is_some_and(|&m| m + 1 != n) {
            violations += 1;
            eprintln!(
                "set {}: {n} writes present but the last is {:?}: a write is there without one it depends on",
                set.set_id,
                present.last()
            );
        }
        prefixes.insert(n);
        // Tags: the request's and each volume's own.
        for s in &set.snapshots {
            assert_eq!(s.tags.get("run").map(String::as_str), Some("checker"));
            assert!(s.tags.contains_key("disk"));
        }
    }
    assert_eq!(violations, 0, "crash-consistency violations");
    assert!(
        prefixes.len() > sets_wanted / 2,
        "the writer barely moved between sets ({prefixes:?} of {written} writes): the check proves little"
    );

    // Incremental: after the first, a set reads only what changed, and stores no more.
    let first = &sets[0].snapshots[0];
    assert!(first.parent.is_none());
    for set in &sets[1..] {
        for s in &set.snapshots {
            assert!(s.parent.is_some(), "{s:?}");
            assert!(s.uploaded_chunks <= s.changed_chunks.unwrap());
            assert!(s.changed_chunks.unwrap() < VOLUME / CHUNK / 4, "{s:?}");
        }
    }
    assert!(
        f.control_plane_metric("blockfleet_coordinator_requests_total{op=\"pause_window\"}")
            >= sets_wanted as u64
    );

    // Writes stopped: one more set is the volumes as they are; restores (encrypted under a
    // new key, from encrypted and unencrypted volumes) read back identical.
    let last_req = CreateSnapshotsRequest {
        instance_id: instance.clone(),
        exclude_boot_volume: true,
        exclude_volume_ids: vec![],
        description: String::new(),
        tags: BTreeMap::new(),
        copy_tags_from_source: false,
        client_token: Some("last-set".into()),
    };
    let last = f.cp.create_snapshots(&last_req).await.unwrap();
    assert_eq!(last.snapshots.len(), 2, "boot volume left out");
    let last = wait_set(&f, &last.set_id).await;
    assert_eq!(last.state, SnapshotState::Completed);
    for s in &last.snapshots {
        let i = vols
            .iter()
            .position(|v| Some(&v.volume_id) == s.volume_id.as_ref())
            .unwrap();
        let want = read_all(&agents[i]).await;
        let restored =
            f.cp.create_volume(&CreateVolumeRequest {
                snapshot_id: Some(s.snapshot_id.clone()),
                encrypted: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .remove(0);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v =
                f.cp.describe_volumes(std::slice::from_ref(&restored.volume_id))
                    .await
                    .unwrap()
                    .remove(0);
            if v.hydration.as_ref().unwrap().state == HydrationState::Done {
                break;
            }
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let back = f
            .attach_in_process(
                &restored.volume_id,
                &InstanceId::generate(),
                None,
                false,
                false,
            )
            .await;
        assert!(
            read_all(&back).await == want,
            "restore of {} (volume {i}) differs from the volume at the cut",
            s.snapshot_id
        );
    }

    // The same client token and arguments: the same set, not a second cut.
    let again = f.cp.create_snapshots(&last_req).await.unwrap();
    assert_eq!(again.set_id, last.set_id);

    // ListChangedBlocks between two sets of volume 1, and DeleteSnapshot with its GC: the
    // chunks only the deleted snapshot held go, the rest stay readable.
    let s_a = &sets[10].snapshots[1];
    let s_b = &sets[40].snapshots[1];
    let d =
        f.cp.list_changed_blocks(&blockfleet_api::ListChangedBlocksRequest {
            first_snapshot_id: Some(s_a.snapshot_id.clone()),
            second_snapshot_id: s_b.snapshot_id.clone(),
        })
        .await
        .unwrap();
    let (a, b) = (
        snapshot_bytes(&archive, &tf_kms, &s_a.snapshot_id).await,
        snapshot_bytes(&archive, &tf_kms, &s_b.snapshot_id).await,
    );
    let differ: Vec<u64> = (0..VOLUME / CHUNK)
        .filter(|&c| {
            let r = (c * CHUNK) as usize..((c + 1) * CHUNK) as usize;
            a[r.clone()] != b[r]
        })
        .collect();
    assert_eq!(d.blocks, differ);
    let before = stored_chunks(&archive).await;
    for set in &sets[..10] {
        for s in &set.snapshots {
            f.cp.delete_snapshot(&s.snapshot_id).await.unwrap();
        }
    }
    let after = stored_chunks(&archive).await;
    assert!(after.len() < before.len());
    assert_eq!(
        after,
        referenced_chunks(&archive).await,
        "orphan or missing chunks"
    );
    for s in &last.snapshots {
        snapshot_bytes(&archive, &tf_kms, &s.snapshot_id).await;
    }
}

/// Every snapshot of `set` restores to its volume as the agent reads it now.
async fn assert_set_is_volumes(
    set: &SnapshotSet,
    vols: &[blockfleet_api::Volume],
    agents: &[Arc<AgentVolume>],
    archive: &Archive,
    kms: &Kms,
) {
    for s in &set.snapshots {
        let i = vols
            .iter()
            .position(|v| Some(&v.volume_id) == s.volume_id.as_ref())
            .unwrap();
        assert!(snapshot_bytes(archive, kms, &s.snapshot_id).await == read_all(&agents[i]).await);
    }
}

/// Waits until every agent's replicas are back in sync (they repair on their own).
async fn wait_all_in_sync(agents: &[Arc<AgentVolume>]) {
    let start = std::time::Instant::now();
    while !agents.iter().all(|a| {
        a.replicas()
            .status()
            .iter()
            .all(|r| r.health == blockfleet_volume_client::Health::InSync)
    }) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "replicas not repaired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_set_leaves_nothing_and_a_killed_coordinator_finishes_its_set() {
    let mut f = Fleet::start(FleetOptions::default());
    // Three volumes, each with 16 MiB of data.
    let (instance, vols, agents) = f.instance_with_volumes(3, 3, 32 << 20).await;
    for (i, a) in agents.iter().enumerate() {
        for u in 0..(16 << 20) / UNIT {
            a.write(u * UNIT, UNIT, Some(&record(u * 7 + i as u64)), false)
                .await
                .unwrap();
        }
    }
    for v in &vols {
        let servers: HashSet<_> = v.placement.iter().collect();
        assert_eq!(servers.len(), 3, "every volume on all three block servers");
    }
    let req = |token: Option<&str>| CreateSnapshotsRequest {
        instance_id: instance.clone(),
        exclude_boot_volume: false,
        exclude_volume_ids: vec![],
        description: "fail".into(),
        tags: BTreeMap::new(),
        copy_tags_from_source: false,
        client_token: token.map(str::to_owned),
    };
    let archive = archive(&f).await;
    let tf_kms = f.kms("AKTF", "tf-secret-0123").await;

    // One block server killed right after the cut: the set completes from the other replicas.
    let good = f.cp.create_snapshots(&req(None)).await.unwrap();
    f.kill_block_server(0);
    let good = wait_set(&f, &good.set_id).await;
    assert_eq!(good.state, SnapshotState::Completed, "{good:?}");
    assert_set_is_volumes(&good, &vols, &agents, &archive, &tf_kms).await;
    f.restart_block_server(0);
    wait_all_in_sync(&agents).await;
    // New data on every volume, then a set two of whose three block servers die mid-call.
    for (i, a) in agents.iter().enumerate() {
        for u in 0..(8 << 20) / UNIT {
            a.write(
                u * UNIT,
                UNIT,
                Some(&record(u * 11 + i as u64 + 1_000_000)),
                false,
            )
            .await
            .unwrap();
        }
    }
    let chunks_before = stored_chunks(&archive).await;
    let bad = f.cp.create_snapshots(&req(None)).await.unwrap();
    f.kill_block_server(1);
    f.kill_block_server(2);
    let bad = wait_set(&f, &bad.set_id).await;
    assert_eq!(bad.state, SnapshotState::Error, "{bad:?}");
    assert!(bad
        .snapshots
        .iter()
        .all(|s| s.state == SnapshotState::Error));
    for s in &bad.snapshots {
        assert!(
            archive.get_manifest(&s.snapshot_id).await.is_err(),
            "a snapshot of the failed set is left"
        );
    }
    // Whatever the set stored was deleted with it.
    assert_eq!(stored_chunks(&archive).await, chunks_before);
    assert_eq!(
        chunks_before,
        referenced_chunks(&archive).await,
        "orphan chunks after the failed set"
    );
    // Without a majority a set is refused at the cut; nothing is made.
    let before =
        f.cp.describe_snapshots(&Default::default())
            .await
            .unwrap()
            .len();
    let e = f.cp.create_snapshots(&req(None)).await.unwrap_err();
    assert_eq!(e.code(), Some("BlockServerUnavailable"), "{e}");
    assert_eq!(
        f.cp.describe_snapshots(&Default::default())
            .await
            .unwrap()
            .len(),
        before
    );
    f.restart_block_server(1);
    f.restart_block_server(2);
    wait_all_in_sync(&agents).await;
    // The volumes serve again.
    for a in &agents {
        a.write(0, UNIT, Some(&record(42)), true).await.unwrap();
        assert_eq!(a.read(0, UNIT as u32).await.unwrap(), record(42));
    }

    // The coordinator killed (-9) right after the cut: the restarted one finishes the set.
    let set =
        f.cp.create_snapshots(&CreateSnapshotsRequest {
            exclude_volume_ids: vec![vols[2].volume_id.clone()],
            ..req(Some("after-restart"))
        })
        .await
        .unwrap();
    f.restart_control_plane();
    let set = wait_set(&f, &set.set_id).await;
    assert_eq!(set.state, SnapshotState::Completed, "{set:?}");
    assert_set_is_volumes(&set, &vols, &agents, &archive, &tf_kms).await;
    assert_eq!(
        stored_chunks(&archive).await,
        referenced_chunks(&archive).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_snapshots_bad_input_changes_nothing() {
    let f = Fleet::start(FleetOptions::default());
    let (instance, vols, _agents) = f.instance_with_volumes(2, 1, VOLUME).await;
    let base = CreateSnapshotsRequest {
        instance_id: instance.clone(),
        exclude_boot_volume: false,
        exclude_volume_ids: vec![],
        description: String::new(),
        tags: BTreeMap::new(),
        copy_tags_from_source: false,
        client_token: None,
    };
    let code = |r: Result<SnapshotSet, blockfleet_core::httpjson::HttpError>| {
        r.unwrap_err().code().map(str::to_owned)
    };
    let unknown = CreateSnapshotsRequest {
        instance_id: InstanceId::generate(),
        ..base.clone()
    };
    assert_eq!(
        code(f.cp.create_snapshots(&unknown).await).as_deref(),
        Some("InvalidInstanceID.NotFound")
    );
    let all_out = CreateSnapshotsRequest {
        exclude_boot_volume: true,
        exclude_volume_ids: vec![vols[1].volume_id.clone()],
        ..base.clone()
    };
    assert_eq!(
        code(f.cp.create_snapshots(&all_out).await).as_deref(),
        Some("InvalidParameterValue")
    );
    let twice = CreateSnapshotsRequest {
        exclude_volume_ids: vec![vols[1].volume_id.clone(), vols[1].volume_id.clone()],
        ..base.clone()
    };
    assert_eq!(
        code(f.cp.create_snapshots(&twice).await).as_deref(),
        Some("InvalidParameterValue")
    );
    let stranger = CreateSnapshotsRequest {
        exclude_volume_ids: vec![VolumeId::generate()],
        ..base.clone()
    };
    assert_eq!(
        code(f.cp.create_snapshots(&stranger).await).as_deref(),
        Some("InvalidParameterValue")
    );
    // The CLI: a set with a token, then the token with other arguments.
    let out = f.ok(&[
        "-o",
        "json",
        "snapshot",
        "create",
        "--instance",
        instance.as_str(),
        "--client-token",
        "t1",
        "--wait",
    ]);
    let set: SnapshotSet = serde_json::from_str(&out).unwrap();
    assert_eq!(set.state, SnapshotState::Completed);
    f.fails(
        &[
            "snapshot",
            "create",
            "--instance",
            instance.as_str(),
            "--client-token",
            "t1",
            "--exclude-boot",
        ],
        "IdempotentParameterMismatch",
    );
    assert_eq!(
        f.cp.describe_snapshots(&Default::default())
            .await
            .unwrap()
            .len(),
        2,
        "only the one set's snapshots exist"
    );
    // Filters, and the CLI's other views of the set.
    let by_volume =
        f.cp.describe_snapshots(&blockfleet_api::DescribeSnapshotsRequest {
            volume_id: Some(vols[1].volume_id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_volume.len(), 1);
    assert_eq!(by_volume[0].volume_id.as_ref(), Some(&vols[1].volume_id));
    let pending =
        f.cp.describe_snapshots(&blockfleet_api::DescribeSnapshotsRequest {
            set_id: Some(set.set_id.clone()),
            state: Some(SnapshotState::Pending),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(pending.is_empty());
    let shown: SnapshotSet =
        serde_json::from_str(&f.ok(&["-o", "json", "snapshot", "set", &set.set_id])).unwrap();
    assert_eq!(shown.set_id, set.set_id);
    let diff: blockfleet_api::ChangedBlocks = serde_json::from_str(&f.ok(&[
        "-o",
        "json",
        "snapshot",
        "diff",
        set.snapshots[0].snapshot_id.as_str(),
    ]))
    .unwrap();
    assert!(diff.blocks.is_empty(), "nothing was written: {diff:?}");
    // A tampered manifest is an error, never data.
    let archive = archive(&f).await;
    let id = &set.snapshots[0].snapshot_id;
    let path = f
        .dir
        .path()
        .join("objects")
        .join(format!("snapshots/{id}/manifest"));
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 40] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert!(archive.get_manifest(id).await.is_err());
    f.fails(
        &["snapshot", "diff", id.as_str()],
        "InvalidSnapshot.Corrupt",
    );
    f.fails(&["snapshot", "rm", id.as_str()], "InvalidSnapshot.Corrupt");
    let e =
        f.cp.create_volume(&CreateVolumeRequest {
            snapshot_id: Some(id.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("InvalidSnapshot.Corrupt"));
}
