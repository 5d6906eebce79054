//! The `Osd` gRPC service: request validation and dispatch.

use crate::chunk_store::{check_range, effective_chunk_size, ChunkStore};
use crate::error::OsdError;
use crate::membership::Membership;
use crate::metrics::Op;
use crate::recovery::{Recovery, INTERNAL_KEY};
use crate::replication::Replicator;
use avalon_proto::chunk_cap::{CapKey, Verified};
use avalon_proto::limits::{MAX_CHUNK_SIZE, MAX_FILE_SIZE};
use avalon_proto::pb::osd_server::Osd;
use avalon_proto::pb::RequestHeader;
use avalon_proto::pb::{
    ByteRange, ChunkExtents, ChunkId, ChunkInfo, CloneId, DeleteObjectsRequest, Empty,
    ListChunksReply, ListChunksRequest, ObjectExtentsReply, ObjectExtentsRequest, OsdStatusReply,
    ReadChunkReply, ReadChunkRequest, ReadCopyReply, ReadCopyRequest, SyncObjectsRequest,
    TrimSnapshotsReply, TrimSnapshotsRequest, WriteChunkReply, WriteChunkRequest,
};
use avalon_proto::placement::pg_of;
use avalon_proto::request_id;
use avalon_proto::tls::Peer;
use std::collections::BTreeSet;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Reads up to this size may be served without the blocking pool.
const INLINE_READ_BYTES: u32 = 256 << 10;

/// The `offset` of a vectored write (see `WriteChunkRequest.extents`).
pub const VECTORED_OFFSET: u32 = u32::MAX;

/// Most extents one vectored write may carry.
pub const MAX_EXTENTS: usize = 1 << 16;

/// Most chunks one ObjectExtents reply describes.
pub const MAX_EXTENT_CHUNKS: usize = 4096;

/// Most inodes one DeleteObjects request may name.
pub const MAX_DELETE_BATCH: usize = 100_000;

/// The Osd service of one daemon.
pub struct OsdService {
    store: Arc<ChunkStore>,
    membership: Arc<Membership>,
    replicator: Arc<Replicator>,
    recovery: Arc<Recovery>,
    /// Checks clients' chunk capabilities (`None`: not checked).
    cap_key: Option<CapKey>,
}

fn chunk_id(c: Option<&ChunkId>) -> Result<(u64, u64), OsdError> {
    let c = c.ok_or_else(|| OsdError::InvalidArgument("missing chunk id".into()))?;
    if c.ino == 0 {
        return Err(OsdError::InvalidArgument("chunk ino must not be 0".into()));
    }
    Ok((c.ino, c.index))
}

/// Validates a write; returns `(ino, index, effective chunk size)`.
pub fn validate_write(req: &WriteChunkRequest) -> Result<(u64, u64, u32), OsdError> {
    let (ino, index) = chunk_id(req.chunk.as_ref())?;
    let cs = effective_chunk_size(req.chunk_size)?;
    if !req.data.is_empty() && req.zero_length > 0 {
        return Err(OsdError::InvalidArgument(
            "a write carries either data or a zero_length, not both".into(),
        ));
    }
    let len = (req.data.len() as u64).max(u64::from(req.zero_length));
    if let Some(keep) = req.truncate_to {
        // The sentinel offset makes an OSD that predates cuts refuse them.
        if len > 0 || !req.extents.is_empty() || req.offset != VECTORED_OFFSET {
            return Err(OsdError::InvalidArgument(
                "a truncate carries no data, zero_length or extents, at offset 0xffffffff".into(),
            ));
        }
        check_range(u64::from(keep), 0, cs)?;
    } else if req.extents.is_empty() {
        check_range(u64::from(req.offset), len, cs)?;
    } else {
        // The sentinel offset makes an OSD that predates extents refuse the
        // request (out of range) instead of storing an empty write.
        if len > 0 || req.offset != VECTORED_OFFSET {
            return Err(OsdError::InvalidArgument(
                "a vectored write carries its data in extents only, at offset 0xffffffff".into(),
            ));
        }
        if req.extents.len() > MAX_EXTENTS {
            return Err(OsdError::InvalidArgument(format!(
                "{} extents in one write; at most {MAX_EXTENTS}",
                req.extents.len()
            )));
        }
        for e in &req.extents {
            check_range(u64::from(e.offset), e.data.len() as u64, cs)?;
        }
    }
    match index.checked_mul(u64::from(cs)) {
        Some(start) if start <= MAX_FILE_SIZE => {}
        _ => {
            return Err(OsdError::InvalidArgument(format!(
                "chunk index {index} with chunk size {cs} lies past the largest file size"
            )))
        }
    }
    if req.forwarded && req.version == 0 {
        return Err(OsdError::InvalidArgument(
            "a forwarded write needs a version > 0".into(),
        ));
    }
    Ok((ino, index, cs))
}

