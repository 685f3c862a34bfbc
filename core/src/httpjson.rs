//! JSON over HTTP/1.1 between blockfleet services (control plane API, transform fetch
//! endpoint): a tiny accept loop with graceful shutdown, a client, and one error shape:
//! `{"error": {"code": "...", "message": "..."}}` with a 4xx/5xx status.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use thiserror::Error;
use tokio::net::TcpListener;

use crate::config::Credentials;
use crate::tls::Role;

/// The header a fleet capability token travels in (see `crate::token`).
pub const TOKEN_HEADER: &str = "x-blockfleet-token";

/// Makes a request's capability token from its body's bytes.
pub type TokenFn<'a> = dyn Fn(&[u8]) -> String + Sync + 'a;

/// Request bodies larger than this are refused.
pub const MAX_BODY: usize = 4 << 20;

/// An API error as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }
    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(400, code, message)
    }
    pub fn not_found(code: &str, message: impl Into<String>) -> Self {
        Self::new(404, code, message)
    }
    pub fn conflict(code: &str, message: impl Into<String>) -> Self {
        Self::new(409, code, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }
    pub fn unavailable(code: &str, message: impl Into<String>) -> Self {
        Self::new(503, code, message)
    }
}

/// What a handler answers: a JSON value or an error.
pub type Reply = Result<serde_json::Value, ApiError>;

fn respond(reply: Reply) -> Response<Full<Bytes>> {
    let (status, body) = match reply {
        Ok(v) => (StatusCode::OK, v),
        Err(e) => (
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            json!({ "error": { "code": e.code, "message": e.message } }),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string() + "\n")))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// Parses a request body, naming the problem in the error.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("InvalidParameter", format!("request body: {e}")))
}

/// Serves `handler(request head, body)` on `listener` until `shutdown` resolves.
pub async fn serve<H, F>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    handler: H,
) where
    H: Fn(Parts, Bytes) -> F + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    serve_tls(listener, None, shutdown, handler).await
}

/// As [`serve`], over mutual TLS with `tls`.
pub async fn serve_tls<H, F>(
    listener: TcpListener,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send,
    handler: H,
) where
    H: Fn(Parts, Bytes) -> F + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let handler = Arc::new(handler);
    serve_http_tls(
        listener,
        tls,
        shutdown,
        move |req: Request<hyper::body::Incoming>| {
            let handler = Arc::clone(&handler);
            async move {
                let (parts, body) = req.into_parts();
                let reply = match Limited::new(body, MAX_BODY).collect().await {
                    Ok(b) => handler(parts, b.to_bytes()).await,
                    Err(_) => Err(ApiError::new(
                        413,
                        "RequestTooLarge",
                        format!("request body larger than {MAX_BODY} bytes or unreadable"),
                    )),
                };
                respond(reply)
            }
        },
    )
    .await;
}

/// The HTTP/1 accept loop every blockfleet server uses: each request to `handler`, until
/// `shutdown` resolves; open keep-alive connections then finish the request in flight and
/// close.
pub async fn serve_http<H, F>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    handler: H,
) where
    H: Fn(Request<hyper::body::Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    serve_http_tls(listener, None, shutdown, handler).await
}

/// TLS for a server: its config, the roles whose certificates may connect and whether a client
/// may present none (`anonymous`: the config must allow that too). A handler finds the
/// client's [`Peer`](crate::tls::Peer) in the request's extensions.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    pub allow: Vec<Role>,
    pub anonymous: bool,
}

/// One HTTP/1 connection until it closes, or until `stop` (then gracefully).
async fn serve_connection<I, H, F>(
    io: I,
    peer: Option<crate::tls::Peer>,
    handler: Arc<H>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<hyper::body::Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        if let Some(p) = &peer {
            req.extensions_mut().insert(p.clone());
        }
        let reply = handler(req);
        async move { Ok::<_, std::convert::Infallible>(reply.await) }
    });
    let io = hyper_util::rt::TokioIo::new(io);
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    tokio::pin!(conn);
    let stopping = tokio::select! {
        _ = conn.as_mut() => false,
        r = stop.wait_for(|s| *s) => r.is_ok(),
    };
    if stopping {
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }
}

