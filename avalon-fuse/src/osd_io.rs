//! Requests to the OSDs: the cluster map, a connection per OSD, and chunk
//! reads, writes and broadcasts that fail over between a chunk's members
//! and newer maps, carrying the chunk capabilities. Knows nothing of files
//! (their sizes, buffers and caches are the data path's, `data_path.rs`).

use crate::chunk_caps::ChunkCaps;
use crate::error::{ClientError, Result};
use crate::session::Session;
use avalon_proto::backoff::Backoff;
use avalon_proto::chunk_cap;
use avalon_proto::data_conn::DataConns;
use avalon_proto::errno::OSD_ANSWERED_KEY;
use avalon_proto::limits::MAX_MESSAGE_BYTES;
use avalon_proto::pb::{self, osd_client::OsdClient, ChunkId, ClusterMap, OsdInfo, OsdState};
use avalon_proto::placement::chunk_members;
use avalon_proto::request_id::Traced;
use bytes::Bytes;
use dashmap::DashMap;
use futures::future::try_join_all;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tonic::Code;

/// Times one chunk request asks for a fresh capability after an OSD
/// called its capability expired (more means clocks far apart).
const MAX_CAP_RENEWALS: u32 = 3;

/// How long one chunk operation keeps trying other replicas and newer maps
/// before the application gets EIO.
pub const IO_RETRY_BUDGET: Duration = Duration::from_secs(20);
/// Pauses between rounds of chunk reads or writes over a chunk's members:
/// from this, doubling...
pub(crate) const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(20);
/// ...up to this.
pub(crate) const MAX_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// A chunk write unanswered this long is taken as lost (and retried
/// elsewhere). Far beyond a primary's own wait for its replicas.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Members ordered for an attempt: up ones first, keeping placement order.
fn attempt_order(members: Vec<&OsdInfo>) -> Vec<&OsdInfo> {
    let (mut up, down): (Vec<&OsdInfo>, Vec<&OsdInfo>) = members
        .into_iter()
        .partition(|o| o.state == OsdState::Up as i32);
    up.extend(down);
    up
}

/// Reads at least this large start at a replica chosen by chunk index, so
/// that sequential reads spread over every member. Smaller reads stay on
/// the primary: a non-primary member checks its peers' versions before
/// serving, which costs more than a small read.
const SPREAD_READ_BYTES: u32 = 1 << 20;

/// True for failures where another replica or a newer map may help. Not
/// a full disk (ENOSPC): the application must see it at once, not EIO
/// after the retry budget.
pub(crate) fn retry_elsewhere(s: &tonic::Status) -> bool {
    !matches!(
        s.code(),
        Code::InvalidArgument
            | Code::OutOfRange
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::ResourceExhausted
    )
}

/// The client's view of the OSDs.
pub struct OsdIo {
    map: RwLock<Arc<ClusterMap>>,
    osds: DashMap<String, OsdClient<Traced>>,
    /// Connections to the OSDs' data ports, for chunk reads and writes.
    data_conns: DataConns,
    /// Chunk capabilities held, sent with every chunk request.
    pub caps: ChunkCaps,
}

impl OsdIo {
    /// Starts from cluster map `map`; `tls` dials the data ports.
    pub fn new(map: ClusterMap, tls: avalon_proto::tls::ClientTls) -> OsdIo {
        OsdIo {
            map: RwLock::new(Arc::new(map)),
            osds: DashMap::new(),
            caps: ChunkCaps::new(!tls.is_plaintext()),
            data_conns: DataConns::new(tls),
        }
    }

    /// The cached cluster map.
    pub fn map(&self) -> Arc<ClusterMap> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Fetches the cluster map from the MDS and caches it.
    pub async fn refresh_map(&self, session: &Session) -> Result<Arc<ClusterMap>> {
        let m = session
            .mds
            .call(|mut c| async move { c.get_cluster_map(pb::Empty {}).await })
            .await?;
        let m = Arc::new(m);
        let mut cur = self.map.write().unwrap_or_else(|e| e.into_inner());
        if m.epoch >= cur.epoch {
            *cur = m.clone();
        }
        Ok(cur.clone())
    }

