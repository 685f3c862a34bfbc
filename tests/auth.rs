#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic
//! Attacks on the fleet's own APIs, by callers without the right identity: every one is
//! refused with a clear error and changes nothing, while the entitled caller still succeeds.
//! (The legitimate flows are the rest of the suite, all signed.)

mod common;

use std::io::{Read, Write};
use std::time::{Duration, SystemTime};

use base64::Engine;
use blockfleet_api::{
    AttachVolumeRequest, BlockTransformRequest, CreateVolumeRequest, FetchRequest, ReplicaReport,
};
use blockfleet_core::httpjson::{HttpError, JsonClient};
use blockfleet_core::ids::{InstanceId, VolumeId};
use blockfleet_core::sigv4::{sign_request, FLEET_REGION, FLEET_SERVICE};
use blockfleet_core::token::{self, TokenKey};
use common::{Fleet, FleetOptions};

/// POSTs raw bytes with `headers` over HTTPS (trusting the fleet CA, presenting no
/// certificate) and returns the status and body (no client library in the way: what an
/// attacker on the network can send).
fn raw_post(addr: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> (u16, String) {
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    let config = blockfleet_core::tls::anonymous_client_config(common::fleet_tls_dir()).unwrap();
    let conn = rustls::ClientConnection::new(
        config,
        blockfleet_core::tls::server_name(blockfleet_core::tls::Role::ControlPlane),
    )
    .unwrap();
    raw_post_on(
        rustls::StreamOwned::new(conn, tcp),
        addr,
        path,
        headers,
        body,
    )
}

/// The same request in the clear.
fn raw_post_plain(addr: &str, path: &str, body: &[u8]) -> (u16, String) {
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    raw_post_on(tcp, addr, path, &[], body)
}

fn raw_post_on(
    mut s: impl Read + Write,
    addr: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, String) {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        if n != "host" {
            req += &format!("{n}: {v}\r\n");
        }
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    // A TLS peer closing without close_notify is fine here: the reply is whole or the
    // parse below fails.
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// The headers of `body` to `path` signed as `access_key_id` at `time`.
fn signed(
    addr: &str,
    path: &str,
    body: &[u8],
    key: (&str, &str),
    time: SystemTime,
) -> Vec<(String, String)> {
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .body(())
        .unwrap();
    sign_request(
        &mut req,
        body,
        key.0,
        key.1,
        FLEET_SERVICE,
        FLEET_REGION,
        time,
    )
    .unwrap();
    req.headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
        .collect()
}

/// The status and code of a refused call (an answer is a failure, never printed: it may be
/// plaintext).
fn refused<T>(r: Result<T, HttpError>) -> (u16, String) {
    match r {
        Ok(_) => panic!("the call was served"),
        Err(HttpError::Api(a)) => (a.status, a.code),
        Err(other) => panic!("expected an API error, got {other}"),
    }
}

/// Attaching `volume` to a new instance on host-local.
fn on_host_local(volume: &VolumeId) -> AttachVolumeRequest {
    AttachVolumeRequest {
        volume_id: volume.clone(),
        instance_id: InstanceId::generate(),
        device: None,
        boot: false,
        host: Some("host-local".into()),
    }
}

const ACTIONS: [&str; 18] = [
    "CreateVolume",
    "DescribeVolumes",
    "DeleteVolume",
    "AttachVolume",
    "DetachVolume",
    "DescribeInstances",
    "CreateSnapshots",
    "DescribeSnapshotSet",
    "DescribeSnapshots",
    "DeleteSnapshot",
    "ListChangedBlocks",
    "DescribeBlockServers",
    "DrainBlockServer",
    "internal/ReportReplicas",
    "internal/AttachInfo",
    "internal/ClaimJob",
    "internal/ReportJob",
    "internal/JobForVolume",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_without_the_right_identity_are_refused_and_change_nothing() {
    let f = Fleet::start(FleetOptions::default());
    let addr = f.control_plane_addr().to_owned();
    let user = Fleet::client(&addr, "AKUSER", "user-secret-0123");
    let other_host = Fleet::client(&addr, "AKOTHERHOST", "other-secret-0123");
    let transform = Fleet::client(&addr, "AKTFCP", "tfcp-secret-0123");

    // An encrypted volume, attached on host-local.
    let v = user
        .create_volume(&CreateVolumeRequest {
            size: Some(8 << 20),
            encrypted: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .remove(0);
    user.attach_volume(&on_host_local(&v.volume_id))
        .await
        .unwrap();
    let volumes_before = f.cp.describe_volumes(&[]).await.unwrap().len();

    // Unsigned, wrongly signed, unknown key, replayed after the window: 401 on every action.
    let create = serde_json::to_vec(&CreateVolumeRequest {
        size: Some(8 << 20),
        ..Default::default()
    })
    .unwrap();
    let now = SystemTime::now();
    for action in ACTIONS {
        let path = format!("/v1/{action}");
        let attempts = [
            ("unsigned", Vec::new()),
            (
                "wrong secret",
                signed(&addr, &path, &create, ("AKUSER", "not-the-secret"), now),
            ),
            (
                "unknown key",
                signed(&addr, &path, &create, ("AKNOBODY", "user-secret-0123"), now),
            ),
            (
                "replayed after 20 minutes",
                signed(
                    &addr,
                    &path,
                    &create,
                    ("AKADMIN", "admin-secret-0123"),
                    now - Duration::from_secs(20 * 60),
                ),
            ),
        ];
        for (what, headers) in attempts {
            let (status, body) = raw_post(&addr, &path, &headers, &create);
            assert_eq!(status, 401, "{action} {what}: {body}");
            assert!(body.contains("AuthFailure"), "{action} {what}: {body}");
        }
    }
    // In the clear, nothing is read or served: one clear error says HTTPS. The same for the
    // KMS, whose Decrypt replies are plaintext keys.
    let (status, body) = raw_post_plain(&addr, "/v1/DescribeVolumes", b"{}");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("HttpsOnly"), "{body}");
    let kms_addr = f.kms_endpoint.trim_start_matches("https://").to_owned();
    let (status, body) = raw_post_plain(&kms_addr, "/", b"{}");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("HttpsOnly"), "{body}");
    // A correctly signed request whose body was altered on the way.
    let mut headers = signed(
        &addr,
        "/v1/CreateVolume",
        &create,
        ("AKADMIN", "admin-secret-0123"),
        now,
    );
    headers.retain(|(n, _)| n != "x-amz-content-sha256");
    let altered = serde_json::to_vec(&CreateVolumeRequest {
        size: Some(16 << 20),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        raw_post(&addr, "/v1/CreateVolume", &headers, &altered).0,
        401
    );

    // A user may not drain servers or call the fleet's internal actions.
    assert_eq!(
        refused(user.describe_block_servers().await),
        (403, "AccessDenied".into())
    );
    assert_eq!(
        refused(user.drain_block_server("127.0.0.1:1").await),
        (403, "AccessDenied".into())
    );
    assert_eq!(refused(user.attach_info(&v.volume_id).await).0, 403);
    assert_eq!(refused(user.job_for_volume(&v.volume_id).await).0, 403);
    // Neither may the admin take a volume's wrapped key, nor a transform worker.
    assert_eq!(refused(f.cp.attach_info(&v.volume_id).await).0, 403);
    assert_eq!(refused(transform.attach_info(&v.volume_id).await).0, 403);
    assert_eq!(
        refused(transform.delete_volume(&v.volume_id).await),
        (403, "AccessDenied".into())
    );
    // The host agent of another host gets neither the key nor a say in the replicas.
    let (status, c) = refused(other_host.attach_info(&v.volume_id).await);
    assert_eq!((status, c.as_str()), (403, "AccessDenied"));
    let report = ReplicaReport {
        volume_id: v.volume_id.clone(),
        replicas: Vec::new(),
    };
    assert_eq!(refused(other_host.report_replicas(&report).await).0, 403);
    // An authenticated caller asking for no action at all hears so.
    let (status, body) = raw_post(
        &addr,
        "/v1/NoSuchAction",
        &signed(
            &addr,
            "/v1/NoSuchAction",
            b"{}",
            ("AKUSER", "user-secret-0123"),
            SystemTime::now(),
        ),
        b"{}",
    );
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("InvalidAction"), "{body}");
    // What users see of a volume holds no wrapped key.
    let listed = serde_json::to_string(&user.describe_volumes(&[]).await.unwrap()).unwrap();
    assert!(!listed.contains("wrapped"), "{listed}");
    // Nothing changed; the entitled host agent still gets its attachment.
    assert_eq!(
        f.cp.describe_volumes(&[]).await.unwrap().len(),
        volumes_before
    );
    let info = f.host_cp.attach_info(&v.volume_id).await.unwrap();
    let wrapped = info.wrapped_key.clone().expect("an encrypted volume's key");

    // A host agent's secret alone is not enough over TLS: it must come with that host's
    // certificate (not another host's, not none); with it, the agent is served.
    let creds = |id: &str, secret: &str| blockfleet_core::config::Credentials {
        access_key_id: id.into(),
        secret_access_key: blockfleet_core::config::Secret::new(secret),
    };
    let host_creds = creds("AKHOSTCP", "hostcp-secret-0123");
    let https = format!("https://{addr}");
    let as_host = |dir: &std::path::Path| {
        blockfleet_api::ControlPlaneClient::with_identity(
            &https,
            Some(&host_creds),
            blockfleet_core::tls::client_config(dir, blockfleet_core::tls::Role::HostAgent)
                .unwrap(),
        )
    };
    let other_cert = common::host_agent_tls_dir("host-other");
    let (status, message) = refused(as_host(other_cert.path()).attach_info(&v.volume_id).await);
    assert_eq!(status, 403, "another host's certificate: {message}");
    let no_cert = blockfleet_api::ControlPlaneClient::with_identity(
        &https,
        Some(&host_creds),
        blockfleet_core::tls::anonymous_client_config(common::fleet_tls_dir()).unwrap(),
    );
    assert_eq!(
        refused(no_cert.attach_info(&v.volume_id).await).0,
        403,
        "no certificate"
    );
    let tf_no_cert = blockfleet_api::ControlPlaneClient::with_identity(
        &https,
        Some(&creds("AKTFCP", "tfcp-secret-0123")),
        blockfleet_core::tls::anonymous_client_config(common::fleet_tls_dir()).unwrap(),
    );
    assert_eq!(
        refused(tf_no_cert.job_for_volume(&v.volume_id).await).0,
        403
    );
    let own = as_host(common::fleet_tls_dir())
        .attach_info(&v.volume_id)
        .await
        .unwrap();
    assert_eq!(own.wrapped_key.as_deref(), Some(wrapped.as_str()));

    // Block servers: a connection without a capability reads, writes and deletes nothing; the
    // attached host's capability opens its volume only.
    let other = user
        .create_volume(&CreateVolumeRequest {
            size: Some(8 << 20),
            ..Default::default()
        })
        .await
        .unwrap()
        .remove(0);
    let bs = blockfleet_proto::BlockClient::connect(&v.placement[0])
        .await
        .unwrap();
    let denied = |e: blockfleet_proto::ClientError| {
        assert_eq!(
            e.code(),
            Some(blockfleet_proto::ErrorCode::AccessDenied),
            "{e}"
        )
    };
    denied(bs.read(&v.volume_id, 0, 4096).await.unwrap_err());
    denied(
        bs.write(&v.volume_id, 0, vec![1u8; 4096].into(), true)
            .await
            .unwrap_err(),
    );
    denied(bs.delete_volume(&v.volume_id).await.unwrap_err());
    let grant = info
        .block_grant
        .clone()
        .expect("a block capability with the attachment");
    bs.authorize(&grant).await.unwrap();
    assert_eq!(bs.read(&v.volume_id, 0, 4096).await.unwrap().len(), 4096);
    denied(bs.read(&other.volume_id, 0, 4096).await.unwrap_err());
    denied(bs.delete_volume(&v.volume_id).await.unwrap_err());
    let mut moved = grant.clone();
    moved.volume = Some(other.volume_id.clone());
    denied(bs.authorize(&moved).await.unwrap_err());
    // Detach: the host's connection loses the volume at once, its capability is no good on a
    // new connection, and a new attachment brings a new one.
    user.detach_volume(&v.volume_id).await.unwrap();
    denied(bs.read(&v.volume_id, 0, 4096).await.unwrap_err());
    let fresh = blockfleet_proto::BlockClient::connect(&v.placement[1])
        .await
        .unwrap();
    denied(fresh.authorize(&grant).await.unwrap_err());
    user.attach_volume(&on_host_local(&v.volume_id))
        .await
        .unwrap();
    let again = f.host_cp.attach_info(&v.volume_id).await.unwrap();
    fresh.authorize(&again.block_grant.unwrap()).await.unwrap();
    assert_eq!(fresh.read(&v.volume_id, 0, 4096).await.unwrap().len(), 4096);

    // The transform worker decrypts for nobody but the control plane.
    let worker = f.transform.as_ref().unwrap().addr.clone();
    // (Over HTTPS as a control-plane certificate: TLS admits it, the tokens decide.)
    let tf = JsonClient::new(&format!("https://{worker}"), Duration::from_secs(10))
        .expect_role(blockfleet_core::tls::Role::Transform);
    let ask = BlockTransformRequest {
        wrapped_key: wrapped,
        context_volume: v.volume_id.clone(),
        block: 0,
        encrypt: false,
        data: base64::engine::general_purpose::STANDARD.encode(vec![7u8; 512 << 10]),
    };
    let r = tf
        .post::<_, serde_json::Value>("/v1/transform-block", &ask)
        .await;
    assert_eq!(refused(r), (403, "AccessDenied".into()), "no token");
    // A token the control plane issued for another request does not carry over.
    let stolen = info.fetch_token.clone().unwrap();
    let r = tf
        .post_with::<_, serde_json::Value>(
            "/v1/transform-block",
            &ask,
            Some(&|_: &[u8]| stolen.clone()),
        )
        .await;
    assert_eq!(refused(r).0, 403, "a fetch token is no transform token");
    // A token made under any key but the fleet's is refused.
    let forged_key = TokenKey::from_bytes([1; 32]);
    let forge = |b: &[u8]| {
        forged_key.issue(
            token::TRANSFORM_BLOCK,
            &token::body_digest(b),
            SystemTime::now(),
            Duration::from_secs(60),
        )
    };
    let r = tf
        .post_with::<_, serde_json::Value>("/v1/transform-block", &ask, Some(&forge))
        .await;
    assert_eq!(refused(r).0, 403, "forged token");

    // On-demand fetch: only with the capability of that very volume.
    let fetch = |id: &VolumeId| FetchRequest {
        volume_id: id.clone(),
        host: "host-local".into(),
        chunks: vec![0],
    };
    let r = tf
        .post::<_, serde_json::Value>("/v1/fetch", &fetch(&v.volume_id))
        .await;
    assert_eq!(refused(r).0, 403, "fetch without a token");
    let other = VolumeId::generate();
    let r = tf
        .post_with::<_, serde_json::Value>(
            "/v1/fetch",
            &fetch(&other),
            Some(&|_: &[u8]| stolen.clone()),
        )
        .await;
    assert_eq!(refused(r).0, 403, "another volume's token");
    let r = tf
        .post_with::<_, serde_json::Value>(
            "/v1/fetch",
            &FetchRequest {
                host: "host-other".into(),
                ..fetch(&v.volume_id)
            },
            Some(&|_: &[u8]| stolen.clone()),
        )
        .await;
    assert_eq!(refused(r).0, 403, "the token names another host");
    // Another host's agent, with its own fleet certificate, holding this host's token.
    let other_host = common::host_agent_tls_dir("host-other");
    let tf_other = JsonClient::new(&format!("https://{worker}"), Duration::from_secs(10))
        .with_identity(
            blockfleet_core::tls::client_config(
                other_host.path(),
                blockfleet_core::tls::Role::HostAgent,
            )
            .unwrap(),
            blockfleet_core::tls::Role::Transform,
        );
    let r = tf_other
        .post_with::<_, serde_json::Value>(
            "/v1/fetch",
            &fetch(&v.volume_id),
            Some(&|_: &[u8]| stolen.clone()),
        )
        .await;
    let (status, message) = refused(r);
    assert_eq!(status, 403, "another host's certificate: {message}");
    tf.post_with::<_, serde_json::Value>(
        "/v1/fetch",
        &fetch(&v.volume_id),
        Some(&|_: &[u8]| stolen.clone()),
    )
    .await
    .expect("the attached host's agent fetches with its token");
}

/// The block protocol takes mutual TLS with a fleet certificate only: a plain client, a
/// certificate from another CA and one of a role that has no business there are refused at
/// connect; a host agent's certificate cannot carry a capability taken from the control plane
/// (admin, or every volume), while the control plane's can. Nothing changes on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_servers_take_only_fleet_certificates_of_client_roles() {
    use blockfleet_core::tls::{self, Role};
    use blockfleet_proto::{BlockClient, Transport};
    let f = Fleet::start(FleetOptions::default());
    let addr = f.block_server_addr(0).to_owned();
    let fleet_ca = common::fleet_tls_dir();
    let refused_at_connect = |r: Result<BlockClient, blockfleet_proto::ClientError>| match r {
        Ok(_) => panic!("connected"),
        Err(e) => e.to_string(),
    };

    let e = refused_at_connect(BlockClient::connect_with(&addr, &Transport::plain()).await);
    assert!(e.contains("mutual TLS only"), "{e}");

    // A CA of the attacker's own, with a control-plane certificate: no.
    let rogue = tempfile::tempdir().unwrap();
    tls::ensure(rogue.path(), &[Role::ControlPlane], "rogue").unwrap();
    let t = Transport::tls(rogue.path(), Role::ControlPlane).unwrap();
    let e = refused_at_connect(BlockClient::connect_with(&addr, &t).await);
    assert!(
        e.contains("certificate") || e.contains("closed") || e.contains("reset"),
        "{e}"
    );

    // The fleet CA's block-server certificate is not a client identity.
    let t = Transport::tls(fleet_ca, Role::BlockServer).unwrap();
    let e = refused_at_connect(BlockClient::connect_with(&addr, &t).await);
    assert!(!e.is_empty());

    // The client checks the server too: a server with a certificate of another CA is refused.
    let rogue_server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rogue_addr = rogue_server.local_addr().unwrap().to_string();
    tls::issue(rogue.path(), Role::BlockServer, "rogue").unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(
        tls::server_config(rogue.path(), Role::BlockServer).unwrap(),
    );
    tokio::spawn(async move {
        if let Ok((s, _)) = rogue_server.accept().await {
            let _ = acceptor.accept(s).await;
        }
    });
    let t = Transport::tls(fleet_ca, Role::HostAgent).unwrap();
    let e = refused_at_connect(BlockClient::connect_with(&rogue_addr, &t).await);
    assert!(e.contains("certificate"), "{e}");

    // A host agent's certificate with an admin capability (as if stolen off the wire): refused,
    // and it cannot create a volume; the control plane's certificate may.
    let key = TokenKey::load_or_create(&f.block_key_file()).unwrap();
    let agent =
        BlockClient::connect_with(&addr, &Transport::tls(fleet_ca, Role::HostAgent).unwrap())
            .await
            .unwrap();
    let e = agent.authorize_admin(&key, "stolen").await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(blockfleet_proto::ErrorCode::AccessDenied),
        "{e}"
    );
    assert!(e.to_string().contains("host-agent certificate"), "{e}");
    let v = VolumeId::generate();
    let e = agent.create_volume(&v, 8 << 20, false).await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(blockfleet_proto::ErrorCode::AccessDenied),
        "{e}"
    );
    let cp = BlockClient::connect_with(
        &addr,
        &Transport::tls(fleet_ca, Role::ControlPlane).unwrap(),
    )
    .await
    .unwrap();
    let e = cp.stat_volume(&v).await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(blockfleet_proto::ErrorCode::AccessDenied),
        "{e}"
    );
    cp.authorize_admin(&key, "control-plane").await.unwrap();
    assert!(
        cp.stat_volume(&v).await.is_err(),
        "the host agent's refused create made no volume"
    );
    // The host agent's own kind of capability (one volume, read and write) is fine.
    cp.create_volume(&v, 8 << 20, false).await.unwrap();
    agent
        .authorize(&blockfleet_proto::Grant::writer(&key, &v, "host-local"))
        .await
        .unwrap();
    agent
        .write(&v, 0, vec![3u8; 4096].into(), true)
        .await
        .unwrap();
    assert_eq!(agent.read(&v, 0, 4096).await.unwrap()[..], [3u8; 4096][..]);

    // Capabilities are bound to the host: another host's agent (a fleet certificate of the
    // right role, for host-other) holding host-local's capability reads and writes nothing,
    // and the capability named for itself is not one the control plane gave it.
    let other_host = common::host_agent_tls_dir("host-other");
    let other = BlockClient::connect_with(
        &addr,
        &Transport::tls(other_host.path(), Role::HostAgent).unwrap(),
    )
    .await
    .unwrap();
    let access_denied = |r: Result<_, blockfleet_proto::ClientError>| {
        let e = r.map(|_: ()| ()).unwrap_err();
        assert_eq!(
            e.code(),
            Some(blockfleet_proto::ErrorCode::AccessDenied),
            "{e}"
        );
        e.to_string()
    };
    let e = access_denied(
        other
            .authorize(&blockfleet_proto::Grant::writer(&key, &v, "host-local"))
            .await,
    );
    assert!(e.contains("host host-local's"), "{e}");
    access_denied(other.read(&v, 0, 4096).await.map(drop));
    access_denied(other.write(&v, 0, vec![9u8; 4096].into(), true).await);
    assert_eq!(
        agent.read(&v, 0, 4096).await.unwrap()[..],
        [3u8; 4096][..],
        "the refused write changed nothing"
    );
}

