//! fsync tracking: which chunks were written since their last fsync, and
//! making them durable (data, sidecar, directories) when a client syncs.

use super::disk::{DiskFile, OpenMode};
use super::error::{io_err, Result};
use super::faults;
use super::open_cache::{lock_open, OpenRef};
use super::sidecar::{DIRTY, FRESH};
use super::ChunkStore;
use std::collections::BTreeSet;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// What an fsync of a chunk found.
enum Synced {
    /// No such chunk.
    Missing,
    /// Synced through files opened for it.
    Closed,
    /// Synced through the open chunk, at this many changes.
    Open(OpenRef, u64),
}

impl ChunkStore {
    /// fsyncs one file of a chunk.
    pub(super) fn fsync(&self, f: &dyn DiskFile, path: &Path) -> Result<()> {
        faults::check(faults::BEFORE_FSYNC, path).map_err(io_err(path))?;
        faults::check(faults::FSYNC, path).map_err(io_err(path))?;
        let _m = crate::metrics::fsync();
        f.sync_data().map_err(io_err(path))
    }

    /// fsyncs a chunk's data and sidecar (open ones through the cache).
    fn sync_files(&self, ino: u64, index: u64) -> Result<Synced> {
        if let Some(c) = self.cached(ino, index) {
            // fsync without holding the chunk: writes go on meanwhile.
            let (data, meta, writes) = {
                let oc = lock_open(&c);
                (oc.data.clone(), oc.meta_file.clone(), oc.writes)
            };
            self.fsync(&*data, &self.data_path(ino, index))?;
            self.fsync(&*meta, &self.meta_path(ino, index))?;
            return Ok(Synced::Open(c, writes));
        }
        for path in [self.data_path(ino, index), self.meta_path(ino, index)] {
            match self.disk.open(&path, OpenMode::Read) {
                Ok(f) => self.fsync(&*f, &path)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Synced::Missing),
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ok(Synced::Closed)
    }

    /// After a chunk and its directory were fsynced: clears its dirty
    /// flag, unless it changed since (the sidecar is rewritten without an
    /// fsync: a crash that loses this only costs a check when reopened).
    fn settle(&self, ino: u64, index: u64, synced: Synced) {
        let _i = self.locks.ino_shared(ino);
        let _c = self.locks.chunk(ino, index);
        let (c, writes) = match synced {
            Synced::Open(c, writes) => (c, writes),
            // Evicted while dirty: loading it checks and settles it (its
            // pages were just written back, so mostly cached).
            Synced::Closed if self.cached(ino, index).is_none() => {
                if let Err(e) = self.load_meta(ino, index) {
                    tracing::warn!(ino, index, error = %e, "synced chunk not settled");
                }
                return;
            }
            _ => return,
        };
        if !self.cached(ino, index).is_some_and(|x| Arc::ptr_eq(&x, &c)) {
            return; // replaced meanwhile (install, truncate, delete)
        }
        let mut oc = lock_open(&c);
        if oc.writes != writes || !oc.meta.dirty() {
            return;
        }
        oc.meta.flags &= !(DIRTY | FRESH);
        let len = oc.meta.encoded_len();
        if let Err(e) = self.persist_meta(ino, index, &oc, len) {
            tracing::warn!(ino, index, error = %e, "sidecar not rewritten after fsync");
            drop(oc);
            self.forget(ino, index);
        }
    }

    /// Makes a chunk durable: fsyncs its data, metadata and directories.
    /// A chunk that no longer exists needs nothing.
    pub fn sync_chunk(&self, ino: u64, index: u64) -> Result<()> {
        if self.lost.contains(ino, index) {
            return Err(Self::lost_io(&self.data_path(ino, index)));
        }
        let synced = self
            .sync_files(ino, index)
            .inspect_err(|e| self.mark_lost(ino, index, e))?;
        if matches!(synced, Synced::Missing) {
            return Ok(());
        }
        self.sync_dir_of(ino)
            .inspect_err(|e| self.mark_lost(ino, index, e))?;
        self.settle(ino, index, synced);
        Ok(())
    }

    /// Makes durable a write this process just applied without sync (a
    /// primary's half of a sync write, fsynced while the replicas store
    /// theirs): data and sidecar, and the bucket directory while a name in
    /// it may not be durable. Unlike [`ChunkStore::sync_chunk`] it leaves
    /// the write-intent flag set, as a replica's sync write does, so a
    /// loop of sync writes to one chunk pays no intent fsync before each
    /// write (which also held up the forward to the replicas), nor a
    /// directory fsync. The flag goes at the next `SyncObjects` (the write
    /// is in the dirty set).
    pub fn sync_write(&self, ino: u64, index: u64) -> Result<()> {
        if self.lost.contains(ino, index) {
            return Err(Self::lost_io(&self.data_path(ino, index)));
        }
        let synced = self
            .sync_files(ino, index)
            .inspect_err(|e| self.mark_lost(ino, index, e))?;
        if self.name_pending(ino) && !matches!(synced, Synced::Missing) {
            self.sync_dir_of(ino)
                .inspect_err(|e| self.mark_lost(ino, index, e))?;
        }
        Ok(())
    }

    pub(super) fn mark_dirty(&self, ino: u64, index: u64) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(ino)
            .or_default()
            .insert(index);
    }

    /// Whether this process wrote chunk `(ino, index)` since its last sync.
    pub(super) fn dirty_here(&self, ino: u64, index: u64) -> bool {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
            .is_some_and(|s| s.contains(&index))
    }

    /// Number of chunks written since their last fsync.
    pub fn dirty_count(&self) -> usize {
        let g = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        g.values().map(BTreeSet::len).sum()
    }

    /// Makes every chunk of `inos` written since its last sync durable
    /// (data, metadata, directories). A failed fsync is final: it is never
    /// retried as if it might succeed (the kernel may have dropped the
    /// pages it could not write, and a second fsync would find nothing to
    /// do). The chunk becomes a lost copy (see `lost`), rebuilt from its
    /// replicas, and every sync of its object fails until then.
    pub fn sync_objects(&self, inos: &[u64]) -> Result<()> {
        for &ino in inos {
            if self.lost.any_of(ino) {
                return Err(Self::lost_io(&self.ino_dir(ino)));
            }
            let taken = self
                .dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&ino);
            let Some(indexes) = taken else { continue };
            let mut synced = Vec::with_capacity(indexes.len());
            let mut failed = None;
            for &index in &indexes {
                match self.sync_files(ino, index) {
                    Ok(s) => synced.push((index, s)),
                    Err(e) => {
                        self.mark_lost(ino, index, &e);
                        failed.get_or_insert(e);
                    }
                }
            }
            if let Err(e) = self.sync_dir_of(ino) {
                // The new names of these chunks may be gone.
                for &(index, _) in &synced {
                    self.mark_lost(ino, index, &e);
                }
                return Err(failed.unwrap_or(e));
            }
            for (index, s) in synced {
                self.settle(ino, index, s);
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    }
}
