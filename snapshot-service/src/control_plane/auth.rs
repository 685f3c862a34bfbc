//! Who called, and may they: every control-plane call is SigV4-signed (service `blockfleet`) by
//! a principal of `control_plane.principals`, and its role must allow the action (the policy
//! table below, docs/api.md "Authorization"). A host agent may act only on volumes attached on
//! its own host.

use std::time::SystemTime;

use blockfleet_core::config::{FleetPrincipal, FleetRole};
use blockfleet_core::httpjson::ApiError;
use blockfleet_core::sigv4::{self, SigV4Error, FLEET_SERVICE};
use blockfleet_core::tls::{Peer, Role};
use hyper::http::request::Parts;

use super::ControlPlane;
use crate::state::VolumeRecord;

/// A verified caller.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub name: String,
    pub role: FleetRole,
}

/// The policy table: which roles may call an action. An action not in it is no action at all
/// (the caller, once authenticated, gets `InvalidAction`).
pub(crate) fn allowed(role: FleetRole, action: &str) -> bool {
    use FleetRole::*;
    match action {
        "CreateVolume"
        | "DescribeVolumes"
        | "DeleteVolume"
        | "AttachVolume"
        | "DetachVolume"
        | "DescribeInstances"
        | "CreateSnapshots"
        | "DescribeSnapshotSet"
        | "DescribeSnapshots"
        | "DeleteSnapshot"
        | "ListChangedBlocks" => {
            matches!(role, Admin | User)
        }
        "DescribeBlockServers" | "DrainBlockServer" => role == Admin,
        // AttachInfo carries the wrapped data key and a fetch capability: the attached
        // host's agent only (checked per volume).
        "internal/AttachInfo" | "internal/ReportReplicas" => role == HostAgent,
        "internal/ClaimJob" | "internal/ReportJob" | "internal/JobForVolume" => role == Transform,
        _ => false,
    }
}

/// Whether `action` is in the policy table.
fn known(action: &str) -> bool {
    [FleetRole::Admin, FleetRole::HostAgent, FleetRole::Transform]
        .into_iter()
        .any(|r| allowed(r, action))
}

fn auth_error(e: SigV4Error) -> ApiError {
    ApiError::new(
        401,
        "AuthFailure",
        format!("request not authenticated: {e}"),
    )
}

impl ControlPlane {
    pub(super) fn principal(&self, access_key_id: &str) -> Option<&FleetPrincipal> {
        self.config
            .principals
            .iter()
            .find(|p| p.access_key_id == access_key_id)
    }

    /// Verifies the request's signature and that the caller's role may call `action`.
    pub(super) fn authorize(
        &self,
        parts: &Parts,
        body: &[u8],
        action: &str,
    ) -> Result<Caller, ApiError> {
        let caller = sigv4::verify_request(parts, body, FLEET_SERVICE, SystemTime::now(), |k| {
            self.principal(k)
                .map(|p| p.secret_access_key.expose().to_owned())
        })
        .map_err(auth_error)?;
        let p = self
            .principal(&caller.access_key_id)
            .ok_or_else(|| auth_error(SigV4Error::UnknownAccessKey))?;
        if known(action) && !allowed(p.role, action) {
            return Err(ApiError::new(
                403,
                "AccessDenied",
                format!("principal {} ({:?}) may not call {action}", p.name, p.role),
            ));
        }
        if self.config.tls.is_some() {
            check_certificate(p, parts.extensions.get::<Peer>())?;
        }
        Ok(Caller {
            name: p.name.clone(),
            role: p.role,
        })
    }
}

/// Over TLS, a fleet role's secret alone is not enough: a host agent's principal must come
/// with that host's host-agent certificate, a transform's with a transform certificate (or
/// either with the control plane's own, as `blockfleet up` runs them in one process). Users
/// and admins authenticate by SigV4 alone.
fn check_certificate(p: &FleetPrincipal, peer: Option<&Peer>) -> Result<(), ApiError> {
    let ok = match (p.role, peer) {
        (FleetRole::Admin | FleetRole::User, _) => true,
        (_, Some(peer)) if peer.role == Role::ControlPlane => true,
        (FleetRole::HostAgent, Some(peer)) => peer.role == Role::HostAgent && peer.is(&p.name),
        (FleetRole::Transform, Some(peer)) => peer.role == Role::Transform,
        (_, None) => false,
    };
    if ok {
        return Ok(());
    }
    let shown = peer.map_or("none".to_owned(), |c| format!("a {} certificate", c.role));
    Err(ApiError::new(
        403,
        "AccessDenied",
        format!(
            "principal {} ({:?}) must call with its own fleet certificate (presented: {shown})",
            p.name, p.role
        ),
    ))
}

/// A host agent acts only on volumes attached on its host.
pub(crate) fn check_host(caller: &Caller, v: &VolumeRecord) -> Result<(), ApiError> {
    match &v.attachment {
        Some(a) if caller.role == FleetRole::HostAgent && a.attachment.host == caller.name => {
            Ok(())
        }
        _ => Err(ApiError::new(
            403,
            "AccessDenied",
            format!(
                "volume {} is not attached on host {}: its host agent only",
                v.id, caller.name
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_reach_only_their_actions() {
        use FleetRole::*;
        assert!(allowed(User, "CreateVolume") && allowed(Admin, "CreateVolume"));
        assert!(!allowed(User, "DrainBlockServer") && allowed(Admin, "DrainBlockServer"));
        for internal in [
            "internal/AttachInfo",
            "internal/ClaimJob",
            "internal/ReportJob",
        ] {
            assert!(
                !allowed(User, internal) && !allowed(Admin, internal),
                "{internal}"
            );
        }
        assert!(allowed(HostAgent, "internal/AttachInfo"));
        assert!(!allowed(HostAgent, "internal/ClaimJob") && !allowed(HostAgent, "CreateVolume"));
        assert!(allowed(Transform, "internal/ClaimJob"));
        assert!(!allowed(Transform, "internal/AttachInfo") && !allowed(Transform, "DeleteVolume"));
        assert!(!allowed(Admin, "NoSuchAction") && !known("NoSuchAction"));
        assert!(known("CreateVolume") && known("internal/JobForVolume"));
    }
}
