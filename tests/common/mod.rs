//! Shared by tests/fleet.rs and benches/hydrate.rs: a whole fleet as real `blockfleet`
//! processes on 127.0.0.1.

#![allow(dead_code)] // each user takes what it needs
#![allow(clippy::unwrap_used)] // a failed setup step should panic

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use blockfleet_api::{AttachVolumeRequest, ControlPlaneClient, CreateVolumeRequest, Volume};
use blockfleet_core::config::{KmsClientConfig, Secret};
use blockfleet_core::ids::InstanceId;
use blockfleet_core::ids::VolumeId;
use blockfleet_core::tls::Role;
use blockfleet_host_agent::{AgentVolume, Fetcher};
use blockfleet_keys::kms::Kms;
use blockfleet_keys::xts::Xts;
use blockfleet_testkit::free_port;
use blockfleet_volume_client::ReplicatedVolume;

pub struct Proc {
    pub child: Child,
    pub addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A block-protocol client holding an admin capability under the key in `key_file` (as the
/// control plane's connections do).
pub async fn admin_block_client(addr: &str, key_file: &Path) -> blockfleet_proto::BlockClient {
    let key = blockfleet_core::token::TokenKey::load_or_create(key_file).unwrap();
    let c = blockfleet_proto::BlockClient::connect(addr).await.unwrap();
    c.authorize_admin(&key, "test-admin").await.unwrap();
    c
}

/// A host agent's capability (read and write `volume`) under the key in `key_file`.
pub fn rw_grant(key_file: &Path, volume: &VolumeId) -> blockfleet_proto::Grant {
    let key = blockfleet_core::token::TokenKey::load_or_create(key_file).unwrap();
    blockfleet_proto::Grant::writer(&key, volume, "test-agent")
}

/// The fleet CA and every role's certificate, made once per test process and shared by its
/// fleets (`[tls] dir`); from then on the test process reaches block servers over mutual TLS
/// as the control plane.
pub fn fleet_tls_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        blockfleet_core::tls::ensure(d.path(), &Role::ALL, "test").unwrap();
        // The host agent's names the test fleets' host, as its capabilities do.
        blockfleet_core::tls::ensure(d.path(), &[Role::HostAgent], "host-local").unwrap();
        blockfleet_core::tls::set_fleet_ca(d.path()).unwrap();
        blockfleet_proto::transport::set_default(
            blockfleet_proto::Transport::tls(d.path(), Role::ControlPlane).unwrap(),
        );
        d
    })
    .path()
}

/// A TLS dir holding a host-agent certificate of the test fleets' CA for host `name`.
pub fn host_agent_tls_dir(name: &str) -> tempfile::TempDir {
    let fleet = fleet_tls_dir();
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(fleet.join(f), d.path().join(f)).unwrap();
    }
    blockfleet_core::tls::issue(d.path(), Role::HostAgent, name).unwrap();
    d
}

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blockfleet"))
}

/// Starts `cmd` and reads the address from its first stdout line (`... listening on ADDR`).
pub fn start_line(mut cmd: Command) -> Proc {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split(" listening on ")
        .nth(1)
        .unwrap_or_else(|| panic!("{cmd:?} printed {line:?}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    Proc { child, addr }
}

/// Starts a service with `config` and waits for its address.
pub fn spawn(config: &Path, args: &[&str]) -> Proc {
    let mut cmd = bin();
    cmd.arg("-c")
        .arg(config)
        .args(args)
        .stderr(Stdio::inherit());
    start_line(cmd)
}

/// What differs between the fleets tests and benches start.
pub struct FleetOptions {
    /// The `[store]` section's body; default: a local store in the fleet's directory.
    pub store: Option<String>,
    pub background_mib_per_sec: u64,
    pub concurrency: usize,
    pub poll_ms: u64,
    /// Block server processes (volumes have three replicas).
    pub block_servers: usize,
    /// More `[control_plane]` settings (TOML lines).
    pub control_plane_extra: String,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            store: None,
            background_mib_per_sec: 0,
            concurrency: 8,
            poll_ms: 100,
            block_servers: 3,
            control_plane_extra: String::new(),
        }
    }
}

