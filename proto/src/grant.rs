//! Capabilities on the block protocol: what the control plane hands a client (and the client
//! presents with `Authorize`) so a block server lets it act on a volume.

use std::time::{Duration, SystemTime};

use blockfleet_core::ids::VolumeId;
use blockfleet_core::token::TokenKey;

use crate::wire::{capability_subject, Request, CAPABILITY};

/// A capability: `rights` ([`crate::wire::rights`]) on `volume` (`None`: every volume) for
/// `holder`, with its token. The token is a bearer credential: never printed.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    pub volume: Option<VolumeId>,
    pub rights: u8,
    pub holder: String,
    pub token: String,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("volume", &self.volume)
            .field("rights", &self.rights)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

impl Grant {
    /// Issues a capability under the block token `key` (the control plane does this).
    pub fn issue(
        key: &TokenKey,
        volume: Option<&VolumeId>,
        rights: u8,
        holder: &str,
        ttl: Duration,
    ) -> Grant {
        Grant {
            volume: volume.cloned(),
            rights,
            holder: holder.to_owned(),
            token: key.issue(
                CAPABILITY,
                &capability_subject(volume, rights, holder),
                SystemTime::now(),
                ttl,
            ),
        }
    }

    /// The capability of a volume's writer (a host agent): read and write `volume`, for the
    /// longest a capability may last.
    pub fn writer(key: &TokenKey, volume: &VolumeId, holder: &str) -> Grant {
        use crate::wire::rights::{READ, WRITE};
        Grant::issue(
            key,
            Some(volume),
            READ | WRITE,
            holder,
            crate::wire::MAX_CAPABILITY_TTL,
        )
    }

    pub fn to_request(&self) -> Request {
        Request::Authorize {
            volume: self.volume.clone(),
            rights: self.rights,
            holder: self.holder.clone(),
            token: self.token.clone(),
        }
    }
}
