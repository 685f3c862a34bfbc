//! Who may do what on this block server: the capabilities each connection presented
//! (`Authorize`), checked under the block token key, and revocations (`Revoke`, the control
//! plane's detach), which take a holder's rights on a volume from every open connection and
//! refuse the capabilities it was given before.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::SystemTime;

use blockfleet_core::ids::VolumeId;
use blockfleet_core::tls::{Peer, Role};
use blockfleet_core::token::{self, TokenKey};
use blockfleet_proto::wire::{
    capability_subject, rights as wire_rights, CAPABILITY, MAX_CAPABILITY_TTL,
};
use blockfleet_proto::{ErrorCode, Request, Response};
use serde::{Deserialize, Serialize};

type Outcome = Result<Response, (ErrorCode, String)>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now() -> u64 {
    token::unix_ms(SystemTime::now())
}

fn denied(message: String) -> Outcome {
    Err((ErrorCode::AccessDenied, message))
}

/// The rights one connection holds: on every volume, and per volume and holder.
#[derive(Debug, Default)]
pub struct Rights {
    all: u8,
    volumes: HashMap<VolumeId, HashMap<String, u8>>,
    /// The connection's TLS peer (`None`: plain TCP).
    peer: Option<Peer>,
}

impl Rights {
    fn allows(&self, volume: &VolumeId, mask: u8) -> bool {
        let on = self
            .volumes
            .get(volume)
            .map_or(0, |h| h.values().fold(0, |a, r| a | r));
        (self.all | on) & mask != 0
    }
}

/// The server's side of capabilities.
#[derive(Debug)]
pub struct Access {
    key: TokenKey,
    /// (volume, holder) -> capabilities expiring at or before this (unix ms) are refused.
    revoked: Mutex<HashMap<(VolumeId, String), u64>>,
    /// Where revocations are kept across restarts (`None`: in memory only).
    revoked_file: Option<PathBuf>,
    connections: Mutex<Vec<Weak<Mutex<Rights>>>>,
}

/// One revocation as kept on disk.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Revoked {
    volume: VolumeId,
    holder: String,
    until_ms: u64,
}

