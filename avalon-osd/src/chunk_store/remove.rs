//! Removing chunks: one chunk (recovery's cleanup) and a whole object
//! (deletes). A truncate is a write (`Payload::Cut`).

use super::error::{io_err, Result, StoreError};
use super::ChunkStore;
use std::io;
use std::sync::atomic::Ordering;

impl ChunkStore {
    fn remove_chunk_files(&self, ino: u64, index: u64) -> Result<()> {
        self.forget(ino, index);
        self.lost.remove(ino, index);
        let dpath = self.data_path(ino, index);
        match self.disk.stat(&dpath) {
            Ok((len, _)) => {
                self.spares.discard(&dpath).map_err(io_err(&dpath))?;
                self.used.fetch_sub(len, Ordering::Relaxed);
                self.chunks.fetch_sub(1, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&dpath)(e)),
        }
        let mpath = self.meta_path(ino, index);
        match self.spares.discard(&mpath) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&mpath)(e)),
        }
    }

    /// Removes one chunk if its version is at most `max_version` (a copy
    /// the current members hold at least as new). Returns whether it was
    /// removed.
    pub fn remove_chunk(&self, ino: u64, index: u64, max_version: u64) -> Result<bool> {
        let _i = self.locks.ino_shared(ino);
        let _c = self.locks.chunk(ino, index);
        let v = match self.meta_of(ino, index) {
            Ok(Some(m)) => m.version,
            Ok(None) => return Ok(false),
            Err(StoreError::Corruption { .. }) => 0,
            Err(e) => return Err(e),
        };
        if v > max_version {
            return Ok(false);
        }
        self.remove_chunk_files(ino, index)?;
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&ino)
            .map(|s| s.remove(&index));
        Ok(true)
    }

    /// Removes every chunk of `ino`.
    pub fn delete_object(&self, ino: u64) -> Result<()> {
        self.delete_object_snap(ino, 0)
    }

    /// Removes every chunk of `ino`, a file covered by snapshots up to
    /// `snap_seq` (0: none): each chunk those snapshots still see (changed
    /// before the newest of them) is kept as a clone first. Clones are
    /// only ever removed by [`ChunkStore::trim_clones`], from the MDS's
    /// list of live snapshots.
    pub fn delete_object_snap(&self, ino: u64, snap_seq: u64) -> Result<()> {
        if ino == 0 {
            return Err(StoreError::InvalidArgument("ino must not be 0".into()));
        }
        let _i = self.locks.ino_exclusive(ino);
        let indexes = self.indexes(ino)?;
        if snap_seq > 0 {
            self.preserve_object(ino, &indexes, snap_seq)?;
        }
        if indexes.is_empty() {
            return Ok(());
        }
        // Each closes its chunk first. (This used to walk every open chunk
        // per deleted inode under the cache lock, which stalled all reads
        // while the GC removed thousands of files.)
        for index in indexes {
            self.remove_chunk_files(ino, index)?;
        }
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ino);
        self.sync_dir(&self.ino_dir(ino))
    }
}
