//! AWS-shaped identifiers: `vol-`, `snap-` and `i-` followed by 17 lowercase hex digits, and KMS
//! key ids (a key UUID, `alias/NAME`, or the ARN of either).
//!
//! Ids are parsed once at the edge; everything inside holds the typed value, so a malformed id
//! can never reach a store key or a file name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Hex digits after the prefix of a resource id, as AWS uses.
const ID_HEX_DIGITS: usize = 17;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdError {
    #[error("invalid {kind} id {input:?}: expected {expected}")]
    Invalid {
        kind: &'static str,
        input: String,
        expected: &'static str,
    },
}

/// Checks `input` is `prefix` followed by exactly 17 lowercase hex digits.
fn parse_prefixed(
    kind: &'static str,
    prefix: &'static str,
    expected: &'static str,
    input: &str,
) -> Result<String, IdError> {
    let ok = input.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == ID_HEX_DIGITS
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(input.to_owned())
    } else {
        Err(IdError::Invalid {
            kind,
            input: input.chars().take(80).collect(),
            expected,
        })
    }
}

/// A random version-4 UUID: the shape of AWS KMS key ids and AWS request ids.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source failed");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// 17 random lowercase hex digits after `prefix`.
fn generate_prefixed(prefix: &str) -> String {
    let mut bytes = [0u8; 9];
    getrandom::fill(&mut bytes).expect("the OS random source failed");
    let mut hex = hex::encode(bytes);
    hex.truncate(ID_HEX_DIGITS);
    format!("{prefix}{hex}")
}

macro_rules! resource_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// A new random id.
            pub fn generate() -> Self {
                $name(generate_prefixed($prefix))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                parse_prefixed($kind, $prefix, concat!("'", $prefix, "' and 17 lowercase hex digits"), s).map($name)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

resource_id!(
    /// A volume: `vol-` and 17 hex digits.
    VolumeId, "volume", "vol-"
);
resource_id!(
    /// A snapshot: `snap-` and 17 hex digits.
    SnapshotId, "snapshot", "snap-"
);
resource_id!(
    /// An instance (the thing volumes attach to): `i-` and 17 hex digits.
    InstanceId, "instance", "i-"
);

/// A KMS key: a key UUID, `alias/NAME`, or an ARN of either (`arn:aws:kms:REGION:ACCOUNT:key/UUID`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KmsKeyId(String);

const KMS_EXPECTED: &str = "a key UUID, alias/NAME, or a KMS key or alias ARN";

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_alias_name(name: &str) -> bool {
    // AWS: 1-256 characters of letters, digits, '/', '_' and '-'.
    !name.is_empty()
        && name.len() <= 250
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-'))
}

fn is_key_or_alias(s: &str) -> bool {
    is_uuid(s) || s.strip_prefix("alias/").is_some_and(is_alias_name)
}

fn is_kms_arn(s: &str) -> bool {
    // arn:PARTITION:kms:REGION:ACCOUNT:key/UUID or .../alias/NAME
    let parts: Vec<&str> = s.splitn(6, ':').collect();
    parts.len() == 6
        && parts[0] == "arn"
        && !parts[1].is_empty()
        && parts[2] == "kms"
        && (parts[5].strip_prefix("key/").is_some_and(is_uuid)
            || parts[5].strip_prefix("alias/").is_some_and(is_alias_name))
}

impl KmsKeyId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for KmsKeyId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if is_key_or_alias(s) || is_kms_arn(s) {
            Ok(KmsKeyId(s.to_owned()))
        } else {
            Err(IdError::Invalid {
                kind: "KMS key",
                input: s.chars().take(80).collect(),
                expected: KMS_EXPECTED,
            })
        }
    }
}

impl TryFrom<String> for KmsKeyId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<KmsKeyId> for String {
    fn from(id: KmsKeyId) -> String {
        id.0
    }
}

impl fmt::Display for KmsKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse() {
        for _ in 0..100 {
            let v = VolumeId::generate();
            assert_eq!(v.as_str().len(), 4 + 17);
            assert_eq!(v.as_str().parse::<VolumeId>().unwrap(), v);
            let s = SnapshotId::generate();
            assert_eq!(s.as_str().parse::<SnapshotId>().unwrap(), s);
            let i = InstanceId::generate();
            assert_eq!(i.as_str().parse::<InstanceId>().unwrap(), i);
        }
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in [
            "",
            "snap-",
            "snap-0123456789abcdef",   // 16 digits
            "snap-0123456789abcdef01", // 18 digits
            "snap-0123456789ABCDEF0",  // upper case
            "snap-0123456789abcdefg",
            "vol-0123456789abcdef0", // wrong kind
            "snap-../../etc/passwd",
        ] {
            let err = bad.parse::<SnapshotId>().unwrap_err();
            assert!(err.to_string().contains("invalid snapshot id"), "{err}");
        }
        assert!("snap-0123456789abcdef0".parse::<SnapshotId>().is_ok());
        assert!("i-0123456789abcdef0".parse::<InstanceId>().is_ok());
        assert!("i-0123456789abcdef".parse::<InstanceId>().is_err());
    }

    #[test]
    fn serde_validates() {
        let ok: SnapshotId = serde_json::from_str("\"snap-0123456789abcdef0\"").unwrap();
        assert_eq!(ok.as_str(), "snap-0123456789abcdef0");
        assert!(serde_json::from_str::<SnapshotId>("\"snap-xyz\"").is_err());
    }

    #[test]
    fn kms_key_ids() {
        for good in [
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "alias/ExampleAlias",
            "alias/team/db_key-1",
            "arn:aws:kms:us-east-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:us-east-2:111122223333:alias/ExampleAlias",
        ] {
            assert!(good.parse::<KmsKeyId>().is_ok(), "{good}");
        }
        for bad in [
            "",
            "1234abcd-12ab-34cd-56ef-1234567890a",
            "alias/",
            "alias/bad name",
            "arn:aws:s3:us-east-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "key/1234abcd-12ab-34cd-56ef-1234567890ab",
        ] {
            assert!(bad.parse::<KmsKeyId>().is_err(), "{bad}");
        }
    }
}
