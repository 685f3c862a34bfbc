//! The `[control_plane]` and `[transform]` sections.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, KmsClientConfig};

/// The `[control_plane]` section: the HTTP API, volume state, placement and hydration jobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    #[serde(default = "default_cp_listen")]
    pub listen: String,
    /// Volume, attachment and job state (sled).
    #[serde(default = "default_cp_data_dir")]
    pub data_dir: PathBuf,
    /// The block servers volumes are placed on (`host:port`).
    #[serde(default = "default_block_servers")]
    pub block_servers: Vec<String>,
    /// Replicas per volume, each on its own block server (on distinct hosts where the
    /// addresses allow). Writes need a majority of them.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// KMS principal of the host agent that serves an attachment when the caller names none.
    #[serde(default = "default_host")]
    pub default_host: String,
    /// A transform worker that has not reported for this long loses its job to another worker.
    #[serde(default = "default_lease_ms")]
    pub job_lease_ms: u64,
    /// Retryable failures (KMS, block server or store unreachable) of one job before the
    /// volumes it fills are marked impaired.
    #[serde(default = "default_max_attempts")]
    pub job_max_attempts: u32,
    /// The control plane's own KMS principal (role `control_plane`); `[kms]` if absent.
    #[serde(default)]
    pub kms: Option<KmsClientConfig>,
    /// Prometheus `GET /metrics` (the coordinator's pause windows and sets); off if absent.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// The EBS direct APIs (StartSnapshot, PutSnapshotBlock, ...), SigV4 service `ebs`; off
    /// if absent.
    #[serde(default)]
    pub ebs_listen: Option<String>,
    /// Who may call the control plane's API (SigV4, service `blockfleet`), with which role.
    /// A call by anyone else is refused.
    #[serde(default)]
    pub principals: Vec<super::FleetPrincipal>,
    /// Who may call the EBS direct APIs.
    #[serde(default)]
    pub ebs_principals: Vec<EbsPrincipal>,
    /// How long one minute of a StartSnapshot `Timeout` lasts, in ms (60000; lower only for
    /// tests and drills of the expiry).
    #[serde(default = "default_minute_ms")]
    pub ebs_timeout_minute_ms: u64,
    /// EBS direct API requests served at once; more are refused with
    /// `RequestThrottledException` (SDKs back off and retry).
    #[serde(default = "default_ebs_inflight")]
    pub ebs_max_inflight: usize,
    /// The fleet's `[tls]` section, copied here by whoever starts the control plane: with it
    /// the API is HTTPS only, and fleet roles' calls need their certificates.
    #[serde(skip)]
    pub tls: Option<crate::tls::TlsConfig>,
}

fn default_ebs_inflight() -> usize {
    256
}

fn default_minute_ms() -> u64 {
    60_000
}

/// A caller of the EBS direct APIs and its SigV4 credentials.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EbsPrincipal {
    pub name: String,
    pub access_key_id: String,
    pub secret_access_key: super::Secret,
}

fn default_cp_listen() -> String {
    "127.0.0.1:7000".into()
}
fn default_cp_data_dir() -> PathBuf {
    PathBuf::from("blockfleet-data/control-plane")
}
fn default_block_servers() -> Vec<String> {
    (7100..7103).map(|p| format!("127.0.0.1:{p}")).collect()
}
fn default_replicas() -> usize {
    3
}
fn default_host() -> String {
    "host-local".into()
}
fn default_lease_ms() -> u64 {
    10_000
}
fn default_max_attempts() -> u32 {
    5
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        ControlPlaneConfig {
            listen: default_cp_listen(),
            data_dir: default_cp_data_dir(),
            block_servers: default_block_servers(),
            replicas: default_replicas(),
            default_host: default_host(),
            job_lease_ms: default_lease_ms(),
            job_max_attempts: default_max_attempts(),
            kms: None,
            metrics_listen: None,
            ebs_listen: None,
            principals: Vec::new(),
            ebs_principals: Vec::new(),
            ebs_timeout_minute_ms: default_minute_ms(),
            ebs_max_inflight: default_ebs_inflight(),
            tls: None,
        }
    }
}

