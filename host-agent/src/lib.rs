//! The host agent: what an instance sees. It serves one volume over NBD (fixed newstyle) and
//! keeps the volume's key; block servers see only ciphertext.
//!
//! - `blockfleet_nbd`: protocol constants, parsers and framing.
//! - [`volume`]: the crypto data path to the block servers (through the replica set).
//! - [`placement`]: follows placement changes (drains) and reports replica health.
//!
//! Per connection: the option handshake (EXPORT_NAME, INFO, GO, LIST, ABORT,
//! STRUCTURED_REPLY), then a reader that parses requests and runs each as its own task (at most
//! 64 at once) and a writer that sends replies in completion order. A malformed header or an
//! oversized write loses framing: that connection closes, others go on.

pub mod placement;
pub mod volume;

use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use blockfleet_nbd::*;
pub use placement::follow_placement;
pub use volume::{AgentMetrics, AgentVolume, Fetcher};

const MAX_INFLIGHT: usize = 64;

/// Serves `volume` over NBD on `listener` until `shutdown`; then lets connections finish and
/// flushes.
pub async fn run(
    volume: Arc<AgentVolume>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => match a {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let v = Arc::clone(&volume);
                    conns.spawn(async move {
                        if let Err(e) = connection(v, stream).await {
                            tracing::debug!(%peer, error = %e, "nbd connection closed");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    if let Err(e) = volume.flush().await {
        tracing::warn!(errno = e, "flush at shutdown failed");
    }
}

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_owned())
}

/// The option phase. Returns whether structured replies were negotiated, or `None` if the
/// client ended the session.
async fn handshake(
    vol: &AgentVolume,
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: &mut BufWriter<tokio::net::tcp::OwnedWriteHalf>,
) -> std::io::Result<Option<bool>> {
    w.write_all(&NBDMAGIC.to_be_bytes()).await?;
    w.write_all(&IHAVEOPT.to_be_bytes()).await?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
        .await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(invalid("unknown client flags"));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    let export_info = || {
        let mut b = Vec::with_capacity(12);
        b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        b.extend_from_slice(&vol.size().to_be_bytes());
        b.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
        b
    };
    loop {
        if r.read_u64().await? != IHAVEOPT {
            return Err(invalid("bad option magic"));
        }
        let option = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION {
            return Err(invalid("option too long"));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        let known = |name: &[u8]| name.is_empty() || name == vol.name().as_bytes();
        match option {
            OPT_EXPORT_NAME => {
                if !known(&data) {
                    return Err(invalid("unknown export"));
                }
                w.write_all(&vol.size().to_be_bytes()).await?;
                w.write_all(&TRANSMISSION_FLAGS.to_be_bytes()).await?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124]).await?;
                }
                w.flush().await?;
                return Ok(Some(structured));
            }
            OPT_ABORT => {
                option_reply(w, option, REP_ACK, &[]).await?;
                w.flush().await?;
                return Ok(None);
            }
            OPT_LIST if len != 0 => {
                option_reply(w, option, REP_ERR_INVALID, b"LIST takes no data").await?
            }
            OPT_LIST => {
                let name = vol.name().as_bytes();
                let mut b = (name.len() as u32).to_be_bytes().to_vec();
                b.extend_from_slice(name);
                option_reply(w, option, REP_SERVER, &b).await?;
                option_reply(w, option, REP_ACK, &[]).await?;
            }
            OPT_STRUCTURED_REPLY if len != 0 => {
                option_reply(
                    w,
                    option,
                    REP_ERR_INVALID,
                    b"STRUCTURED_REPLY takes no data",
                )
                .await?
            }
            OPT_STRUCTURED_REPLY => {
                structured = true;
                option_reply(w, option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                None => option_reply(w, option, REP_ERR_INVALID, b"malformed INFO/GO").await?,
                Some(name) if !known(name) => {
                    option_reply(w, option, REP_ERR_UNKNOWN, b"no such export").await?
                }
                Some(_) => {
                    option_reply(w, option, REP_INFO, &export_info()).await?;
                    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    bs.extend_from_slice(&1u32.to_be_bytes());
                    bs.extend_from_slice(&4096u32.to_be_bytes());
                    bs.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                    option_reply(w, option, REP_INFO, &bs).await?;
                    option_reply(w, option, REP_ACK, &[]).await?;
                    if option == OPT_GO {
                        w.flush().await?;
                        return Ok(Some(structured));
                    }
                }
            },
            _ => option_reply(w, option, REP_ERR_UNSUP, b"option not supported").await?,
        }
        w.flush().await?;
    }
}

/// A reply: the header bytes and, for a successful READ, the data.
type Reply = (Vec<u8>, Option<Vec<u8>>);

fn reply(cookie: u64, structured: bool, result: Result<Option<(u64, Vec<u8>)>, u32>) -> Reply {
    match (structured, result) {
        (false, Ok(data)) => (simple_reply(cookie, 0), data.map(|(_, d)| d)),
        (false, Err(e)) => (simple_reply(cookie, e), None),
        (true, Ok(None)) => (structured_header(cookie, REPLY_FLAG_DONE, 0, 0), None),
        (true, Ok(Some((offset, data)))) => {
            let mut h = structured_header(
                cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                8 + data.len() as u32,
            );
            h.extend_from_slice(&offset.to_be_bytes());
            (h, Some(data))
        }
        (true, Err(e)) => {
            let mut h = structured_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6);
            h.extend_from_slice(&e.to_be_bytes());
            h.extend_from_slice(&0u16.to_be_bytes());
            (h, None)
        }
    }
}

