//! File data I/O: byte ranges split by chunk and sent to the OSDs holding
//! each chunk, all chunks of one request in parallel.
//!
//! Writes are acknowledged from the client's write-back buffer
//! ([`crate::write_buffer`]) and sent in the background, one vectored RPC
//! per chunk; fsync, flush/close, reads of buffered ranges, truncate,
//! fallocate and O_SYNC writes send what is buffered first and wait for it.
//! Writes go to the chunk's primary (the first member of its placement
//! group that is up), which replicates and acknowledges after m copies.
//! If the primary cannot be reached, the next member takes the write; the
//! cluster map is refreshed between rounds. Small reads go to the primary;
//! whole-chunk (readahead) reads start at a member chosen by chunk index,
//! spreading sequential reads over all replicas. Any read moves on to the
//! next member when one fails or its data does not verify (the requests
//! themselves are `osd_io.rs`'s; this file is about files: sizes, the
//! buffer, the chunk cache).

use crate::chunk_cache::{copy_out, READAHEAD_CHUNKS};
use crate::client::Client;
use crate::error::{ClientError, Result};
use crate::osd_io::{retry_elsewhere, IO_RETRY_BUDGET};
use crate::write_buffer::{Take, TICK};
use avalon_proto::limits::{DEFAULT_CHUNK_SIZE, MAX_FILE_SIZE};
use avalon_proto::pb::{self, OsdState};
use avalon_proto::placement::split_range;
use bytes::Bytes;
use futures::future::{join_all, try_join_all};
use futures::stream::{self, StreamExt, TryStreamExt};
use std::collections::BTreeSet;
use std::sync::{Arc, Weak};

/// The `offset` of a vectored write: out of range for an OSD that
/// predates `WriteChunkRequest.extents`, so it refuses instead of storing
/// an empty write.
const VECTORED_WRITE_OFFSET: u32 = u32::MAX;

/// Chunk cuts of one truncate in flight at once.
const CUT_CONCURRENCY: usize = 32;

/// Largest written chunk copied together from several buffered runs to be
/// kept in the chunk cache (a single run is kept without a copy).
const KEEP_COPY_MAX: u64 = 256 << 10;

/// Data for one piece of a read: fetched for it alone, or a cached chunk
/// and the piece's offset in it.
enum Piece {
    Direct(Bytes),
    Cached(Bytes, usize),
}

impl Client {
    fn chunk_size_of(&self, ino: u64) -> u32 {
        match self.open_files.files.get(&ino).map(|s| s.chunk_size) {
            Some(cs) if cs > 0 => cs,
            _ => DEFAULT_CHUNK_SIZE,
        }
    }

    /// Writes `data` at `offset` of file `ino`; returns the bytes written.
    /// Unless `sync`, the data is buffered and sent in the background
    /// (waiting for room when the buffer is full); a failure of that send
    /// is reported by the next fsync or flush of the file. In shared-write
    /// mode the data goes through at once and `append` (O_APPEND) writes
    /// at the end of file as the MDS has it, not at `offset`.
    pub async fn write(
        self: &Arc<Self>,
        ino: u64,
        offset: u64,
        data: Bytes,
        sync: bool,
        append: bool,
    ) -> Result<u32> {
        let gate = self.open_files.write_gate(ino);
        let guard = gate.read().await;
        // Shared-write and O_APPEND opens are direct I/O: the kernel's
        // pages do not see those writes.
        let shared = self.is_shared(ino);
        if shared || append {
            self.page_versions.bypassed(ino);
        } else {
            self.page_versions.changed(ino);
        }
        if shared {
            drop(guard);
            return self.write_shared(ino, offset, data, sync, append).await;
        }
        if append {
            drop(guard);
            return self.append_local(ino, data, sync).await;
        }
        let r = self.write_local(ino, offset, data, sync, false).await;
        drop(guard);
        r
    }

