//! The read path: only the checksum blocks a read touches are read and
//! verified; small reads of open chunks whose pages are cached are served
//! without blocking.

use super::error::{corrupt, io_err, Result};
use super::faults;
use super::open_cache::lock_open;
use super::sidecar::{SnapStamp, BLOCK_SIZE};
use super::{check_range, ChunkStore};
use avalon_proto::limits::MAX_CHUNK_SIZE;
use std::io;

/// The checksum blocks a read of `len` bytes at `offset` touches, clipped
/// to the chunk's stored length: the bytes read from disk are
/// `start..stop`, the caller wants `off..end` of them.
pub(super) struct BlockSpan {
    first: u64,
    last: u64,
    /// Where the blocks read start in the chunk.
    pub(super) start: u64,
    stop: u64,
    off: u64,
    end: u64,
}

impl BlockSpan {
    /// None when nothing of the range is stored.
    pub(super) fn of(offset: u32, len: u32, chunk_len: u64) -> Option<BlockSpan> {
        let off = u64::from(offset);
        let end = (off + u64::from(len)).min(chunk_len);
        if off >= end {
            return None;
        }
        let first = off / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        Some(BlockSpan {
            first,
            last,
            start: first * BLOCK_SIZE,
            stop: ((last + 1) * BLOCK_SIZE).min(chunk_len),
            off,
            end,
        })
    }

    /// A buffer for the blocks.
    pub(super) fn buffer(&self) -> Vec<u8> {
        vec![0u8; (self.stop - self.start) as usize]
    }

    /// Checks every block of `buf` against its stored crc.
    pub(super) fn verify(&self, buf: &[u8], crcs: &[u32]) -> std::result::Result<(), String> {
        for b in self.first..=self.last {
            let lo = ((b - self.first) * BLOCK_SIZE) as usize;
            let hi = (lo + BLOCK_SIZE as usize).min(buf.len());
            let got = crc32c::crc32c(&buf[lo..hi]);
            let want = crcs[b as usize];
            if got != want {
                return Err(format!(
                    "block {b} checksum mismatch (stored {want:08x}, computed {got:08x})"
                ));
            }
        }
        Ok(())
    }

    /// The bytes asked for, out of the blocks read.
    pub(super) fn cut(&self, mut buf: Vec<u8>) -> Vec<u8> {
        buf.truncate((self.end - self.start) as usize);
        buf.drain(..(self.off - self.start) as usize);
        buf
    }
}

impl ChunkStore {
    /// Reads up to `len` bytes at `offset` of a chunk, verifying the crc of
    /// every block touched. Returns the bytes (shorter than asked past the
    /// stored end: a hole) and the chunk's version (0 for a missing chunk).
    pub fn read(&self, ino: u64, index: u64, offset: u32, len: u32) -> Result<(Vec<u8>, u64)> {
        if ino == 0 {
            return Err(super::StoreError::InvalidArgument(
                "ino must not be 0".into(),
            ));
        }
        check_range(u64::from(offset), u64::from(len), MAX_CHUNK_SIZE)?;
        let _i = self.locks.ino_shared(ino);
        let _c = self.locks.chunk(ino, index);
        self.read_head(ino, index, offset, len, None)
    }

    /// [`ChunkStore::read`] with the chunk's locks held; with `seen_by`, as
    /// that snapshot sees the head: a hole unless created before it.
    pub(super) fn read_head(
        &self,
        ino: u64,
        index: u64,
        offset: u32,
        len: u32,
        seen_by: Option<u64>,
    ) -> Result<(Vec<u8>, u64)> {
        self.read_head_stamped(ino, index, offset, len, seen_by)
            .map(|(data, version, _)| (data, version))
    }

    /// [`ChunkStore::read_head`], also returning the snapshot stamp of the
    /// copy read (read under the same lock as the bytes).
    pub(super) fn read_head_stamped(
        &self,
        ino: u64,
        index: u64,
        offset: u32,
        len: u32,
        seen_by: Option<u64>,
    ) -> Result<(Vec<u8>, u64, SnapStamp)> {
        if self.lost.contains(ino, index) {
            return Err(Self::lost_copy(ino, index));
        }
        let Some(entry) = self.open_chunk(ino, index)? else {
            return Ok((Vec::new(), 0, SnapStamp::default()));
        };
        let oc = lock_open(&entry);
        let meta = &oc.meta;
        if seen_by.is_some_and(|s| meta.snap.born >= s) {
            return Ok((Vec::new(), 0, SnapStamp::default()));
        }
        // Only the checksum blocks the range touches are read and verified.
        let Some(span) = BlockSpan::of(offset, len, meta.len) else {
            return Ok((Vec::new(), meta.version, meta.snap));
        };
        let mut buf = span.buffer();
        let read = faults::check(faults::READ, &self.data_path(ino, index))
            .and_then(|()| oc.data.read_exact_at(&mut buf, span.start));
        if let Err(e) = read {
            drop(oc);
            if e.kind() == io::ErrorKind::UnexpectedEof {
                return Err(corrupt(ino, index, "data file shorter than its metadata"));
            }
            // A disk read error: this copy is lost, another replica serves.
            self.mark_lost(ino, index, &io_err(&self.data_path(ino, index))(e));
            return Err(Self::lost_copy(ino, index));
        }
        span.verify(&buf, &meta.crcs)
            .map_err(|m| corrupt(ino, index, m))?;
        let (version, stamp) = (meta.version, meta.snap);
        drop(oc);
        Ok((span.cut(buf), version, stamp))
    }

    /// A read served without blocking, for async callers: only when the
    /// chunk is open, no writer holds it and the bytes are in the page
    /// cache (`RWF_NOWAIT`). `None`: use [`ChunkStore::read`] on the
    /// blocking pool instead.
    pub fn try_read_cached(
        &self,
        ino: u64,
        index: u64,
        offset: u32,
        len: u32,
    ) -> Option<Result<(Vec<u8>, u64)>> {
        if ino == 0 || check_range(u64::from(offset), u64::from(len), MAX_CHUNK_SIZE).is_err() {
            return None;
        }
        let _locks = self.locks.try_chunk(ino, index)?;
        if self.lost.contains(ino, index) {
            return Some(Err(Self::lost_copy(ino, index)));
        }
        let entry = self.try_cached(ino, index)?;
        let oc = entry.try_lock().ok()?;
        let meta = &oc.meta;
        let Some(span) = BlockSpan::of(offset, len, meta.len) else {
            return Some(Ok((Vec::new(), meta.version)));
        };
        let mut buf = span.buffer();
        if faults::check(faults::READ, &self.data_path(ino, index)).is_err() {
            return None; // the blocking path meets the error and handles it
        }
        if oc.data.read_nowait(&mut buf, span.start) != Some(buf.len()) {
            // Not (all) cached, or unsupported: the blocking path decides.
            return None;
        }
        if let Err(m) = span.verify(&buf, &meta.crcs) {
            return Some(Err(corrupt(ino, index, m)));
        }
        let version = meta.version;
        drop(oc);
        Some(Ok((span.cut(buf), version)))
    }
}