/// Transform workers serve HTTPS only, to control-plane and host-agent certificates of the
/// fleet CA: plain HTTP gets one `HttpsOnly` error, another CA and another role no answer; the client side checks
/// the worker's certificate by role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transform_workers_take_only_fleet_certificates() {
    use blockfleet_core::tls::{self, Role};
    let f = Fleet::start(FleetOptions::default());
    let worker = f.transform.as_ref().unwrap().addr.clone();
    let unreachable = |r: Result<serde_json::Value, HttpError>| match r {
        Err(e @ HttpError::Unreachable { .. }) => e.to_string(),
        other => panic!("reached the worker: {other:?}"),
    };
    let ask = FetchRequest {
        volume_id: VolumeId::generate(),
        host: "host-local".into(),
        chunks: vec![0],
    };
    // Plain HTTP: nothing is served, one clear error says HTTPS.
    let plain = JsonClient::new(&format!("http://{worker}"), Duration::from_secs(10));
    assert_eq!(
        refused(plain.post::<_, serde_json::Value>("/v1/fetch", &ask).await),
        (400, "HttpsOnly".into())
    );
    // The right CA but the wrong role (a block server's certificate), then another CA: both
    // are refused by the worker; a worker address checked as another role is refused by us.
    let https = format!("https://{worker}");
    let with = |dir: &std::path::Path, role: Role| {
        JsonClient::new(&https, Duration::from_secs(10))
            .with_identity(tls::client_config(dir, role).unwrap(), Role::Transform)
    };
    let c = with(common::fleet_tls_dir(), Role::BlockServer);
    unreachable(c.post("/v1/fetch", &ask).await);
    let rogue = tempfile::tempdir().unwrap();
    tls::ensure(rogue.path(), &[Role::HostAgent], "rogue").unwrap();
    let c = with(rogue.path(), Role::HostAgent);
    let e = unreachable(c.post("/v1/fetch", &ask).await);
    assert!(
        e.contains("certificate") || e.contains("closed") || e.contains("reset"),
        "{e}"
    );
    let wrong = JsonClient::new(&https, Duration::from_secs(10)).expect_role(Role::BlockServer);
    let e = unreachable(wrong.post("/v1/fetch", &ask).await);
    assert!(
        e.contains("certificate") || e.contains("NotValidForName"),
        "{e}"
    );
    // A host agent's certificate is let through; the missing token then refuses the fetch.
    let c = with(common::fleet_tls_dir(), Role::HostAgent);
    match c.post::<_, serde_json::Value>("/v1/fetch", &ask).await {
        Err(HttpError::Api(e)) => assert_eq!(e.status, 403, "{e}"),
        other => panic!("{other:?}"),
    }
}
