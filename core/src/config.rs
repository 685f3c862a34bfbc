//! The TOML configuration (`config/single-node.toml` is the embedded default). Plain data:
//! serde structs that refuse unknown fields, a `Default`, and `validate()` called at load.
//!
//! Relative paths are relative to the working directory of the process.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

mod auth;
mod fleet;
pub use auth::{Credentials, FleetConfig, FleetPrincipal, FleetRole};
pub use fleet::{ControlPlaneConfig, EbsPrincipal, TransformConfig};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    #[serde(default)]
    pub block_server: BlockServerConfig,
    /// How this process reaches a KMS (the embedded one or any AWS KMS API).
    #[serde(default)]
    pub kms: KmsClientConfig,
    /// The embedded KMS server (`blockfleet kms`).
    #[serde(default)]
    pub kms_server: KmsServerConfig,
    #[serde(default)]
    pub control_plane: ControlPlaneConfig,
    #[serde(default)]
    pub transform: TransformConfig,
    /// What the services share (the fleet token key).
    #[serde(default)]
    pub fleet: FleetConfig,
    /// How this machine's CLI signs its calls to the control plane.
    #[serde(default)]
    pub client: Option<Credentials>,
    /// How this machine's host agent signs its calls to the control plane (a `host_agent`
    /// principal named for the host).
    #[serde(default)]
    pub host_agent: Option<Credentials>,
    /// Mutual TLS on the block protocol: block servers take only fleet-certified clients,
    /// clients present their role's certificate. Absent: plain TCP (a trusted network only).
    #[serde(default)]
    pub tls: Option<crate::tls::TlsConfig>,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_owned() + &span_hint(&text, e.span()),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.store.validate()?;
        self.snapshot.validate()?;
        self.block_server.validate()?;
        self.kms.validate()?;
        self.kms_server.validate()?;
        self.control_plane.validate()?;
        self.transform.validate()?;
        if let Some(c) = &self.client {
            c.validate("client")?;
        }
        if let Some(c) = &self.host_agent {
            c.validate("host_agent")?;
        }
        if self.tls.is_some() && !self.transform.control_plane.starts_with("https://") {
            return Err(invalid(
                "transform.control_plane",
                "with [tls] the control plane takes HTTPS only: an https:// URL",
            ));
        }
        Ok(())
    }
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    span.map(|s| {
        let line = text[..s.start.min(text.len())].lines().count().max(1);
        format!(" (line {line})")
    })
    .unwrap_or_default()
}

/// Where snapshots live.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// A directory on this machine.
    Local(LocalStoreConfig),
    /// An S3 bucket (AWS or any S3-compatible service).
    S3(S3StoreConfig),
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::Local(LocalStoreConfig::default())
    }
}