    /// An O_APPEND write while this session is the file's only writer: at
    /// the end of file as this client knows it (the MDS's size at open
    /// plus its own writes), not at the kernel's offset, which comes from
    /// an i_size that may predate other mounts' appends. The gate is taken
    /// exclusively so that appends of this mount's threads get disjoint
    /// ranges and a shared-write demand waits for the append under way.
    async fn append_local(self: &Arc<Self>, ino: u64, data: Bytes, sync: bool) -> Result<u32> {
        let gate = self.open_files.write_gate(ino);
        let _g = gate.write().await;
        // The MDS may have let another writer in while the lease was
        // broken: confirm what was appended, then reserve ranges.
        if !self.is_shared(ino) && self.sole_lapsed(ino) {
            self.confirm_sole_writes(ino).await?;
        }
        if self.is_shared(ino) {
            drop(_g);
            return self.write_shared(ino, 0, data, sync, true).await;
        }
        // Set at open from the MDS and moved by this client's own writes
        // and truncates since (see `Client::note_attr`).
        let offset = {
            let mut st = self.open_files.files.entry(ino).or_default();
            if st.append_base.is_none() {
                st.append_base = Some(st.mds_size);
            }
            st.size
        };
        tracing::debug!(ino, offset, len = data.len(), "append as the only writer");
        self.write_local(ino, offset, data, sync, false).await
    }

    /// A write in shared-write mode: through to the OSDs, then the size to
    /// the MDS (for an append, the MDS reserves the range first).
    async fn write_shared(
        self: &Arc<Self>,
        ino: u64,
        offset: u64,
        data: Bytes,
        sync: bool,
        append: bool,
    ) -> Result<u32> {
        let len = data.len() as u64;
        if len == 0 {
            return Ok(0);
        }
        if !append {
            self.write_local(ino, offset, data, sync, true).await?;
            self.commit_size(ino).await?;
            return Ok(len as u32);
        }
        let req = pb::AppendWriteRequest {
            header: self.session.header(),
            ino,
            len,
        };
        self.meta.forget_attr(ino);
        let r = self
            .rpc(req, |mut c, r| async move { c.append_write(r).await })
            .await?;
        let a = r
            .attr
            .ok_or_else(|| ClientError::Unavailable("MDS reply without attributes".into()))?;
        self.note_attr(&a);
        // The size already covers the range: a crash before the data is
        // stored leaves zeros there, never other bytes.
        let offset = a.size - len;
        tracing::debug!(ino, offset, len, "append in a reserved range");
        let cs = self.chunk_size_of(ino);
        self.send_through(ino, split_range(offset, len, cs), data, sync, cs)
            .await?;
        Ok(len as u32)
    }

    /// Sends `data`, cut into `parts` (chunk, offset, length), straight to
    /// the OSDs, after what is buffered for those chunks.
    async fn send_through(
        &self,
        ino: u64,
        parts: Vec<(u64, u32, u32)>,
        data: Bytes,
        sync: bool,
        cs: u32,
    ) -> Result<()> {
        self.flush_chunks(ino, parts.iter().map(|p| p.0), false)
            .await?;
        let mut pos = 0usize;
        let sends = parts.into_iter().map(|(index, off, n)| {
            let piece = data.slice(pos..pos + n as usize);
            pos += n as usize;
            self.chunk_op(ino, index, off, piece, 0, sync, cs)
        });
        try_join_all(sends).await?;
        Ok(())
    }

