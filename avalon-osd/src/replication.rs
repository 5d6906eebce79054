//! Primary-side replication: version a write, store it locally, forward it
//! to the other members of the chunk's placement group in parallel, and
//! answer once the write quorum holds it.

use crate::chunk_store::{ChunkStore, Payload, StoreError, VersionMode};
use crate::chunk_version;
use crate::disk_space::DiskSpace;
use crate::error::OsdError;
use crate::membership::Membership;
use crate::recovery::{Recovery, INTERNAL_KEY};
use avalon_proto::data_conn::DataConns;
use avalon_proto::errno::{errno_of, has_errno};
use avalon_proto::limits::{MAX_CHUNK_SIZE, MAX_MESSAGE_BYTES};
use avalon_proto::pb::osd_client::OsdClient;
use avalon_proto::pb::{
    ChunkId, ListChunksReply, ListChunksRequest, OsdState, ReadChunkReply, ReadChunkRequest,
    ReadCopyReply, ReadCopyRequest, WriteChunkReply, WriteChunkRequest,
};
use avalon_proto::placement::{chunk_members, pg_of};
use avalon_proto::request_id::{Stamp, Traced};
use avalon_proto::tls::{ClientTls, Dial};
use avalon_proto::version::FEATURE_EPOCH_VERSIONS;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tonic::Status;

/// Connections to peer OSDs: gRPC clients cached by address, and pooled
/// data-port connections for forwarded writes.
pub struct Peers {
    clients: Mutex<HashMap<String, OsdClient<Traced>>>,
    /// Feature bits each peer (by address) sent with its last chunk list.
    features: Mutex<HashMap<String, u64>>,
    data: DataConns,
    timeout: Duration,
    tls: ClientTls,
}

impl Peers {
    /// A cache whose forwarded calls time out after `timeout`, connecting
    /// with `tls` (this OSD's key).
    pub fn new(timeout: Duration, tls: ClientTls) -> Peers {
        Peers {
            clients: Mutex::new(HashMap::new()),
            features: Mutex::new(HashMap::new()),
            data: DataConns::new(tls.clone()),
            timeout,
            tls,
        }
    }

    fn client(&self, addr: &str) -> Result<OsdClient<Traced>, Status> {
        let mut g = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = g.get(addr) {
            return Ok(c.clone());
        }
        // Calls made for a request carry its id (recovery's, fresh ones).
        let ch = self.tls.channel(addr, Dial::Osd, Duration::from_secs(2))?;
        let c = OsdClient::with_interceptor(ch, Stamp)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        g.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Does the OSD at `addr` have feature `bit`, as its last chunk list
    /// said? Peering lists every member before a PG takes writes, so a
    /// primary knows its replicas' features when it writes.
    pub fn supports(&self, addr: &str, bit: u64) -> bool {
        let g = self.features.lock().unwrap_or_else(|e| e.into_inner());
        g.get(addr).is_some_and(|f| f & bit != 0)
    }

    fn note_features(&self, addr: &str, features: u64) {
        let mut g = self.features.lock().unwrap_or_else(|e| e.into_inner());
        if g.get(addr) != Some(&features) {
            g.insert(addr.to_string(), features);
        }
    }

    /// Sends a forwarded write to the OSD at `addr` (over its data port).
    pub async fn forward(
        &self,
        addr: &str,
        req: WriteChunkRequest,
    ) -> Result<WriteChunkReply, Status> {
        self.data.write_chunk(addr, &req, self.timeout).await
    }
}

impl Peers {
    fn internal<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(timeout);
        r.metadata_mut().insert(
            INTERNAL_KEY,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        r
    }