/// Validates a read; returns `(ino, index)`.
pub fn validate_read(req: &ReadChunkRequest) -> Result<(u64, u64), OsdError> {
    let ids = chunk_id(req.chunk.as_ref())?;
    check_range(u64::from(req.offset), u64::from(req.length), MAX_CHUNK_SIZE)?;
    Ok(ids)
}

/// Validates a sync.
pub fn validate_sync(req: &SyncObjectsRequest) -> Result<(), OsdError> {
    if req.inos.len() > MAX_DELETE_BATCH {
        return Err(OsdError::InvalidArgument(format!(
            "{} inodes in one sync; at most {MAX_DELETE_BATCH}",
            req.inos.len()
        )));
    }
    if req.inos.contains(&0) {
        return Err(OsdError::InvalidArgument("ino must not be 0".into()));
    }
    Ok(())
}

/// Validates a chunk listing; returns the PG filter (`None` = all).
pub fn validate_list(req: &ListChunksRequest) -> Result<Option<(u32, u32)>, OsdError> {
    if req.all {
        return Ok(None);
    }
    if req.pg_count == 0 || req.pg >= req.pg_count {
        return Err(OsdError::InvalidArgument(format!(
            "placement group {} out of range for pg_count {}",
            req.pg, req.pg_count
        )));
    }
    Ok(Some((req.pg, req.pg_count)))
}

/// Validates a delete.
pub fn validate_delete(req: &DeleteObjectsRequest) -> Result<(), OsdError> {
    if req.inos.len() > MAX_DELETE_BATCH {
        return Err(OsdError::InvalidArgument(format!(
            "{} inodes in one delete; at most {MAX_DELETE_BATCH}",
            req.inos.len()
        )));
    }
    if req.inos.contains(&0) {
        return Err(OsdError::InvalidArgument("ino must not be 0".into()));
    }
    Ok(())
}

/// Bytes of data a write carries (plain or vectored).
fn write_bytes(req: &WriteChunkRequest) -> usize {
    req.data.len() + req.extents.iter().map(|e| e.data.len()).sum::<usize>()
}

impl OsdService {
    /// A service over `store`, answering once `membership` is registered.
    pub fn new(
        store: Arc<ChunkStore>,
        membership: Arc<Membership>,
        replicator: Arc<Replicator>,
        recovery: Arc<Recovery>,
        cap_key: Option<CapKey>,
    ) -> OsdService {
        OsdService {
            store,
            membership,
            replicator,
            recovery,
            cap_key,
        }
    }

    /// May `peer` (which sent `header`) read or (`write`) change the chunks
    /// of `ino`? See [`crate::authz::chunk_access`].
    pub(crate) fn chunk_access(
        &self,
        peer: &Peer,
        header: Option<&RequestHeader>,
        ino: u64,
        write: bool,
        seen: Option<&mut Verified>,
    ) -> Result<(), Status> {
        let none = bytes::Bytes::new();
        let cred = header.map_or(&none, |h| &h.credential);
        crate::authz::chunk_access(self.cap_key.as_ref(), peer, cred, ino, write, seen)
    }

    fn ready(&self) -> Result<(), OsdError> {
        if self.membership.map().is_none() {
            return Err(OsdError::NotReady);
        }
        Ok(())
    }

    /// Serves a chunk write: as the chunk's primary, or as a replica when
    /// forwarded. A data-port request is traced here with the id its
    /// header carries (a gRPC one already is, by the server's layer).
    pub(crate) async fn write(&self, req: WriteChunkRequest) -> Result<WriteChunkReply, OsdError> {
        let id = req.header.as_ref().map_or(0, |h| h.trace_id);
        let what = if req.forwarded {
            "data port: replica write"
        } else {
            "data port: write"
        };
        request_id::serve_unless_served(id, what, self.write_untraced(req)).await
    }

    async fn write_untraced(&self, req: WriteChunkRequest) -> Result<WriteChunkReply, OsdError> {
        let _m = crate::metrics::op(if req.forwarded {
            Op::ReplicaWrite
        } else {
            Op::Write
        });
        crate::metrics::written(write_bytes(&req), req.forwarded);
        self.ready()?;
        let (ino, index, cs) = validate_write(&req)?;
        if req.forwarded {
            self.replicator.write_replica(req, ino, index, cs).await
        } else {
            self.replicator.write_primary(req, ino, index, cs).await
        }
    }

