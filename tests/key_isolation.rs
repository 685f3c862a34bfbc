//! Key isolation by construction: the block server's crate graph holds no key type, no cipher
//! and no KMS client, so no change to it can make it hold a plaintext key. `.ci/run` runs the
//! same check.

use std::process::Command;

/// The normal (non-dev) dependencies of `package`, one crate name a line.
fn normal_deps(package: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            package,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Crates that hold or make plaintext keys.
const KEY_CRATES: [&str; 4] = ["blockfleet-keys", "aes", "aws-sdk-kms", "aes-gcm"];

#[test]
fn block_server_links_no_key_crate() {
    let deps = normal_deps("blockfleet-block-server");
    assert!(deps.iter().any(|d| d == "blockfleet-proto"), "{deps:?}");
    for k in KEY_CRATES {
        assert!(
            !deps.iter().any(|d| d == k),
            "blockfleet-block-server depends on {k}"
        );
    }
}

#[test]
fn key_holders_do_link_the_key_crate() {
    // The check above has teeth only if the tree shows the key crate where it is used.
    for p in ["blockfleet-host-agent", "blockfleet-transform-fleet"] {
        let deps = normal_deps(p);
        assert!(deps.iter().any(|d| d == "blockfleet-keys"), "{p}: {deps:?}");
        assert!(deps.iter().any(|d| d == "aes"), "{p}: {deps:?}");
    }
}
