//! The data port: chunk reads and writes over [`avalon_proto::data_wire`]
//! on the gRPC port. With TLS, each accepted connection is classified by
//! the ALPN its handshake settled on ([`tls::ALPN_DATA`]); in plaintext
//! (`insecure`) by its first bytes: one that opens with the data-wire magic
//! is served here, every other one is handed to the gRPC server.

use crate::osd_service::OsdService;
use avalon_proto::data_wire::{self, MAGIC, MAX_REQUEST_BYTES, READ_CHUNK, WRITE_CHUNK};
use avalon_proto::pb::{ReadChunkRequest, WriteChunkRequest};
use avalon_proto::tls::{self, Conn, Peer, ServerTls};
use bytes::Bytes;
use futures::Stream;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// How long a new connection may take to send its first bytes before it is
/// given to the gRPC server (which has its own timeouts) undecided.
const CLASSIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on `listener` until `stop`; serves data-wire ones and
/// yields the others, for the gRPC server.
pub fn incoming(
    listener: TcpListener,
    tls: ServerTls,
    svc: Arc<OsdService>,
    stop: CancellationToken,
) -> impl Stream<Item = io::Result<Conn>> {
    let (tx, rx) = mpsc::channel::<Conn>(64);
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                _ = stop.cancelled() => break,
                r = listener.accept() => r,
            };
            let s = match conn {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors and the like: pass, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Small replies (acks, 4 KiB reads) must not wait for Nagle.
            let _ = s.set_nodelay(true);
            let (tx, svc, stop, tls) = (tx.clone(), svc.clone(), stop.clone(), tls.clone());
            tokio::spawn(async move {
                if !tls.is_plaintext() {
                    match tls.accept(s).await {
                        Ok(c) if c.alpn() == Some(tls::ALPN_DATA) => {
                            let peer = c.peer().clone();
                            serve(c, &peer, svc, stop).await
                        }
                        Ok(c) => {
                            let _ = tx.send(c).await;
                        }
                        Err(e) => tracing::info!(error = %e, "refused connection"),
                    }
                    return;
                }
                let data = tokio::time::timeout(CLASSIFY_TIMEOUT, speaks_data_wire(&s)).await;
                match data {
                    Ok(Ok(true)) => serve(s, &Peer::default(), svc, stop).await,
                    Ok(Err(_)) => {}
                    Ok(Ok(false)) | Err(_) => {
                        let _ = tx.send(Conn::plain(s)).await;
                    }
                }
            });
        }
    });
    futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|s| (Ok(s), rx)) },
    )
}

/// True if the connection's first bytes are the data-wire magic (decided as
/// soon as a byte differs: HTTP/2 opens with "PRI *").
async fn speaks_data_wire(s: &TcpStream) -> io::Result<bool> {
    let mut buf = [0u8; MAGIC.len()];
    loop {
        let n = s.peek(&mut buf).await?;
        if n == 0 || buf[..n] != MAGIC[..n] {
            return Ok(false);
        }
        if n == MAGIC.len() {
            return Ok(true);
        }
        // Part of the magic so far (peek does not wait for more).
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Serves one data-wire connection: request, reply, in turn, until the
/// client closes it, sends something invalid, or the OSD stops.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    peer: &Peer,
    svc: Arc<OsdService>,
    stop: CancellationToken,
) {
    let mut magic = [0u8; MAGIC.len()];
    if s.read_exact(&mut magic).await.is_err() {
        return;
    }
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => return,
            f = data_wire::read_frame(&mut s, MAX_REQUEST_BYTES) => f,
        };
        let (kind, payload) = match frame {
            Ok(f) => f,
            Err(e) => {
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    let st = Status::invalid_argument(format!("data port: {e}"));
                    let _ = s.write_all(&data_wire::encode_status(&st)).await;
                }
                return;
            }
        };
        let sent = match kind {
            READ_CHUNK => read(&mut s, &svc, payload).await,
            WRITE_CHUNK => {
                let reply = match <WriteChunkRequest as prost::Message>::decode(payload) {
                    // The data fields are slices of the frame: no copy.
                    Ok(req) => match crate::authz::write(peer, &req) {
                        Ok(()) => svc.write(req).await.map_err(Status::from),
                        Err(st) => Err(st),
                    },
                    Err(e) => Err(Status::invalid_argument(format!(
                        "data port: bad WriteChunkRequest: {e}"
                    ))),
                };
                let frame = match reply {
                    Ok(r) => data_wire::encode_reply(&r),
                    Err(st) => data_wire::encode_status(&st),
                };
                s.write_all(&frame).await
            }
            _ => {
                let st = Status::unimplemented(format!("data port: unknown request kind {kind}"));
                let _ = s.write_all(&data_wire::encode_status(&st)).await;
                return;
            }
        };
        // TLS keeps what did not fit the socket in its own buffer until
        // a flush: without one a reply can sit there until the next one.
        if sent.is_err() || s.flush().await.is_err() {
            return;
        }
    }
}

/// Serves one chunk read and sends its reply.
async fn read<S: AsyncWrite + Unpin>(
    s: &mut S,
    svc: &OsdService,
    payload: Bytes,
) -> io::Result<()> {
    let reply = match <ReadChunkRequest as prost::Message>::decode(payload) {
        Ok(req) => svc.read(req, false).await.map_err(Status::from),
        Err(e) => Err(Status::invalid_argument(format!(
            "data port: bad ReadChunkRequest: {e}"
        ))),
    };
    match reply {
        Ok(r) => {
            let head = data_wire::ok_header(r.version, r.data.len());
            // One vectored write: header and data leave in one segment.
            let mut out = bytes::Buf::chain(&head[..], r.data);
            s.write_all_buf(&mut out).await
        }
        Err(st) => s.write_all(&data_wire::encode_status(&st)).await,
    }
}
