//! Object-store key syntax, shared by the stores and the config check of a store prefix.

const MAX_KEY_LEN: usize = 1024;

fn valid_component(c: &str) -> bool {
    !c.is_empty()
        && !c.starts_with('.')
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks an object key: `/`-separated components of letters, digits, `.`, `_` and `-`, none
/// empty and none starting with `.` (so no `..`, and the local store's temp names stay private).
pub fn check_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        Err("empty")
    } else if key.len() > MAX_KEY_LEN {
        Err("longer than 1024 bytes")
    } else if !key.split('/').all(valid_component) {
        Err("components must be non-empty, not start with '.', and use only [A-Za-z0-9._-]")
    } else {
        Ok(())
    }
}

/// Checks a list prefix: empty, or a valid key optionally ending in `/`.
pub fn check_prefix(prefix: &str) -> Result<(), &'static str> {
    match prefix.strip_suffix('/').unwrap_or(prefix) {
        "" if prefix.is_empty() => Ok(()),
        p => check_key(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for good in ["a", "chunks/abc", "snapshots/snap-1/manifest", "a.b_c-d"] {
            assert!(check_key(good).is_ok(), "{good}");
        }
        for bad in [
            "", "/a", "a/", "a//b", "../x", "a/../b", ".tmp/x", "a b", "a\\b", "ä",
        ] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
        assert!(check_key(&"a".repeat(1025)).is_err());
        assert!(check_prefix("").is_ok());
        assert!(check_prefix("snapshots/").is_ok());
        assert!(check_prefix("/").is_err());
        assert!(check_prefix("../").is_err());
    }
}
