//! The embedded KMS through `aws-sdk-kms` (the same client code every component uses), over
//! HTTP on 127.0.0.1: the policy table principal by principal, grants, tampering, bad
//! credentials.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

mod common;

use blockfleet_core::config::{KmsClientConfig, KmsPrincipal, KmsRole, KmsServerConfig, Secret};
use blockfleet_core::ids::{KmsKeyId, VolumeId};
use blockfleet_keys::kms::Kms;

struct Fleet {
    endpoint: String,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

const PRINCIPALS: [(&str, KmsRole); 6] = [
    ("coordinator", KmsRole::Coordinator),
    ("control-plane", KmsRole::ControlPlane),
    ("transform", KmsRole::Transform),
    ("host-a", KmsRole::HostAgent),
    ("host-b", KmsRole::HostAgent),
    ("block-server", KmsRole::BlockServer),
];

fn akid(name: &str) -> String {
    format!("AK{}", name.to_uppercase().replace('-', ""))
}

fn secret(name: &str) -> String {
    format!("secret-of-{name}-0123456789")
}

async fn start() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let config = KmsServerConfig {
        data_dir: dir.path().join("kms"),
        root_key_file: dir.path().join("root.key"),
        principals: PRINCIPALS
            .iter()
            .map(|(name, role)| KmsPrincipal {
                name: (*name).into(),
                role: *role,
                access_key_id: akid(name),
                secret_access_key: Secret::new(secret(name)),
            })
            .collect(),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(blockfleet_kms_server::run(config, listener, async {
        let _ = rx.await;
    }));
    Fleet {
        endpoint,
        _dir: dir,
        _stop: tx,
    }
}

async fn client(f: &Fleet, name: &str, secret_key: &str) -> Kms {
    Kms::connect(&KmsClientConfig {
        endpoint: Some(f.endpoint.clone()),
        region: "local".into(),
        access_key_id: Some(akid(name)),
        secret_access_key: Some(Secret::new(secret_key)),
        credentials_from_environment: false,
    })
    .await
}

#[tokio::test]
async fn policy_grants_and_tampering_through_aws_sdk_kms() {
    let f = start().await;
    let cp = client(&f, "control-plane", &secret("control-plane")).await;
    let tf = client(&f, "transform", &secret("transform")).await;
    let host_a = client(&f, "host-a", &secret("host-a")).await;
    let host_b = client(&f, "host-b", &secret("host-b")).await;
    let bs = client(&f, "block-server", &secret("block-server")).await;

    let key: KmsKeyId = cp.create_key("volumes").await.unwrap().parse().unwrap();
    assert_eq!(cp.describe_key(&key).await.unwrap(), key.as_str());
    let (v1, v2) = (VolumeId::generate(), VolumeId::generate());
    let w1 = cp.generate_wrapped_key(&key, &v1).await.unwrap();
    let w2 = cp.generate_wrapped_key(&key, &v2).await.unwrap();
    assert_ne!(w1, w2);

    // Transform may decrypt; the same wrapped key gives the same key.
    let k1 = tf.decrypt_key(&w1, &v1).await.unwrap();
    assert_eq!(
        k1.expose_secret(),
        tf.decrypt_key(&w1, &v1).await.unwrap().expose_secret()
    );
    assert!(
        !w1.windows(64).any(|w| w == k1.expose_secret()),
        "wrapped key holds the plaintext"
    );

    // The control plane and block servers never decrypt; block servers do nothing at all.
    for (who, c) in [("control-plane", &cp), ("block-server", &bs)] {
        assert_eq!(
            c.decrypt_key(&w1, &v1).await.unwrap_err().code(),
            "AccessDeniedException",
            "{who}"
        );
    }
    assert_eq!(
        bs.create_key("x").await.unwrap_err().code(),
        "AccessDeniedException"
    );
    assert_eq!(
        bs.generate_wrapped_key(&key, &v1).await.unwrap_err().code(),
        "AccessDeniedException"
    );
    assert_eq!(
        tf.generate_wrapped_key(&key, &v1).await.unwrap_err().code(),
        "AccessDeniedException"
    );
    assert_eq!(
        host_a
            .create_grant(&key, "host-a", &v1)
            .await
            .unwrap_err()
            .code(),
        "AccessDeniedException"
    );

    // A host agent decrypts only under a live grant for that volume.
    assert_eq!(
        host_a.decrypt_key(&w1, &v1).await.unwrap_err().code(),
        "AccessDeniedException"
    );
    let (grant_id, _token) = cp.create_grant(&key, "host-a", &v1).await.unwrap();
    assert_eq!(
        host_a.decrypt_key(&w1, &v1).await.unwrap().expose_secret(),
        k1.expose_secret()
    );
    assert_eq!(
        host_a.decrypt_key(&w2, &v2).await.unwrap_err().code(),
        "AccessDeniedException",
        "other volume"
    );
    assert_eq!(
        host_b.decrypt_key(&w1, &v1).await.unwrap_err().code(),
        "AccessDeniedException",
        "other host"
    );
    let grants = cp.list_grants(&key).await.unwrap();
    assert_eq!(grants.len(), 1);
    assert_eq!(
        (grants[0].grantee.as_str(), grants[0].volume.as_deref()),
        ("host-a", Some(v1.as_str()))
    );
    cp.retire_grant(&key, &grant_id).await.unwrap();
    assert_eq!(
        host_a.decrypt_key(&w1, &v1).await.unwrap_err().code(),
        "AccessDeniedException",
        "retired"
    );
    assert!(cp.list_grants(&key).await.unwrap().is_empty());
    assert_eq!(
        cp.retire_grant(&key, &grant_id).await.unwrap_err().code(),
        "NotFoundException"
    );

    // A ciphertext for another volume's context, or altered, does not open.
    assert_eq!(
        tf.decrypt_key(&w1, &v2).await.unwrap_err().code(),
        "InvalidCiphertextException"
    );
    let mut bad = w1.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x40;
    assert_eq!(
        tf.decrypt_key(&bad, &v1).await.unwrap_err().code(),
        "InvalidCiphertextException"
    );
    assert_eq!(
        tf.decrypt_key(b"garbage", &v1).await.unwrap_err().code(),
        "InvalidCiphertextException"
    );

    // Unknown keys, wrong secrets and unknown access keys.
    let missing: KmsKeyId = "1234abcd-12ab-34cd-56ef-1234567890ab".parse().unwrap();
    assert_eq!(
        cp.generate_wrapped_key(&missing, &v1)
            .await
            .unwrap_err()
            .code(),
        "NotFoundException"
    );
    let forged = client(&f, "transform", "not-the-secret-at-all").await;
    assert_eq!(
        forged.decrypt_key(&w1, &v1).await.unwrap_err().code(),
        "AccessDeniedException"
    );
    let stranger = client(&f, "nobody", &secret("nobody")).await;
    assert_eq!(
        stranger.create_key("x").await.unwrap_err().code(),
        "AccessDeniedException"
    );
}

/// The fleet manifest key lives wrapped in the object store; only the coordinator and the
/// transform fleet can unwrap it, and the coordinator can unwrap nothing else.
#[tokio::test]
async fn manifest_key_held_by_the_kms() {
    use blockfleet_snapshot_format::manifest_key::{load_or_create, WRAPPED_MANIFEST_KEY};
    use blockfleet_snapshot_format::store::{LocalStore, ObjectStore};
    use blockfleet_snapshot_format::Manifest;

    let f = start().await;
    let cp = client(&f, "control-plane", &secret("control-plane")).await;
    let coord = client(&f, "coordinator", &secret("coordinator")).await;
    let tf = client(&f, "transform", &secret("transform")).await;
    let bs = client(&f, "block-server", &secret("block-server")).await;
    let key: KmsKeyId = cp.create_key("fleet").await.unwrap().parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();

    let k1 = load_or_create(&store, &coord, &key).await.unwrap();
    let wrapped = store.get(WRAPPED_MANIFEST_KEY).await.unwrap();
    let k2 = load_or_create(&store, &coord, &key).await.unwrap();
    let k3 = load_or_create(&store, &tf, &key).await.unwrap();
    let m = Manifest {
        snapshot_id: blockfleet_core::ids::SnapshotId::generate(),
        volume_size: 1 << 20,
        parent: None,
        created_at: 0,
        description: String::new(),
        encryption: None,
        chunks: Default::default(),
    };
    assert_eq!(m.encode(&k1), m.encode(&k2));
    assert_eq!(m.encode(&k1), m.encode(&k3));
    assert_eq!(
        store.get(WRAPPED_MANIFEST_KEY).await.unwrap(),
        wrapped,
        "not replaced"
    );
    for (who, c) in [("control-plane", &cp), ("block-server", &bs)] {
        let e = load_or_create(&store, c, &key).await.unwrap_err();
        assert!(e.to_string().contains("access denied"), "{who}: {e}");
    }
    // The coordinator's role reaches no volume key.
    let v = VolumeId::generate();
    let w = cp.generate_wrapped_key(&key, &v).await.unwrap();
    assert_eq!(
        coord.decrypt_key(&w, &v).await.unwrap_err().code(),
        "AccessDeniedException"
    );
    assert_eq!(
        coord
            .generate_wrapped_key(&key, &v)
            .await
            .unwrap_err()
            .code(),
        "AccessDeniedException"
    );
}

/// Runs the `blockfleet` binary to completion off the async threads.
async fn blockfleet(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_blockfleet"))
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn toml_config(dir: &std::path::Path, f: &Fleet, key: &KmsKeyId, who: &str) -> std::path::PathBuf {
    let p = dir.join(format!("{who}.toml"));
    std::fs::write(
        &p,
        format!(
            "[store]\nkind = \"local\"\npath = \"{d}/objects\"\n\n[snapshot]\nmanifest_key_file = \"{d}/unused.key\"\nmanifest_key_kms_key_id = \"{key}\"\n\n[kms]\nendpoint = \"{e}\"\nregion = \"local\"\naccess_key_id = \"{a}\"\nsecret_access_key = \"{s}\"\n",
            d = dir.display(),
            e = f.endpoint,
            a = akid(who),
            s = secret(who),
        ),
    )
    .unwrap();
    p
}

/// `blockfleet snapshot` with the manifest key in the KMS: import and export work as the
/// coordinator, no key file is written, and a block-server principal is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_snapshots_with_the_manifest_key_in_the_kms() {
    let f = start().await;
    let cp = client(&f, "control-plane", &secret("control-plane")).await;
    let key: KmsKeyId = cp.create_key("fleet").await.unwrap().parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image: Vec<u8> = (0..3 * 512 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("d.raw"), &image).unwrap();
    let cfg = toml_config(dir.path(), &f, &key, "coordinator")
        .display()
        .to_string();
    let d = dir.path().display().to_string();
    let out = blockfleet(vec![
        "--config".into(),
        cfg.clone(),
        "snapshot".into(),
        "import".into(),
        format!("{d}/d.raw"),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let out = blockfleet(vec![
        "--config".into(),
        cfg,
        "snapshot".into(),
        "export".into(),
        id.clone(),
        format!("{d}/o.raw"),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(dir.path().join("o.raw")).unwrap() == image);
    assert!(!dir.path().join("unused.key").exists());
    assert!(dir
        .path()
        .join("objects/keys/manifest-mac.wrapped")
        .exists());

    let bad = toml_config(dir.path(), &f, &key, "block-server")
        .display()
        .to_string();
    let out = blockfleet(vec![
        "--config".into(),
        bad,
        "snapshot".into(),
        "show".into(),
        id,
    ])
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("access denied"), "{err}");
}

/// `blockfleet kms` refuses a root key file others can read, with a clear message.
#[test]
fn kms_refuses_a_readable_root_key_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.key");
    std::fs::write(&root, format!("{}\n", "11".repeat(32))).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        format!(
            "[kms_server]\ndata_dir = \"{}/kms\"\nroot_key_file = \"{}\"\n",
            dir.path().display(),
            root.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blockfleet"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "kms",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("root.key") && err.contains("chmod 600"),
        "{err}"
    );
}

/// `blockfleet attach` over a real block-server process: refused without a grant (clear
/// message), serves the volume over NBD under the grant, refuses an unknown volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_needs_a_grant_and_serves_nbd() {
    use std::process::{Command, Stdio};

    let f = start().await;
    let cp = client(&f, "control-plane", &secret("control-plane")).await;
    let key: KmsKeyId = cp.create_key("volumes").await.unwrap().parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spawn_line = |args: Vec<String>| {
        let mut cmd = common::bin();
        cmd.args(args).stderr(Stdio::piped());
        common::start_line(cmd)
    };
    let bs = spawn_line(vec![
        "block-server".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.path().join("bs").display().to_string(),
        "--token-key-file".into(),
        dir.path().join("block-token.key").display().to_string(),
    ]);
    let bs_addr = bs.addr.clone();
    let v = VolumeId::generate();
    let bc = common::admin_block_client(&bs_addr, &dir.path().join("block-token.key")).await;
    bc.create_volume(&v, 4 << 20, false).await.unwrap();
    let wrapped = hex::encode(cp.generate_wrapped_key(&key, &v).await.unwrap());

    let host_cfg = dir.path().join("host.toml");
    std::fs::write(
        &host_cfg,
        format!(
            "[kms]\nendpoint = \"{}\"\nregion = \"local\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            f.endpoint,
            akid("host-a"),
            secret("host-a")
        ),
    )
    .unwrap();
    let attach = |volume: &VolumeId, wrapped: &str| {
        vec![
            "--config".to_owned(),
            host_cfg.display().to_string(),
            "attach".into(),
            "--block-server".into(),
            bs_addr.clone(),
            "--volume".into(),
            volume.to_string(),
            "--wrapped-key".into(),
            wrapped.to_owned(),
            "--block-token-key-file".into(),
            dir.path().join("block-token.key").display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ]
    };
    let refused = blockfleet(attach(&v, &wrapped)).await;
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("no grant") && err.contains("access denied"),
        "{err}"
    );

    cp.create_grant(&key, "host-a", &v).await.unwrap();
    let other = VolumeId::generate();
    cp.create_grant(&key, "host-a", &other).await.unwrap();
    let other_wrapped = hex::encode(cp.generate_wrapped_key(&key, &other).await.unwrap());
    let unknown = blockfleet(attach(&other, &other_wrapped)).await;
    assert!(!unknown.status.success());
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(err.contains(&format!("cannot open {other}")), "{err}");

    let agent = spawn_line(attach(&v, &wrapped));
    let uri = format!("nbd://{}/{v}", agent.addr);
    let out = tokio::task::spawn_blocking(move || {
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                &uri,
                "-c",
                "write -P 0x77 4096 8192",
                "-c",
                "read -P 0x77 4096 8192",
                "-c",
                "read -P 0 0 4096",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The block server got ciphertext.
    let raw = bc.read(&v, 4096, 8192).await.unwrap();
    assert!(!raw.iter().all(|&b| b == 0x77));
    drop(agent);
    drop(bs);
}
