//! The block protocol over TCP. Per connection: a versioned handshake, then a reader that
//! decodes frames and runs each request as its own task (at most `max_inflight_per_connection`
//! at once), and a writer that sends replies in completion order.
//!
//! Every request on a volume needs the connection to have presented a capability (`Authorize`)
//! the control plane issued under the block token key, for that volume (or every volume) with
//! the right the request takes (`Request::needs`); without, it gets `AccessDenied` and changes
//! nothing. A capability is checked when presented and kept for the connection's life.
//!
//! With the fleet's `[tls]` section a connection must be mutual TLS with a certificate of the
//! fleet CA naming the control plane, a transform worker or a host agent; a capability for
//! every volume or with the admin right is then taken from the control plane only. A plain
//! client gets one plain error frame saying so.
//!
//! Bad input: a frame that decodes wrongly gets a typed error reply and the connection goes on;
//! a frame whose length is over the limit, or one too short to hold a request id, loses the
//! framing, so the connection is closed. Other connections never notice.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use blockfleet_core::tls::{Peer, Role};
use blockfleet_proto::transport::{BoxRead, BoxWrite, TLS_HANDSHAKE};
use blockfleet_proto::wire::{
    check_frame_len, decode_hello, encode_hello, encode_response, DecodeError,
};
use blockfleet_proto::{ErrorCode, Request, PROTOCOL_VERSION};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use crate::access::Access;
use crate::config::BlockServerConfig;
use crate::store::Store;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

enum FrameError {
    Closed,
    Fatal(String),
}

async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> Result<Bytes, FrameError> {
    let len = match r.read_u32_le().await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(FrameError::Fatal(e.to_string())),
    };
    let len = check_frame_len(len).map_err(|e| FrameError::Fatal(e.to_string()))?;
    // Read into spare capacity (no zeroing of up to 8 MiB first).
    let mut body = Vec::with_capacity(len);
    let got = (&mut *r)
        .take(len as u64)
        .read_to_end(&mut body)
        .await
        .map_err(|e| FrameError::Fatal(e.to_string()))?;
    if got != len {
        return Err(FrameError::Fatal(format!(
            "truncated frame: {got} of {len} bytes"
        )));
    }
    Ok(Bytes::from(body))
}

fn decode_error_code(e: &DecodeError) -> ErrorCode {
    match e {
        DecodeError::UnknownOpcode(_) => ErrorCode::UnknownOpcode,
        _ => ErrorCode::BadRequest,
    }
}

/// Accepts connections until `shutdown`, then waits for every connection to finish its
/// in-flight requests.
pub async fn serve(
    store: Arc<Store>,
    access: Arc<Access>,
    tls: Option<Arc<rustls::ServerConfig>>,
    config: &BlockServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let store = Arc::clone(&store);
                    let access = Arc::clone(&access);
                    let stop = stop_rx.clone();
                    let inflight = config.max_inflight_per_connection;
                    let tls = tls.clone();
                    conns.spawn(async move {
                        let opened = match tls {
                            None => {
                                let (r, w) = stream.into_split();
                                Ok((Box::new(r) as BoxRead, Box::new(w) as BoxWrite, None))
                            }
                            Some(c) => accept_tls(c, stream).await,
                        };
                        let result = match opened {
                            Ok((r, w, role)) => {
                                connection(store, access, r, w, role, stop, inflight).await
                            }
                            Err(e) => {
                                tracing::info!(%peer, error = %e, "connection refused");
                                return;
                            }
                        };
                        if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "connection closed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    tracing::info!("shutting down: finishing in-flight requests");
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
}

/// Roles whose certificates may open a block-protocol connection.
const CLIENT_ROLES: [Role; 3] = [Role::ControlPlane, Role::Transform, Role::HostAgent];

/// The TLS handshake, within the handshake timeout; the client's role from its certificate.
/// A client that speaks plain TCP gets one plain error frame telling it so.
async fn accept_tls(
    config: Arc<rustls::ServerConfig>,
    mut stream: TcpStream,
) -> Result<(BoxRead, BoxWrite, Option<Peer>), String> {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first))
        .await
        .map_err(|_| "nothing sent in time".to_owned())?
        .map_err(|e| e.to_string())?;
    if peeked == 1 && first[0] != TLS_HANDSHAKE {
        let msg = "this block server takes mutual TLS only (a fleet certificate: [tls] dir)";
        let _ = stream
            .write_all(&encode_response(
                0,
                &Err((ErrorCode::AccessDenied, msg.into())),
            ))
            .await;
        return Err("plain TCP client refused".into());
    }
    let (s, peer) =
        blockfleet_core::tls::accept(&config, stream, &CLIENT_ROLES, false, HANDSHAKE_TIMEOUT)
            .await
            .map_err(|e| format!("{e} (block protocol)"))?;
    let (r_half, w_half) = tokio::io::split(s);
    Ok((Box::new(r_half), Box::new(w_half), peer))
}