    /// Serves a chunk read (`internal`: from another OSD, no admission),
    /// traced as [`OsdService::write`].
    pub(crate) async fn read(
        &self,
        req: ReadChunkRequest,
        internal: bool,
    ) -> Result<ReadChunkReply, OsdError> {
        let id = req.header.as_ref().map_or(0, |h| h.trace_id);
        request_id::serve_unless_served(id, "data port: read", self.read_untraced(req, internal))
            .await
    }

    async fn read_untraced(
        &self,
        req: ReadChunkRequest,
        internal: bool,
    ) -> Result<ReadChunkReply, OsdError> {
        let _m = crate::metrics::op(Op::Read);
        self.ready()?;
        let (ino, index) = validate_read(&req)?;
        if !internal {
            let map = self.membership.map_at_least(req.map_epoch).await?;
            self.recovery.admit(&map, ino, index).await?;
        }
        let (offset, length, snap) = (req.offset, req.length, req.snap_id);
        // Small reads of open, cached chunks are served right here; the
        // rest (and anything that might block) on the blocking pool.
        let fast = if length <= INLINE_READ_BYTES && snap == 0 {
            self.store.try_read_cached(ino, index, offset, length)
        } else {
            None
        };
        let r = match fast {
            Some(r) => r,
            None => {
                self.store
                    .blocking(move |s| s.read_snap(ino, index, offset, length, snap))
                    .await
            }
        };
        let (data, version) = match r {
            Ok(r) => r,
            Err(e) => {
                self.recovery.note_read_error(ino, index, &e);
                return Err(e.into());
            }
        };
        crate::metrics::read(data.len());
        Ok(ReadChunkReply {
            data: data.into(),
            version,
        })
    }

    async fn delete(&self, req: DeleteObjectsRequest) -> Result<Empty, OsdError> {
        let _m = crate::metrics::op(Op::Delete);
        self.ready()?;
        validate_delete(&req)?;
        let (inos, snap) = (req.inos, req.snap_seq);
        self.store
            .blocking(move |s| {
                inos.iter()
                    .try_for_each(|&ino| s.delete_object_snap(ino, snap))
            })
            .await?;
        Ok(Empty {})
    }

    async fn trim(&self, req: TrimSnapshotsRequest) -> Result<TrimSnapshotsReply, OsdError> {
        let _m = crate::metrics::op(Op::Delete);
        self.ready()?;
        let live: BTreeSet<u64> = req.live.into_iter().collect();
        let newest = req.newest;
        self.recovery.note_live_snapshots(live.clone(), newest);
        let t = self
            .store
            .blocking(move |s| s.trim_clones(&live, newest))
            .await?;
        if t.clones > 0 {
            tracing::info!(
                clones = t.clones,
                bytes = t.bytes,
                "snapshot clones trimmed"
            );
        }
        Ok(TrimSnapshotsReply {
            clones: t.clones,
            bytes: t.bytes,
        })
    }

    async fn sync(&self, req: SyncObjectsRequest) -> Result<Empty, OsdError> {
        let _m = crate::metrics::op(Op::Sync);
        self.ready()?;
        validate_sync(&req)?;
        let inos = req.inos;
        self.store.blocking(move |s| s.sync_objects(&inos)).await?;
        Ok(Empty {})
    }

    async fn list(&self, req: ListChunksRequest) -> Result<ListChunksReply, OsdError> {
        let _m = crate::metrics::op(Op::List);
        let filter = validate_list(&req)?;
        if req.map_epoch > 0 {
            // A peer peering under a newer map: take it first, so that no
            // forward of a primary it replaced lands after this listing.
            self.membership.map_at_least(req.map_epoch).await?;
        }
        let listed = self
            .store
            .blocking(move |s| {
                s.list(|ino, index| match filter {
                    None => true,
                    Some((pg, n)) => pg_of(ino, index, n) == pg,
                })
            })
            .await?;
        let clones = self
            .store
            .blocking(move |s| {
                s.list_clones(|ino, index| match filter {
                    None => true,
                    Some((pg, n)) => pg_of(ino, index, n) == pg,
                })
            })
            .await?
            .into_iter()
            .map(|(ino, index, seq)| CloneId {
                chunk: Some(ChunkId { ino, index }),
                seq,
            })
            .collect();
        let chunks = listed
            .into_iter()
            .filter_map(|c| {
                let (version, len) = c.state?;
                Some(ChunkInfo {
                    chunk: Some(ChunkId {
                        ino: c.ino,
                        index: c.index,
                    }),
                    version,
                    length: u32::try_from(len).unwrap_or(u32::MAX),
                    digest: c.digest,
                })
            })
            .collect();
        let (pg_count, serving_pgs) = self.recovery.serving_pgs();
        Ok(ListChunksReply {
            chunks,
            serving_pgs,
            pg_count,
            clones,
            features: avalon_proto::version::FEATURES,
        })
    }

