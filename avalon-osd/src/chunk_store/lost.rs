//! Copies lost to disk errors: a chunk whose fsync failed (the kernel may
//! have dropped its dirty pages, and a second fsync could succeed without
//! them: PostgreSQL's "fsyncgate") or whose data could not be read (EIO).
//! Such a copy is never trusted again in this process: reads answer
//! `Corruption` (DataLoss: the client reads another replica), writes and
//! syncs of its object fail with EIO, listings report it corrupt so that
//! peering replaces it by another replica's copy; an install (that repair)
//! or a removal clears the mark.

use super::error::{corrupt, StoreError};
use super::ChunkStore;
use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The lost copies of a store.
#[derive(Debug, Default)]
pub(super) struct Lost {
    set: Mutex<HashSet<(u64, u64)>>,
    /// Size of `set`, so that the hot paths skip the lock while it is 0.
    count: AtomicUsize,
}

impl Lost {
    fn lock(&self) -> MutexGuard<'_, HashSet<(u64, u64)>> {
        self.set.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn contains(&self, ino: u64, index: u64) -> bool {
        self.count.load(Ordering::Acquire) > 0 && self.lock().contains(&(ino, index))
    }

    pub(super) fn any_of(&self, ino: u64) -> bool {
        self.count.load(Ordering::Acquire) > 0 && self.lock().iter().any(|&(i, _)| i == ino)
    }

    fn insert(&self, ino: u64, index: u64) {
        let mut g = self.lock();
        g.insert((ino, index));
        self.count.store(g.len(), Ordering::Release);
    }

    pub(super) fn remove(&self, ino: u64, index: u64) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut g = self.lock();
        g.remove(&(ino, index));
        self.count.store(g.len(), Ordering::Release);
    }
}

impl ChunkStore {
    /// Marks chunk `(ino, index)` lost after `e`, an error of its files.
    pub(super) fn mark_lost(&self, ino: u64, index: u64, e: &StoreError) {
        tracing::error!(ino, index, error = %e, "chunk copy lost to a disk error; to be rebuilt from its replicas");
        self.lost.insert(ino, index);
        self.forget(ino, index);
    }

    /// The error a lost copy answers a read with.
    pub(super) fn lost_copy(ino: u64, index: u64) -> StoreError {
        corrupt(
            ino,
            index,
            "a disk error lost this copy (failed fsync or read); rebuilt from the replicas",
        )
    }

    /// The error a write or sync touching a lost copy fails with.
    pub(super) fn lost_io(path: &Path) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            source: io::Error::from_raw_os_error(libc::EIO),
        }
    }

    /// Number of copies lost to disk errors and not rebuilt yet.
    pub fn lost_count(&self) -> usize {
        self.lost.count.load(Ordering::Acquire)
    }

    /// Whether chunk `(ino, index)` is a copy lost to a disk error.
    pub fn is_lost(&self, ino: u64, index: u64) -> bool {
        self.lost.contains(ino, index)
    }
}
