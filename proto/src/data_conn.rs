//! Pooled connections to the OSDs' data ports ([`crate::data_wire`]): the
//! caller's own task writes the request and reads the reply, so a chunk
//! read or write costs one loopback round trip and no task hand-offs. Used
//! by clients (reads, writes to a chunk's primary) and by primaries
//! (writes forwarded to replicas).

use crate::data_wire::{self, MAGIC, READ_CHUNK};
use crate::pb::{ReadChunkRequest, WriteChunkReply, WriteChunkRequest};
use crate::tls::{ClientTls, Conn};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tonic::Status;

/// Connecting to an OSD gives up after this long (as the gRPC channels do).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A read gives up after this long; it then goes to another replica.
/// Generous: a 4 MiB read on a busy disk takes well under a second.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle connections kept per OSD (more are opened while requests overlap).
const IDLE_PER_OSD: usize = 16;

/// Room in a reply frame beyond the data asked for (an error's message).
const REPLY_SLACK: usize = 64 << 10;

/// The pool: idle connections by OSD address.
pub struct DataConns {
    idle: Mutex<HashMap<String, Vec<Conn>>>,
    tls: ClientTls,
}

impl DataConns {
    /// An empty pool whose connections use `tls` (connections stay open
    /// across requests: one handshake per connection).
    pub fn new(tls: ClientTls) -> DataConns {
        DataConns {
            idle: Mutex::default(),
            tls,
        }
    }

    /// Reads a chunk range from the OSD at `addr`: the chunk's version and
    /// bytes, or the OSD's status (transport failures are `Unavailable`).
    pub async fn read_chunk(
        &self,
        addr: &str,
        req: &ReadChunkRequest,
    ) -> Result<(u64, Bytes), Status> {
        let frame = [Bytes::from(data_wire::encode_request(READ_CHUNK, req))];
        let max = 1 + 8 + req.length as usize + REPLY_SLACK;
        let (kind, payload) = self.exchange(addr, &frame, max, READ_TIMEOUT).await?;
        data_wire::decode_read_reply(kind, payload)
    }

    /// Sends a chunk write to the OSD at `addr` and waits at most `timeout`
    /// for its answer (transport failures and silence are `Unavailable`).
    pub async fn write_chunk(
        &self,
        addr: &str,
        req: &WriteChunkRequest,
        timeout: Duration,
    ) -> Result<WriteChunkReply, Status> {
        // The data is not copied: it is written from the request's buffers.
        let frame = data_wire::write_request_parts(req);
        let (kind, payload) = self.exchange(addr, &frame, REPLY_SLACK, timeout).await?;
        data_wire::decode_write_reply(kind, payload)
    }

    /// Sends `frame` (its parts in order) and reads the reply frame (at most `max` bytes). A
    /// pooled connection may have been closed by the OSD (a restart): one
    /// more try on a fresh connection. Reads are idempotent, and so is a
    /// write sent again (the same bytes at the same place; a client has one
    /// write per chunk in flight, and retries failed ones anyway).
    async fn exchange(
        &self,
        addr: &str,
        frame: &[Bytes],
        max: usize,
        timeout: Duration,
    ) -> Result<(u8, Bytes), Status> {
        let mut pooled = self.checkout(addr);
        loop {
            let reused = pooled.is_some();
            let mut conn = match pooled.take() {
                Some(c) => c,
                None => self.connect(addr).await?,
            };
            let sent = tokio::time::timeout(timeout, async {
                if !reused {
                    conn.write_all(MAGIC).await?;
                }
                data_wire::write_parts(&mut conn, frame).await?;
                // A TLS connection sends what it buffered only on a flush.
                conn.flush().await?;
                data_wire::read_frame(&mut conn, max).await
            })
            .await;
            match sent {
                Ok(Ok(reply)) => {
                    self.checkin(addr, conn);
                    return Ok(reply);
                }
                Ok(Err(_)) if reused => continue,
                Ok(Err(e)) => {
                    return Err(Status::unavailable(format!("OSD {addr} data port: {e}")))
                }
                Err(_) => {
                    return Err(Status::unavailable(format!(
                        "OSD {addr} data port: no reply within {timeout:?}"
                    )))
                }
            }
        }
    }

    async fn connect(&self, addr: &str) -> Result<Conn, Status> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.tls.connect_data(addr))
            .await
            .map_err(|_| Status::unavailable(format!("OSD {addr}: connect timed out")))?
            .map_err(|e| Status::unavailable(format!("OSD {addr}: {e}")))
    }

    fn checkout(&self, addr: &str) -> Option<Conn> {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(addr)
            .and_then(Vec::pop)
    }

    fn checkin(&self, addr: &str, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        match idle.get_mut(addr) {
            Some(v) if v.len() < IDLE_PER_OSD => v.push(conn),
            Some(_) => {}
            None => {
                idle.insert(addr.to_string(), vec![conn]);
            }
        }
    }
}