impl Access {
    /// The server's access checks under block token `key`, keeping revocations in `file` so a
    /// restarted server still
    /// refuses a detached host's capabilities until they expire. A file that does not parse
    /// is an error (deleting it lets revocations lapse within a capability's lifetime, 1 h).
    pub fn with_revocations(key: TokenKey, file: PathBuf) -> Result<Self, String> {
        let mut revoked = HashMap::new();
        match std::fs::read(&file) {
            Ok(bytes) => {
                let list: Vec<Revoked> = serde_json::from_slice(&bytes).map_err(|e| {
                    format!(
                        "{}: not a revocation list ({e}); delete it to start without \
                         (detached hosts' capabilities then lapse within 1 h)",
                        file.display()
                    )
                })?;
                let now = now();
                for r in list.into_iter().filter(|r| r.until_ms >= now) {
                    revoked.insert((r.volume, r.holder), r.until_ms);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", file.display())),
        }
        Ok(Access {
            key,
            revoked: Mutex::new(revoked),
            revoked_file: Some(file),
            connections: Mutex::default(),
        })
    }

    /// The rights of a new connection, registered so revocations reach it.
    pub fn connection(&self, peer: Option<Peer>) -> Arc<Mutex<Rights>> {
        let rights = Arc::new(Mutex::new(Rights {
            peer,
            ..Rights::default()
        }));
        let mut conns = lock(&self.connections);
        conns.retain(|w| w.strong_count() > 0);
        conns.push(Arc::downgrade(&rights));
        rights
    }

    /// Answers `Authorize` and `Revoke`, and refuses a request the connection holds no right
    /// for; `None`: the store serves the request.
    pub fn check(&self, rights: &Mutex<Rights>, req: &Request) -> Option<Outcome> {
        match req {
            Request::Authorize {
                volume,
                rights: r,
                holder,
                token,
            } => Some(self.authorize(rights, volume.as_ref(), *r, holder, token)),
            _ => match req.needs() {
                Some((volume, mask)) if !lock(rights).allows(volume, mask) => {
                    Some(denied(format!(
                        "{volume}: this connection holds no capability for this request \
                     (Authorize with one from the control plane)"
                    )))
                }
                _ => match req {
                    Request::Revoke { volume, holder } => Some(self.revoke(volume, holder)),
                    _ => None,
                },
            },
        }
    }

    fn authorize(
        &self,
        rights: &Mutex<Rights>,
        volume: Option<&VolumeId>,
        r: u8,
        holder: &str,
        token: &str,
    ) -> Outcome {
        // Over TLS, what only the control plane does needs the control plane's certificate
        // too: a capability taken from the network is no use to another role.
        let peer = lock(rights).peer.clone();
        if let Some(p) = peer.filter(|p| p.role != Role::ControlPlane) {
            if volume.is_none() || r & wire_rights::ADMIN != 0 {
                return denied(format!(
                    "a {} certificate cannot hold an admin capability or one for every volume",
                    p.role
                ));
            }
            // A host agent's capability names its host: one taken from another host (or
            // handed out for it) is no use to this host's certificate.
            if p.role == Role::HostAgent && !p.is(holder) {
                tracing::info!(holder, "capability of another host refused");
                return denied(format!(
                    "capability refused: it is host {holder}'s and this certificate is not"
                ));
            }
        }
        let subject = capability_subject(volume, r, holder);
        if let Err(e) = self
            .key
            .check(Some(token), CAPABILITY, &subject, SystemTime::now())
        {
            tracing::info!(holder, error = %e, "capability refused");
            return denied(format!("capability refused: {e}"));
        }
        if let Some(v) = volume {
            let revoked = lock(&self.revoked)
                .get(&(v.clone(), holder.to_owned()))
                .copied();
            if revoked.is_some_and(|until| token::expiry(token).is_some_and(|e| e <= until)) {
                tracing::info!(holder, volume = %v, "revoked capability refused");
                return denied(format!(
                    "capability refused: {holder}'s rights on {v} were revoked (detached)"
                ));
            }
        }
        tracing::debug!(holder, ?volume, rights = r, "capability accepted");
        let mut g = lock(rights);
        match volume {
            Some(v) => {
                *g.volumes
                    .entry(v.clone())
                    .or_default()
                    .entry(holder.to_owned())
                    .or_default() |= r
            }
            None => g.all |= r,
        }
        Ok(Response::Done)
    }

    fn revoke(&self, volume: &VolumeId, holder: &str) -> Outcome {
        // Every capability issued so far expires by then.
        let until = now() + MAX_CAPABILITY_TTL.as_millis() as u64;
        let mut revoked = lock(&self.revoked);
        revoked.retain(|_, u| *u >= now());
        revoked.insert((volume.clone(), holder.to_owned()), until);
        if let Some(file) = &self.revoked_file {
            // Durable before the control plane hears "done": a restart keeps refusing.
            let list: Vec<Revoked> = revoked
                .iter()
                .map(|((v, h), u)| Revoked {
                    volume: v.clone(),
                    holder: h.clone(),
                    until_ms: *u,
                })
                .collect();
            let bytes = serde_json::to_vec(&list).unwrap_or_default();
            if let Err(e) = blockfleet_core::fsutil::write_atomic(file, &bytes, 0o600) {
                tracing::error!(file = %file.display(), error = %e, "cannot keep a revocation");
                return Err((
                    ErrorCode::Io,
                    format!("cannot keep the revocation durably: {e}"),
                ));
            }
        }
        drop(revoked);
        let mut cut = 0;
        for c in lock(&self.connections).iter().filter_map(Weak::upgrade) {
            let mut g = lock(&c);
            if let Some(h) = g.volumes.get_mut(volume) {
                cut += usize::from(h.remove(holder).is_some());
                if h.is_empty() {
                    g.volumes.remove(volume);
                }
            }
        }
        tracing::info!(volume = %volume, holder, connections = cut, "rights revoked");
        Ok(Response::Done)
    }
}