/// KMS, block servers (three by default), control plane and a transform worker, each a `blockfleet`
/// process on 127.0.0.1, sharing one config file.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// First to go at drop, so no job attempt sees its block servers vanish.
    pub transform: Option<Proc>,
    kms_proc: Option<Proc>,
    block_servers: Vec<Proc>,
    control_plane: Proc,
    pub kms_endpoint: String,
    /// The EBS direct APIs (principal `AKEBS` / `ebs-secret-0123`).
    pub ebs_endpoint: String,
    /// The control plane as the fleet's admin (`[client]`).
    pub cp: ControlPlaneClient,
    /// The control plane as host-local's host agent (`[host_agent]`): AttachInfo.
    pub host_cp: ControlPlaneClient,
    transform_metrics: u16,
    control_plane_metrics: u16,
}

impl Fleet {
    /// The block servers' token key (the control plane signs block capabilities with it).
    pub fn block_key_file(&self) -> PathBuf {
        self.dir.path().join("block-token.key")
    }

    /// `host:port` of the control plane's API.
    pub fn control_plane_addr(&self) -> &str {
        &self.control_plane.addr
    }

    /// A control-plane client signing as `access_key_id`.
    pub fn client(addr: &str, access_key_id: &str, secret: &str) -> ControlPlaneClient {
        let creds = blockfleet_core::config::Credentials {
            access_key_id: access_key_id.into(),
            secret_access_key: blockfleet_core::config::Secret::new(secret),
        };
        ControlPlaneClient::new(&format!("https://{addr}"), Some(&creds))
    }