/// A TLS server's first look at a connection: a client speaking plain HTTP gets one clear
/// error reply (`HttpsOnly`) instead of a failed handshake, and the connection is closed.
async fn refuse_plain_http(
    mut stream: tokio::net::TcpStream,
    within: Duration,
) -> Option<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut first = [0u8; 1];
    match tokio::time::timeout(within, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] != crate::tls::TLS_HANDSHAKE => {
            let body = serde_json::json!({"error": {
                "code": "HttpsOnly",
                "message": "this service takes HTTPS only (a fleet CA: [tls] dir; https:// URLs)",
            }})
            .to_string();
            let reply = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            // Read the request first: closing with it unread would reset the connection
            // and lose the reply.
            let mut head = vec![0u8; 64 * 1024];
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                tokio::io::AsyncReadExt::read(&mut stream, &mut head),
            )
            .await;
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
            None
        }
        Ok(Ok(_)) => Some(stream),
        _ => None,
    }
}

/// As [`serve_http`], over mutual TLS with `tls`.
pub async fn serve_http_tls<H, F>(
    listener: TcpListener,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send,
    handler: H,
) where
    H: Fn(Request<hyper::body::Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let handler = Arc::new(handler);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => {
                let _ = stop_tx.send(true);
                break;
            }
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handler = Arc::clone(&handler);
        let stop = stop_rx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            match tls {
                None => serve_connection(stream, None, handler, stop).await,
                Some(t) => {
                    let within = Duration::from_secs(10);
                    let Some(stream) = refuse_plain_http(stream, within).await else {
                        return;
                    };
                    match crate::tls::accept(&t.config, stream, &t.allow, t.anonymous, within).await
                    {
                        Ok((s, peer)) => serve_connection(s, peer, handler, stop).await,
                        Err(e) => tracing::info!(%peer, error = %e, "connection refused"),
                    }
                }
            }
        });
    }
}

#[derive(Debug, Error)]
pub enum HttpError {
    #[error("{url}: cannot reach the service: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{url}: timed out after {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("{0}")]
    Api(ApiError),
    #[error("{url}: unexpected reply: {reason}")]
    BadReply { url: String, reason: String },
}

impl HttpError {
    /// The API error code, if the service answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            HttpError::Api(e) => Some(&e.code),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorInner,
}
#[derive(Deserialize)]
struct ErrorInner {
    code: String,
    message: String,
}

/// Kept-alive clients to a role's servers, one per base URL (one TLS handshake per server,
/// not per request).
#[derive(Debug)]
pub struct Clients {
    role: Role,
    timeout: Duration,
    by_base: std::sync::Mutex<std::collections::HashMap<String, JsonClient>>,
}

impl Clients {
    pub fn new(role: Role, timeout: Duration) -> Self {
        Clients {
            role,
            timeout,
            by_base: std::sync::Mutex::default(),
        }
    }

    /// The client for `base`, made on first use.
    pub fn get(&self, base: &str) -> JsonClient {
        self.by_base
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(base.to_owned())
            .or_insert_with(|| JsonClient::new(base, self.timeout).expect_role(self.role))
            .clone()
    }
}

/// An HTTP/1 client for `http://` and `https://` URLs; HTTPS as this process's fleet identity,
/// verifying the server as `name` (default: the URL's host).
fn https_client(
    identity: Option<Arc<rustls::ClientConfig>>,
    name: Option<rustls::pki_types::ServerName<'static>>,
) -> Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(3)));
    http.set_nodelay(true);
    http.enforce_http(false);
    let config = identity
        .map(|c| (*c).clone())
        .unwrap_or_else(crate::tls::no_identity);
    let b = HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http();
    let b = match name {
        Some(n) => b.with_server_name_resolver(FixedServerNameResolver::new(n)),
        None => b,
    };
    Client::builder(TokioExecutor::new()).build(b.enable_http1().wrap_connector(http))
}

/// A JSON client for one service; with credentials, every request is SigV4-signed for the
/// fleet's API ([`crate::sigv4::FLEET_SERVICE`]).
#[derive(Debug, Clone)]
pub struct JsonClient {
    base: String,
    timeout: Duration,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    credentials: Option<Arc<Credentials>>,
}

impl JsonClient {
    /// `base`: `http://host:port` (a bare `host:port` gets `http://`).
    pub fn new(base: &str, timeout: Duration) -> Self {
        let base = if base.contains("://") {
            base.trim_end_matches('/').to_owned()
        } else {
            format!("http://{base}")
        };
        JsonClient {
            base,
            timeout,
            client: https_client(crate::tls::client_identity(), None),
            credentials: None,
        }
    }