impl ControlPlaneConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        super::auth::validate_principals(&self.principals)?;
        if self.block_servers.is_empty() {
            return Err(invalid(
                "control_plane.block_servers",
                "name at least one block server",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for b in &self.block_servers {
            if !seen.insert(b) {
                return Err(invalid(
                    "control_plane.block_servers",
                    format!("{b} is listed twice"),
                ));
            }
        }
        if self.replicas == 0 || self.replicas > self.block_servers.len() {
            return Err(invalid(
                "control_plane.replicas",
                format!(
                    "{} replicas need as many block servers; {} are listed",
                    self.replicas,
                    self.block_servers.len()
                ),
            ));
        }
        if !(500..=3_600_000).contains(&self.job_lease_ms) {
            return Err(invalid(
                "control_plane.job_lease_ms",
                "must be 500 to 3600000",
            ));
        }
        if !(1..=1000).contains(&self.job_max_attempts) {
            return Err(invalid(
                "control_plane.job_max_attempts",
                "must be 1 to 1000",
            ));
        }
        if self.default_host.is_empty() {
            return Err(invalid("control_plane.default_host", "must not be empty"));
        }
        if let Some(k) = &self.kms {
            k.validate()?;
        }
        if !(1..=65_536).contains(&self.ebs_max_inflight) {
            return Err(invalid(
                "control_plane.ebs_max_inflight",
                "must be 1 to 65536",
            ));
        }
        if !(10..=60_000).contains(&self.ebs_timeout_minute_ms) {
            return Err(invalid(
                "control_plane.ebs_timeout_minute_ms",
                "must be 10 to 60000",
            ));
        }
        let mut keys = std::collections::HashSet::new();
        for p in &self.ebs_principals {
            if p.access_key_id.is_empty() || p.secret_access_key.expose().len() < 8 {
                return Err(invalid(
                    "control_plane.ebs_principals",
                    format!(
                        "{}: give an access key id and a secret of 8 or more characters",
                        p.name
                    ),
                ));
            }
            if !keys.insert(&p.access_key_id) {
                return Err(invalid(
                    "control_plane.ebs_principals",
                    format!("access key id {} is listed twice", p.access_key_id),
                ));
            }
        }
        Ok(())
    }
}

/// The `[transform]` section: one transform worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// The on-demand fetch endpoint host agents call for unhydrated chunks.
    #[serde(default = "default_tf_listen")]
    pub listen: String,
    /// The control plane's base URL.
    #[serde(default = "default_control_plane_url")]
    pub control_plane: String,
    /// Source chunks in flight per job (memory: about (1 + targets) x 512 KiB each).
    #[serde(default = "default_tf_concurrency")]
    pub concurrency: usize,
    /// Background hydration rate limit in MiB/s of source chunks; on-demand fetches are not
    /// limited. 0 = unlimited.
    #[serde(default)]
    pub background_mib_per_sec: u64,
    /// How often the worker asks for a job when idle.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// Where to serve Prometheus `/metrics`; none if absent.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// The worker's KMS principal (role `transform`); `[kms]` if absent.
    #[serde(default)]
    pub kms: Option<KmsClientConfig>,
    /// How the worker signs its calls to the control plane (a `transform` principal).
    #[serde(default)]
    pub credentials: Option<super::Credentials>,
}

fn default_tf_listen() -> String {
    "127.0.0.1:7400".into()
}
fn default_control_plane_url() -> String {
    "http://127.0.0.1:7000".into()
}
fn default_tf_concurrency() -> usize {
    16
}
fn default_poll_ms() -> u64 {
    500
}

impl Default for TransformConfig {
    fn default() -> Self {
        TransformConfig {
            listen: default_tf_listen(),
            control_plane: default_control_plane_url(),
            concurrency: default_tf_concurrency(),
            background_mib_per_sec: 0,
            poll_ms: default_poll_ms(),
            metrics_listen: None,
            kms: None,
            credentials: None,
        }
    }
}

impl TransformConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.control_plane.starts_with("http://")
            || self.control_plane.starts_with("https://"))
        {
            return Err(invalid(
                "transform.control_plane",
                format!("{:?} is not an http:// URL", self.control_plane),
            ));
        }
        if !(1..=256).contains(&self.concurrency) {
            return Err(invalid("transform.concurrency", "must be 1 to 256"));
        }
        if !(10..=60_000).contains(&self.poll_ms) {
            return Err(invalid("transform.poll_ms", "must be 10 to 60000"));
        }
        if let Some(k) = &self.kms {
            k.validate()?;
        }
        if let Some(c) = &self.credentials {
            c.validate("transform.credentials")?;
        }
        Ok(())
    }
}