    /// A write at `offset` through this client's buffer (or straight to
    /// the OSDs when `direct`, `sync`, large or the buffer is off).
    async fn write_local(
        self: &Arc<Self>,
        ino: u64,
        offset: u64,
        data: Bytes,
        sync: bool,
        direct: bool,
    ) -> Result<u32> {
        let len = data.len() as u64;
        let end = offset.checked_add(len).filter(|e| *e <= MAX_FILE_SIZE);
        let Some(end) = end else {
            return Err(ClientError::posix(
                libc::EFBIG,
                "write past the largest file size",
            ));
        };
        if len == 0 {
            return Ok(0);
        }
        // An earlier background write of the file found the cluster full:
        // later writes fail with ENOSPC too (the error stays for the
        // file's fsync or close, which report it once and clear it).
        if let Some((errno, msg)) = self.wbuf.no_space_error(ino) {
            return Err(ClientError::posix(errno, msg));
        }
        self.keep_in_quota(ino, end).await?;
        let cs = self.chunk_size_of(ino);
        let parts = split_range(offset, len, cs);
        if !sync && !direct && self.wbuf.accepts(len) {
            self.start_ticker();
            self.wbuf.reserve(len, || self.kick_flush()).await;
            let mut pos = 0usize;
            for &(index, off, n) in &parts {
                let piece = data.slice(pos..pos + n as usize);
                pos += n as usize;
                let full = self.wbuf.add(ino, index, off, piece);
                // A cached copy of the chunk is stale from now on (dropped
                // after buffering: see `WriteBuffer::done_then`).
                self.cache.invalidate(ino, index);
                if full {
                    self.spawn_flush(ino, index);
                }
            }
            if self.wbuf.under_pressure() {
                self.kick_flush();
            }
        } else {
            // Buffered writes to these chunks go first, in order.
            self.send_through(ino, parts, data, sync, cs).await?;
        }
        let mut st = self.open_files.files.entry(ino).or_default();
        if end > st.size {
            st.size = end;
            st.grown = true;
        }
        // Every write moves mtime and ctime (make, rsync and other mounts'
        // caches go by them), committed at close or fsync.
        st.dirty = true;
        Ok(len as u32)
    }

