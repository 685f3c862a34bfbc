//! How a block-protocol connection is carried: plain TCP, or mutual TLS with a fleet
//! certificate (`blockfleet_core::tls`). A process has one identity, set at start
//! ([`set_default`]) from its `[tls]` section and role; every [`crate::BlockClient::connect`]
//! uses it. Tests and benches that need another pick one per connection (`connect_with`).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use blockfleet_core::tls::{self, Role, TlsError};

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

pub use blockfleet_core::tls::TLS_HANDSHAKE;

/// Plain TCP or mutual TLS as one client identity.
#[derive(Clone, Default)]
pub struct Transport {
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.tls.is_some() { "tls" } else { "plain" })
    }
}

impl Transport {
    pub fn plain() -> Self {
        Transport::default()
    }

    /// Mutual TLS as `role`, with the certificates in `dir`.
    pub fn tls(dir: &Path, role: Role) -> Result<Self, TlsError> {
        Ok(Transport {
            tls: Some(tls::client_config(dir, role)?),
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connects to `addr` and, for TLS, completes the handshake, verifying that the server
    /// holds a block-server certificate of the fleet CA.
    pub(crate) async fn connect(&self, addr: &str) -> std::io::Result<(BoxRead, BoxWrite)> {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => {
                let (r, w) = stream.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
            Some(config) => {
                let c = tokio_rustls::TlsConnector::from(Arc::clone(config))
                    .connect(tls::server_name(Role::BlockServer), tls::buffered(stream))
                    .await?;
                let (r, w) = tokio::io::split(c);
                Ok((Box::new(r), Box::new(w)))
            }
        }
    }
}

/// Sets this process's block-protocol transport (its role's identity; also the identity of
/// its HTTPS requests to transform workers, `blockfleet_core::tls::set_client_identity`).
pub fn set_default(t: Transport) {
    tls::set_client_identity(t.tls);
}

/// This process's transport: plain TCP unless [`set_default`] said otherwise.
pub fn default_transport() -> Transport {
    Transport {
        tls: tls::client_identity(),
    }
}