    /// A copy of a chunk's head or of one of its clones, for another OSD's
    /// recovery: served from local data, past the peering gate.
    async fn read_copy(&self, req: ReadCopyRequest) -> Result<ReadCopyReply, OsdError> {
        let _m = crate::metrics::op(Op::Read);
        self.ready()?;
        let Some(ChunkId { ino, index }) = req.chunk else {
            return Err(OsdError::InvalidArgument("chunk id missing".into()));
        };
        let (offset, length, clone) = (req.offset, req.length, req.clone_seq);
        let c = self
            .store
            .blocking(move |s| s.read_stamped(ino, index, offset, length, clone))
            .await?;
        crate::metrics::read(c.data.len());
        Ok(ReadCopyReply {
            data: c.data.into(),
            version: c.version,
            stamp_seq: c.stamp.seq,
            stamp_born: c.stamp.born,
        })
    }

    async fn extents(&self, req: ObjectExtentsRequest) -> Result<ObjectExtentsReply, OsdError> {
        let _m = crate::metrics::op(Op::Extents);
        self.ready()?;
        if req.ino == 0 {
            return Err(OsdError::InvalidArgument("ino must not be 0".into()));
        }
        let (ino, from) = (req.ino, req.from_index);
        let max = (req.max_chunks as usize).clamp(1, MAX_EXTENT_CHUNKS);
        let (chunks, truncated) = self
            .store
            .blocking(move |s| s.extents(ino, from, max))
            .await?;
        Ok(ObjectExtentsReply {
            chunks: chunks
                .into_iter()
                .map(|(index, data, state)| {
                    let (version, length) = state.unwrap_or_default();
                    ChunkExtents {
                        index,
                        data: data
                            .into_iter()
                            .map(|(start, end)| ByteRange { start, end })
                            .collect(),
                        length,
                        version,
                    }
                })
                .collect(),
            truncated,
        })
    }

    fn status(&self) -> OsdStatusReply {
        OsdStatusReply {
            osd_id: self.membership.osd_id(),
            addr: self.membership.addr().to_string(),
            capacity_bytes: self.membership.capacity(),
            used_bytes: self.store.used_bytes(),
            chunks: self.store.chunk_count(),
            map_epoch: self.membership.epoch(),
            pid: std::process::id(),
            report: Some(self.recovery.report()),
            clones: self.store.clone_count(),
            clone_bytes: self.store.clone_bytes(),
        }
    }
}

#[tonic::async_trait]
impl Osd for OsdService {
    async fn write_chunk(
        &self,
        request: Request<WriteChunkRequest>,
    ) -> Result<Response<WriteChunkReply>, Status> {
        let peer = Peer::of(&request);
        let req = request.into_inner();
        crate::authz::write(&peer, &req)?;
        let ino = req.chunk.as_ref().map_or(0, |c| c.ino);
        self.chunk_access(&peer, req.header.as_ref(), ino, true, None)?;
        Ok(Response::new(self.write(req).await?))
    }

    async fn read_chunk(
        &self,
        request: Request<ReadChunkRequest>,
    ) -> Result<Response<ReadChunkReply>, Status> {
        let internal = request.metadata().contains_key(INTERNAL_KEY);
        let peer = Peer::of(&request);
        if internal {
            crate::authz::internal_read(&peer)?;
        }
        let req = request.into_inner();
        let ino = req.chunk.as_ref().map_or(0, |c| c.ino);
        self.chunk_access(&peer, req.header.as_ref(), ino, false, None)?;
        Ok(Response::new(self.read(req, internal).await?))
    }

    async fn delete_objects(
        &self,
        request: Request<DeleteObjectsRequest>,
    ) -> Result<Response<Empty>, Status> {
        Ok(Response::new(self.delete(request.into_inner()).await?))
    }

