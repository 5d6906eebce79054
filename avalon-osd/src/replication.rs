//! Primary-side replication: version a write, store it locally, forward it
//! to the other members of the chunk's placement group in parallel, and
//! answer once the write quorum holds it.

use crate::chunk_store::{ChunkStore, StoreError, VersionMode};
use crate::error::OsdError;
use crate::membership::Membership;
use avalon_proto::limits::MAX_MESSAGE_BYTES;
use avalon_proto::mds_conn::channel;
use avalon_proto::pb::osd_client::OsdClient;
use avalon_proto::pb::{ChunkId, OsdState, WriteChunkReply, WriteChunkRequest};
use avalon_proto::placement::chunk_members;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tonic::transport::Channel;
use tonic::Status;

/// gRPC clients of peer OSDs, cached by address.
pub struct Peers {
    clients: Mutex<HashMap<String, OsdClient<Channel>>>,
    timeout: Duration,
}

impl Peers {
    /// A cache whose forwarded calls time out after `timeout`.
    pub fn new(timeout: Duration) -> Peers {
        Peers {
            clients: Mutex::new(HashMap::new()),
            timeout,
        }
    }

    fn client(&self, addr: &str) -> Result<OsdClient<Channel>, Status> {
        let mut g = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = g.get(addr) {
            return Ok(c.clone());
        }
        let c = OsdClient::new(channel(addr, Duration::from_secs(2))?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        g.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Sends a forwarded write to the OSD at `addr`.
    pub async fn forward(
        &self,
        addr: &str,
        req: WriteChunkRequest,
    ) -> Result<WriteChunkReply, Status> {
        let mut c = self.client(addr)?;
        let mut r = tonic::Request::new(req);
        r.set_timeout(self.timeout);
        match tokio::time::timeout(self.timeout, c.write_chunk(r)).await {
            Ok(res) => res.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }
}

/// Writes as primary and replicates.
pub struct Replicator {
    pub store: Arc<ChunkStore>,
    pub membership: Arc<Membership>,
    pub peers: Arc<Peers>,
    /// Woken after every applied write (replicas waiting for an earlier
    /// version of a chunk recheck).
    pub applied: Arc<Notify>,
    /// How long a replica waits for a missing earlier version.
    pub reorder_wait: Duration,
}

type Outcome = (u64, String, Result<(), String>);

impl Replicator {
    /// Handles a client write (`forwarded == false`) to chunk
    /// `(ino, index)`; `chunk_size` is already validated.
    pub async fn write_primary(
        &self,
        req: WriteChunkRequest,
        ino: u64,
        index: u64,
        chunk_size: u32,
    ) -> Result<WriteChunkReply, OsdError> {
        let map = self.membership.map_at_least(req.map_epoch).await?;
        let me = self.membership.osd_id();
        let members = chunk_members(&map, ino, index);
        if !members.iter().any(|o| o.id == me) {
            return Err(OsdError::StaleMap(format!(
                "OSD {me} holds no replica of chunk {ino:016x}/{index:016x} in cluster map epoch {} \
                 (request placed with epoch {}); refresh the map",
                map.epoch, req.map_epoch
            )));
        }
        let mut skipped = Vec::new();
        let mut targets = Vec::new();
        for o in members.iter().filter(|o| o.id != me) {
            if o.state == OsdState::Up as i32 {
                targets.push((o.id, o.addr.clone()));
            } else {
                skipped.push(format!("osd {} ({}) is not up", o.id, o.addr));
            }
        }
        let need = (map.write_quorum.max(1) as usize).min(1 + targets.len()) as u32;

        let data = req.data.clone();
        let offset = req.offset;
        let outcome = self
            .store
            .blocking(move |s| {
                s.write(
                    ino,
                    index,
                    offset,
                    &data,
                    chunk_size,
                    VersionMode::Next,
                    false,
                )
            })
            .await?;
        self.applied.notify_waiters();
        let version = outcome.version;

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
        let mut acks: u32 = 0;
        if req.sync {
            let store = Arc::clone(&self.store);
            let tx = tx.clone();
            let addr = self.membership.addr().to_string();
            tokio::spawn(async move {
                let r = store
                    .blocking(move |s| s.sync_chunk(ino, index))
                    .await
                    .map_err(|e| e.to_string());
                let _ = tx.send((me, addr, r));
            });
        } else {
            acks = 1;
        }
        for (id, addr) in targets {
            let fwd = WriteChunkRequest {
                header: req.header.clone(),
                chunk: Some(ChunkId { ino, index }),
                offset: req.offset,
                data: req.data.clone(),
                sync: req.sync,
                map_epoch: map.epoch,
                forwarded: true,
                version,
                chunk_size,
            };
            let peers = Arc::clone(&self.peers);
            let tx = tx.clone();
            tokio::spawn(async move {
                let r = peers
                    .forward(&addr, fwd)
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()));
                if let Err(e) = &r {
                    tracing::warn!(osd = id, %addr, ino, index, version, error = %e,
                        "replica missed a write");
                }
                let _ = tx.send((id, addr, r));
            });
        }
        drop(tx);

        let mut failures = skipped;
        while acks < need {
            match rx.recv().await {
                Some((_, _, Ok(()))) => acks += 1,
                Some((id, addr, Err(e))) => failures.push(format!("osd {id} ({addr}): {e}")),
                None => break,
            }
        }
        if acks < need {
            return Err(OsdError::Quorum {
                acks,
                need,
                detail: failures.join("; "),
            });
        }
        // Count copies that are already done; the rest finish in the background.
        while let Ok((_, _, r)) = rx.try_recv() {
            if r.is_ok() {
                acks += 1;
            }
        }
        Ok(WriteChunkReply { version, acks })
    }

    /// Handles a forwarded write: store exactly the primary's version,
    /// waiting a bounded time for earlier versions that are still in flight.
    pub async fn write_replica(
        &self,
        req: WriteChunkRequest,
        ino: u64,
        index: u64,
        chunk_size: u32,
    ) -> Result<WriteChunkReply, OsdError> {
        if req.version == 0 {
            return Err(OsdError::InvalidArgument(
                "a forwarded write needs a version > 0".into(),
            ));
        }
        let deadline = tokio::time::Instant::now() + self.reorder_wait;
        loop {
            let notified = self.applied.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let force = tokio::time::Instant::now() >= deadline;
            let data = req.data.clone();
            let (offset, version, sync) = (req.offset, req.version, req.sync);
            let mode = VersionMode::Exact { version, force };
            let r = self
                .store
                .blocking(move |s| s.write(ino, index, offset, &data, chunk_size, mode, sync))
                .await;
            match r {
                Ok(o) => {
                    self.applied.notify_waiters();
                    if o.duplicate {
                        tracing::debug!(
                            ino,
                            index,
                            version,
                            "re-applied a write of the stored version"
                        );
                    }
                    if force {
                        tracing::warn!(ino, index, version, "applied a write after a version gap");
                    }
                    return Ok(WriteChunkReply {
                        version: o.version,
                        acks: 1,
                    });
                }
                Err(StoreError::VersionGap { .. }) => {
                    let _ = tokio::time::timeout_at(deadline, notified).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
