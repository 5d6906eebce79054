//! Removing chunks: one chunk (recovery's cleanup), a whole object
//! (deletes), and cutting an object's chunks (truncate).

use super::disk::OpenMode;
use super::error::{corrupt, io_err, Result, StoreError};
use super::sidecar::{blocks_for, ChunkMeta, BLOCK_SIZE, DIRTY, FRESH};
use super::{effective_chunk_size, ChunkStore};
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

    /// Cuts object `ino` (a file of `chunk_size`-byte chunks) to `size`
    /// bytes: chunks starting at or past `size` become empty, the one
    /// containing `size` is cut. Every chunk that changes gets the next
    /// version, so a replica that missed the truncate holds an older
    /// version and learns it when peering (an emptied chunk stays as a
    /// zero-length tombstone until the object is deleted). Idempotent: a
    /// chunk already short enough is left alone.
    pub fn truncate_object(&self, ino: u64, size: u64, chunk_size: u32) -> Result<()> {
        if ino == 0 {
            return Err(StoreError::InvalidArgument("ino must not be 0".into()));
        }
        let cs = u64::from(effective_chunk_size(chunk_size)?);
        let _i = self.locks.ino_exclusive(ino);
        // Works on the files directly; open copies are reloaded afterwards.
        // (A chunk is open only while its files exist: the listing names
        // every open one, without a walk over all open chunks.)
        for index in self.indexes(ino)? {
            self.forget(ino, index);
            let keep = match index.checked_mul(cs) {
                Some(s) if s < size => size - s,
                _ => 0,
            };
            if keep >= cs {
                continue;
            }
            let mut meta = match self.load_meta(ino, index) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(StoreError::Corruption { .. }) if keep == 0 => {
                    // Nothing of it survives: replace by an empty chunk
                    // one version past what its sidecar says.
                    let v = self.meta_version(ino, index).unwrap_or(0);
                    self.remove_chunk_files(ino, index)?;
                    let dpath = self.data_path(ino, index);
                    let f = self
                        .disk
                        .open(&dpath, OpenMode::CreateTruncate)
                        .map_err(io_err(&dpath))?;
                    self.fsync(&*f, &dpath)?;
                    let meta = ChunkMeta {
                        version: v.saturating_add(1),
                        ..ChunkMeta::empty(0)
                    };
                    self.store_meta(ino, index, &meta, true)?;
                    self.chunks.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if keep >= meta.len {
                continue;
            }
            let dpath = self.data_path(ino, index);
            let file = self
                .disk
                .open(&dpath, OpenMode::Write)
                .map_err(io_err(&dpath))?;
            // Durably dirty first: a crash while cutting leaves a chunk
            // that is checked and settled when opened, never "corrupt".
            meta.flags |= DIRTY;
            self.store_meta(ino, index, &meta, true)?;
            let tail = keep % BLOCK_SIZE;
            let nblocks = blocks_for(keep);
            if tail != 0 {
                // Verify the block being cut before re-checksumming its prefix.
                let b = keep / BLOCK_SIZE;
                let bs = b * BLOCK_SIZE;
                let be = (bs + BLOCK_SIZE).min(meta.len);
                let mut buf = vec![0u8; (be - bs) as usize];
                file.read_exact_at(&mut buf, bs).map_err(io_err(&dpath))?;
                if crc32c::crc32c(&buf) != meta.crcs[b as usize] {
                    return Err(corrupt(
                        ino,
                        index,
                        format!("block {b} checksum mismatch while truncating"),
                    ));
                }
                meta.crcs[b as usize] = crc32c::crc32c(&buf[..tail as usize]);
            }
            file.set_len(keep).map_err(io_err(&dpath))?;
            meta.crcs.truncate(nblocks);
            let old_len = meta.len;
            meta.len = keep;
            meta.version = meta.version.saturating_add(1);
            self.fsync(&*file, &dpath)?;
            meta.flags &= !(DIRTY | FRESH);
            self.store_meta(ino, index, &meta, true)?;
            self.used.fetch_sub(old_len - keep, Ordering::Relaxed);
        }
        Ok(())
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
        if ino == 0 {
            return Err(StoreError::InvalidArgument("ino must not be 0".into()));
        }
        let _i = self.locks.ino_exclusive(ino);
        let indexes = self.indexes(ino)?;
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
