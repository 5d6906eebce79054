//! The data port: chunk reads and writes over [`avalon_proto::data_wire`]
//! on the gRPC port. With TLS, each accepted connection is classified by
//! the ALPN its handshake settled on: `avalon-data/2` (its records are then
//! handled by [`avalon_proto::tls_records`]) or `avalon-data/1` (older
//! clients: by rustls) is a data connection; in plaintext
//! (`insecure`) by its first bytes: one that opens with the data-wire magic
//! is served here, every other one is handed to the gRPC server.
//!
//! Hostile peers: a frame must arrive whole within [`FRAME_TIMEOUT`] of its
//! first byte and a connection may idle [`IDLE_TIMEOUT`] between frames;
//! frame buffers come from a bounded pool or grow with the bytes received,
//! never with the length claimed; each
//! peer (identity, or address when plaintext) has at most
//! [`MAX_CONNS_PER_PEER`] data connections, i.e. requests in flight (one
//! at a time per connection). Client requests need chunk capabilities
//! ([`crate::authz::chunk_access`]), verified once per connection.

use crate::osd_service::OsdService;
use avalon_proto::chunk_cap::Verified;
use avalon_proto::data_wire::{self, MAGIC, MAX_REQUEST_BYTES, READ_CHUNK, WRITE_CHUNK};
use avalon_proto::pb::{ReadChunkRequest, WriteChunkRequest};
use avalon_proto::tls::{Conn, Peer, ServerTls};
use bytes::Bytes;
use futures::Stream;
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// How long a new connection may take to send its first bytes before it is
/// given to the gRPC server (which has its own timeouts) undecided.
const CLASSIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// A request frame must be complete this long after its first byte
/// (a whole-chunk write over a slow link takes far less).
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(60);

/// A data connection idle this long between requests is closed (clients
/// open a new one when a pooled one turns out closed).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Data connections (hence requests in flight) one peer may hold open.
pub const MAX_CONNS_PER_PEER: usize = 512;

/// Open data connections by peer.
#[derive(Default)]
struct PeerConns(Mutex<HashMap<String, usize>>);

/// One counted connection; uncounted when dropped.
struct PeerSlot {
    conns: Arc<PeerConns>,
    key: String,
}