    /// Starts the background ticker that sends data left in the buffer
    /// for [`crate::write_buffer::MAX_AGE`] (once per client; it ends
    /// with the client).
    fn start_ticker(self: &Arc<Self>) {
        if !self.wbuf.start_ticker() {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(TICK).await;
                let Some(me) = weak.upgrade() else { return };
                for (ino, index) in me.wbuf.pick(true) {
                    me.spawn_flush(ino, index);
                }
            }
        });
    }

    /// Sends, in the background, whatever the buffer says is due.
    fn kick_flush(self: &Arc<Self>) {
        for (ino, index) in self.wbuf.pick(false) {
            self.spawn_flush(ino, index);
        }
    }

    /// Sends one chunk's buffered data in the background (nothing if it is
    /// in flight already: its sender picks the rest up when due).
    fn spawn_flush(self: &Arc<Self>, ino: u64, index: u64) {
        // Appends waiting to be confirmed stay buffered until then.
        if self.appends_unconfirmed(ino) {
            return;
        }
        let Take::Send(ext) = self.wbuf.take(ino, index, true) else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let whole = me.whole_chunk(ino, index, &ext);
            let r = me.send_extents(ino, index, ext, false).await;
            me.wbuf.done_then(
                ino,
                index,
                true,
                r.err().map(|e| (e.errno(), e.to_string())),
                || me.keep_written(ino, index, whole),
            );
            me.kick_flush();
        });
    }

    /// What chunk `(ino, index)` holds once `ext` (everything buffered for
    /// it) is stored, if `ext` holds every byte of it up to the end of the
    /// file: one contiguous run from 0 (a small file written whole). Not
    /// for runs that would need copying into one past [`KEEP_COPY_MAX`].
    fn whole_chunk(&self, ino: u64, index: u64, ext: &[(u32, Bytes)]) -> Option<Bytes> {
        let size = self
            .open_files
            .files
            .get(&ino)
            .filter(|st| !st.shared)?
            .size;
        let cs = u64::from(self.chunk_size_of(ino));
        let below_eof = size
            .checked_sub(index.checked_mul(cs)?)
            .filter(|n| *n > 0)?;
        let mut end = 0u64;
        for (off, data) in ext {
            if u64::from(*off) != end {
                return None;
            }
            end += data.len() as u64;
        }
        if end < below_eof.min(cs) {
            return None;
        }
        match ext {
            [(_, only)] => Some(only.clone()),
            _ if end <= KEEP_COPY_MAX => {
                let mut b = bytes::BytesMut::with_capacity(end as usize);
                for (_, data) in ext {
                    b.extend_from_slice(data);
                }
                Some(b.freeze())
            }
            _ => None,
        }
    }

    /// Caches a chunk this client just stored whole (see `whole_chunk`).
    fn keep_written(&self, ino: u64, index: u64, whole: Option<Bytes>) {
        if let Some(b) = whole {
            self.cache.put(ino, index, b);
        }
    }

    /// Writes extents taken from the buffer to one chunk.
    async fn send_extents(
        &self,
        ino: u64,
        index: u64,
        ext: Vec<(u32, Bytes)>,
        sync: bool,
    ) -> Result<()> {
        // Appends made as the only writer go out only while that holds:
        // those not confirmed yet fail here (fsync, close, the next append
        // and a demand confirm them first; confirming from here could wait
        // for the queue of delegated changes that is storing this data).
        if let Some(e) = self.held_back(ino) {
            return Err(e);
        }
        let cs = self.chunk_size_of(ino);
        let r = if ext.len() == 1 {
            let (off, data) = ext.into_iter().next().unwrap_or_default();
            self.chunk_op(ino, index, off, data, 0, sync, cs).await
        } else {
            let extents = ext
                .into_iter()
                .map(|(offset, data)| pb::WriteExtent { offset, data })
                .collect();
            let body = pb::WriteChunkRequest {
                offset: VECTORED_WRITE_OFFSET,
                extents,
                ..Default::default()
            };
            self.chunk_write(ino, index, body, sync, cs).await
        };
        if let Err(e) = &r {
            tracing::warn!(ino, index, error = %e, "buffered write failed; reported at the next fsync or close");
        }
        r
    }

    /// Sends what the buffer holds for chunk `(ino, index)` when called
    /// (with `sync`: durably) and waits until it (and anything in flight
    /// before) is stored.
    async fn flush_chunk(&self, ino: u64, index: u64, sync: bool) -> Result<()> {
        loop {
            // Registered before looking, so a completion in between wakes it.
            let changed = self.wbuf.changed();
            match self.wbuf.take(ino, index, false) {
                Take::Idle => return Ok(()),
                Take::Busy => changed.await,
                Take::Send(ext) => {
                    let whole = self.whole_chunk(ino, index, &ext);
                    let r = self.send_extents(ino, index, ext, sync).await;
                    // The caller reports its own failure; the buffer keeps
                    // no error for it.
                    let whole = whole.filter(|_| r.is_ok());
                    self.wbuf.done_then(ino, index, false, None, || {
                        self.keep_written(ino, index, whole)
                    });
                    // Anything written since is not ours to wait for.
                    return r;
                }
            }
        }
    }

    /// [`Client::flush_chunk`] for several chunks of a file, in parallel.
    async fn flush_chunks(
        &self,
        ino: u64,
        indexes: impl Iterator<Item = u64>,
        sync: bool,
    ) -> Result<()> {
        let busy: Vec<u64> = {
            let held = self.wbuf.chunks_of(ino);
            indexes.filter(|i| held.contains(i)).collect()
        };
        if busy.is_empty() {
            return Ok(());
        }
        let rs = join_all(busy.into_iter().map(|i| self.flush_chunk(ino, i, sync))).await;
        rs.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    /// Sends everything buffered for `ino` and waits for it; reports a
    /// failure of an earlier background write of the file (once).
    pub async fn flush_file(&self, ino: u64) -> Result<()> {
        self.flush_file_as(ino, false).await
    }

    /// [`Client::flush_file`]; with `sync`, what it sends is made durable
    /// (fsynced by every copy) before it is acknowledged.
    async fn flush_file_as(&self, ino: u64, sync: bool) -> Result<()> {
        self.flush_file_then(ino, sync, true).await
    }

    /// [`Client::flush_file`] for a close: an earlier background write's
    /// failure is reported but left for the file's next fsync. A close
    /// may come from another process sharing the descriptor (a child
    /// that inherited it and execs); taking the error there would let
    /// the owner's fsync succeed over lost data.
    pub async fn flush_file_for_close(&self, ino: u64) -> Result<()> {
        self.flush_file_then(ino, false, false).await
    }

    async fn flush_file_then(&self, ino: u64, sync: bool, take: bool) -> Result<()> {
        let chunks = self.wbuf.chunks_of(ino);
        let r = self.flush_chunks(ino, chunks.into_iter(), sync).await;
        let kept = if take {
            self.wbuf.take_error(ino)
        } else {
            self.wbuf.peek_error(ino)
        };
        let r = match kept {
            Some((errno, msg)) => Err(if errno == libc::EIO {
                ClientError::Unavailable(msg)
            } else {
                ClientError::posix(errno, msg)
            }),
            None => r,
        };
        if r.is_err() {
            self.give_up_growth(ino);
        }
        r
    }

    /// Buffered writes of `ino` could not be stored (the caller reports
    /// it): the growth this client has not committed is given up, its
    /// size goes back to the MDS's. A later commit of it (the close after
    /// a failed fsync, a close that failed to store) would cover bytes no
    /// OSD holds, read back as zeros; later appends go where it stopped.
    fn give_up_growth(&self, ino: u64) {
        let Some(mut st) = self.open_files.files.get_mut(&ino) else {
            return;
        };
        if st.grown && st.size > st.mds_size {
            tracing::warn!(
                ino,
                size = st.size,
                kept = st.mds_size,
                "writes past the committed size were not stored: the size stays"
            );
            st.give_up_growth();
            drop(st);
            self.meta.forget_attr(ino);
        }
    }

    /// Sends everything buffered, for every file (unmount).
    pub async fn flush_all(&self) -> Result<()> {
        let mut first = Ok(());
        for ino in self.wbuf.inos() {
            if let Err(e) = self.flush_file(ino).await {
                tracing::warn!(ino, error = %e, "could not write buffered data");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Writes `data` (or, with `zero_length`, zeros) into one chunk through
    /// its primary, failing over to other members and newer maps.
    #[allow(clippy::too_many_arguments)]
    async fn chunk_op(
        &self,
        ino: u64,
        index: u64,
        offset: u32,
        data: Bytes,
        zero_length: u32,
        sync: bool,
        cs: u32,
    ) -> Result<()> {
        let body = pb::WriteChunkRequest {
            offset,
            data,
            zero_length,
            ..Default::default()
        };
        self.chunk_write(ino, index, body, sync, cs).await
    }

    /// One `WriteChunk` of chunk `(ino, index)` (see
    /// [`crate::osd_io::OsdIo::write_chunk`]); the chunk's cached copy goes.
    async fn chunk_write(
        &self,
        ino: u64,
        index: u64,
        body: pb::WriteChunkRequest,
        sync: bool,
        cs: u32,
    ) -> Result<()> {
        self.cache.invalidate(ino, index);
        if !sync {
            self.sync_marks.note_unsynced(ino);
        }
        // The OSDs keep what the file's snapshots saw.
        let body = pb::WriteChunkRequest {
            snap_seq: self.snaps.seq(ino),
            ..body
        };
        self.osd_io
            .write_chunk(&self.session, ino, index, body, sync, cs)
            .await?;
        // A readahead that raced the write may hold old data.
        self.cache.invalidate(ino, index);
        Ok(())
    }

    /// Reads up to `size` bytes at `offset`, stopping at the end of file.
    /// Sequential reads are served from whole chunks fetched ahead.
    pub async fn read(self: &Arc<Self>, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let file_size = match self.known_size(ino) {
            // Other writers grow a shared file: the size comes from the
            // MDS (or the lease cache, which their commits recall).
            Some(st) if !st.shared => st.size,
            _ => {
                let a = self.getattr(ino).await?;
                self.note_attr(&a)
            }
        };
        if offset >= file_size || size == 0 {
            return Ok(Vec::new());
        }
        let len = u64::from(size).min(file_size - offset);
        let cs = self.chunk_size_of(ino);
        let parts = split_range(offset, len, cs);
        let mut buf = vec![0u8; len as usize];
        // Parts that this client's buffered writes hold whole are read from
        // there (the newest bytes): a file read right after it was written
        // needs neither a flush nor an OSD.
        let mut pos = 0usize;
        let buffered: Vec<bool> = parts
            .iter()
            .map(|&(index, off, n)| {
                let dst = &mut buf[pos..pos + n as usize];
                pos += n as usize;
                self.wbuf.copy_if_covered(ino, index, u64::from(off), dst)
            })
            .collect();
        if buffered.iter().all(|&b| b) {
            return Ok(buf);
        }
        // Other buffered writes to the range land first.
        let held: Vec<u64> = parts
            .iter()
            .zip(&buffered)
            .filter(|&(&(index, off, n), &b)| {
                !b && self.wbuf.holds(ino, index, u64::from(off), u64::from(n))
            })
            .map(|(p, _)| p.0)
            .collect();
        if !held.is_empty() {
            self.flush_chunks(ino, held.into_iter(), false).await?;
        }
        // Another session writes a shared-write file through at any time,
        // and its commits reach this client only while it holds a lease:
        // such a file is read from the OSDs each time, never cached.
        let shared = self.is_shared(ino);
        let sequential = !shared && self.cache.note_read(ino, offset, len);
        if sequential {
            // Keep READAHEAD_CHUNKS chunks past this read loading.
            let last = parts.last().map_or(0, |p| p.0);
            let end_index = file_size.saturating_sub(1) / u64::from(cs);
            for index in last + 1..=(last + READAHEAD_CHUNKS).min(end_index) {
                let (slot, new) = self.cache.get_or_insert(ino, index, u64::from(cs));
                if new {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let _ = slot
                            .get_or_try_init(|| {
                                me.osd_io.read_chunk(&me.session, ino, index, 0, cs, 0)
                            })
                            .await;
                    });
                }
            }
        }
        let reads = parts
            .iter()
            .zip(&buffered)
            .map(|(&(index, off, n), &b)| async move {
                if b {
                    return Ok(None);
                }
                let slot = match self.cache.get(ino, index).filter(|_| !shared) {
                    Some(s) => Some(s),
                    None if sequential => {
                        Some(self.cache.get_or_insert(ino, index, u64::from(cs)).0)
                    }
                    None => None,
                };
                match slot {
                    Some(slot) => {
                        let chunk = slot
                            .get_or_try_init(|| {
                                self.osd_io.read_chunk(&self.session, ino, index, 0, cs, 0)
                            })
                            .await?;
                        Ok::<_, ClientError>(Some(Piece::Cached(chunk.clone(), off as usize)))
                    }
                    None => Ok(Some(Piece::Direct(
                        self.osd_io
                            .read_chunk(&self.session, ino, index, off, n, 0)
                            .await?,
                    ))),
                }
            });
        let datas = try_join_all(reads).await?;
        let mut pos = 0usize;
        for ((_, _, n), d) in parts.iter().zip(datas) {
            let n = *n as usize;
            match d {
                None => {}
                Some(Piece::Direct(d)) => {
                    let take = d.len().min(n);
                    buf[pos..pos + take].copy_from_slice(&d[..take]);
                }
                Some(Piece::Cached(chunk, off)) => copy_out(&chunk, off, n, &mut buf[pos..pos + n]),
            }
            pos += n;
        }
        Ok(buf)
    }

    /// Asks every up OSD to make the writes to `ino` it acknowledged durable.
    /// Each OSD syncs what it stored itself, so every replica is covered.
    /// Buffered data goes out as sync writes (one round trip: the primary
    /// and its replicas fsync before they answer); only when writes went
    /// out without sync since the last fsync are the OSDs asked as well.
    pub async fn sync_data(&self, ino: u64) -> Result<()> {
        self.flush_file_as(ino, true).await?;
        let Some(mark) = self.sync_marks.pending(ino) else {
            return Ok(());
        };
        self.osd_io
            .broadcast(&self.session, "fsync", |mut c, header| async move {
                c.sync_objects(pb::SyncObjectsRequest {
                    header,
                    inos: vec![ino],
                })
                .await
                .map(|_| ())
            })
            .await?;
        self.sync_marks.synced(ino, mark);
        Ok(())
    }

    /// Data ranges of `ino` from chunk `from` on, as the up OSDs store
    /// them, merged (a range is data if any copy has data there), and the
    /// byte offset up to which that is complete. None if an OSD did not
    /// answer: nothing can be called a hole then.
    async fn object_extents(&self, ino: u64, from: u64) -> Result<Option<(Vec<(u64, u64)>, u64)>> {
        let cs = u64::from(self.chunk_size_of(ino));
        let map = self.osd_io.map();
        let cap = self.osd_io.caps.get(&self.session, ino, false).await?;
        let asks = map
            .osds
            .iter()
            .filter(|o| o.state == OsdState::Up as i32)
            .map(|o| {
                let call = self.osd_io.osd(&self.session, &o.addr).map(|mut c| {
                    let req = pb::ObjectExtentsRequest {
                        header: self.session.header_with(cap.clone()),
                        ino,
                        from_index: from,
                        max_chunks: 4096,
                    };
                    async move { c.object_extents(req).await }
                });
                async move {
                    match tokio::time::timeout(IO_RETRY_BUDGET, call?).await {
                        Ok(Ok(r)) => Ok(Some(r.into_inner())),
                        Ok(Err(s)) if !retry_elsewhere(&s) => Err(ClientError::from(s)),
                        _ => Ok(None),
                    }
                }
            });
        let mut ranges = Vec::new();
        let mut complete_to = u64::MAX;
        for r in try_join_all(asks).await? {
            let Some(r) = r else { return Ok(None) };
            if r.truncated {
                let last = r.chunks.last().map_or(from, |c| c.index);
                complete_to = complete_to.min(last.saturating_add(1).saturating_mul(cs));
            }
            for c in r.chunks {
                let base = c.index.saturating_mul(cs);
                ranges.extend(c.data.iter().map(|d| {
                    (
                        base.saturating_add(d.start.min(cs)),
                        base.saturating_add(d.end.min(cs)),
                    )
                }));
            }
        }
        ranges.retain(|r| r.0 < r.1 && r.0 < complete_to);
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e.min(complete_to))),
            }
        }
        Ok(Some((merged, complete_to)))
    }

    /// lseek SEEK_DATA (`data`) or SEEK_HOLE from `offset` in a file of
    /// `size` bytes, from where the OSDs store data (their own sparse
    /// files). ENXIO at or past the end; the end is a hole.
    pub async fn seek_data_hole(
        &self,
        ino: u64,
        offset: u64,
        data: bool,
        size: u64,
    ) -> Result<u64> {
        if offset >= size {
            return Err(ClientError::posix(libc::ENXIO, "seek past the end"));
        }
        // Buffered writes are data too.
        self.flush_file(ino).await?;
        let cs = u64::from(self.chunk_size_of(ino));
        let mut pos = offset;
        loop {
            let Some((ranges, complete_to)) = self.object_extents(ino, pos / cs).await? else {
                // Not every OSD answered: all of the file counts as data.
                return Ok(if data { offset } else { size });
            };
            if data {
                if let Some(r) = ranges.iter().find(|r| r.1 > pos) {
                    let at = r.0.max(pos);
                    return if at < size {
                        Ok(at)
                    } else {
                        Err(ClientError::posix(libc::ENXIO, "no data past the offset"))
                    };
                }
            } else {
                for r in &ranges {
                    if r.0 > pos {
                        break;
                    }
                    pos = pos.max(r.1);
                }
                if pos < complete_to {
                    return Ok(pos.min(size));
                }
            }
            if complete_to >= size {
                return if data {
                    Err(ClientError::posix(libc::ENXIO, "no data past the offset"))
                } else {
                    Ok(size)
                };
            }
            pos = pos.max(complete_to);
        }
    }

    /// Makes `[offset, offset+len)` of `ino` read as zeros without storing
    /// data (punch hole / zero range). Does not change the file size.
    pub async fn zero_range(&self, ino: u64, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > MAX_FILE_SIZE) {
            return Err(ClientError::posix(
                libc::EFBIG,
                "range past the largest file size",
            ));
        }
        let cs = self.chunk_size_of(ino);
        let parts = split_range(offset, len, cs);
        self.flush_chunks(ino, parts.iter().map(|p| p.0), false)
            .await?;
        let parts = parts
            .into_iter()
            .map(|(index, off, n)| self.chunk_op(ino, index, off, Bytes::new(), n, false, cs));
        try_join_all(parts).await?;
        Ok(())
    }

    /// Cuts the data of `ino` to `size` bytes (growing a file needs no data
    /// change: it is sparse). Each chunk holding bytes at or past `size` is
    /// cut through its primary, versioned and replicated like a write, so
    /// a replica that misses the cut is behind by a version and catches up.
    pub async fn truncate_data(&self, ino: u64, size: u64) -> Result<()> {
        if size > MAX_FILE_SIZE {
            return Err(ClientError::posix(
                libc::EFBIG,
                "size past the largest file size",
            ));
        }
        // Buffered writes happened before the truncate. One that found the
        // cluster full stays reported at fsync/close: a truncate (which
        // frees space) goes on.
        match self.flush_file(ino).await {
            Err(e) if matches!(e.errno(), libc::ENOSPC | libc::EDQUOT) => {
                self.wbuf.keep_error(ino, (e.errno(), e.to_string()));
            }
            r => r?,
        }
        self.cache.invalidate_file(ino);
        self.refresh_snap_seq(ino).await;
        let cs = self.chunk_size_of(ino);
        let chunk = u64::from(cs);
        let cuts = self
            .chunks_past(ino, size, chunk)
            .await?
            .into_iter()
            .map(|index| {
                // index <= MAX_FILE_SIZE / chunk: no overflow.
                let keep = size.saturating_sub(index * chunk).min(chunk) as u32;
                let body = pb::WriteChunkRequest {
                    offset: VECTORED_WRITE_OFFSET,
                    truncate_to: Some(keep),
                    ..Default::default()
                };
                self.chunk_write(ino, index, body, true, cs)
            });
        stream::iter(cuts)
            .buffer_unordered(CUT_CONCURRENCY)
            .try_collect()
            .await
    }

    /// Chunks of `ino` that may hold bytes at or past `size`: those where
    /// an up OSD stores data past it; if one did not answer, every chunk
    /// up to the largest size known for the file.
    async fn chunks_past(&self, ino: u64, size: u64, chunk: u64) -> Result<BTreeSet<u64>> {
        let first = size / chunk;
        let mut out = BTreeSet::new();
        let mut from = first;
        loop {
            let Some((ranges, complete_to)) = self.object_extents(ino, from).await? else {
                let attr = self.getattr(ino).await?.size;
                let known = self.known_size(ino).map_or(0, |st| st.size).max(attr);
                out.extend(first..known.div_ceil(chunk).min(MAX_FILE_SIZE / chunk + 1));
                return Ok(out);
            };
            for (start, end) in ranges.into_iter().filter(|r| r.1 > size) {
                out.extend(start.max(size) / chunk..=(end - 1) / chunk);
            }
            if complete_to == u64::MAX {
                return Ok(out);
            }
            from = complete_to / chunk;
        }
    }
}