    /// For an `https://` base: the server must hold a fleet certificate of `role` (whatever
    /// its address), and this process presents its own (`tls::set_client_identity`).
    pub fn expect_role(mut self, role: Role) -> Self {
        self.client = https_client(
            crate::tls::client_identity(),
            Some(crate::tls::server_name(role)),
        );
        self
    }

    /// As [`expect_role`](Self::expect_role), presenting `identity` instead of the process's.
    pub fn with_identity(mut self, identity: Arc<rustls::ClientConfig>, role: Role) -> Self {
        self.client = https_client(Some(identity), Some(crate::tls::server_name(role)));
        self
    }

    /// Signs every request with `credentials`.
    pub fn with_credentials(mut self, credentials: Option<&Credentials>) -> Self {
        self.credentials = credentials.map(|c| Arc::new(c.clone()));
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// POSTs `body` as JSON to `path` and parses the reply.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, HttpError> {
        self.post_with(path, body, None).await
    }

    /// As [`post`](Self::post), with a capability token in [`TOKEN_HEADER`] made by `token`
    /// from the body's bytes.
    pub async fn post_with<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        token: Option<&TokenFn<'_>>,
    ) -> Result<T, HttpError> {
        let body = serde_json::to_vec(body).unwrap_or_default();
        let token = token.map(|t| t(&body));
        self.send(Method::POST, path, body, token).await
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, HttpError> {
        self.send(Method::GET, path, Vec::new(), None).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        token: Option<String>,
    ) -> Result<T, HttpError> {
        let url = format!("{}{path}", self.base);
        let bad = |reason: String| HttpError::BadReply {
            url: url.clone(),
            reason,
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(&url)
            .header("content-type", "application/json");
        if let Some(t) = token {
            builder = builder.header(TOKEN_HEADER, t);
        }
        let mut req = builder
            .body(Full::new(Bytes::from(body.clone())))
            .map_err(|e| bad(e.to_string()))?;
        if let Some(c) = &self.credentials {
            crate::sigv4::sign_request(
                &mut req,
                &body,
                &c.access_key_id,
                c.secret_access_key.expose(),
                crate::sigv4::FLEET_SERVICE,
                crate::sigv4::FLEET_REGION,
                std::time::SystemTime::now(),
            )
            .map_err(|e| bad(format!("cannot sign the request: {e}")))?;
        }
        let work = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HttpError::Unreachable {
                    url: url.clone(),
                    reason: error_chain(&e),
                })?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), 64 << 20)
                .collect()
                .await
                .map_err(|e| HttpError::Unreachable {
                    url: url.clone(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            Ok::<_, HttpError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| HttpError::Timeout {
                url: url.clone(),
                secs: self.timeout.as_secs(),
            })??;
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| HttpError::BadReply {
                url,
                reason: e.to_string(),
            })
        } else {
            let e: ErrorBody = serde_json::from_slice(&bytes).map_err(|_| HttpError::BadReply {
                url: url.clone(),
                reason: format!("status {status}: {}", String::from_utf8_lossy(&bytes)),
            })?;
            Err(HttpError::Api(ApiError {
                status: status.as_u16(),
                code: e.error.code,
                message: e.error.message,
            }))
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn round_trip_and_errors() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            async {
                let _ = rx.await;
            },
            |parts: Parts, body| async move {
                let path = parts.uri.path().to_owned();
                match path.as_str() {
                    "/echo" => {
                        let v: serde_json::Value = parse(&body)?;
                        Ok(v)
                    }
                    _ => Err(ApiError::not_found("NoSuchAction", path)),
                }
            },
        ));
        let c = JsonClient::new(&addr.to_string(), Duration::from_secs(5));
        let v: serde_json::Value = c.post("/echo", &json!({"a": 1})).await.unwrap();
        assert_eq!(v, json!({"a": 1}));
        let e = c
            .post::<_, serde_json::Value>("/nope", &json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("NoSuchAction"));
        let raw = c
            .send::<serde_json::Value>(Method::POST, "/echo", b"{bad".to_vec(), None)
            .await;
        assert_eq!(raw.unwrap_err().code(), Some("InvalidParameter"));
        tx.send(()).unwrap();
        server.await.unwrap();
        let down = c.get::<serde_json::Value>("/echo").await.unwrap_err();
        assert!(matches!(down, HttpError::Unreachable { .. }), "{down}");
    }
}
