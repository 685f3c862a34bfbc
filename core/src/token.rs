//! Fleet capability tokens: short-lived HMAC-SHA256 tags the control plane issues under the
//! fleet token key (`[fleet].token_key_file`) and transform workers check, so a worker serves
//! only what the control plane allowed: a block transform for exactly the request it signed,
//! an on-demand fetch for the volume it names (given only to the host agent of the instance
//! the volume is attached to). A token is `<expiry, unix milliseconds>.<hex tag>`; the tag covers the
//! purpose, the subject and the expiry, so it is good for nothing else.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::secret_file::{load_or_create_secret, KEY_LEN};

/// A block transform of one request body.
pub const TRANSFORM_BLOCK: &str = "transform-block";
/// On-demand fetches for one volume.
pub const FETCH: &str = "fetch";

/// When a token expires (unix milliseconds), as it says; `None` if malformed. Unverified: check it
/// first.
pub fn expiry(token: &str) -> Option<u64> {
    token.split_once('.')?.0.parse().ok()
}

/// The subject of a token that covers one request body: its SHA-256, hex.
pub fn body_digest(body: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(Sha256::digest(body))
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("no capability token (header x-blockfleet-token)")]
    Missing,
    #[error("malformed capability token")]
    Malformed,
    #[error("the capability token has expired")]
    Expired,
    #[error(
        "the capability token does not cover this request (or the issuer signs under another key)"
    )]
    BadTag,
    #[error("fleet token key {path}: {reason}")]
    KeyFile { path: String, reason: String },
}

/// The fleet token key. Never printed.
pub struct TokenKey(Zeroizing<[u8; KEY_LEN]>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

/// Unix milliseconds (fine enough that a revocation and a capability issued just after it
/// fall on different instants).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl TokenKey {
    /// Loads the key file, creating it (mode 0600) on first use.
    pub fn load_or_create(path: &Path) -> Result<Self, TokenError> {
        load_or_create_secret(path, true)
            .map(TokenKey)
            .map_err(|reason| TokenError::KeyFile {
                path: path.display().to_string(),
                reason,
            })
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        TokenKey(Zeroizing::new(bytes))
    }

    fn tag(&self, purpose: &str, subject: &str, expires: u64) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0[..]).expect("any key length");
        for part in [
            purpose.as_bytes(),
            subject.as_bytes(),
            &expires.to_le_bytes(),
        ] {
            m.update(&(part.len() as u64).to_le_bytes());
            m.update(part);
        }
        m
    }

    /// A token for `purpose` on `subject`, good for `ttl` from `now`.
    pub fn issue(&self, purpose: &str, subject: &str, now: SystemTime, ttl: Duration) -> String {
        let expires = unix_ms(now) + ttl.as_millis() as u64;
        let tag = self.tag(purpose, subject, expires).finalize().into_bytes();
        format!("{expires}.{}", hex::encode(tag))
    }

    /// Checks that `token` was issued for `purpose` on `subject` and has not expired.
    pub fn check(
        &self,
        token: Option<&str>,
        purpose: &str,
        subject: &str,
        now: SystemTime,
    ) -> Result<(), TokenError> {
        let token = token.ok_or(TokenError::Missing)?;
        let (expires, tag) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let expires: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        let tag = hex::decode(tag).map_err(|_| TokenError::Malformed)?;
        // Checked before the expiry, so an altered expiry reads as a bad tag.
        self.tag(purpose, subject, expires)
            .verify_slice(&tag)
            .map_err(|_| TokenError::BadTag)?;
        if unix_ms(now) > expires {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_covers_its_purpose_subject_and_time_only() {
        let k = TokenKey::from_bytes([7; KEY_LEN]);
        let now = SystemTime::now();
        let t = k.issue(FETCH, "vol-0123456789abcdef0", now, Duration::from_secs(60));
        assert_eq!(
            k.check(Some(&t), FETCH, "vol-0123456789abcdef0", now),
            Ok(())
        );
        assert_eq!(
            k.check(Some(&t), FETCH, "vol-0123456789abcdef1", now),
            Err(TokenError::BadTag)
        );
        assert_eq!(
            k.check(Some(&t), TRANSFORM_BLOCK, "vol-0123456789abcdef0", now),
            Err(TokenError::BadTag)
        );
        let later = now + Duration::from_secs(120);
        assert_eq!(
            k.check(Some(&t), FETCH, "vol-0123456789abcdef0", later),
            Err(TokenError::Expired)
        );
        let (exp, tag) = t.split_once('.').unwrap();
        let stretched = format!("{}.{tag}", exp.parse::<u64>().unwrap() + 3_600_000);
        assert_eq!(
            k.check(Some(&stretched), FETCH, "vol-0123456789abcdef0", later),
            Err(TokenError::BadTag)
        );
        let other = TokenKey::from_bytes([8; KEY_LEN]);
        assert_eq!(
            other.check(Some(&t), FETCH, "vol-0123456789abcdef0", now),
            Err(TokenError::BadTag)
        );
        assert_eq!(k.check(None, FETCH, "x", now), Err(TokenError::Missing));
        assert_eq!(
            k.check(Some("zz"), FETCH, "x", now),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            k.check(Some("1.nothex"), FETCH, "x", now),
            Err(TokenError::Malformed)
        );
    }
}