    /// A (cached) client for the OSD at `addr`.
    pub fn osd(&self, session: &Session, addr: &str) -> Result<OsdClient<Traced>> {
        if let Some(c) = self.osds.get(addr) {
            return Ok(c.clone());
        }
        let ch = session.mds.tls().channel(
            addr,
            avalon_proto::tls::Dial::Osd,
            Duration::from_secs(2),
        )?;
        let c = OsdClient::with_interceptor(ch, avalon_proto::request_id::Stamp)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        self.osds.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// One `WriteChunk` through the chunk's primary, failing over to other
    /// members and newer maps. `body` says what it stores (offset and data,
    /// zeroing, extents or a cut); the rest is filled in here. `cs`: the
    /// file's chunk size.
    pub async fn write_chunk(
        &self,
        session: &Session,
        ino: u64,
        index: u64,
        body: pb::WriteChunkRequest,
        sync: bool,
        cs: u32,
    ) -> Result<()> {
        let deadline = Instant::now() + IO_RETRY_BUDGET;
        let mut last = String::from("no OSD holds this chunk's placement group");
        let mut backoff = Backoff::new(FIRST_RETRY_PAUSE, MAX_RETRY_PAUSE).until(deadline);
        let mut renewals = 0;
        'rounds: loop {
            let map = self.map();
            let cap = self.caps.get(session, ino, true).await?;
            for osd in attempt_order(chunk_members(&map, ino, index)) {
                let req = pb::WriteChunkRequest {
                    header: session.header_with(cap.clone()),
                    chunk: Some(ChunkId { ino, index }),
                    sync,
                    map_epoch: map.epoch,
                    forwarded: false,
                    version: 0,
                    chunk_size: cs,
                    ..body.clone()
                };
                match self
                    .data_conns
                    .write_chunk(&osd.addr, &req, WRITE_TIMEOUT)
                    .await
                {
                    Ok(_) => return Ok(()),
                    Err(s) if chunk_cap::is_expired(&s) && renewals < MAX_CAP_RENEWALS => {
                        // Nothing was written: renew and send again.
                        renewals += 1;
                        self.caps.forget(ino);
                        continue 'rounds;
                    }
                    Err(s) if !retry_elsewhere(&s) => return Err(s.into()),
                    Err(s) => {
                        tracing::debug!(ino, index, osd = osd.id, code = ?s.code(), msg = s.message(), "chunk write failed");
                        last = format!("osd.{} ({}): {}", osd.id, osd.addr, s.message());
                        // An OSD that answered is alive: a write must not move
                        // to another member (it would order this chunk's
                        // writes concurrently with the primary); ask again.
                        if s.metadata().contains_key(OSD_ANSWERED_KEY) {
                            break;
                        }
                    }
                }
            }
            if !backoff.wait().await {
                return Err(ClientError::Unavailable(format!(
                    "write of chunk {ino:x}.{index} failed: {last}"
                )));
            }
            crate::metrics::osd_retry();
            let _ = self.refresh_map(session).await;
        }
    }

    /// Reads `length` bytes at `offset` of chunk `(ino, index)` as
    /// snapshot `snap_id` saw it (0: the live chunk) from one of its
    /// members, failing over to the others and newer maps.
    pub async fn read_chunk(
        &self,
        session: &Session,
        ino: u64,
        index: u64,
        offset: u32,
        length: u32,
        snap_id: u64,
    ) -> Result<Bytes> {
        let deadline = Instant::now() + IO_RETRY_BUDGET;
        let mut last = String::from("no OSD holds this chunk's placement group");
        let mut backoff = Backoff::new(FIRST_RETRY_PAUSE, MAX_RETRY_PAUSE).until(deadline);
        let mut renewals = 0;
        'rounds: loop {
            let map = self.map();
            let cap = self.caps.get(session, ino, false).await?;
            let mut order = attempt_order(chunk_members(&map, ino, index));
            let up = order
                .iter()
                .filter(|o| o.state == OsdState::Up as i32)
                .count();
            if length >= SPREAD_READ_BYTES && up > 1 {
                order[..up].rotate_left((index % up as u64) as usize);
            }
            for osd in order {
                let req = pb::ReadChunkRequest {
                    header: session.header_with(cap.clone()),
                    chunk: Some(ChunkId { ino, index }),
                    offset,
                    length,
                    map_epoch: map.epoch,
                    snap_id,
                };
                match self.data_conns.read_chunk(&osd.addr, &req).await {
                    Ok((_, data)) => return Ok(data),
                    Err(s) if chunk_cap::is_expired(&s) && renewals < MAX_CAP_RENEWALS => {
                        renewals += 1;
                        self.caps.forget(ino);
                        continue 'rounds;
                    }
                    Err(s) if !retry_elsewhere(&s) => return Err(s.into()),
                    Err(s) => {
                        tracing::debug!(ino, index, osd = osd.id, code = ?s.code(), msg = s.message(), "chunk read failed");
                        last = format!("osd.{} ({}): {}", osd.id, osd.addr, s.message());
                    }
                }
            }
            if !backoff.wait().await {
                return Err(ClientError::Unavailable(format!(
                    "read of chunk {ino:x}.{index} failed: {last}"
                )));
            }
            crate::metrics::osd_retry();
            let _ = self.refresh_map(session).await;
        }
    }

    /// Runs `op` on every up OSD at once. An OSD that cannot be reached
    /// holds nothing to act on that the others do not; the operation fails
    /// only when more OSDs failed than the replication can lose, or when an
    /// OSD refused it outright.
    pub async fn broadcast<F, Fut>(&self, session: &Session, what: &str, op: F) -> Result<()>
    where
        F: Fn(OsdClient<Traced>, Option<pb::RequestHeader>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(), tonic::Status>>,
    {
        let map = self.map();
        let sends = map
            .osds
            .iter()
            .filter(|o| o.state == OsdState::Up as i32)
            .map(|o| {
                let call = self.osd(session, &o.addr).map(|c| op(c, session.header()));
                let id = o.id;
                async move {
                    match tokio::time::timeout(IO_RETRY_BUDGET, call?).await {
                        Ok(Ok(())) => Ok(None),
                        Ok(Err(s)) if !retry_elsewhere(&s) => Err(ClientError::from(s)),
                        Ok(Err(s)) => Ok(Some(format!("osd.{id}: {}", s.message()))),
                        Err(_) => Ok(Some(format!("osd.{id}: timed out"))),
                    }
                }
            });
        let failed: Vec<String> = try_join_all(sends).await?.into_iter().flatten().collect();
        let tolerable = map.replicas.saturating_sub(map.write_quorum.max(1)) as usize;
        if failed.len() > tolerable {
            return Err(ClientError::Unavailable(format!(
                "{what} failed: {}",
                failed.join("; ")
            )));
        }
        if !failed.is_empty() {
            tracing::warn!(what, failed = %failed.join("; "), "skipped unreachable OSDs");
        }
        Ok(())
    }
}
