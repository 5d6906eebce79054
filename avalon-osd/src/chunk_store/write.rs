//! The write path: versioned writes and punched holes into a chunk,
//! buffered, or with `O_DIRECT` for the aligned middle of a large write
//! (see `direct_io`).

use super::disk::DiskFile;
use super::error::{corrupt, io_err, Result, StoreError};
use super::faults;
use super::open_cache::{lock_open, OpenChunk};
use super::sidecar::{blocks_for, BLOCK_SIZE, DIRTY};
use super::{check_range, effective_chunk_size, ChunkStore, Payload, VersionMode, WriteOutcome};
use crate::direct_io;
use std::path::Path;
use std::sync::atomic::Ordering;

/// Writes at least this large start their way to the disk at once.
const EARLY_WRITEBACK_BYTES: usize = 256 << 10;

/// Punches a hole over `[off, off+len)` of `file` (keeping its size), or
/// writes zeros where the filesystem cannot punch holes.
fn zero_range(file: &dyn DiskFile, path: &Path, off: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    match file.punch_hole(off, len) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
            let zeros = vec![0u8; BLOCK_SIZE as usize];
            let mut pos = off;
            while pos < off + len {
                let n = (off + len - pos).min(BLOCK_SIZE);
                file.write_all_at(&zeros[..n as usize], pos)
                    .map_err(io_err(path))?;
                pos += n;
            }
            Ok(())
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

/// How recording a write intent failed.
enum IntentError {
    /// Writing the sidecar.
    Write(StoreError),
    /// Its fsync.
    Fsync(StoreError),
}
use IntentError::{Fsync, Write};

impl IntentError {
    fn into_inner(self) -> StoreError {
        match self {
            Write(e) | Fsync(e) => e,
        }
    }
}

impl ChunkStore {
    /// The stored version of a chunk (0 when it does not exist).
    pub fn version(&self, ino: u64, index: u64) -> Result<u64> {
        let _i = self.locks.ino_shared(ino);
        let _c = self.locks.chunk(ino, index);
        Ok(self
            .open_chunk(ino, index)?
            .map_or(0, |c| lock_open(&c).meta.version))
    }

    /// Writes `data` at `offset` of chunk `(ino, index)` of a file whose
    /// chunks are `chunk_size` bytes, storing the version `mode` picks.
    /// With `sync`, the data, metadata and directories are fsynced before
    /// returning.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &self,
        ino: u64,
        index: u64,
        offset: u32,
        data: &[u8],
        chunk_size: u32,
        mode: VersionMode,
        sync: bool,
    ) -> Result<WriteOutcome> {
        self.apply(
            ino,
            index,
            offset,
            Payload::Data(data),
            chunk_size,
            mode,
            sync,
        )
    }

    /// Like [`ChunkStore::write`] for any [`Payload`]: a `Zero` payload
    /// makes the range read as zeros (punching a hole) without extending the
    /// chunk, and is versioned like a write.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        ino: u64,
        index: u64,
        offset: u32,
        payload: Payload<'_>,
        chunk_size: u32,
        mode: VersionMode,
        sync: bool,
    ) -> Result<WriteOutcome> {
        self.apply_items(ino, index, &[(offset, payload)], chunk_size, mode, sync)
    }

    /// Applies several ranges to one chunk, in order, as one write with one
    /// version (a client's coalesced write-back): all of them or, on an
    /// error, possibly some of them but never a version that claims them.
    pub fn apply_items(
        &self,
        ino: u64,
        index: u64,
        items: &[(u32, Payload<'_>)],
        chunk_size: u32,
        mode: VersionMode,
        sync: bool,
    ) -> Result<WriteOutcome> {
        self.apply_items_snap(ino, index, items, chunk_size, mode, sync, 0)
    }

    /// [`ChunkStore::apply_items`] for a file covered by snapshots up to
    /// `snap_seq` (0: none): when that is newer than the chunk's last
    /// change, the chunk's content is first kept, durably, as the clone
    /// those snapshots read (see `snaps`); a chunk created now is marked
    /// unseen by them.
    #[allow(clippy::too_many_arguments)]
    pub fn apply_items_snap(
        &self,
        ino: u64,
        index: u64,
        items: &[(u32, Payload<'_>)],
        chunk_size: u32,
        mode: VersionMode,
        sync: bool,
        snap_seq: u64,
    ) -> Result<WriteOutcome> {
        if ino == 0 {
            return Err(StoreError::InvalidArgument("ino must not be 0".into()));
        }
        let cs = effective_chunk_size(chunk_size)?;
        for (offset, payload) in items {
            check_range(u64::from(*offset), payload.len(), cs)?;
        }
        if let VersionMode::Exact { version: 0, .. } | VersionMode::After { version: 0, .. } = mode
        {
            return Err(StoreError::InvalidArgument(
                "a replicated write needs a version > 0".into(),
            ));
        }
        let _i = self.locks.ino_shared(ino);
        let _c = self.locks.chunk(ino, index);
        if self.lost.contains(ino, index) {
            return Err(Self::lost_io(&self.data_path(ino, index)));
        }
        let found = self.open_chunk(ino, index)?;
        let (current, len) = found.as_ref().map_or((0, 0), |c| {
            let oc = lock_open(c);
            (oc.meta.version, oc.meta.len)
        });
        if let ([(keep, Payload::Cut)], VersionMode::Next | VersionMode::NextIn { .. }) =
            (items, mode)
        {
            if len <= u64::from(*keep) {
                return Ok(WriteOutcome {
                    version: current,
                    previous: current,
                    duplicate: false,
                    unchanged: true,
                });
            }
        }
        let duplicate = matches!(mode, VersionMode::Exact { version, .. }
            | VersionMode::After { version, .. } if version == current);
        let overflow = || StoreError::InvalidArgument("chunk version overflow".to_string());
        let stale = |got| StoreError::StaleVersion {
            ino,
            index,
            current,
            got,
        };
        let gap = |got| StoreError::VersionGap {
            ino,
            index,
            current,
            got,
        };
        let new_version = match mode {
            VersionMode::Next => current.checked_add(1).ok_or_else(overflow)?,
            VersionMode::NextIn { epoch } => {
                crate::chunk_version::next(current, epoch).ok_or_else(overflow)?
            }
            VersionMode::After { prev, version } => {
                if version < current {
                    return Err(stale(version));
                }
                if version != current && prev != current {
                    return Err(gap(version));
                }
                version
            }
            VersionMode::Exact { version, force } => {
                if version < current {
                    return Err(stale(version));
                }
                if version > current + 1 && !force {
                    return Err(gap(version));
                }
                version
            }
        };
        let dpath = self.data_path(ino, index);
        faults::check(faults::BEFORE_WRITE, &dpath).map_err(io_err(&dpath))?;
        let (entry, existed) = match found {
            Some(c) => (c, true),
            None => (self.create_chunk(ino, index)?, false),
        };
        let mut oc = lock_open(&entry);
        if snap_seq > oc.meta.snap.seq {
            // A duplicate's bytes are in the chunk already: nothing of
            // the content before it is left to keep.
            if !existed {
                oc.meta.snap.born = snap_seq;
            } else if !duplicate {
                self.preserve(ino, index, &oc, snap_seq)?;
            }
            // Made durable with the write intent below (or with the new
            // chunk's first fsync).
            oc.meta.snap.seq = snap_seq;
        }
        if !oc.meta.dirty() {
            if let Err(e) = self.record_intent(ino, index, &mut oc) {
                drop(oc);
                match &e {
                    // The sidecar's fsync failed: final (see `sync`).
                    Fsync(e) => self.mark_lost(ino, index, e),
                    Write(_) => self.note_torn(ino, index),
                }
                return Err(e.into_inner());
            }
        }
        oc.writes += 1;
        let old_meta_len = oc.meta.encoded_len();
        let old_len = oc.meta.len;
        let applied = self
            .apply_to(ino, index, &mut oc, items, new_version)
            .and_then(|()| faults::check(faults::AFTER_DATA_WRITE, &dpath).map_err(io_err(&dpath)));
        match applied {
            Ok(()) => {}
            Err(e) => {
                // Files and memory may disagree now: reload from disk next
                // time, where the torn blocks are accepted (as after a
                // crash: old or new per page) and the copy repaired.
                drop(oc);
                self.note_torn(ino, index);
                return Err(e);
            }
        }
        let dpath = self.data_path(ino, index);
        if let Err(e) = self.persist_meta(ino, index, &oc, old_meta_len) {
            drop(oc);
            self.note_torn(ino, index);
            return Err(e);
        }
        let synced = if sync {
            self.fsync(&*oc.meta_file, &self.meta_path(ino, index))
                .and_then(|()| self.fsync(&*oc.data, &dpath))
                .and_then(|()| {
                    // Also when an earlier write without sync made the
                    // chunk: its name must be durable with these bytes.
                    if self.name_pending(ino) {
                        self.sync_dir_of(ino)
                    } else {
                        Ok(())
                    }
                })
        } else {
            Ok(())
        };
        let new_len = oc.meta.len;
        drop(oc);
        if let Err(e) = synced {
            // Final (see `sync`): the bytes may be gone whatever a retry says.
            self.mark_lost(ino, index, &e);
            return Err(e);
        }
        if !sync {
            self.mark_dirty(ino, index);
        }
        if new_len >= old_len {
            self.used.fetch_add(new_len - old_len, Ordering::Relaxed);
        } else {
            self.used.fetch_sub(old_len - new_len, Ordering::Relaxed);
        }
        if !existed {
            self.chunks.fetch_add(1, Ordering::Relaxed);
        }
        Ok(WriteOutcome {
            version: new_version,
            previous: current,
            duplicate,
            unchanged: false,
        })
    }

    /// Drops a chunk whose write failed midway from the cache, noting
    /// that its files may disagree (see `ChunkStore::recover_dirty`).
    fn note_torn(&self, ino: u64, index: u64) {
        self.torn_here
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((ino, index));
        self.forget(ino, index);
    }

    /// Makes the chunk's sidecar say, durably, that the chunk is being
    /// changed, before its first change since its last fsync: after a
    /// crash, blocks of such a chunk that fail their crc are torn writes
    /// nobody fsynced, not damage (see `ChunkStore::recover_dirty`). One
    /// sidecar fsync per chunk per fsync of the chunk.
    fn record_intent(
        &self,
        ino: u64,
        index: u64,
        oc: &mut OpenChunk,
    ) -> std::result::Result<(), IntentError> {
        oc.meta.flags |= DIRTY;
        let len = oc.meta.encoded_len();
        self.persist_meta(ino, index, oc, len).map_err(Write)?;
        self.fsync(&*oc.meta_file, &self.meta_path(ino, index))
            .map_err(Fsync)
    }

    /// Writes `data` at `off` of a chunk's data file: the aligned middle
    /// of a large write direct (see `direct_io`), the rest buffered.
    fn write_data(&self, oc: &mut OpenChunk, dpath: &Path, data: &[u8], off: u64) -> Result<()> {
        if let Some((n, e)) = faults::write_fault(dpath, off, data.len()) {
            oc.data
                .write_all_at(&data[..n], off)
                .map_err(io_err(dpath))?;
            return Err(io_err(dpath)(e));
        }
        let direct = self.direct_writes.load(Ordering::Relaxed);
        if let Some(mid) = direct
            .then(|| direct_io::aligned_part(off, data.len()))
            .flatten()
        {
            match self.write_direct(oc, dpath, &data[mid.clone()], off + mid.start as u64) {
                Ok(n) => {
                    let rest = mid.start + n;
                    oc.data
                        .write_all_at(&data[..mid.start], off)
                        .and_then(|()| oc.data.write_all_at(&data[rest..], off + rest as u64))
                        .map_err(io_err(dpath))?;
                    return Ok(());
                }
                // This filesystem takes no direct I/O (or not so aligned).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(error = %e, path = %dpath.display(), "direct writes off");
                    self.direct_writes.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(io_err(dpath)(e)),
            }
        }
        oc.data.write_all_at(data, off).map_err(io_err(dpath))?;
        if data.len() >= EARLY_WRITEBACK_BYTES {
            oc.data.start_writeback(off, data.len());
        }
        Ok(())
    }

    fn write_direct(
        &self,
        oc: &mut OpenChunk,
        dpath: &Path,
        data: &[u8],
        off: u64,
    ) -> std::io::Result<usize> {
        if oc.direct.is_none() {
            oc.direct = Some(self.disk.open_direct(dpath)?);
        }
        oc.direct
            .as_ref()
            .expect("just opened")
            .write_direct(data, off)
    }

    /// Writes `items` into an open chunk's data file and updates its
    /// in-memory metadata (block checksums, length, version).
    fn apply_to(
        &self,
        ino: u64,
        index: u64,
        oc: &mut OpenChunk,
        items: &[(u32, Payload<'_>)],
        new_version: u64,
    ) -> Result<()> {
        let dpath = self.data_path(ino, index);
        let mut len = oc.meta.len;
        // Blocks whose bytes changed, with their crc when one data range
        // covers the whole block (else it is recomputed from the file).
        let mut touched: std::collections::BTreeMap<u64, Option<u32>> = Default::default();
        for &(offset, payload) in items {
            let off = u64::from(offset);
            match payload {
                Payload::Zero(zl) => {
                    let end = (off + u64::from(zl)).min(len);
                    if off < end {
                        zero_range(&*oc.data, &dpath, off, end - off)?;
                        for b in off / BLOCK_SIZE..=(end - 1) / BLOCK_SIZE {
                            touched.insert(b, None);
                        }
                    }
                }
                Payload::Cut => {
                    if off >= len {
                        continue;
                    }
                    let tail = off % BLOCK_SIZE;
                    let b = off / BLOCK_SIZE;
                    if tail != 0 && !touched.contains_key(&b) {
                        // The block being cut keeps a prefix whose crc is
                        // recomputed below: verify it first, so that a
                        // rotten block is never blessed with a new crc.
                        let bs = b * BLOCK_SIZE;
                        let mut buf = vec![0u8; ((bs + BLOCK_SIZE).min(len) - bs) as usize];
                        oc.data
                            .read_exact_at(&mut buf, bs)
                            .map_err(io_err(&dpath))?;
                        if crc32c::crc32c(&buf) != oc.meta.crcs[b as usize] {
                            return Err(corrupt(
                                ino,
                                index,
                                format!("block {b} checksum mismatch while truncating"),
                            ));
                        }
                    }
                    oc.data.set_len(off).map_err(io_err(&dpath))?;
                    len = off;
                    touched.retain(|&t, _| t < blocks_for(off) as u64);
                    if tail != 0 {
                        touched.insert(b, None);
                    }
                }
                Payload::Data(data) => {
                    if data.is_empty() {
                        continue;
                    }
                    self.write_data(oc, &dpath, data, off)?;
                    let end = off + data.len() as u64;
                    // Past the old end, the old tail block and any gap
                    // blocks change too.
                    let first = off.min(len) / BLOCK_SIZE;
                    len = len.max(end);
                    for b in first..=(end - 1) / BLOCK_SIZE {
                        let bs = b * BLOCK_SIZE;
                        let be = (bs + BLOCK_SIZE).min(len);
                        let crc = (bs >= off && be <= end).then(|| {
                            crc32c::crc32c(&data[(bs - off) as usize..(be - off) as usize])
                        });
                        touched.insert(b, crc);
                    }
                }
            }
        }
        let meta = &mut oc.meta;
        meta.crcs.resize(blocks_for(len), 0);
        meta.len = len;
        let mut buf = Vec::new();
        for (b, crc) in touched {
            let crc = match crc {
                Some(c) => c,
                None => {
                    let bs = b * BLOCK_SIZE;
                    let be = (bs + BLOCK_SIZE).min(len);
                    buf.resize((be - bs) as usize, 0);
                    oc.data
                        .read_exact_at(&mut buf, bs)
                        .map_err(io_err(&dpath))?;
                    crc32c::crc32c(&buf)
                }
            };
            meta.crcs[b as usize] = crc;
        }
        meta.version = new_version;
        Ok(())
    }
}