impl PeerConns {
    /// A slot for a connection of `key`, unless it has `max` already.
    fn take(self: &Arc<Self>, key: String, max: usize) -> Option<PeerSlot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key.clone()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            conns: self.clone(),
            key,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut m = self.conns.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// Who counts as one peer: its identity, or its IP address in plaintext.
fn peer_key(peer: &Peer, addr: Option<std::net::SocketAddr>) -> String {
    match (&peer.identity, addr) {
        (Some(i), _) => i.name.clone(),
        (None, Some(a)) => a.ip().to_string(),
        (None, None) => String::new(),
    }
}

/// Accepts connections on `listener` until `stop`; serves data-wire ones and
/// yields the others, for the gRPC server.
pub fn incoming(
    listener: TcpListener,
    tls: ServerTls,
    svc: Arc<OsdService>,
    stop: CancellationToken,
) -> impl Stream<Item = io::Result<Conn>> {
    let (tx, rx) = mpsc::channel::<Conn>(64);
    let conns = Arc::new(PeerConns::default());
    let bodies = Arc::new(data_wire::BodyPool::default());
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                _ = stop.cancelled() => break,
                r = listener.accept() => r,
            };
            let (s, addr) = match conn {
                Ok((s, a)) => (s, a),
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
            let (conns, bodies) = (conns.clone(), bodies.clone());
            tokio::spawn(async move {
                if !tls.is_plaintext() {
                    match tls.accept(s).await {
                        Ok(c) if c.is_data() => {
                            let peer = c.peer().clone();
                            let key = peer_key(&peer, Some(addr));
                            // Counted before the hand-over: a peer over its
                            // cap costs no receive buffer.
                            let slot = conns.take(key, MAX_CONNS_PER_PEER);
                            let c = match c.into_data_records().await {
                                Ok(c) => c,
                                Err(e) => {
                                    tracing::info!(error = %e, "data connection dropped");
                                    return;
                                }
                            };
                            match slot {
                                Some(_slot) => serve(c, &peer, svc, &bodies, stop).await,
                                None => refuse_busy(c, &peer).await,
                            }
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
                    Ok(Ok(true)) => {
                        let peer = Peer::default();
                        match conns.take(peer_key(&peer, Some(addr)), MAX_CONNS_PER_PEER) {
                            Some(_slot) => serve(s, &peer, svc, &bodies, stop).await,
                            None => refuse_busy(s, &peer).await,
                        }
                    }
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

/// Answers a connection over its peer's cap with a status and closes it.
async fn refuse_busy<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, peer: &Peer) {
    tracing::warn!(peer = ?peer.identity, "data connection refused: {MAX_CONNS_PER_PEER} open already");
    let mut magic = [0u8; MAGIC.len()];
    let st = Status::resource_exhausted(format!(
        "too many data connections from this peer (at most {MAX_CONNS_PER_PEER})"
    ));
    let sent = async {
        s.read_exact(&mut magic).await?;
        data_wire::read_frame(&mut s, MAX_REQUEST_BYTES).await?;
        s.write_all(&data_wire::encode_status(&st)).await?;
        s.flush().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), sent).await;
}

/// Serves one data-wire connection: request, reply, in turn, until the
/// client closes it, sends something invalid, stalls, or the OSD stops.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    peer: &Peer,
    svc: Arc<OsdService>,
    bodies: &Arc<data_wire::BodyPool>,
    stop: CancellationToken,
) {
    let mut magic = [0u8; MAGIC.len()];
    match tokio::time::timeout(FRAME_TIMEOUT, s.read_exact(&mut magic)).await {
        Ok(Ok(_)) => {}
        _ => return,
    }
    let mut seen = Verified::default();
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => return,
            f = data_wire::read_frame_within(&mut s, bodies, MAX_REQUEST_BYTES, IDLE_TIMEOUT, FRAME_TIMEOUT) => f,
        };
        let (kind, payload) = match frame {
            Ok(f) => f,
            Err(e) => {
                if !matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::TimedOut
                ) {
                    let st = Status::invalid_argument(format!("data port: {e}"));
                    let _ = s.write_all(&data_wire::encode_status(&st)).await;
                }
                return;
            }
        };
        let sent = match kind {
            READ_CHUNK => read(&mut s, peer, &mut seen, &svc, payload).await,
            WRITE_CHUNK => {
                let reply = match <WriteChunkRequest as prost::Message>::decode(payload) {
                    // The data fields are slices of the frame: no copy.
                    Ok(req) => {
                        let ino = req.chunk.as_ref().map_or(0, |c| c.ino);
                        let allowed = crate::authz::write(peer, &req).and_then(|()| {
                            svc.chunk_access(peer, req.header.as_ref(), ino, true, Some(&mut seen))
                        });
                        match allowed {
                            Ok(()) => svc.write(req).await.map_err(Status::from),
                            Err(st) => Err(st),
                        }
                    }
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
    peer: &Peer,
    seen: &mut Verified,
    svc: &OsdService,
    payload: Bytes,
) -> io::Result<()> {
    let reply = match <ReadChunkRequest as prost::Message>::decode(payload) {
        Ok(req) => {
            let ino = req.chunk.as_ref().map_or(0, |c| c.ino);
            match svc.chunk_access(peer, req.header.as_ref(), ino, false, Some(seen)) {
                Ok(()) => svc.read(req, false).await.map_err(Status::from),
                Err(st) => Err(st),
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_counted_per_peer_and_released() {
        let conns = Arc::new(PeerConns::default());
        let a: Vec<_> = (0..3)
            .filter_map(|_| conns.take("client.a".into(), 3))
            .collect();
        assert_eq!(a.len(), 3);
        assert!(conns.take("client.a".into(), 3).is_none(), "over the cap");
        assert!(
            conns.take("client.b".into(), 3).is_some(),
            "others unaffected"
        );
        drop(a);
        assert!(conns.take("client.a".into(), 3).is_some(), "released");
        assert!(conns.0.lock().unwrap().get("client.b").is_none());
    }
}
