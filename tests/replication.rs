//! Replication over real processes: every volume on three block servers; one killed with -9
//! or stopped (SIGSTOP) and brought back, again and again, under random writes through the
//! host agent's data path; then every acknowledged write must read back from every replica
//! and the replicas' extent files must be identical.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockfleet_core::ids::InstanceId;
use blockfleet_host_agent::AgentVolume;
use blockfleet_proto::ClientError;
use blockfleet_volume_client::Health;
use common::{Fleet, FleetOptions};

const SIZE: u64 = 32 << 20;
const UNIT: u64 = 4096;
const WRITERS: usize = 4;

/// What the volume must hold: the acknowledged writes.
struct Model {
    data: Mutex<Vec<u8>>,
    acked: AtomicU64,
    failed: AtomicU64,
}

impl Model {
    fn new() -> Self {
        Model {
            data: Mutex::new(vec![0u8; SIZE as usize]),
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }
}

/// Writers each own a stripe of units (so the model knows the order) and write random 4 KiB
/// units, with a flush every 16 writes, until `stop`.
fn start_writers(
    agent: &Arc<AgentVolume>,
    model: &Arc<Model>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WRITERS)
        .map(|w| {
            let (agent, model, stop) = (Arc::clone(agent), Arc::clone(model), Arc::clone(stop));
            tokio::spawn(async move {
                let mut rng = blockfleet_testkit::Rng::new(w as u64);
                let units = SIZE / UNIT;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let u = rng.below(units / WRITERS as u64) * WRITERS as u64 + w as u64;
                    let mut buf = vec![0u8; UNIT as usize];
                    rng.fill(&mut buf);
                    n += 1;
                    let ok = agent
                        .write(u * UNIT, UNIT, Some(&buf), n % 16 == 0)
                        .await
                        .is_ok();
                    if ok {
                        let at = (u * UNIT) as usize;
                        model.data.lock().unwrap()[at..at + UNIT as usize].copy_from_slice(&buf);
                        model.acked.fetch_add(1, Ordering::Relaxed);
                    } else {
                        model.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect()
}

/// Stops the writers; none of their writes may have failed.
async fn stop_writers(
    stop: &AtomicBool,
    writers: Vec<tokio::task::JoinHandle<()>>,
    model: &Model,
    when: &str,
) {
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(
        model.failed.load(Ordering::Relaxed),
        0,
        "writes failed {when}"
    );
}

async fn wait_in_sync(agent: &AgentVolume, within: Duration) {
    let start = Instant::now();
    loop {
        let s = agent.replicas().status();
        if s.iter().all(|r| r.health == Health::InSync) {
            return;
        }
        assert!(
            start.elapsed() < within,
            "replicas not back in sync within {within:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn open_volume(f: &Fleet) -> (Arc<AgentVolume>, String) {
    open_volume_on(f, 3).await
}

/// A new encrypted volume on the fleet's first `servers` block servers, opened through the
/// host agent's data path.
async fn open_volume_on(f: &Fleet, servers: usize) -> (Arc<AgentVolume>, String) {
    let v =
        f.cp.create_volume(&blockfleet_api::CreateVolumeRequest {
            size: Some(SIZE),
            encrypted: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .remove(0);
    let mut placed = v.placement.clone();
    placed.sort();
    let mut servers: Vec<String> = (0..servers)
        .map(|i| f.block_server_addr(i).to_owned())
        .collect();
    servers.sort();
    assert_eq!(placed, servers, "three replicas, one per block server");
    let agent = f
        .attach_in_process(&v.volume_id, &InstanceId::generate(), None, false, false)
        .await;
    (Arc::new(agent), v.volume_id.to_string())
}

/// Every replica holds every acknowledged write: the volume read back through the agent
/// equals the model, each replica's ciphertext and chunk versions equal the others', and so
/// do the extent files on disk.
async fn check_replicas(f: &Fleet, agent: &AgentVolume, volume: &str, model: &Model) {
    check_replicas_on(f, agent, volume, model, &[0, 1, 2]).await
}

async fn check_replicas_on(
    f: &Fleet,
    agent: &AgentVolume,
    volume: &str,
    model: &Model,
    servers: &[usize],
) {
    agent.flush().await.unwrap();
    let want = model.data.lock().unwrap().clone();
    let got = agent.read(0, SIZE as u32).await.unwrap();
    assert!(got == want, "the volume lost acknowledged writes");
    let id = volume.parse().unwrap();
    let mut ciphertexts = Vec::new();
    for &i in servers {
        let c = common::admin_block_client(f.block_server_addr(i), &f.block_key_file()).await;
        let mut all = Vec::new();
        for at in (0..SIZE).step_by(4 << 20) {
            all.extend_from_slice(&c.read(&id, at, 4 << 20).await.unwrap());
        }
        let versions = c.chunk_versions(&id, 0, 0, 65536).await.unwrap();
        ciphertexts.push((all, versions));
    }
    for i in 1..3 {
        assert!(
            ciphertexts[i].0 == ciphertexts[0].0,
            "replica {i} holds other bytes than replica 0"
        );
        assert_eq!(ciphertexts[i].1, ciphertexts[0].1, "chunk versions differ");
    }
    let files: Vec<Vec<u8>> = servers
        .iter()
        .map(|&i| {
            std::fs::read(
                f.block_server_dir(i)
                    .join("volumes")
                    .join(volume)
                    .join("data"),
            )
            .unwrap()
        })
        .collect();
    assert!(
        files[1] == files[0] && files[2] == files[0],
        "extent files differ"
    );
}

async fn fault_cycles(kill: bool) {
    let mut f = Fleet::start(FleetOptions::default());
    let (agent, volume) = open_volume(&f).await;
    let model = Arc::new(Model::new());
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&agent, &model, &stop);
    let cycles = 10;
    let mut repaired_before = 0;
    for cycle in 0..cycles {
        let victim = cycle % 3;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = model.acked.load(Ordering::Relaxed);
        if kill {
            f.kill_block_server(victim);
            tokio::time::sleep(Duration::from_millis(400)).await;
            f.restart_block_server(victim);
        } else {
            // Alternately longer than the replica timeout (marked out, then repaired) and
            // shorter (writes wait, nothing is marked out).
            f.signal_block_server(victim, "STOP");
            let held = if cycle % 2 == 0 { 1500 } else { 300 };
            tokio::time::sleep(Duration::from_millis(held)).await;
            f.signal_block_server(victim, "CONT");
        }
        wait_in_sync(&agent, Duration::from_secs(60)).await;
        // A short stop leaves nothing out of sync, so writes held by it may still be on
        // their way back: give them time rather than racing a slow machine.
        let progress = Instant::now();
        while model.acked.load(Ordering::Relaxed) == before {
            assert!(
                progress.elapsed() < Duration::from_secs(30),
                "cycle {cycle}: no write acknowledged within 30 s of the fault ending"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let repaired = agent.replicas().metrics.repairs.load(Ordering::Relaxed);
        if kill || cycle % 2 == 0 {
            assert!(repaired > repaired_before, "cycle {cycle}: no repair ran");
        }
        repaired_before = repaired;
    }
    stop_writers(&stop, writers, &model, "with a majority up").await;
    assert!(
        agent
            .replicas()
            .metrics
            .repair_bytes
            .load(Ordering::Relaxed)
            > 0
    );
    println!(
        "{} writes acknowledged over {cycles} {} cycles, {} repairs, {} bytes repaired",
        model.acked.load(Ordering::Relaxed),
        if kill { "kill -9" } else { "SIGSTOP" },
        agent.replicas().metrics.repairs.load(Ordering::Relaxed),
        agent
            .replicas()
            .metrics
            .repair_bytes
            .load(Ordering::Relaxed),
    );
    check_replicas(&f, &agent, &volume, &model).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_survive_kill_9_and_converge() {
    fault_cycles(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_survive_a_stopped_server_and_converge() {
    fault_cycles(false).await;
}

/// Replica `addr`'s state as the agent sees it.
fn replica_state(agent: &AgentVolume, addr: &str) -> blockfleet_volume_client::ReplicaStatus {
    agent
        .replicas()
        .status()
        .into_iter()
        .find(|r| r.addr == addr)
        .unwrap()
}

/// Faults a block server: kill -9 and restart, or SIGSTOP past the replica timeout (so it is
/// marked out) and SIGCONT.
async fn fault(f: &mut Fleet, victim: usize, kill: bool) {
    if kill {
        f.kill_block_server(victim);
        tokio::time::sleep(Duration::from_millis(300)).await;
        f.restart_block_server(victim);
    } else {
        f.signal_block_server(victim, "STOP");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        f.signal_block_server(victim, "CONT");
    }
}

/// Each fault lands while the replica the previous fault took is still repairing (seen in
/// the agent's replica state), so for a while one replica is in sync, one repairing, one out:
/// no write may fail, since the repairing replica holds every chunk it has been repaired or
/// written since it rejoined, and a write to a chunk it lacks waits for that chunk's repair.
async fn faults_during_repair(kill: bool) {
    let mut f = Fleet::start(FleetOptions::default());
    let (agent, volume) = open_volume(&f).await;
    // Paced so that a repair lasts long enough for the next fault to land inside it.
    agent.replicas().set_repair_pace(Duration::from_millis(40));
    let model = Arc::new(Model::new());
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&agent, &model, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    fault(&mut f, 0, kill).await;
    let cycles = 10;
    for cycle in 1..=cycles {
        let repairing = f.block_server_addr((cycle - 1) % 3).to_owned();
        let start = Instant::now();
        loop {
            let r = replica_state(&agent, &repairing);
            if r.health == Health::Repairing && r.repair_total - r.repair_done > 4 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "cycle {cycle}: {repairing} never seen repairing: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = model.acked.load(Ordering::Relaxed);
        fault(&mut f, cycle % 3, kill).await;
        let during = replica_state(&agent, &repairing);
        assert_ne!(during.health, Health::Out, "cycle {cycle}: {during:?}");
        assert!(
            model.acked.load(Ordering::Relaxed) > before,
            "cycle {cycle}: no write acknowledged during the fault"
        );
        assert_eq!(
            model.failed.load(Ordering::Relaxed),
            0,
            "cycle {cycle}: writes failed with one replica in sync and one repairing"
        );
    }
    wait_in_sync(&agent, Duration::from_secs(120)).await;
    stop_writers(&stop, writers, &model, "with faults during repairs").await;
    let m = &agent.replicas().metrics;
    println!(
        "{} writes acknowledged over {cycles} {} faults during repairs, {} repairs, {} chunks copied, {} adopted",
        model.acked.load(Ordering::Relaxed),
        if kill { "kill -9" } else { "SIGSTOP" },
        m.repairs.load(Ordering::Relaxed),
        m.repair_chunks.load(Ordering::Relaxed),
        m.repair_adopted.load(Ordering::Relaxed),
    );
    assert!(m.repairs.load(Ordering::Relaxed) > cycles as u64);
    check_replicas(&f, &agent, &volume, &model).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_another_replicas_repair_fails_no_write() {
    faults_during_repair(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigstop_during_another_replicas_repair_fails_no_write() {
    faults_during_repair(false).await;
}

/// kill -9 of block server `i`, restarted at once; returns when a repair has run and every
/// replica is in sync again.
async fn kill_and_repair(f: &mut Fleet, agent: &AgentVolume, i: usize) {
    let repairs = || agent.replicas().metrics.repairs.load(Ordering::Relaxed);
    let before = repairs();
    f.kill_block_server(i);
    f.restart_block_server(i);
    let start = Instant::now();
    while repairs() == before {
        assert!(start.elapsed() < Duration::from_secs(30), "no repair ran");
        // Reads find the closed connection; nothing else would.
        let _ = agent.read(0, UNIT as u32).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_in_sync(agent, Duration::from_secs(30)).await;
}

/// A server killed after writes whose chunk states never reached its disk (no flush) holds
/// the data all the same: its repair adopts those chunks by digest and copies none; so does a
/// kill while the volume is only read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_repairs_only_chunks_whose_data_differ() {
    let mut f = Fleet::start(FleetOptions::default());
    let (agent, volume) = open_volume(&f).await;
    let model = Model::new();
    let rv = agent.replicas();
    // Unflushed writes over every chunk, then reads only.
    let mut rng = blockfleet_testkit::Rng::new(7);
    for chunk in 0..SIZE / (512 << 10) {
        let mut buf = vec![0u8; UNIT as usize];
        rng.fill(&mut buf);
        let at = chunk * (512 << 10) + rng.below(128) * UNIT;
        agent.write(at, UNIT, Some(&buf), false).await.unwrap();
        model.data.lock().unwrap()[at as usize..(at + UNIT) as usize].copy_from_slice(&buf);
    }
    let reads = {
        let agent = Arc::clone(&agent);
        tokio::spawn(async move {
            for i in 0..2000u64 {
                agent
                    .read((i * 7919 * UNIT) % SIZE, UNIT as u32)
                    .await
                    .unwrap();
            }
        })
    };
    let copied = || rv.metrics.repair_chunks.load(Ordering::Relaxed);
    let adopted = || rv.metrics.repair_adopted.load(Ordering::Relaxed);
    let (copied0, adopted0) = (copied(), adopted());
    kill_and_repair(&mut f, &agent, 1).await;
    reads.await.unwrap();
    assert_eq!(copied(), copied0, "repair copied chunks whose data matched");
    assert_eq!(
        adopted() - adopted0,
        SIZE / (512 << 10),
        "every chunk written since the last flush is checked and adopted"
    );
    // A second kill, after a flush and with the volume only read: nothing to repair at all.
    agent.flush().await.unwrap();
    let (copied1, adopted1) = (copied(), adopted());
    kill_and_repair(&mut f, &agent, 2).await;
    assert_eq!((copied(), adopted()), (copied1, adopted1));
    check_replicas(&f, &agent, &volume, &model).await;
}

/// Two of three servers stopped (SIGSTOP): a write fails with a quorum error within a few
/// replica timeouts, never hangs; once they are back it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stopped_servers_fail_writes_without_hanging() {
    let f = Fleet::start(FleetOptions::default());
    let (agent, _volume) = open_volume(&f).await;
    let data = bytes::Bytes::from(vec![5u8; UNIT as usize]);
    agent.replicas().write(0, data.clone(), true).await.unwrap();
    f.signal_block_server(1, "STOP");
    f.signal_block_server(2, "STOP");
    let start = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        agent.replicas().write(UNIT, data.clone(), true),
    )
    .await
    .expect("a write with two servers stopped hung");
    let e = r.unwrap_err();
    assert!(matches!(e, ClientError::Quorum { .. }), "{e}");
    println!("failed after {:?}: {e}", start.elapsed());
    f.signal_block_server(1, "CONT");
    f.signal_block_server(2, "CONT");
    wait_in_sync(&agent, Duration::from_secs(30)).await;
    agent.replicas().write(UNIT, data, true).await.unwrap();
}

/// With two of three replicas gone a write fails clearly rather than being acknowledged on
/// one; once they are back the volume is whole, including what was acknowledged before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_fail_without_a_majority_and_recover() {
    let mut f = Fleet::start(FleetOptions::default());
    let (agent, volume) = open_volume(&f).await;
    let model = Model::new();
    let put = |at: u64, byte: u8| {
        model.data.lock().unwrap()[at as usize..(at + UNIT) as usize].fill(byte);
        vec![byte; UNIT as usize]
    };
    agent.write(0, UNIT, Some(&put(0, 1)), true).await.unwrap();
    f.kill_block_server(1);
    f.kill_block_server(2);
    let e = agent
        .replicas()
        .write(UNIT, bytes::Bytes::from(vec![9u8; UNIT as usize]), true)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Quorum {
                have: 1,
                need: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("replicas"), "{e}");
    // Through the agent: an I/O error for the instance.
    assert!(agent
        .write(UNIT, UNIT, Some(&[9u8; 4096][..]), true)
        .await
        .is_err());
    f.restart_block_server(1);
    f.restart_block_server(2);
    wait_in_sync(&agent, Duration::from_secs(30)).await;
    // The unacknowledged write may or may not be there; the replicas agree either way.
    let now = agent.read(UNIT, UNIT as u32).await.unwrap();
    model.data.lock().unwrap()[UNIT as usize..2 * UNIT as usize].copy_from_slice(&now);
    agent
        .write(2 * UNIT, UNIT, Some(&put(2 * UNIT, 3)), true)
        .await
        .unwrap();
    // Repair copies only what a replica missed: one write while it was down, one chunk.
    f.kill_block_server(0);
    let far = SIZE - UNIT;
    agent
        .write(far, UNIT, Some(&put(far, 4)), true)
        .await
        .unwrap();
    let before = agent
        .replicas()
        .metrics
        .repair_bytes
        .load(Ordering::Relaxed);
    f.restart_block_server(0);
    wait_in_sync(&agent, Duration::from_secs(30)).await;
    assert_eq!(
        agent
            .replicas()
            .metrics
            .repair_bytes
            .load(Ordering::Relaxed)
            - before,
        512 << 10,
        "repair copied more than the one chunk missed"
    );
    check_replicas(&f, &agent, &volume, &model).await;
}

/// `server drain` under write load: every replica leaves the drained server for the spare,
/// no write fails, the volume is whole on its new replicas, and `server ls` shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_moves_replicas_under_load() {
    let f = Fleet::start(FleetOptions {
        block_servers: 4,
        ..Default::default()
    });
    let (agent, volume) = open_volume_on(&f, 3).await;
    let _follow = blockfleet_host_agent::follow_placement(
        f.host_cp.clone(),
        agent.replicas(),
        Duration::from_millis(200),
    );
    let model = Arc::new(Model::new());
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&agent, &model, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Writes in flight do not make replicas in sync look behind.
    for _ in 0..5 {
        let ls = f.ok(&["-o", "json", "server", "ls"]);
        let servers: Vec<blockfleet_api::BlockServerView> = serde_json::from_str(&ls).unwrap();
        for r in servers.iter().flat_map(|s| &s.volumes) {
            assert_eq!(r.state, "in_sync", "under write load: {r:?}");
        }
    }
    let drained = f.block_server_addr(0).to_owned();
    f.ok(&["server", "drain", &drained]);
    let start = Instant::now();
    let placement = loop {
        let v =
            f.cp.describe_volumes(&[volume.parse().unwrap()])
                .await
                .unwrap();
        if !v[0].placement.contains(&drained) {
            break v[0].placement.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "drain did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(placement.contains(&f.block_server_addr(3).to_owned()));
    // The agent drops the old replica at its next look at the placement.
    while agent.replicas().status().iter().any(|r| r.addr == drained) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_writers(&stop, writers, &model, "during the drain").await;
    wait_in_sync(&agent, Duration::from_secs(30)).await;
    check_replicas_on(&f, &agent, &volume, &model, &[1, 2, 3]).await;
    let ls = f.ok(&["-o", "json", "server", "ls"]);
    let servers: Vec<blockfleet_api::BlockServerView> = serde_json::from_str(&ls).unwrap();
    let s0 = servers.iter().find(|s| s.address == drained).unwrap();
    assert!(s0.draining && s0.volumes.is_empty(), "{s0:?}");
    let s3 = servers
        .iter()
        .find(|s| s.address == f.block_server_addr(3))
        .unwrap();
    assert_eq!(s3.volumes.len(), 1);
    assert_eq!(s3.volumes[0].state, "in_sync");
    assert!(
        !std::fs::exists(f.block_server_dir(0).join("volumes").join(&volume)).unwrap(),
        "the drained server still holds the replica"
    );
    // New volumes avoid the drained server; draining a second one would leave too few.
    let v = f.create(&["--size", "1048576"]);
    assert!(!v[0].placement.contains(&drained));
    f.fails(
        &["server", "drain", f.block_server_addr(1)],
        "InsufficientCapacity",
    );
    f.fails(
        &["server", "drain", "127.0.0.1:1"],
        "not one of the configured",
    );
}

/// `server ls` answers within its bound while a block server is stopped (SIGSTOP) with a
/// volume on it: that server shows as unresponsive, the others as up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_ls_answers_with_a_stopped_server() {
    let f = Fleet::start(FleetOptions::default());
    let (agent, _volume) = open_volume(&f).await;
    agent.flush().await.unwrap();
    let stopped = f.block_server_addr(1).to_owned();
    f.signal_block_server(1, "STOP");
    let start = Instant::now();
    let out = f.ok(&["server", "ls"]);
    let took = start.elapsed();
    f.signal_block_server(1, "CONT");
    assert!(
        took < Duration::from_secs(5),
        "server ls took {took:?}:\n{out}"
    );
    for line in out.lines().filter(|l| !l.starts_with(' ')) {
        let want = if line.starts_with(&stopped) {
            "UNRESPONSIVE"
        } else {
            "  up  "
        };
        assert!(line.contains(want), "{line:?} (want {want}):\n{out}");
    }
    // Back: it answers again.
    let out = f.ok(&["server", "ls"]);
    assert!(!out.contains("UNRESPONSIVE"), "{out}");
}

/// Allocated bytes of a replica's extent file (what `du` shows, holes not counted).
fn allocated(f: &Fleet, server: usize, volume: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(
        f.block_server_dir(server)
            .join("volumes")
            .join(volume)
            .join("data"),
    )
    .map(|m| m.blocks() * 512)
    .unwrap()
}

/// A drain of a detached volume with one chunk of data fills the new replica with that chunk
/// only (zero chunks become holes), shows its fill while it runs, and the moved volume reads
/// back the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_copies_no_zero_chunks() {
    let f = Fleet::start(FleetOptions {
        block_servers: 4,
        ..Default::default()
    });
    let (agent, volume) = open_volume_on(&f, 3).await;
    let data = vec![0x5au8; 1 << 20];
    agent
        .write(4 << 20, data.len() as u64, Some(&data), false)
        .await
        .unwrap();
    agent.flush().await.unwrap();
    drop(agent);
    let id: blockfleet_core::ids::VolumeId = volume.parse().unwrap();
    f.cp.detach_volume(&id).await.unwrap();
    f.ok(&["server", "drain", f.block_server_addr(0)]);
    let start = Instant::now();
    while f
        .cp
        .describe_volumes(std::slice::from_ref(&id))
        .await
        .unwrap()[0]
        .placement
        .contains(&f.block_server_addr(0).to_owned())
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "drain did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let on_new = allocated(&f, 3, &volume);
    let on_old = allocated(&f, 1, &volume);
    assert!(
        on_new <= 2 << 20,
        "the new replica allocates {on_new} bytes for 1 MiB of data in a {SIZE}-byte volume"
    );
    assert!(on_new <= on_old, "new {on_new} > old {on_old}");
    // The moved volume reads back: data where written, zeros elsewhere.
    let agent = f
        .attach_in_process(&id, &InstanceId::generate(), None, false, false)
        .await;
    let got = agent.read(0, SIZE as u32).await.unwrap();
    assert!(got[4 << 20..5 << 20] == data[..], "the written chunk");
    assert!(
        got[..4 << 20]
            .iter()
            .chain(&got[5 << 20..])
            .all(|b| *b == 0),
        "zeros elsewhere"
    );
}

/// A tmpfs mounted over a directory for a test, unmounted when dropped (even on a panic).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` over `dir`, keeping `dir`'s files (copied in, holes kept).
    fn over(dir: &std::path::Path, size: &str) -> Tmpfs {
        let run = |cmd: &mut std::process::Command| {
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let saved = dir.with_extension("saved");
        std::fs::rename(dir, &saved).unwrap();
        std::fs::create_dir(dir).unwrap();
        run(std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir));
        let fs = Tmpfs(dir.to_owned());
        run(std::process::Command::new("cp")
            .args(["-a", "--sparse=always", "-T"])
            .arg(&saved)
            .arg(dir));
        fs
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A block server whose disk fills up stops cleanly; the volume's writes go on on the other
/// two replicas with none failing, and `server ls` says why that replica is out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_stops_its_block_server_and_says_why() {
    let mut f = Fleet::start(FleetOptions::default());
    let (agent, volume) = open_volume(&f).await;
    agent.flush().await.unwrap();
    let _follow = blockfleet_host_agent::follow_placement(
        f.host_cp.clone(),
        agent.replicas(),
        Duration::from_millis(200),
    );
    // Block server 2's data onto a tmpfs with room for its metadata and a few MiB more.
    f.kill_block_server(2);
    let dir = f.block_server_dir(2);
    let _tmpfs = Tmpfs::over(&dir, "12m");
    f.restart_block_server(2);
    wait_in_sync(&agent, Duration::from_secs(30)).await;

    // The whole volume written (and flushed) through the agent: more than the tmpfs holds.
    let model = Model::new();
    let mut x = 0x1234_5678_9abc_def1u64;
    for at in (0..SIZE).step_by(1 << 20) {
        let data: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        agent
            .write(at, data.len() as u64, Some(&data), false)
            .await
            .expect("a write with two replicas left");
        model.data.lock().unwrap()[at as usize..at as usize + data.len()].copy_from_slice(&data);
        agent.flush().await.expect("a flush with two replicas left");
    }
    let out = replica_state(&agent, f.block_server_addr(2));
    assert_eq!(out.health, Health::Out);
    assert!(
        out.reason
            .as_deref()
            .is_some_and(|r| r.contains("no space left")),
        "{out:?}"
    );
    // The full server stopped by itself, cleanly (an error exit, not a crash signal).
    let start = Instant::now();
    let status = loop {
        if let Some(s) = f.block_server_exited(2) {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the full block server did not stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(1), "{status:?}");
    // `server ls` shows the server down and why its replica went out.
    let start = Instant::now();
    loop {
        let ls = f.ok(&["-o", "json", "server", "ls"]);
        let servers: Vec<blockfleet_api::BlockServerView> = serde_json::from_str(&ls).unwrap();
        let s2 = servers
            .iter()
            .find(|s| s.address == f.block_server_addr(2))
            .unwrap();
        let r = &s2.volumes[0];
        if r.reason
            .as_deref()
            .is_some_and(|w| w.contains("no space left"))
        {
            assert!(!s2.reachable, "{s2:?}");
            let text = f.ok(&["server", "ls"]);
            assert!(text.contains("no space left"), "{text}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "server ls shows no reason: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = agent.read(0, SIZE as u32).await.unwrap();
    assert!(
        got == *model.data.lock().unwrap(),
        "the volume lost acknowledged writes"
    );
    drop(volume);
}