impl StoreConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            StoreConfig::Local(c) if c.path.as_os_str().is_empty() => {
                Err(invalid("store.path", "must not be empty"))
            }
            StoreConfig::Local(_) => Ok(()),
            StoreConfig::S3(c) => c.validate(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalStoreConfig {
    pub path: PathBuf,
}

impl Default for LocalStoreConfig {
    fn default() -> Self {
        LocalStoreConfig {
            path: PathBuf::from("blockfleet-data/objects"),
        }
    }
}

/// A secret string from config: kept out of `Debug` output.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3StoreConfig {
    /// `http(s)://host:port`; absent for AWS S3 itself.
    #[serde(default)]
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    /// Key prefix inside the bucket, so several fleets can share one.
    #[serde(default)]
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`), which Garage and most self-hosted stores need.
    #[serde(default)]
    pub path_style: bool,
    /// Both or neither; when absent the usual AWS credential chain is used.
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_attempt_timeout_secs")]
    pub attempt_timeout_secs: u64,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

fn default_connect_timeout_ms() -> u64 {
    3000
}
fn default_attempt_timeout_secs() -> u64 {
    30
}
fn default_max_attempts() -> u32 {
    3
}

impl S3StoreConfig {
    /// A config with the defaults for everything but the location.
    pub fn new(endpoint: Option<String>, region: &str, bucket: &str) -> Self {
        S3StoreConfig {
            endpoint,
            region: region.to_owned(),
            bucket: bucket.to_owned(),
            prefix: String::new(),
            path_style: true,
            access_key_id: None,
            secret_access_key: None,
            connect_timeout_ms: default_connect_timeout_ms(),
            attempt_timeout_secs: default_attempt_timeout_secs(),
            max_attempts: default_max_attempts(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(e) = &self.endpoint {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"));
            if !rest.is_some_and(|r| !r.is_empty() && !r.contains(char::is_whitespace)) {
                return Err(invalid(
                    "store.endpoint",
                    format!("{e:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if self.region.is_empty() {
            return Err(invalid("store.region", "must not be empty"));
        }
        let b = &self.bucket;
        let bucket_ok = (3..=63).contains(&b.len())
            && b.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
            && !b.starts_with(['-', '.'])
            && !b.ends_with(['-', '.']);
        if !bucket_ok {
            return Err(invalid(
                "store.bucket",
                format!("{b:?} is not a valid bucket name (3-63 of a-z, 0-9, '-', '.')"),
            ));
        }
        if !self.prefix.is_empty() {
            crate::object_key::check_prefix(&format!("{}/", self.prefix.trim_end_matches('/')))
                .map_err(|e| invalid("store.prefix", e))?;
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(invalid(
                "store.access_key_id",
                "access_key_id and secret_access_key go together",
            ));
        }
        if !(1..=20).contains(&self.max_attempts) {
            return Err(invalid("store.max_attempts", "must be 1 to 20"));
        }
        if self.connect_timeout_ms == 0 || self.attempt_timeout_secs == 0 {
            return Err(invalid("store timeouts", "must be greater than zero"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// The HMAC key that authenticates manifests; created (mode 0600) on first use.
    #[serde(default = "default_manifest_key_file")]
    pub manifest_key_file: PathBuf,
    /// Chunks read, hashed and uploaded at once by import and export.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// When set, the manifest key is not the file above but a key wrapped by this KMS key and
    /// kept in the object store (`keys/manifest-mac.wrapped`); `[kms]` says how to reach the KMS.
    #[serde(default)]
    pub manifest_key_kms_key_id: Option<crate::ids::KmsKeyId>,
}

fn default_manifest_key_file() -> PathBuf {
    PathBuf::from("blockfleet-data/manifest.key")
}
fn default_concurrency() -> usize {
    8
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            manifest_key_file: default_manifest_key_file(),
            concurrency: default_concurrency(),
            manifest_key_kms_key_id: None,
        }
    }
}

impl SnapshotConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.manifest_key_file.as_os_str().is_empty() {
            return Err(invalid("snapshot.manifest_key_file", "must not be empty"));
        }
        if !(1..=256).contains(&self.concurrency) {
            return Err(invalid("snapshot.concurrency", "must be 1 to 256"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// The `[block_server]` section.
pub struct BlockServerConfig {
    /// Address to listen on (the binary binds it; tests pass their own listener).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Extent files, copy-on-write areas and the metadata database live here.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// A pause not resumed within this time resumes by itself and drops its mark.
    #[serde(default = "default_pause_timeout_ms")]
    pub pause_timeout_ms: u64,
    /// Requests one connection may have in flight; more wait (backpressure).
    #[serde(default = "default_inflight")]
    pub max_inflight_per_connection: usize,
    /// Where to serve Prometheus `/metrics`; none if absent.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// The key admin capabilities are checked with (0600, created on first use). The control
    /// plane signs with the same file: every block server and the control plane need it.
    #[serde(default = "default_block_token_key")]
    pub token_key_file: PathBuf,
    /// The fleet's `[tls]` section, copied here by whoever starts the server: with it the
    /// server takes only mutual-TLS connections from fleet-certified clients.
    #[serde(skip)]
    pub tls: Option<crate::tls::TlsConfig>,
}

fn default_block_token_key() -> PathBuf {
    PathBuf::from("blockfleet-data/block-token.key")
}

fn default_listen() -> String {
    "127.0.0.1:7100".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("blockfleet-data/block-server")
}
fn default_pause_timeout_ms() -> u64 {
    10_000
}
fn default_inflight() -> usize {
    128
}

impl Default for BlockServerConfig {
    fn default() -> Self {
        BlockServerConfig {
            listen: default_listen(),
            data_dir: default_data_dir(),
            pause_timeout_ms: default_pause_timeout_ms(),
            max_inflight_per_connection: default_inflight(),
            metrics_listen: None,
            token_key_file: default_block_token_key(),
            tls: None,
        }
    }
}

impl BlockServerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("block_server.data_dir", "must not be empty"));
        }
        if !(100..=3_600_000).contains(&self.pause_timeout_ms) {
            return Err(invalid(
                "block_server.pause_timeout_ms",
                "must be 100 to 3600000",
            ));
        }
        if !(1..=4096).contains(&self.max_inflight_per_connection) {
            return Err(invalid(
                "block_server.max_inflight_per_connection",
                "must be 1 to 4096",
            ));
        }
        Ok(())
    }
}

/// The `[kms]` section: how a component reaches the KMS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsClientConfig {
    /// `http(s)://host:port` of the KMS; absent for AWS KMS itself.
    #[serde(default = "default_kms_endpoint")]
    pub endpoint: Option<String>,
    #[serde(default = "default_kms_region")]
    pub region: String,
    /// This component's credentials; both or neither (then none, unless
    /// `credentials_from_environment`).
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    /// Without credentials here, take them from the AWS environment (`AWS_*` variables,
    /// profile, instance role). Off by default: a key-holding process reads no secret from its
    /// environment unless told to.
    #[serde(default)]
    pub credentials_from_environment: bool,
}