    /// Reads a chunk range from a peer, bypassing its peering gate (the
    /// reply's version tells how current it is).
    pub async fn read_internal(
        &self,
        addr: &str,
        ino: u64,
        index: u64,
        offset: u32,
        length: u32,
        timeout: Duration,
    ) -> Result<ReadChunkReply, Status> {
        let mut c = self.client(addr)?;
        let req = ReadChunkRequest {
            header: None,
            chunk: Some(ChunkId { ino, index }),
            offset,
            length,
            map_epoch: 0,
            snap_id: 0,
        };
        match tokio::time::timeout(timeout, c.read_chunk(Self::internal(req, timeout))).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {timeout:?}"
            ))),
        }
    }

    /// A whole copy of a chunk's head (`clone_seq` 0) or of one of its
    /// snapshot clones from a peer, with its snapshot stamp.
    pub async fn read_copy_internal(
        &self,
        addr: &str,
        ino: u64,
        index: u64,
        clone_seq: u64,
        timeout: Duration,
    ) -> Result<ReadCopyReply, Status> {
        let mut c = self.client(addr)?;
        let req = ReadCopyRequest {
            chunk: Some(ChunkId { ino, index }),
            clone_seq,
            offset: 0,
            length: MAX_CHUNK_SIZE,
        };
        match tokio::time::timeout(timeout, c.read_copy(Self::internal(req, timeout))).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {timeout:?}"
            ))),
        }
    }

    /// The chunks a peer stores in one PG.
    pub async fn list_pg_internal(
        &self,
        addr: &str,
        pg: u32,
        pg_count: u32,
    ) -> Result<ListChunksReply, Status> {
        let req = ListChunksRequest {
            header: None,
            pg,
            pg_count,
            all: false,
            map_epoch: 0,
        };
        self.list(addr, req).await
    }

    /// Every chunk a peer stores, with versions and digests, and the PGs
    /// it serves, once the peer has a map at least as new as `map_epoch`
    /// (the one this OSD peers under).
    pub async fn list_internal(
        &self,
        addr: &str,
        map_epoch: u64,
    ) -> Result<ListChunksReply, Status> {
        let req = ListChunksRequest {
            header: None,
            pg: 0,
            pg_count: 0,
            all: true,
            map_epoch,
        };
        self.list(addr, req).await
    }

    async fn list(&self, addr: &str, req: ListChunksRequest) -> Result<ListChunksReply, Status> {
        let timeout = Duration::from_secs(30);
        let mut c = self.client(addr)?;
        match tokio::time::timeout(timeout, c.list_chunks(Self::internal(req, timeout))).await {
            Ok(r) => {
                let reply = r?.into_inner();
                self.note_features(addr, reply.features);
                Ok(reply)
            }
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {timeout:?}"
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
    /// Peering state: gates client writes, records chunks that missed one.
    pub recovery: Arc<Recovery>,
    /// Full disks: refuses client writes to PGs with a full member.
    pub space: Arc<DiskSpace>,
}

/// The member that takes a chunk's writes: the first one up.
fn acting_primary(members: &[&avalon_proto::pb::OsdInfo]) -> Option<u64> {
    members
        .iter()
        .find(|o| o.state == OsdState::Up as i32)
        .map(|o| o.id)
}

/// What a (validated) write request stores, in order.
fn items(req: &WriteChunkRequest) -> Vec<(u32, Payload<'_>)> {
    if let Some(keep) = req.truncate_to {
        vec![(keep, Payload::Cut)]
    } else if !req.extents.is_empty() {
        req.extents
            .iter()
            .map(|e| (e.offset, Payload::Data(&e.data)))
            .collect()
    } else if req.data.is_empty() && req.zero_length > 0 {
        vec![(req.offset, Payload::Zero(req.zero_length))]
    } else {
        vec![(req.offset, Payload::Data(&req.data))]
    }
}

/// Why one copy of a write failed; `no_space` when it was ENOSPC/EDQUOT.
struct Failure {
    msg: String,
    no_space: bool,
}

type Outcome = (u64, String, Result<(), Failure>);

fn is_no_space(errno: i32) -> bool {
    errno == libc::ENOSPC || errno == libc::EDQUOT
}

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
        // One primary per chunk and map: a member that is not the acting
        // primary (the first up member) would write beside it, and two
        // histories under one epoch cannot be ordered (chunk_version.rs).
        // The client refreshes its map and asks again.
        let acting = acting_primary(&members);
        if acting != Some(me) && members.iter().any(|o| o.id == me) {
            return Err(OsdError::StaleMap(format!(
                "OSD {me} is not the primary of chunk {ino:016x}/{index:016x} in cluster map \
                 epoch {}: {}",
                map.epoch,
                acting.map_or("no member is up".to_string(), |a| format!("OSD {a} is"))
            )));
        }
        self.recovery.admit(&map, ino, index).await?;
        // Before anything is stored: the primary decides for the whole PG
        // (a replica stores what its primary stored). Zeroing (punch hole)
        // only frees space within what is stored: served at full, too.
        let zeroing = req.data.is_empty() && req.extents.is_empty();
        if !zeroing {
            self.space.admit_write(me, &members)?;
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
        // m of the n members must hold the write, whether or not the others
        // are up (a cluster smaller than n needs all of its members).
        let need = (map.write_quorum.max(1) as usize).min(members.len()) as u32;
        if 1 + targets.len() < need as usize {
            return Err(OsdError::Quorum {
                acks: 0,
                need,
                detail: skipped.join("; "),
            });
        }

        // The map epoch goes into the version only when every replica
        // written to compares such versions: an older one would take the
        // jump for missed writes.
        let stamp = targets
            .iter()
            .all(|(_, addr)| self.peers.supports(addr, FEATURE_EPOCH_VERSIONS));
        let mode = if stamp {
            VersionMode::NextIn { epoch: map.epoch }
        } else {
            VersionMode::Next
        };
        let r = req.clone();
        let outcome = self
            .store
            .blocking(move |s| {
                s.apply_items_snap(ino, index, &items(&r), chunk_size, mode, false, r.snap_seq)
            })
            .await?;
        self.applied.notify_waiters();
        let version = outcome.version;
        if outcome.unchanged {
            // A cut of a chunk already that short (or absent): no version
            // taken, nothing to replicate. A member holding more at this
            // version cannot exist; one behind catches up by peering.
            return Ok(WriteChunkReply {
                version,
                acks: need,
            });
        }

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
        let mut acks: u32 = 0;
        if req.sync {
            let store = Arc::clone(&self.store);
            let tx = tx.clone();
            let addr = self.membership.addr().to_string();
            tokio::spawn(async move {
                let r = store
                    .blocking(move |s| s.sync_write(ino, index))
                    .await
                    .map_err(|e| Failure {
                        no_space: matches!(&e, StoreError::Io { source, .. }
                            if source.raw_os_error().is_some_and(is_no_space)),
                        msg: e.to_string(),
                    });
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
                zero_length: req.zero_length,
                extents: req.extents.clone(),
                truncate_to: req.truncate_to,
                snap_seq: req.snap_seq,
                prev_version: Some(outcome.previous),
                primary_osd: me,
            };
            let peers = Arc::clone(&self.peers);
            let tx = tx.clone();
            tokio::spawn(async move {
                let r = peers
                    .forward(&addr, fwd)
                    .await
                    .map(|_| ())
                    .map_err(|s| Failure {
                        no_space: has_errno(&s) && is_no_space(errno_of(&s)),
                        msg: format!("{:?}: {}", s.code(), s.message()),
                    });
                if let Err(e) = &r {
                    tracing::warn!(osd = id, %addr, ino, index, version = %chunk_version::display(version),
                        error = %e.msg, "replica missed a write");
                }
                let _ = tx.send((id, addr, r));
            });
        }
        drop(tx);

        let mut failures = skipped;
        let mut no_space = false;
        while acks < need {
            match rx.recv().await {
                Some((_, _, Ok(()))) => acks += 1,
                Some((id, addr, Err(e))) => {
                    no_space |= e.no_space;
                    failures.push(format!("osd {id} ({addr}): {}", e.msg));
                }
                None => break,
            }
        }
        if acks < need && no_space {
            // A disk filled past the full ratio before the MDS said so: the
            // client must see ENOSPC, not a retryable quorum failure.
            return Err(OsdError::NoSpace(format!(
                "write quorum not reached: {acks} of {need} copies; {}",
                failures.join("; ")
            )));
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
        if req.primary_osd != 0 {
            // A forward from an OSD that this OSD's map (at least as new as
            // the sender's) does not name the chunk's primary: the sender
            // missed the map that replaced it, and the new primary writes
            // this chunk's history now.
            let map = self.membership.map_at_least(req.map_epoch).await?;
            let acting = acting_primary(&chunk_members(&map, ino, index));
            if acting != Some(req.primary_osd) {
                return Err(OsdError::StaleMap(format!(
                    "OSD {} is not the primary of chunk {ino:016x}/{index:016x} in cluster map \
                     epoch {}: {}",
                    req.primary_osd,
                    map.epoch,
                    acting.map_or("no member is up".to_string(), |a| format!("OSD {a} is"))
                )));
            }
        }
        // While the PG is not peered, a gap is waited for briefly: peering
        // is about to pull the chunk anyway.
        let wait = match self.membership.map() {
            Some(m) if self.recovery.is_peered(&m, pg_of(ino, index, m.pg_count)) => {
                self.reorder_wait
            }
            _ => self.reorder_wait.min(Duration::from_secs(1)),
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.applied.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let r2 = req.clone();
            let (version, sync) = (req.version, req.sync);
            let mode = match req.prev_version {
                Some(prev) => VersionMode::After { prev, version },
                None => VersionMode::Exact {
                    version,
                    force: false,
                },
            };
            let r = self
                .store
                .blocking(move |s| {
                    let snap = r2.snap_seq;
                    s.apply_items_snap(ino, index, &items(&r2), chunk_size, mode, sync, snap)
                })
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
                    return Ok(WriteChunkReply {
                        version: o.version,
                        acks: 1,
                    });
                }
                Err(StoreError::VersionGap { current, .. }) => {
                    if tokio::time::Instant::now() >= deadline {
                        tracing::warn!(
                            ino,
                            index,
                            version,
                            current,
                            "missed earlier versions of a chunk; marking it stale"
                        );
                        self.recovery.mark_stale(ino, index, version);
                        return Err(OsdError::Peering(format!(
                            "chunk {ino:016x}/{index:016x}: holds version {current}, \
                             got {version}; recovering"
                        )));
                    }
                    let _ = tokio::time::timeout_at(deadline, notified).await;
                }
                Err(e @ (StoreError::Io { .. } | StoreError::Corruption { .. })) => {
                    // This copy missed the write (its disk failed, maybe
                    // midway, or the copy is damaged) while the quorum may
                    // hold it: rebuilt from a peer now, not at the next write.
                    tracing::warn!(ino, index, version, error = %e,
                        "a replicated write failed on this disk; marking the chunk for recovery");
                    if matches!(e, StoreError::Corruption { .. }) {
                        self.recovery.mark_corrupt(ino, index);
                    }
                    self.recovery.mark_stale(ino, index, version);
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
