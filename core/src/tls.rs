//! The fleet's TLS identities: a fleet CA, and per role a certificate whose names say the role
//! and the holder (DNS names `<role>.blockfleet` and `<name>.<role>.blockfleet`, URI
//! `spiffe://blockfleet/<role>/<name>`), so a peer's role and name are read from a certificate
//! the fleet CA signed, never from anything the peer claims.
//!
//! Files in the `[tls] dir`: `ca.pem` (every process), `ca.key` (only where certificates are
//! issued), `<role>.pem` + `<role>.key` (a process of that role). Keys are 0600.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::fsutil::{create_dir_all_durable, write_atomic};

/// The `[tls]` section: where this machine's fleet certificates are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Holds `ca.pem` and this machine's `<role>.pem` / `<role>.key`.
    pub dir: PathBuf,
}

/// Who a certificate says its holder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    ControlPlane,
    BlockServer,
    Transform,
    HostAgent,
    /// The embedded KMS (a server only: AWS SDK clients verify it, present no certificate).
    Kms,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::ControlPlane,
        Role::BlockServer,
        Role::Transform,
        Role::HostAgent,
        Role::Kms,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::ControlPlane => "control-plane",
            Role::BlockServer => "block-server",
            Role::Transform => "transform",
            Role::HostAgent => "host-agent",
            Role::Kms => "kms",
        }
    }

    /// The DNS name every certificate of this role carries (and clients verify).
    pub fn dns_name(self) -> String {
        format!("{}.blockfleet", self.as_str())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, TlsError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| TlsError::Role(s.to_owned()))
    }
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Bad { path: PathBuf, reason: String },
    #[error("{}: missing ({hint})", path.display())]
    Missing { path: PathBuf, hint: String },
    #[error("unknown role {0:?}: one of control-plane, block-server, transform, host-agent, kms")]
    Role(String),
    #[error("certificate name {0:?}: 1 to 64 of a-z, 0-9, '-', '.'")]
    Name(String),
    #[error("cannot make a certificate: {0}")]
    Generate(String),
    #[error("TLS setup: {0}")]
    Rustls(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn generate(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}
fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca.key")
}
pub fn cert_path(dir: &Path, role: Role) -> PathBuf {
    dir.join(format!("{role}.pem"))
}
fn key_path(dir: &Path, role: Role) -> PathBuf {
    dir.join(format!("{role}.key"))
}

/// The CA's parameters: rebuilt the same way to sign with it later (its name and key-id
/// method are what issued certificates point at).
fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "blockfleet fleet CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
    p
}

/// Creates the fleet CA in `dir` unless it is there; returns whether it was created.
pub fn init_ca(dir: &Path) -> Result<bool, TlsError> {
    let (cert, key) = (ca_cert_path(dir), ca_key_path(dir));
    if cert.exists() {
        return Ok(false);
    }
    create_dir_all_durable(dir).map_err(io(dir))?;
    let kp = KeyPair::generate().map_err(generate)?;
    let ca = ca_params().self_signed(&kp).map_err(generate)?;
    write_atomic(&key, kp.serialize_pem().as_bytes(), 0o600).map_err(io(&key))?;
    write_atomic(&cert, ca.pem().as_bytes(), 0o644).map_err(io(&cert))?;
    Ok(true)
}

fn check_name(name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(TlsError::Name(name.to_owned()))
    }
}

/// Issues `<role>.pem` / `<role>.key` in `dir` for `name` (a host or service name), signed by
/// the CA in `dir` (valid one year); replaces an earlier one.
pub fn issue(dir: &Path, role: Role, name: &str) -> Result<(), TlsError> {
    check_name(name)?;
    let ca_key = ca_key_path(dir);
    let text = std::fs::read_to_string(&ca_key).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TlsError::Missing {
            path: ca_key.clone(),
            hint: "run `blockfleet ca init` first, or issue where the CA key is".into(),
        },
        _ => TlsError::Io {
            path: ca_key.clone(),
            source: e,
        },
    })?;
    let ca_kp = KeyPair::from_pem(&text).map_err(|e| TlsError::Bad {
        path: ca_key.clone(),
        reason: e.to_string(),
    })?;
    let issuer = Issuer::new(ca_params(), ca_kp);
    let mut p = CertificateParams::new(vec![role.dns_name(), holder_dns_name(role, name)])
        .map_err(generate)?;
    let uri = format!("spiffe://blockfleet/{role}/{name}");
    p.subject_alt_names
        .push(SanType::URI(uri.try_into().map_err(generate)?));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{role} {name}"));
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365);
    let kp = KeyPair::generate().map_err(generate)?;
    let cert = p.signed_by(&kp, &issuer).map_err(generate)?;
    let (cp, kpath) = (cert_path(dir, role), key_path(dir, role));
    write_atomic(&kpath, kp.serialize_pem().as_bytes(), 0o600).map_err(io(&kpath))?;
    write_atomic(&cp, cert.pem().as_bytes(), 0o644).map_err(io(&cp))?;
    Ok(())
}