async fn connection(
    store: Arc<Store>,
    access: Arc<Access>,
    r: BoxRead,
    w: BoxWrite,
    peer: Option<Peer>,
    mut stop: watch::Receiver<bool>,
    max_inflight: usize,
) -> Result<(), String> {
    // Buffered both ways: pipelined requests and replies share syscalls.
    let mut r = BufReader::with_capacity(256 * 1024, r);
    let mut w = BufWriter::with_capacity(256 * 1024, w);

    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut r))
        .await
        .map_err(|_| "no hello in time".to_owned())?;
    let refuse = |message: String| encode_response(0, &Err((ErrorCode::BadRequest, message)));
    match hello.map(|b| decode_hello(&b)) {
        Ok(Ok(PROTOCOL_VERSION)) => {
            w.write_all(&encode_hello(PROTOCOL_VERSION))
                .await
                .map_err(|e| e.to_string())?;
            w.flush().await.map_err(|e| e.to_string())?;
        }
        Ok(Ok(v)) => {
            let msg = format!(
                "protocol version {v} is not supported; this server speaks {PROTOCOL_VERSION}"
            );
            let _ = w.write_all(&refuse(msg.clone())).await;
            let _ = w.flush().await;
            return Err(msg);
        }
        Ok(Err(e)) => {
            let _ = w.write_all(&refuse(format!("bad hello: {e}"))).await;
            let _ = w.flush().await;
            return Err(format!("bad hello: {e}"));
        }
        Err(FrameError::Closed) => return Ok(()),
        Err(FrameError::Fatal(e)) => return Err(e),
    }

    let (tx, mut rx) = mpsc::channel::<Bytes>(max_inflight.max(1) * 2);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if w.write_all(&frame).await.is_err() {
                return;
            }
            // Batch replies that are already queued into one syscall.
            if rx.is_empty() && w.flush().await.is_err() {
                return;
            }
        }
        let _ = w.flush().await;
    });

    // Granted by valid Authorize requests; kept until the connection closes or a revocation.
    let granted = access.connection(peer);
    let permits = Arc::new(Semaphore::new(max_inflight.max(1)));
    let mut tasks = JoinSet::new();
    let outcome = loop {
        let body = tokio::select! {
            _ = stop.changed() => break Ok(()),
            f = read_frame(&mut r) => f,
        };
        let body = match body {
            Ok(b) => b,
            Err(FrameError::Closed) => break Ok(()),
            Err(FrameError::Fatal(e)) => break Err(e),
        };
        let (id, decoded) = Request::decode_bytes(&body);
        let Some(id) = id else {
            break Err("frame too short for a request id".to_owned());
        };
        let req = match decoded {
            Ok(req) => req,
            Err(e) => {
                let reply = encode_response(id, &Err((decode_error_code(&e), e.to_string())));
                if tx.send(reply).await.is_err() {
                    break Err("writer gone".into());
                }
                continue;
            }
        };
        // Answered in order, so requests after an Authorize see its outcome.
        let refused = access.check(&granted, &req);
        if let Some(result) = refused {
            if tx.send(encode_response(id, &result)).await.is_err() {
                break Err("writer gone".into());
            }
            continue;
        }
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break Err("semaphore closed".into());
        };
        let store = Arc::clone(&store);
        let tx = tx.clone();
        tasks.spawn(async move {
            let result = store.handle(req).await.map_err(|e| (e.code, e.message));
            let _ = tx.send(encode_response(id, &result)).await;
            drop(permit);
        });
        // Reap finished tasks so the set does not grow without bound.
        while tasks.try_join_next().is_some() {}
    };
    // Graceful: requests already received finish and are answered.
    while tasks.join_next().await.is_some() {}
    drop(tx);
    let _ = writer.await;
    outcome
}