fn default_kms_endpoint() -> Option<String> {
    Some("http://127.0.0.1:7300".into())
}
fn default_kms_region() -> String {
    "local".into()
}

impl Default for KmsClientConfig {
    fn default() -> Self {
        KmsClientConfig {
            endpoint: default_kms_endpoint(),
            region: default_kms_region(),
            access_key_id: None,
            secret_access_key: None,
            credentials_from_environment: false,
        }
    }
}

impl KmsClientConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(e) = &self.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(invalid(
                    "kms.endpoint",
                    format!("{e:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if self.region.is_empty() {
            return Err(invalid("kms.region", "must not be empty"));
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(invalid(
                "kms.access_key_id",
                "access_key_id and secret_access_key go together",
            ));
        }
        Ok(())
    }
}

/// What a KMS principal may do (DESIGN.md, keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KmsRole {
    /// Creates keys, generates wrapped data keys, creates and retires grants; never decrypts.
    ControlPlane,
    /// Decrypts data keys (to write volumes).
    Transform,
    /// Decrypts a volume's data key only under a live grant naming it.
    HostAgent,
    /// May do nothing.
    BlockServer,
    /// The snapshot coordinator: generates and decrypts only the fleet's manifest MAC key
    /// (encryption context `blockfleet:purpose = manifest-mac`).
    Coordinator,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsPrincipal {
    /// The name grants use as grantee (e.g. `host-i-0123456789abcdef0`).
    pub name: String,
    pub role: KmsRole,
    pub access_key_id: String,
    pub secret_access_key: Secret,
}