/// The single-node start: the CA and a certificate for each of `roles` naming `name`, made
/// where missing or naming another holder (e.g. one made before certificates named holders).
pub fn ensure(dir: &Path, roles: &[Role], name: &str) -> Result<(), TlsError> {
    init_ca(dir)?;
    for &r in roles {
        let current = std::fs::read(cert_path(dir, r)).ok().is_some_and(|pem| {
            CertificateDer::pem_slice_iter(&pem)
                .next()
                .and_then(Result::ok)
                .is_some_and(|c| names_holder(&c, r, name))
        });
        if !current {
            issue(dir, r, name)?;
        }
    }
    Ok(())
}

/// The first byte of a TLS handshake record: how a TLS-only server tells a plain client.
pub const TLS_HANDSHAKE: u8 = 0x16;

/// The DNS name that says a certificate of `role` belongs to `name`.
fn holder_dns_name(role: Role, name: &str) -> String {
    format!("{name}.{}", role.dns_name())
}

/// Whether a verified peer certificate is `role`'s certificate for holder `name` (a host
/// agent's is named for its host).
pub fn names_holder(cert: &CertificateDer<'_>, role: Role, name: &str) -> bool {
    let Ok(n) = ServerName::try_from(holder_dns_name(role, name)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&n).is_ok())
}

/// A verified TLS peer: its role and certificate.
#[derive(Debug, Clone)]
pub struct Peer {
    pub role: Role,
    pub cert: CertificateDer<'static>,
}

impl Peer {
    /// Whether this peer's certificate was issued to holder `name`.
    pub fn is(&self, name: &str) -> bool {
        names_holder(&self.cert, self.role, name)
    }
}

fn missing_hint(role: Option<Role>) -> String {
    match role {
        Some(r) => {
            format!("run `blockfleet ca issue {r} NAME` where the CA key is, then copy it here")
        }
        None => "copy the fleet CA's ca.pem here (`blockfleet ca init` makes one)".into(),
    }
}

fn read(path: &Path, role: Option<Role>) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TlsError::Missing {
            path: path.to_owned(),
            hint: missing_hint(role),
        },
        _ => TlsError::Io {
            path: path.to_owned(),
            source: e,
        },
    })
}

fn bad(path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError::Bad {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn roots(dir: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let path = ca_cert_path(dir);
    let pem = read(&path, None)?;
    let mut store = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        store
            .add(c.map_err(|e| bad(&path, e))?)
            .map_err(|e| bad(&path, e))?;
    }
    if store.is_empty() {
        return Err(bad(&path, "no certificate in it"));
    }
    Ok(Arc::new(store))
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn identity(dir: &Path, role: Role) -> Result<Identity, TlsError> {
    let (cp, kp) = (cert_path(dir, role), key_path(dir, role));
    let pem = read(&cp, Some(role))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&cp, e))?;
    if certs.is_empty() {
        return Err(bad(&cp, "no certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&kp, Some(role))?).map_err(|e| bad(&kp, e))?;
    Ok((certs, key))
}

/// ring, preferring AES-128-GCM (TLS 1.3's mandatory suite): on the 4 KiB data path the
/// record cipher is a visible share of the work, and AES-256's extra rounds buy nothing here.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut p = rustls::crypto::ring::default_provider();
    let first = cipher_suite::TLS13_AES_128_GCM_SHA256;
    p.cipher_suites.retain(|s| s.suite() != first.suite());
    p.cipher_suites.insert(0, first);
    Arc::new(p)
}

fn rustls_err(e: impl fmt::Display) -> TlsError {
    TlsError::Rustls(e.to_string())
}

/// A server of `role` that takes only clients with a certificate from the fleet CA.
pub fn server_config(dir: &Path, role: Role) -> Result<Arc<ServerConfig>, TlsError> {
    make_server_config(dir, role, false)
}

/// A server of `role` whose clients may present a fleet certificate or none (an API that
/// authenticates callers otherwise too, e.g. SigV4); a certificate of another CA is refused.
pub fn server_config_optional_client(
    dir: &Path,
    role: Role,
) -> Result<Arc<ServerConfig>, TlsError> {
    make_server_config(dir, role, true)
}

fn make_server_config(
    dir: &Path,
    role: Role,
    anonymous: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut builder =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(dir)?, provider());
    if anonymous {
        builder = builder.allow_unauthenticated();
    }
    let verifier = builder.build().map_err(rustls_err)?;
    let (certs, key) = identity(dir, role)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(rustls_err)?;
    Ok(Arc::new(config))
}

/// A client of `role`, trusting only the fleet CA and presenting its own certificate.
pub fn client_config(dir: &Path, role: Role) -> Result<Arc<ClientConfig>, TlsError> {
    let (certs, key) = identity(dir, role)?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_err)?
        .with_root_certificates(roots(dir)?)
        .with_client_auth_cert(certs, key)
        .map_err(rustls_err)?;
    Ok(Arc::new(config))
}

