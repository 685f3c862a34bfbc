//! The fleet end to end over real processes on 127.0.0.1: embedded KMS, three block servers,
//! control plane and transform worker, each a `blockfleet` process; real NBD clients
//! (nbdcopy, qemu-io) through the host agent.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blockfleet_api::{HydrationState, Volume};
use blockfleet_core::ids::{KmsKeyId, VolumeId};
use blockfleet_core::units::{CHUNK, SECTORS_PER_CHUNK};
use blockfleet_keys::xts::Xts;
use blockfleet_snapshot_format::{
    manifest::CIPHER_XTS_4K, Archive, ChunkHash, EncryptionHeader, Manifest, ManifestKey,
};
use common::{spawn, Fleet, FleetOptions, Proc};
use sha2::{Digest, Sha256};

/// Random data with zero chunks (every fourth) and a zero unit inside a data chunk.
fn image(path: &Path, chunks: u64) -> Vec<u8> {
    let mut data = vec![0u8; (chunks * CHUNK) as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ chunks;
    for (i, c) in data.chunks_exact_mut(CHUNK as usize).enumerate() {
        if i % 4 == 2 {
            continue;
        }
        for w in c.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        if i == 1 {
            c[8192..12288].fill(0);
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

fn nbd_read(agent: &Proc, out: &Path) -> Vec<u8> {
    let st = Command::new("nbdcopy")
        .arg(format!("nbd://{}", agent.addr))
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success(), "nbdcopy failed");
    std::fs::read(out).unwrap()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn unit_hashes(data: &[u8]) -> HashSet<[u8; 32]> {
    data.chunks_exact(4096)
        .filter(|u| u.iter().any(|&b| b != 0))
        .map(|u| Sha256::digest(u).into())
        .collect()
}

fn extent_of(f: &Fleet, v: &VolumeId) -> Vec<u8> {
    let p = files_under(f.dir.path())
        .into_iter()
        .find(|p| p.to_string_lossy().contains(v.as_str()) && p.ends_with("data"))
        .unwrap();
    std::fs::read(p).unwrap()
}

fn wait_hydrated(f: &Fleet, ids: &[VolumeId]) -> Vec<Volume> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rt = tokio::runtime::Handle::current();
        let v = tokio::task::block_in_place(|| rt.block_on(f.cp.describe_volumes(ids))).unwrap();
        if v.iter().all(|v| {
            v.hydration
                .as_ref()
                .is_some_and(|h| matches!(h.state, HydrationState::Done | HydrationState::Failed))
        }) {
            return v;
        }
        assert!(Instant::now() < deadline, "hydration did not end: {v:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_to_four_encrypted_volumes_reencryption_and_bad_input() {
    let f = Fleet::start(FleetOptions::default());
    let img_path = f.dir.path().join("image.raw");
    let chunks = 16;
    let img = image(&img_path, chunks);
    let snap = f
        .ok(&["snapshot", "import", img_path.to_str().unwrap()])
        .trim()
        .to_owned();
    let cp_kms = f.kms("AKCP", "cp-secret-0123").await;
    let tf_kms = f.kms("AKTF", "tf-secret-0123").await;
    let key: KmsKeyId = cp_kms.create_key("t").await.unwrap().parse().unwrap();

    // Four encrypted volumes in one call, hydrated by one job that reads each chunk once.
    let vols = f.create(&[
        "--from-snapshot",
        &snap,
        "--kms-key",
        key.as_str(),
        "--count",
        "4",
        "--wait",
    ]);
    assert_eq!(vols.len(), 4);
    for v in &vols {
        let placements: HashSet<_> = v.placement.iter().collect();
        assert_eq!(placements.len(), 3, "each volume on all 3 block servers");
    }
    for v in &vols {
        let h = v.hydration.as_ref().unwrap();
        assert_eq!(
            (h.state, h.hydrated_chunks),
            (HydrationState::Done, Some(chunks))
        );
        assert!(v.encrypted);
    }
    let data_chunks = img
        .chunks_exact(CHUNK as usize)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64;
    assert_eq!(
        f.metric("blockfleet_transform_source_chunks_total"),
        data_chunks
    );
    assert_eq!(
        f.metric("blockfleet_transform_chunks_written_total"),
        4 * chunks
    );

    // Each reads back identical through its host agent; the block servers hold no plaintext
    // unit and no key byte; two volumes' ciphertexts share nothing.
    let plain_units = unit_hashes(&img);
    let mut keys = Vec::new();
    for (i, v) in vols.iter().enumerate() {
        let agent = f.attach(&v.volume_id);
        let back = nbd_read(&agent, &f.dir.path().join(format!("out{i}")));
        assert!(back == img, "volume {i} differs from the image");
        let info = f.host_cp.attach_info(&v.volume_id).await.unwrap();
        let wrapped = hex::decode(info.wrapped_key.unwrap()).unwrap();
        keys.push(tf_kms.decrypt_key(&wrapped, &v.volume_id).await.unwrap());
    }
    let mut all_units = Vec::new();
    for p in files_under(f.dir.path()) {
        let s = p.to_string_lossy();
        if !s.contains("/bs") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        for k in &keys {
            let (a, b) = k.expose_secret().split_at(32);
            assert!(
                !bytes.windows(32).any(|w| w == a || w == b),
                "key bytes in {s}"
            );
        }
        all_units.push(unit_hashes(&bytes));
    }
    for u in &all_units {
        assert!(
            u.is_disjoint(&plain_units),
            "a plaintext unit is on a block server"
        );
    }
    let (c0, c1) = (
        extent_of(&f, &vols[0].volume_id),
        extent_of(&f, &vols[1].volume_id),
    );
    assert!(
        unit_hashes(&c0).is_disjoint(&unit_hashes(&c1)),
        "two volumes share ciphertext"
    );

    // Re-encryption: a snapshot encrypted under one volume's key restores under another key.
    let src = VolumeId::generate();
    let wrapped = cp_kms.generate_wrapped_key(&key, &src).await.unwrap();
    let src_xts = Xts::new(&tf_kms.decrypt_key(&wrapped, &src).await.unwrap());
    let store = blockfleet_snapshot_format::store::open(
        &blockfleet_core::config::StoreConfig::Local(blockfleet_core::config::LocalStoreConfig {
            path: f.dir.path().join("objects"),
        }),
    )
    .await
    .unwrap();
    let mkey = ManifestKey::load_or_create(&f.dir.path().join("manifest.key")).unwrap();
    let archive = Archive::new(store, std::sync::Arc::new(mkey));
    let mut manifest = Manifest {
        snapshot_id: blockfleet_core::ids::SnapshotId::generate(),
        volume_size: img.len() as u64,
        parent: None,
        created_at: 0,
        description: "encrypted".into(),
        encryption: Some(EncryptionHeader {
            kms_key_id: key.clone(),
            wrapped_key: wrapped,
            cipher: CIPHER_XTS_4K.into(),
            context_volume: Some(src.clone()),
        }),
        chunks: Default::default(),
    };
    for (i, c) in img.chunks_exact(CHUNK as usize).enumerate() {
        if c.iter().all(|&b| b == 0) {
            continue;
        }
        let mut ct = c.to_vec();
        src_xts
            .encrypt(&mut ct, i as u64 * SECTORS_PER_CHUNK)
            .unwrap();
        let h = ChunkHash::of(&ct);
        archive.put_chunk(&h, ct.into()).await.unwrap();
        manifest.chunks.insert(i as u64, h);
    }
    archive.put_manifest(&manifest).await.unwrap();
    let key2: KmsKeyId = cp_kms.create_key("t2").await.unwrap().parse().unwrap();
    let re = f.create(&[
        "--from-snapshot",
        manifest.snapshot_id.as_str(),
        "--kms-key",
        key2.as_str(),
        "--wait",
    ]);
    let agent = f.attach(&re[0].volume_id);
    assert!(
        nbd_read(&agent, &f.dir.path().join("re")) == img,
        "re-encrypted restore differs"
    );

    // Bad input: a clear error, and nothing created.
    let before = f.cp.describe_volumes(&[]).await.unwrap().len();
    let unknown = blockfleet_core::ids::SnapshotId::generate();
    f.fails(
        &["volume", "create", "--from-snapshot", unknown.as_str()],
        "InvalidSnapshot.NotFound",
    );
    f.fails(
        &[
            "volume",
            "create",
            "--from-snapshot",
            &snap,
            "--kms-key",
            "6f1c1a8e-3b1e-4e53-9c55-1f2b5c7e9d10",
        ],
        "NotFound",
    );
    f.fails(
        &[
            "volume",
            "create",
            "--from-snapshot",
            &snap,
            "--size",
            "1MiB",
        ],
        "smaller than the snapshot",
    );
    f.fails(
        &["volume", "create", "--from-snapshot", &snap, "--count", "0"],
        "count must be",
    );
    f.fails(&["volume", "create", "--size", "1000"], "multiple of");
    f.fails(&["volume", "rm", vols[0].volume_id.as_str()], "VolumeInUse");
    assert_eq!(f.cp.describe_volumes(&[]).await.unwrap().len(), before);

    // A corrupt chunk met during hydration: the job fails, the volume is impaired, and the
    // chunk is never served.
    let bad_path = f.dir.path().join("bad.raw");
    let mut bad = vec![0u8; 4 * CHUNK as usize];
    bad[..CHUNK as usize].fill(7);
    bad[2 * CHUNK as usize..3 * CHUNK as usize].fill(9);
    std::fs::write(&bad_path, &bad).unwrap();
    let bad_snap = f
        .ok(&["snapshot", "import", bad_path.to_str().unwrap()])
        .trim()
        .to_owned();
    let h = ChunkHash::of(&bad[2 * CHUNK as usize..3 * CHUNK as usize]);
    let chunk_file = f.dir.path().join("objects").join(h.key());
    let mut bytes = std::fs::read(&chunk_file).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&chunk_file, bytes).unwrap();
    f.fails(
        &["volume", "create", "--from-snapshot", &bad_snap, "--wait"],
        "corrupt",
    );
    let all = f.cp.describe_volumes(&[]).await.unwrap();
    let imp = all
        .iter()
        .find(|v| v.snapshot_id.as_ref().map(|s| s.as_str()) == Some(bad_snap.as_str()))
        .unwrap();
    assert_eq!(imp.status, "impaired");
    assert_eq!(
        imp.hydration.as_ref().unwrap().state,
        HydrationState::Failed
    );
    let agent = f.attach(&imp.volume_id);
    let st = Command::new("nbdcopy")
        .arg(format!("nbd://{}", agent.addr))
        .arg(f.dir.path().join("bad.out"))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(
        !st.success(),
        "a read of the corrupt chunk must fail, not return data"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_job_resumes_and_user_writes_survive() {
    // Background hydration paced at 8 MiB/s so the kill lands mid-job.
    let mut f = Fleet::start(FleetOptions {
        background_mib_per_sec: 8,
        ..FleetOptions::default()
    });
    let img_path = f.dir.path().join("image.raw");
    let chunks = 64;
    let mut expect = image(&img_path, chunks);
    let snap = f
        .ok(&["snapshot", "import", img_path.to_str().unwrap()])
        .trim()
        .to_owned();
    let vols = f.create(&["--from-snapshot", &snap, "--encrypted"]);
    let id = vols[0].volume_id.clone();
    let agent = f.attach(&id);

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = &f
            .cp
            .describe_volumes(std::slice::from_ref(&id))
            .await
            .unwrap()[0];
        if v.hydration.as_ref().unwrap().hydrated_chunks.unwrap_or(0) >= 4 {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // kill -9: no goodbye to the control plane; the lease has to run out.
    let mut tf = f.transform.take().unwrap();
    tf.child.kill().unwrap();
    tf.child.wait().unwrap();
    let v = &f
        .cp
        .describe_volumes(std::slice::from_ref(&id))
        .await
        .unwrap()[0];
    let done = v.hydration.as_ref().unwrap().hydrated_chunks.unwrap();
    assert!(done < chunks, "the job finished before the kill ({done})");

    // A user write to a chunk not hydrated yet, while no worker runs.
    let off = (chunks - 2) * CHUNK + 8192;
    common::qemu_io(&agent, &format!("write -P 0xab {off} 65536"));
    expect[off as usize..off as usize + 65536].fill(0xab);

    f.start_transform();
    // An unaligned write needs the units around it: fetched on demand.
    let off2 = (chunks - 5) * CHUNK + 1000;
    common::qemu_io(&agent, &format!("write -P 0xcd {off2} 3000"));
    expect[off2 as usize..off2 as usize + 3000].fill(0xcd);
    // Reading everything during hydration: the snapshot's data and the user's writes.
    assert!(
        nbd_read(&agent, &f.dir.path().join("during")) == expect,
        "read during hydration"
    );

    let v = wait_hydrated(&f, std::slice::from_ref(&id));
    let h = v[0].hydration.as_ref().unwrap();
    assert_eq!(h.state, HydrationState::Done);
    assert!(h.attempts >= 2, "resumed by a second claim: {h:?}");
    drop(agent);
    let agent = spawn(
        &f.config,
        &["attach", "--volume", id.as_str(), "--listen", "127.0.0.1:0"],
    );
    assert!(
        nbd_read(&agent, &f.dir.path().join("after")) == expect,
        "read after hydration"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_copied_from_a_volume_at_the_moment_asked() {
    // Paced at 4 MiB/s so writes to the source land while the copy is still being read.
    let mut f = Fleet::start(FleetOptions {
        background_mib_per_sec: 4,
        ..FleetOptions::default()
    });
    let img_path = f.dir.path().join("image.raw");
    let chunks = 32;
    let mut at_cut = image(&img_path, chunks);
    let snap = f
        .ok(&["snapshot", "import", img_path.to_str().unwrap()])
        .trim()
        .to_owned();
    let src = f.create(&["--from-snapshot", &snap, "--encrypted", "--wait"]);
    let a = src[0].volume_id.clone();
    let agent_a = f.attach(&a);
    common::qemu_io(&agent_a, &format!("write -P 0x11 {} 8192", 3 * CHUNK));
    at_cut[3 * CHUNK as usize..3 * CHUNK as usize + 8192].fill(0x11);

    // Two copies at once in one call, under another key; then the source changes at once.
    let cp_kms = f.kms("AKCP", "cp-secret-0123").await;
    let key: KmsKeyId = cp_kms.create_key("copy").await.unwrap().parse().unwrap();
    let copies = f.create(&[
        "--from-volume",
        a.as_str(),
        "--kms-key",
        key.as_str(),
        "--count",
        "2",
    ]);
    let mut now = at_cut.clone();
    let late = (chunks - 1) * CHUNK;
    common::qemu_io(&agent_a, &format!("write -P 0x22 {late} 65536"));
    now[late as usize..late as usize + 65536].fill(0x22);

    // While the copy runs: the source cannot be deleted.
    // A second copy meanwhile is a cut of its own, with that write.
    let second = f.create(&["--from-volume", a.as_str()]);
    drop(agent_a);
    f.ok(&["volume", "detach", a.as_str()]);
    f.fails(&["volume", "rm", a.as_str()], "source of hydration job");
    let agent_a = f.attach(&a);

    let ids: Vec<VolumeId> = copies.iter().map(|v| v.volume_id.clone()).collect();
    let done = wait_hydrated(&f, &ids);
    for (i, v) in done.iter().enumerate() {
        assert_eq!(v.hydration.as_ref().unwrap().state, HydrationState::Done);
        assert_eq!(v.source_volume_id.as_ref(), Some(&a));
        assert_eq!(v.kms_key_id.as_deref(), Some(key.as_str()));
        let agent = f.attach(&v.volume_id);
        assert!(
            nbd_read(&agent, &f.dir.path().join(format!("copy{i}"))) == at_cut,
            "copy {i} is not the source as it was when the copy was asked for"
        );
    }
    assert!(
        nbd_read(&agent_a, &f.dir.path().join("src")) == now,
        "the source lost a write made during the copy"
    );
    wait_hydrated(&f, &[second[0].volume_id.clone()]);
    let agent = f.attach(&second[0].volume_id);
    assert!(
        nbd_read(&agent, &f.dir.path().join("second")) == now,
        "the second copy is not the source at its own cut"
    );

    // The cut is released with the job: the source can be copied again, now with the write.
    let again = f.create(&["--from-volume", a.as_str(), "--wait"]);
    let agent = f.attach(&again[0].volume_id);
    assert!(nbd_read(&agent, &f.dir.path().join("again")) == now);

    // Bad input: a clear error, nothing created.
    let before = f.cp.describe_volumes(&[]).await.unwrap().len();
    let unknown = VolumeId::generate();
    f.fails(
        &["volume", "create", "--from-volume", unknown.as_str()],
        "InvalidVolume.NotFound",
    );
    f.fails(
        &[
            "volume",
            "create",
            "--from-volume",
            a.as_str(),
            "--size",
            "1MiB",
        ],
        "smaller than the source volume's",
    );
    let both =
        f.cp.create_volume(&blockfleet_api::CreateVolumeRequest {
            snapshot_id: Some(snap.parse().unwrap()),
            source_volume_id: Some(a.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(both.code(), Some("InvalidParameterCombination"), "{both}");
    assert_eq!(f.cp.describe_volumes(&[]).await.unwrap().len(), before);

    // The KMS gone: retried, then a clear failure, and nothing made.
    f.kill_kms();
    f.fails(
        &[
            "volume",
            "create",
            "--from-volume",
            a.as_str(),
            "--encrypted",
        ],
        "KmsUnavailable",
    );
    assert_eq!(f.cp.describe_volumes(&[]).await.unwrap().len(), before);
}