/// The `[kms_server]` section: the embedded KMS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsServerConfig {
    #[serde(default = "default_kms_listen")]
    pub listen: String,
    /// Master keys and grants (sled).
    #[serde(default = "default_kms_data_dir")]
    pub data_dir: PathBuf,
    /// Seals the master keys; created mode 0600 on first start, refused if wider.
    #[serde(default = "default_root_key_file")]
    pub root_key_file: PathBuf,
    #[serde(default = "default_kms_region")]
    pub region: String,
    #[serde(default)]
    pub principals: Vec<KmsPrincipal>,
    /// The fleet's `[tls]` section, copied here by whoever starts the KMS: with it the KMS
    /// serves HTTPS only (its `kms` certificate), so no key crosses the network in the clear.
    #[serde(skip)]
    pub tls: Option<crate::tls::TlsConfig>,
}

fn default_kms_listen() -> String {
    "127.0.0.1:7300".into()
}
fn default_kms_data_dir() -> PathBuf {
    PathBuf::from("blockfleet-data/kms")
}
fn default_root_key_file() -> PathBuf {
    PathBuf::from("blockfleet-data/kms-root.key")
}

impl Default for KmsServerConfig {
    fn default() -> Self {
        KmsServerConfig {
            listen: default_kms_listen(),
            data_dir: default_kms_data_dir(),
            root_key_file: default_root_key_file(),
            region: default_kms_region(),
            principals: Vec::new(),
            tls: None,
        }
    }
}

impl KmsServerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for p in &self.principals {
            if p.name.is_empty()
                || p.access_key_id.len() < 4
                || p.secret_access_key.expose().len() < 8
            {
                return Err(invalid(
                    "kms_server.principals",
                    format!("principal {:?}: name, access_key_id (4+) and secret_access_key (8+) are required", p.name),
                ));
            }
            if !seen.insert(p.access_key_id.as_str()) {
                return Err(invalid(
                    "kms_server.principals",
                    format!("access key {} is listed twice", p.access_key_id),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        Config::load(&p)
    }

    #[test]
    fn shipped_configs_parse() {
        for name in [
            "single-node.toml",
            "multi-node.toml",
            "s3-example.toml",
            "kms-example.toml",
        ] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../config")
                .join(name);
            Config::load(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert!(matches!(c.store, StoreConfig::Local(_)));
        assert_eq!(c.snapshot.concurrency, 8);
    }

    #[test]
    fn s3_config() {
        let c = parse(
            r#"
            [store]
            kind = "s3"
            endpoint = "http://127.0.0.1:3900"
            region = "garage"
            bucket = "snaps"
            path_style = true
            access_key_id = "GK1"
            secret_access_key = "very-secret"
            "#,
        )
        .unwrap();
        let StoreConfig::S3(s3) = &c.store else {
            panic!("not s3")
        };
        assert_eq!(s3.max_attempts, 3);
        assert!(!format!("{c:?}").contains("very-secret"));
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let cases = [
            ("[store]\nkind = \"ftp\"", "unknown variant"),
            (
                "[store]\nkind = \"local\"\npath = \"x\"\nspeed = 3",
                "unknown field",
            ),
            ("[snapshot]\nconcurrency = 0", "snapshot.concurrency"),
            (
                "[store]\nkind = \"s3\"\nregion = \"r\"\nbucket = \"B!\"",
                "store.bucket",
            ),
            (
                "[store]\nkind = \"s3\"\nregion = \"r\"\nbucket = \"bkt\"\nendpoint = \"ftp://x\"",
                "store.endpoint",
            ),
            (
                "[store]\nkind = \"s3\"\nregion = \"r\"\nbucket = \"bkt\"\naccess_key_id = \"a\"",
                "go together",
            ),
            ("[store\n", "line 1"),
            ("bogus = 1", "unknown field"),
            (
                "[tls]\ndir = \"t\"\n[transform]\ncontrol_plane = \"http://127.0.0.1:7000\"",
                "transform.control_plane",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let err = Config::load(Path::new("/nonexistent/blockfleet.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/blockfleet.toml"));
    }
}