/// A client trusting only the fleet CA that presents no certificate of its own (an operator's
/// or user's CLI: it authenticates with SigV4).
pub fn anonymous_client_config(dir: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_err)?
        .with_root_certificates(roots(dir)?)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

static FLEET_CA: std::sync::RwLock<Option<Vec<u8>>> = std::sync::RwLock::new(None);

/// Sets the fleet CA (`ca.pem`'s bytes) this process's AWS SDK clients trust for an
/// `https://` endpoint of the fleet's own KMS, beside the system's roots.
pub fn set_fleet_ca(dir: &Path) -> Result<(), TlsError> {
    roots(dir)?;
    let pem = read(&ca_cert_path(dir), None)?;
    *FLEET_CA.write().unwrap_or_else(|p| p.into_inner()) = Some(pem);
    Ok(())
}

/// The fleet CA set by [`set_fleet_ca`], PEM.
pub fn fleet_ca() -> Option<Vec<u8>> {
    FLEET_CA.read().unwrap_or_else(|p| p.into_inner()).clone()
}

static CLIENT: std::sync::RwLock<Option<Arc<ClientConfig>>> = std::sync::RwLock::new(None);

/// Sets this process's client identity (its role's certificate), used by every fleet
/// connection it opens from then on: the block protocol and HTTPS to transform workers.
pub fn set_client_identity(config: Option<Arc<ClientConfig>>) {
    *CLIENT.write().unwrap_or_else(|p| p.into_inner()) = config;
}

/// This process's client identity (`None`: plain TCP).
pub fn client_identity() -> Option<Arc<ClientConfig>> {
    CLIENT.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A client config that trusts nothing: what an HTTPS request gets from a process without a
/// `[tls]` section (it fails with a certificate error, never goes out unverified).
pub fn no_identity() -> ClientConfig {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth()
}

/// The server name a client verifies for a peer of `role` (its certificate's DNS name).
pub fn server_name(role: Role) -> ServerName<'static> {
    ServerName::try_from(role.dns_name()).expect("role names are DNS names")
}

/// A socket read through a buffer: rustls reads at most 4 KiB per call, so without one a
/// stream of records costs a system call per 4 KiB (writes pass straight through).
pub type Buffered = tokio::io::BufReader<tokio::net::TcpStream>;

/// `stream` with the read buffer TLS connections use.
pub fn buffered(stream: tokio::net::TcpStream) -> Buffered {
    tokio::io::BufReader::with_capacity(256 * 1024, stream)
}

/// The server side of a TLS handshake on `stream`, within `within`: the stream and its client,
/// whose certificate must name one of `allow`; with `anonymous`, a client may also present
/// none (`None`: it authenticates otherwise, e.g. SigV4).
pub async fn accept(
    config: &Arc<ServerConfig>,
    stream: tokio::net::TcpStream,
    allow: &[Role],
    anonymous: bool,
    within: std::time::Duration,
) -> Result<(tokio_rustls::server::TlsStream<Buffered>, Option<Peer>), String> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(config));
    let s = tokio::time::timeout(within, acceptor.accept(buffered(stream)))
        .await
        .map_err(|_| "TLS handshake not done in time".to_owned())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let cert = s
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());
    let Some(cert) = cert else {
        return if anonymous {
            Ok((s, None))
        } else {
            Err("no client certificate".to_owned())
        };
    };
    match peer_role(&cert) {
        Some(role) if allow.contains(&role) => Ok((s, Some(Peer { role, cert }))),
        other => Err(format!(
            "a certificate of role {} may not call this service",
            other.map_or("(none)", Role::as_str)
        )),
    }
}