async fn connection(vol: Arc<AgentVolume>, stream: TcpStream) -> std::io::Result<()> {
    let (r, w) = stream.into_split();
    let mut r = BufReader::with_capacity(256 * 1024, r);
    let mut w = BufWriter::with_capacity(256 * 1024, w);
    let Some(structured) = handshake(&vol, &mut r, &mut w).await? else {
        return Ok(());
    };
    vol.metrics
        .connections
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Reply>(MAX_INFLIGHT * 2);
    let writer = tokio::spawn(async move {
        while let Some((head, data)) = rx.recv().await {
            if w.write_all(&head).await.is_err() {
                return;
            }
            if let Some(d) = data {
                if w.write_all(&d).await.is_err() {
                    return;
                }
            }
            if rx.is_empty() && w.flush().await.is_err() {
                return;
            }
        }
        let _ = w.flush().await;
    });
    let permits = Arc::new(Semaphore::new(MAX_INFLIGHT));
    let mut tasks = JoinSet::new();
    let outcome = loop {
        let req = match read_request(&mut r).await {
            Ok(q) => q,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        };
        let mut payload = None;
        if req.kind == CMD_WRITE {
            if req.length > MAX_PAYLOAD {
                break Err(invalid("write larger than the advertised maximum"));
            }
            let mut d = vec![0u8; req.length as usize];
            r.read_exact(&mut d).await?;
            payload = Some(d);
        }
        if req.kind == CMD_DISC {
            break Ok(());
        }
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break Ok(());
        };
        let (vol, tx) = (Arc::clone(&vol), tx.clone());
        tasks.spawn(async move {
            let started = std::time::Instant::now();
            let fua = req.flags & CMD_FLAG_FUA != 0;
            let known_flags = req.flags & !(CMD_FLAG_FUA | (1 << 1)) == 0;
            let result = if !known_flags {
                Err(EINVAL)
            } else {
                match req.kind {
                    CMD_READ if req.length == 0 || req.length > MAX_PAYLOAD => Err(EINVAL),
                    CMD_READ => vol
                        .read(req.offset, req.length)
                        .await
                        .map(|d| Some((req.offset, d))),
                    CMD_WRITE => vol
                        .write(req.offset, u64::from(req.length), payload.as_deref(), fua)
                        .await
                        .map(|()| None),
                    CMD_WRITE_ZEROES | CMD_TRIM => vol
                        .write(req.offset, u64::from(req.length), None, fua)
                        .await
                        .map(|()| None),
                    CMD_FLUSH => vol.flush().await.map(|()| None),
                    CMD_CACHE => vol
                        .check(req.offset, u64::from(req.length), false)
                        .map(|()| None),
                    _ => Err(EINVAL),
                }
            };
            let op = match req.kind {
                CMD_READ => 0,
                CMD_WRITE => 1,
                CMD_FLUSH => 2,
                CMD_TRIM => 3,
                CMD_WRITE_ZEROES => 4,
                CMD_CACHE => 5,
                _ => 6,
            };
            vol.metrics
                .ops
                .record(op, result.is_ok(), started.elapsed());
            if result.is_ok() {
                let counter = match req.kind {
                    CMD_READ => Some(&vol.metrics.bytes_read),
                    CMD_WRITE => Some(&vol.metrics.bytes_written),
                    _ => None,
                };
                if let Some(c) = counter {
                    c.fetch_add(u64::from(req.length), std::sync::atomic::Ordering::Relaxed);
                }
            }
            let _ = tx.send(reply(req.cookie, structured, result)).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    };
    while tasks.join_next().await.is_some() {}
    drop(tx);
    let _ = writer.await;
    outcome
}
