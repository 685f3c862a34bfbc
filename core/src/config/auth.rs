//! Who may call the fleet's own HTTP APIs: the control plane's principals and roles, the
//! credentials each caller signs with (SigV4, service `blockfleet`), and the fleet token key
//! the control plane signs transform-worker requests and fetch capabilities with.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, Secret};

/// SigV4 credentials a caller signs its requests with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
}

impl Credentials {
    pub fn validate(&self, field: &'static str) -> Result<(), ConfigError> {
        if self.access_key_id.is_empty() || self.access_key_id.len() > 128 {
            return Err(invalid(field, "access_key_id: 1 to 128 characters"));
        }
        if self.secret_access_key.expose().len() < 8 {
            return Err(invalid(field, "secret_access_key: at least 8 characters"));
        }
        Ok(())
    }
}

/// What a control-plane caller may do (docs/api.md, "Authorization").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetRole {
    /// Operators: every user action, plus the block-server actions (ls, drain).
    Admin,
    /// API callers: volumes, attachments, snapshots.
    User,
    /// A host's agent (its `name` is the host): attach info and replica reports for volumes
    /// attached on that host only.
    HostAgent,
    /// Transform workers: claim and report jobs.
    Transform,
}

/// A caller of the control plane's API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetPrincipal {
    /// For a host agent, the host it serves (the `host` of AttachVolume).
    pub name: String,
    pub role: FleetRole,
    pub access_key_id: String,
    pub secret_access_key: Secret,
}

/// The `[fleet]` section: what services share.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// HMAC key (0600, created on first use) the control plane signs requests to transform
    /// workers and host agents' fetch capabilities with; the control plane and every transform
    /// worker must have the same file.
    #[serde(default = "default_token_key_file")]
    pub token_key_file: PathBuf,
}

fn default_token_key_file() -> PathBuf {
    PathBuf::from("blockfleet-data/fleet-token.key")
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            token_key_file: default_token_key_file(),
        }
    }
}

/// Checks a principal list: each well-formed, names and access keys unique.
pub(super) fn validate_principals(p: &[FleetPrincipal]) -> Result<(), ConfigError> {
    let field = "control_plane.principals";
    for (i, a) in p.iter().enumerate() {
        if a.name.is_empty() || a.name.len() > 128 {
            return Err(invalid(field, "name: 1 to 128 characters"));
        }
        Credentials {
            access_key_id: a.access_key_id.clone(),
            secret_access_key: a.secret_access_key.clone(),
        }
        .validate(field)?;
        if p[..i].iter().any(|b| b.access_key_id == a.access_key_id) {
            return Err(invalid(
                field,
                format!("access_key_id {:?} is given twice", a.access_key_id),
            ));
        }
    }
    Ok(())
}