/// The role a verified peer certificate names (`None`: none of the fleet's roles).
pub fn peer_role(cert: &CertificateDer<'_>) -> Option<Role> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    Role::ALL.into_iter().find(|r| {
        ee.verify_is_valid_for_subject_name(&server_name(*r))
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_name_their_role() {
        let dir = tempfile::tempdir().unwrap();
        assert!(init_ca(dir.path()).unwrap());
        assert!(!init_ca(dir.path()).unwrap(), "an existing CA is kept");
        issue(dir.path(), Role::HostAgent, "host-a").unwrap();
        let pem = std::fs::read(cert_path(dir.path(), Role::HostAgent)).unwrap();
        let cert = CertificateDer::from_pem_slice(&pem).unwrap();
        assert_eq!(peer_role(&cert), Some(Role::HostAgent));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(key_path(dir.path(), Role::HostAgent))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        // Configs build from the files.
        server_config(dir.path(), Role::HostAgent).unwrap();
        client_config(dir.path(), Role::HostAgent).unwrap();
    }

    /// Drives a client and a server handshake in memory to the end.
    fn handshake(dir: &Path) -> rustls::ClientConnection {
        let mut client = rustls::ClientConnection::new(
            client_config(dir, Role::HostAgent).unwrap(),
            server_name(Role::BlockServer),
        )
        .unwrap();
        let mut server =
            rustls::ServerConnection::new(server_config(dir, Role::BlockServer).unwrap()).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut &buf[..]).unwrap();
            server.process_new_packets().unwrap();
            buf.clear();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut &buf[..]).unwrap();
            client.process_new_packets().unwrap();
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        assert!(!client.is_handshaking(), "the handshake did not finish");
        client
    }

    #[test]
    fn fleet_links_prefer_aes_128_gcm_over_tls_1_3() {
        let dir = tempfile::tempdir().unwrap();
        ensure(dir.path(), &[Role::HostAgent, Role::BlockServer], "t").unwrap();
        let c = handshake(dir.path());
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(
            c.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }

    #[test]
    fn certificates_name_their_holder() {
        let dir = tempfile::tempdir().unwrap();
        ensure(dir.path(), &[Role::HostAgent], "host-a").unwrap();
        let cert = |d: &Path| {
            let pem = std::fs::read(cert_path(d, Role::HostAgent)).unwrap();
            CertificateDer::pem_slice_iter(&pem)
                .next()
                .unwrap()
                .unwrap()
        };
        let a = cert(dir.path());
        assert!(names_holder(&a, Role::HostAgent, "host-a"));
        assert!(!names_holder(&a, Role::HostAgent, "host-b"));
        assert!(!names_holder(&a, Role::Transform, "host-a"));
        assert!(!names_holder(&a, Role::HostAgent, "bad name"));
        // ensure keeps a certificate naming the holder, reissues one naming another.
        ensure(dir.path(), &[Role::HostAgent], "host-a").unwrap();
        assert_eq!(cert(dir.path()), a);
        ensure(dir.path(), &[Role::HostAgent], "host-b").unwrap();
        assert!(names_holder(&cert(dir.path()), Role::HostAgent, "host-b"));
    }

    #[test]
    fn bad_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            issue(dir.path(), Role::Transform, "t"),
            Err(TlsError::Missing { .. })
        ));
        init_ca(dir.path()).unwrap();
        assert!(matches!(
            issue(dir.path(), Role::Transform, "Bad Name"),
            Err(TlsError::Name(_))
        ));
        assert!("admin".parse::<Role>().is_err());
        assert_eq!("kms".parse::<Role>().unwrap(), Role::Kms);
        assert!(matches!(
            client_config(dir.path(), Role::Transform),
            Err(TlsError::Missing { .. })
        ));
        std::fs::write(ca_cert_path(dir.path()), "not a certificate").unwrap();
        issue(dir.path(), Role::Transform, "t").unwrap();
        assert!(matches!(
            client_config(dir.path(), Role::Transform),
            Err(TlsError::Bad { .. })
        ));
    }
}