    async fn trim_snapshots(
        &self,
        request: Request<TrimSnapshotsRequest>,
    ) -> Result<Response<TrimSnapshotsReply>, Status> {
        Ok(Response::new(self.trim(request.into_inner()).await?))
    }

    async fn status(&self, _request: Request<Empty>) -> Result<Response<OsdStatusReply>, Status> {
        Ok(Response::new(OsdService::status(self)))
    }

    async fn sync_objects(
        &self,
        request: Request<SyncObjectsRequest>,
    ) -> Result<Response<Empty>, Status> {
        Ok(Response::new(self.sync(request.into_inner()).await?))
    }

    async fn list_chunks(
        &self,
        request: Request<ListChunksRequest>,
    ) -> Result<Response<ListChunksReply>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn read_copy(
        &self,
        request: Request<ReadCopyRequest>,
    ) -> Result<Response<ReadCopyReply>, Status> {
        Ok(Response::new(
            OsdService::read_copy(self, request.into_inner()).await?,
        ))
    }

    async fn object_extents(
        &self,
        request: Request<ObjectExtentsRequest>,
    ) -> Result<Response<ObjectExtentsReply>, Status> {
        let peer = Peer::of(&request);
        let req = request.into_inner();
        self.chunk_access(&peer, req.header.as_ref(), req.ino, false, None)?;
        Ok(Response::new(self.extents(req).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wreq(ino: u64, offset: u32, len: usize, cs: u32) -> WriteChunkRequest {
        WriteChunkRequest {
            chunk: Some(ChunkId { ino, index: 0 }),
            offset,
            data: vec![0u8; len].into(),
            chunk_size: cs,
            ..Default::default()
        }
    }

    #[test]
    fn write_validation() {
        let cs = 64 << 10;
        assert!(validate_write(&wreq(1, 0, 10, cs)).is_ok());
        assert!(validate_write(&wreq(1, 0, 10, 0)).is_ok());
        assert!(validate_write(&wreq(0, 0, 10, cs)).is_err());
        assert!(validate_write(&wreq(1, cs - 9, 10, cs)).is_err());
        assert!(validate_write(&wreq(1, u32::MAX, 10, cs)).is_err());
        assert!(validate_write(&wreq(1, 0, 10, 1)).is_err());
        assert!(validate_write(&wreq(1, 0, 10, u32::MAX)).is_err());
        let mut r = wreq(1, 0, 10, cs);
        r.chunk = None;
        assert!(validate_write(&r).is_err());
        let mut r = wreq(1, 0, 10, cs);
        r.chunk = Some(ChunkId {
            ino: 1,
            index: u64::MAX,
        });
        assert!(validate_write(&r).is_err());
        let mut r = wreq(1, 0, 10, cs);
        r.forwarded = true;
        assert!(validate_write(&r).is_err());
        r.version = 3;
        assert!(validate_write(&r).is_ok());
        // Vectored: extents only, at the sentinel offset.
        let ext = |offset, len: usize| avalon_proto::pb::WriteExtent {
            offset,
            data: vec![1u8; len].into(),
        };
        let mut v = wreq(1, VECTORED_OFFSET, 0, cs);
        v.extents = vec![ext(0, 10), ext(cs - 10, 10)];
        assert!(validate_write(&v).is_ok());
        v.extents.push(ext(cs - 9, 10));
        assert!(validate_write(&v).is_err());
        let mut v = wreq(1, 0, 0, cs);
        v.extents = vec![ext(0, 10)];
        assert!(validate_write(&v).is_err(), "offset must be the sentinel");
        let mut v = wreq(1, VECTORED_OFFSET, 5, cs);
        v.extents = vec![ext(0, 10)];
        assert!(validate_write(&v).is_err(), "no data beside extents");
        // An OSD that predates extents sees an out-of-range write.
        assert!(check_range(u64::from(VECTORED_OFFSET), 0, cs).is_err());
        // A cut: nothing but the new length, at the sentinel offset.
        let cut = |offset, keep, len| WriteChunkRequest {
            truncate_to: Some(keep),
            ..wreq(1, offset, len, cs)
        };
        assert!(validate_write(&cut(VECTORED_OFFSET, 0, 0)).is_ok());
        assert!(validate_write(&cut(VECTORED_OFFSET, cs, 0)).is_ok());
        assert!(validate_write(&cut(VECTORED_OFFSET, cs + 1, 0)).is_err());
        assert!(validate_write(&cut(0, 10, 0)).is_err(), "sentinel offset");
        assert!(
            validate_write(&cut(VECTORED_OFFSET, 10, 5)).is_err(),
            "no data"
        );
        let mut v = cut(VECTORED_OFFSET, 10, 0);
        v.zero_length = 4;
        assert!(validate_write(&v).is_err(), "no zeroing");
        v.zero_length = 0;
        v.extents = vec![ext(0, 10)];
        assert!(validate_write(&v).is_err(), "no extents");
    }

    #[test]
    fn other_validation() {
        let read = |offset, length| ReadChunkRequest {
            chunk: Some(ChunkId { ino: 1, index: 0 }),
            offset,
            length,
            ..Default::default()
        };
        assert!(validate_read(&read(0, 100)).is_ok());
        assert!(validate_read(&read(u32::MAX, u32::MAX)).is_err());
        let d = |inos: Vec<u64>| DeleteObjectsRequest {
            header: None,
            inos,
            snap_seq: 0,
        };
        assert!(validate_delete(&d(vec![1, 2])).is_ok());
        assert!(validate_delete(&d(vec![1, 0])).is_err());
    }

    mod props {
        use super::*;
        use avalon_proto::limits::MIN_CHUNK_SIZE;
        use proptest::prelude::*;
        use prost::Message;

        fn edge_u32() -> impl Strategy<Value = u32> {
            prop_oneof![
                Just(0u32),
                Just(1),
                Just(u32::MAX),
                Just(u32::MAX - 1),
                Just(MIN_CHUNK_SIZE),
                Just(MAX_CHUNK_SIZE),
                Just(MAX_CHUNK_SIZE + 1),
                Just(4 << 20),
                Just((4 << 20) - 1),
                any::<u32>(),
            ]
        }

        fn edge_u64() -> impl Strategy<Value = u64> {
            prop_oneof![
                Just(0u64),
                Just(u64::MAX),
                Just(MAX_FILE_SIZE),
                Just(MAX_FILE_SIZE / u64::from(4u32 << 20)),
                any::<u64>(),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            /// Arbitrary bytes decode to an error or a request that
            /// validation judges without panicking.
            #[test]
            fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                if let Ok(r) = WriteChunkRequest::decode(&bytes[..]) {
                    let _ = validate_write(&r);
                }
                if let Ok(r) = ReadChunkRequest::decode(&bytes[..]) {
                    let _ = validate_read(&r);
                }
                if let Ok(r) = ListChunksRequest::decode(&bytes[..]) {
                    let _ = validate_list(&r);
                }
                if let Ok(r) = SyncObjectsRequest::decode(&bytes[..]) {
                    let _ = validate_sync(&r);
                }
            }

            /// A write is accepted exactly when its range lies inside the
            /// chunk and the chunk inside the largest file.
            #[test]
            fn write_range_math(
                offset in edge_u32(),
                len in 0usize..3,
                zero in edge_u32(),
                cs in edge_u32(),
                index in edge_u64(),
            ) {
                let req = WriteChunkRequest {
                    chunk: Some(ChunkId { ino: 1, index }),
                    offset,
                    data: vec![7u8; len].into(),
                    chunk_size: cs,
                    zero_length: zero,
                    ..Default::default()
                };
                let ecs = if cs == 0 { avalon_proto::limits::DEFAULT_CHUNK_SIZE } else { cs };
                let cs_ok = (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&ecs);
                let both = len > 0 && zero > 0;
                let n = (len as u64).max(u64::from(zero));
                let range_ok = u64::from(offset) + n <= u64::from(ecs);
                let index_ok = index
                    .checked_mul(u64::from(ecs))
                    .is_some_and(|s| s <= MAX_FILE_SIZE);
                let want = cs_ok && !both && range_ok && index_ok;
                prop_assert_eq!(validate_write(&req).is_ok(), want);
            }

            #[test]
            fn read_range_math(offset in edge_u32(), length in edge_u32()) {
                let req = ReadChunkRequest {
                    chunk: Some(ChunkId { ino: 3, index: 0 }),
                    offset,
                    length,
                    ..Default::default()
                };
                let want = u64::from(offset) + u64::from(length) <= u64::from(MAX_CHUNK_SIZE);
                prop_assert_eq!(validate_read(&req).is_ok(), want);
            }

            #[test]
            fn list_filter(pg in edge_u32(), pg_count in edge_u32(), all in any::<bool>()) {
                let req = ListChunksRequest { header: None, pg, pg_count, all, map_epoch: 0 };
                let want = all || (pg_count > 0 && pg < pg_count);
                prop_assert_eq!(validate_list(&req).is_ok(), want);
            }
        }
    }
}
