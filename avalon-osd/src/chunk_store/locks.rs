//! Striped locks: writers to one chunk are serialized by a per-chunk lock;
//! object-wide operations (truncate, delete) take a per-inode lock
//! exclusively, chunk operations take it shared. A fixed number of
//! stripes, so that no lock is ever allocated or freed.

use super::mix;
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

const LOCK_STRIPES: usize = 1024;

/// The striped inode and chunk locks of a store.
#[derive(Debug)]
pub(super) struct Locks {
    inos: Vec<RwLock<()>>,
    chunks: Vec<Mutex<()>>,
}

fn ino_stripe(ino: u64) -> usize {
    (mix(ino) % LOCK_STRIPES as u64) as usize
}

fn chunk_stripe(ino: u64, index: u64) -> usize {
    (mix(mix(ino) ^ index) % LOCK_STRIPES as u64) as usize
}

impl Locks {
    pub(super) fn new() -> Locks {
        Locks {
            inos: (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            chunks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// `ino` shared: chunk operations.
    pub(super) fn ino_shared(&self, ino: u64) -> RwLockReadGuard<'_, ()> {
        self.inos[ino_stripe(ino)]
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// `ino` exclusive: object-wide operations.
    pub(super) fn ino_exclusive(&self, ino: u64) -> RwLockWriteGuard<'_, ()> {
        self.inos[ino_stripe(ino)]
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Chunk `(ino, index)` (under the inode's shared lock).
    pub(super) fn chunk(&self, ino: u64, index: u64) -> MutexGuard<'_, ()> {
        self.chunks[chunk_stripe(ino, index)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Both locks of a chunk, without waiting; `None` when either is held.
    pub(super) fn try_chunk(
        &self,
        ino: u64,
        index: u64,
    ) -> Option<(RwLockReadGuard<'_, ()>, MutexGuard<'_, ()>)> {
        let i = match self.inos[ino_stripe(ino)].try_read() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        let c = match self.chunks[chunk_stripe(ino, index)].try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some((i, c))
    }
}