    pub fn start(o: FleetOptions) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let (kms, cp, tf, tfm) = (free_port(), free_port(), free_port(), free_port());
        let (cpm, ebs) = (free_port(), free_port());
        let bs: Vec<u16> = (0..o.block_servers).map(|_| free_port()).collect();
        let servers = bs
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            r#"
[store]
{store}
[snapshot]
manifest_key_file = "{d}/manifest.key"
[block_server]
token_key_file = "{d}/block-token.key"
[control_plane]
listen = "127.0.0.1:{cp}"
data_dir = "{d}/cp"
block_servers = [{servers}]
metrics_listen = "127.0.0.1:{cpm}"
ebs_listen = "127.0.0.1:{ebs}"
# A StartSnapshot Timeout minute lasts 100 ms here, so expiry is testable.
ebs_timeout_minute_ms = 100
{cp_extra}
job_lease_ms = 1000
[[control_plane.principals]]
name = "admin"
role = "admin"
access_key_id = "AKADMIN"
secret_access_key = "admin-secret-0123"
[[control_plane.principals]]
name = "alice"
role = "user"
access_key_id = "AKUSER"
secret_access_key = "user-secret-0123"
[[control_plane.principals]]
name = "host-local"
role = "host_agent"
access_key_id = "AKHOSTCP"
secret_access_key = "hostcp-secret-0123"
[[control_plane.principals]]
name = "host-other"
role = "host_agent"
access_key_id = "AKOTHERHOST"
secret_access_key = "other-secret-0123"
[[control_plane.principals]]
name = "transform"
role = "transform"
access_key_id = "AKTFCP"
secret_access_key = "tfcp-secret-0123"
[[control_plane.ebs_principals]]
name = "uploader"
access_key_id = "AKEBS"
secret_access_key = "ebs-secret-0123"
[control_plane.kms]
endpoint = "https://127.0.0.1:{kms}"
access_key_id = "AKCP"
secret_access_key = "cp-secret-0123"
[transform]
listen = "127.0.0.1:{tf}"
control_plane = "https://127.0.0.1:{cp}"
concurrency = {concurrency}
background_mib_per_sec = {background}
poll_ms = {poll_ms}
metrics_listen = "127.0.0.1:{tfm}"
[transform.credentials]
access_key_id = "AKTFCP"
secret_access_key = "tfcp-secret-0123"
[transform.kms]
endpoint = "https://127.0.0.1:{kms}"
access_key_id = "AKTF"
secret_access_key = "tf-secret-0123"
[fleet]
token_key_file = "{d}/fleet-token.key"
[tls]
dir = "{tls}"
[client]
access_key_id = "AKADMIN"
secret_access_key = "admin-secret-0123"
[host_agent]
access_key_id = "AKHOSTCP"
secret_access_key = "hostcp-secret-0123"
[kms]
endpoint = "https://127.0.0.1:{kms}"
access_key_id = "AKHOST"
secret_access_key = "host-secret-0123"
[kms_server]
listen = "127.0.0.1:{kms}"
data_dir = "{d}/kms"
root_key_file = "{d}/kms-root.key"
[[kms_server.principals]]
name = "control-plane"
role = "control_plane"
access_key_id = "AKCP"
secret_access_key = "cp-secret-0123"
[[kms_server.principals]]
name = "transform"
role = "transform"
access_key_id = "AKTF"
secret_access_key = "tf-secret-0123"
[[kms_server.principals]]
name = "host-local"
role = "host_agent"
access_key_id = "AKHOST"
secret_access_key = "host-secret-0123"
"#,
            store = o
                .store
                .unwrap_or_else(|| format!("kind = \"local\"\npath = \"{d}/objects\"")),
            concurrency = o.concurrency,
            background = o.background_mib_per_sec,
            poll_ms = o.poll_ms,
            cp_extra = o.control_plane_extra,
            tls = fleet_tls_dir().display(),
        );
        let config = dir.path().join("fleet.toml");
        std::fs::write(&config, text).unwrap();
        let kms_proc = spawn(&config, &["kms"]);
        let block_servers = bs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                spawn(
                    &config,
                    &[
                        "block-server",
                        "--listen",
                        &format!("127.0.0.1:{p}"),
                        "--data-dir",
                        &format!("{d}/bs{i}"),
                    ],
                )
            })
            .collect();
        let control_plane = spawn(&config, &["control-plane"]);
        // The EBS listener opens once the control plane's state is loaded, just after its
        // API's.
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", ebs)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "EBS APIs not listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut f = Fleet {
            config,
            kms_proc: Some(kms_proc),
            block_servers,
            cp: Fleet::client(&control_plane.addr, "AKADMIN", "admin-secret-0123"),
            host_cp: Fleet::client(&control_plane.addr, "AKHOSTCP", "hostcp-secret-0123"),
            control_plane,
            transform: None,
            kms_endpoint: format!("https://127.0.0.1:{kms}"),
            ebs_endpoint: format!("http://127.0.0.1:{ebs}"),
            transform_metrics: tfm,
            control_plane_metrics: cpm,
            dir,
        };
        f.start_transform();
        f
    }

    /// Creates `n` volumes (the first `encrypted` of them encrypted), attaches them to one new
    /// instance (the first as its boot volume) and opens each through the host agent's data path.
    pub async fn instance_with_volumes(
        &self,
        n: usize,
        encrypted: usize,
        size: u64,
    ) -> (InstanceId, Vec<Volume>, Vec<Arc<AgentVolume>>) {
        let instance = InstanceId::generate();
        let mut vols = Vec::new();
        let mut agents = Vec::new();
        for i in 0..n {
            let v = self
                .cp
                .create_volume(&CreateVolumeRequest {
                    size: Some(size),
                    encrypted: i < encrypted,
                    tags: BTreeMap::from([("disk".to_owned(), format!("d{i}"))]),
                    ..Default::default()
                })
                .await
                .unwrap()
                .remove(0);
            let device = format!("/dev/sd{}", (b'f' + i as u8) as char);
            agents.push(Arc::new(
                self.attach_in_process(&v.volume_id, &instance, Some(device), i == 0, false)
                    .await,
            ));
            vols.push(v);
        }
        (instance, vols, agents)
    }

    /// Attaches `volume` to `instance` and opens it through the host agent's data path in this
    /// process (its key unwrapped under the host's grant; `fetch`: on-demand hydration on).
    pub async fn attach_in_process(
        &self,
        volume: &VolumeId,
        instance: &InstanceId,
        device: Option<String>,
        boot: bool,
        fetch: bool,
    ) -> AgentVolume {
        self.cp
            .attach_volume(&AttachVolumeRequest {
                volume_id: volume.clone(),
                instance_id: instance.clone(),
                device,
                boot,
                host: None,
            })
            .await
            .unwrap();
        let info = self.host_cp.attach_info(volume).await.unwrap();
        let xts = match &info.wrapped_key {
            Some(w) => {
                let host = self.kms("AKHOST", "host-secret-0123").await;
                let key = host
                    .decrypt_key(&hex::decode(w).unwrap(), volume)
                    .await
                    .unwrap();
                Some(Arc::new(Xts::new(&key)))
            }
            None => None,
        };
        let fetcher = fetch.then(|| {
            Fetcher::new(
                info.fetch_endpoints.clone(),
                info.fetch_token.clone(),
                info.attachment.host.clone(),
                Some(self.host_cp.clone()),
            )
        });
        let replicas = Arc::new(
            ReplicatedVolume::open(
                volume.clone(),
                &info.replicas,
                Duration::from_secs(1),
                info.block_grant.clone(),
            )
            .await
            .unwrap(),
        );
        replicas.spawn_repair(Duration::from_millis(200));
        AgentVolume::open(replicas, xts, fetcher)
    }

    /// kill -9 of the control plane, then a new one on the same address and state.
    pub fn restart_control_plane(&mut self) {
        self.control_plane.child.kill().unwrap();
        self.control_plane.child.wait().unwrap();
        self.control_plane = spawn(&self.config, &["control-plane"]);
    }

    /// kill -9 of block server `i`.
    pub fn kill_block_server(&mut self, i: usize) {
        let p = &mut self.block_servers[i];
        p.child.kill().unwrap();
        p.child.wait().unwrap();
    }

    /// Block server `i`'s exit status, if it has exited.
    pub fn block_server_exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.block_servers[i].child.try_wait().unwrap()
    }

    pub fn block_server_addr(&self, i: usize) -> &str {
        &self.block_servers[i].addr
    }

    /// Block server `i`'s data directory.
    pub fn block_server_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("bs{i}"))
    }

    /// Starts block server `i` again (after a kill) on its address and data.
    pub fn restart_block_server(&mut self, i: usize) {
        let addr = self.block_servers[i].addr.clone();
        let dir = self.block_server_dir(i);
        self.block_servers[i] = spawn(
            &self.config,
            &[
                "block-server",
                "--listen",
                &addr,
                "--data-dir",
                dir.to_str().unwrap(),
            ],
        );
    }

    /// Sends `signal` (`STOP`, `CONT`) to block server `i`.
    pub fn signal_block_server(&self, i: usize, signal: &str) {
        let pid = self.block_servers[i].child.id().to_string();
        let st = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// kill -9 of the KMS.
    pub fn kill_kms(&mut self) {
        self.kms_proc.take();
    }

    pub fn start_transform(&mut self) {
        self.transform = Some(spawn(&self.config, &["transform"]));
    }

    pub fn bf(&self, args: &[&str]) -> Output {
        bin()
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.bf(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn fails(&self, args: &[&str], want: &str) {
        let out = self.bf(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    }

    pub async fn kms(&self, akid: &str, secret: &str) -> Kms {
        Kms::connect(&KmsClientConfig {
            endpoint: Some(self.kms_endpoint.clone()),
            region: "local".into(),
            access_key_id: Some(akid.into()),
            secret_access_key: Some(Secret::new(secret)),
            credentials_from_environment: false,
        })
        .await
    }

    pub fn create(&self, args: &[&str]) -> Vec<Volume> {
        let mut a = vec!["-o", "json", "volume", "create"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// Attaches `v` to a new instance and starts a host agent for it.
    pub fn attach(&self, v: &VolumeId) -> Proc {
        let instance = blockfleet_core::ids::InstanceId::generate();
        self.ok(&[
            "volume",
            "attach",
            v.as_str(),
            "--instance",
            instance.as_str(),
        ]);
        spawn(
            &self.config,
            &["attach", "--volume", v.as_str(), "--listen", "127.0.0.1:0"],
        )
    }

    /// A transform worker metric.
    pub fn metric(&self, name: &str) -> u64 {
        scrape(self.transform_metrics, name)
    }

    /// A control plane (coordinator) metric; `name` may carry labels.
    pub fn control_plane_metric(&self, name: &str) -> u64 {
        scrape(self.control_plane_metrics, name)
    }
}

/// One value from a Prometheus text endpoint on 127.0.0.1.
pub fn scrape(port: u16, name: &str) -> u64 {
    let out = Command::new("curl")
        .args(["-s", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .trim()
        .parse()
        .unwrap()
}

/// `qemu-io -c CMD` against a host agent's NBD export; its output (a failure or a pattern
/// mismatch fails the test).
pub fn qemu_io(agent: &Proc, cmd: &str) -> String {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd, &format!("nbd://{}", agent.addr)])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("error") && !text.contains("failed"),
        "{cmd}: {text}"
    );
    text
}

/// `aws SERVICE ARGS` (the AWS CLI from PyPI) against `endpoint` as `key` (access key id,
/// secret), no profile or config file: the parsed JSON output, or the CLI's error text.
pub fn aws(
    service: &str,
    endpoint: &str,
    key: (&str, &str),
    args: &[&str],
) -> Result<serde_json::Value, String> {
    let out = Command::new("aws")
        .args([service, "--endpoint-url", endpoint, "--region", "local"])
        .args(["--output", "json"])
        .args(args)
        .env("AWS_ACCESS_KEY_ID", key.0)
        .env("AWS_SECRET_ACCESS_KEY", key.1)
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .output()
        .expect("the aws CLI (pip install awscli)");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A numeric setting from the environment (benches' sizes and sample counts), or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
