//! What the store holds: listings for peering, inode numbers, and the
//! data ranges (holes) of an object's chunks.

use super::disk::OpenMode;
use super::error::{io_err, Result, StoreError};
use super::sidecar::SUSPECT;
use super::ChunkStore;
use super::ListedChunk;
use std::io;

/// A chunk index, the byte ranges of it that hold data, and its version
/// and stored length from its sidecar (`None`: corrupt metadata).
pub type ChunkData = (u64, Vec<(u64, u64)>, Option<(u64, u64)>);

impl ChunkStore {
    /// Every stored chunk for which `want(ino, index)` holds, with its
    /// version and length (`None` when its metadata is corrupt).
    pub fn list(&self, mut want: impl FnMut(u64, u64) -> bool) -> Result<Vec<ListedChunk>> {
        let mut out = Vec::new();
        for (ino, index) in self.all_chunks()? {
            if !want(ino, index) {
                continue;
            }
            let _i = self.locks.ino_shared(ino);
            let _c = self.locks.chunk(ino, index);
            let (state, digest) = match self.meta_of(ino, index) {
                // Reported as corrupt so that peering replaces it.
                Ok(Some(m)) if m.flags & SUSPECT != 0 || self.lost.contains(ino, index) => {
                    (None, 0)
                }
                Ok(Some(m)) => (Some((m.version, m.len)), m.digest()),
                Ok(None) => continue,
                Err(StoreError::Corruption { .. }) => (None, 0),
                Err(e) => return Err(e),
            };
            out.push(ListedChunk {
                ino,
                index,
                state,
                digest,
            });
        }
        Ok(out)
    }
    /// Where the chunks of `ino` with index `from` on hold data: up to
    /// `max` chunks in index order, each with its data ranges (from the
    /// local filesystem's SEEK_DATA/SEEK_HOLE over the stored length, so
    /// punched and never-written ranges are holes), and whether chunks
    /// were left out.
    pub fn extents(&self, ino: u64, from: u64, max: usize) -> Result<(Vec<ChunkData>, bool)> {
        let mut out = Vec::new();
        let indexes = self.indexes(ino)?;
        let mut it = indexes.range(from..);
        for &index in it.by_ref() {
            if out.len() >= max.max(1) {
                return Ok((out, true));
            }
            let _i = self.locks.ino_shared(ino);
            let _c = self.locks.chunk(ino, index);
            let (len, state) = match self.meta_of(ino, index) {
                Ok(Some(m)) if m.flags & SUSPECT != 0 || self.lost.contains(ino, index) => {
                    (m.len, None)
                }
                Ok(Some(m)) => (m.len, Some((m.version, m.len))),
                Ok(None) => continue,
                // Unknown content: say data, never a false hole.
                Err(StoreError::Corruption { .. }) => (u64::MAX, None),
                Err(e) => return Err(e),
            };
            let dpath = self.data_path(ino, index);
            let file = match self.disk.open(&dpath, OpenMode::Read) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&dpath)(e)),
            };
            let len = len.min(file.len().map_err(io_err(&dpath))?);
            out.push((index, file.data_ranges(len), state));
        }
        Ok((out, false))
    }

    /// Inode numbers with chunks stored here.
    pub fn inos(&self) -> Result<Vec<u64>> {
        let mut out: Vec<u64> = self.all_chunks()?.into_iter().map(|c| c.0).collect();
        out.dedup();
        Ok(out)
    }
}
