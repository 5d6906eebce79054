//! fsync tracking: which chunks were written since their last fsync, and
//! making them durable (data, sidecar, directories) when a client syncs.

use super::disk::{DiskFile, OpenMode};
use super::error::{io_err, Result};
use super::faults;
use super::open_cache::lock_open;
use super::ChunkStore;
use std::collections::BTreeSet;
use std::io;
use std::path::Path;

impl ChunkStore {
    /// fsyncs one file of a chunk.
    pub(super) fn fsync(&self, f: &dyn DiskFile, path: &Path) -> Result<()> {
        faults::check(faults::BEFORE_FSYNC).map_err(io_err(path))?;
        faults::check(faults::FSYNC).map_err(io_err(path))?;
        f.sync_all().map_err(io_err(path))
    }

    /// fsyncs a chunk's data and sidecar (open ones through the cache).
    /// `false` when the chunk does not exist.
    fn sync_files(&self, ino: u64, index: u64) -> Result<bool> {
        if let Some(c) = self.cached(ino, index) {
            // fsync without holding the chunk: writes go on meanwhile.
            let (data, meta) = {
                let oc = lock_open(&c);
                (oc.data.clone(), oc.meta_file.clone())
            };
            self.fsync(&*data, &self.data_path(ino, index))?;
            self.fsync(&*meta, &self.meta_path(ino, index))?;
            return Ok(true);
        }
        for path in [self.data_path(ino, index), self.meta_path(ino, index)] {
            match self.disk.open(&path, OpenMode::Read) {
                Ok(f) => self.fsync(&*f, &path)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ok(true)
    }

    /// Makes a chunk durable: fsyncs its data, metadata and directories.
    /// A chunk that no longer exists needs nothing.
    pub fn sync_chunk(&self, ino: u64, index: u64) -> Result<()> {
        if !self.sync_files(ino, index)? {
            return Ok(());
        }
        self.sync_dir_of(ino)
    }

    pub(super) fn mark_dirty(&self, ino: u64, index: u64) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(ino)
            .or_default()
            .insert(index);
    }

    /// Number of chunks written since their last fsync.
    pub fn dirty_count(&self) -> usize {
        let g = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        g.values().map(BTreeSet::len).sum()
    }

    /// Makes every chunk of `inos` written since its last sync durable
    /// (data, metadata, directories). On failure the chunks stay dirty.
    pub fn sync_objects(&self, inos: &[u64]) -> Result<()> {
        for &ino in inos {
            let taken = self
                .dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&ino);
            let Some(indexes) = taken else { continue };
            let r = (|| {
                for &index in &indexes {
                    self.sync_files(ino, index)?;
                }
                self.sync_dir_of(ino)
            })();
            if let Err(e) = r {
                let mut g = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
                g.entry(ino).or_default().extend(indexes);
                return Err(e);
            }
        }
        Ok(())
    }
}
