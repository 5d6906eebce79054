//! Open chunks: recently used chunks keep their files open and their
//! verified metadata in memory (an LRU bounded by the process file
//! limit), so that a request neither reopens the files nor rereads the
//! sidecar. Opening a chunk whose directory entries and inodes the kernel
//! dropped costs several disk reads, more than reading a small chunk
//! itself: a working set of many small files stays open.

use super::disk::{DiskFile, OpenMode};
use super::error::{io_err, Result};
use super::sidecar::{ChunkMeta, FRESH};
use super::ChunkStore;
use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};

/// Open chunks kept by default (two descriptors each), before the process
/// file limit lowers it.
pub const DEFAULT_OPEN_CHUNKS: usize = 8192;
/// Descriptors left for sockets and everything else.
const FD_RESERVE: u64 = 256;

/// A chunk whose files are open, with its metadata as last stored.
///
/// Only used under the chunk's lock (or the inode's exclusive lock), so
/// its own mutex is never contended. The sidecar on disk is rewritten (one
/// `pwrite`, to the page cache) by every change before the change is
/// acknowledged, so it always matches `meta` for a process that is killed;
/// after a power loss, a chunk whose sidecar says it was being changed
/// (its `DIRTY` flag, made durable before the first change since an
/// fsync) is checked whole and settled when opened (see `sidecar`).
#[derive(Debug)]
pub(super) struct OpenChunk {
    pub(super) data: Arc<dyn DiskFile>,
    pub(super) meta_file: Arc<dyn DiskFile>,
    /// The data file opened for direct writes, at the first that needs it.
    pub(super) direct: Option<Arc<dyn DiskFile>>,
    pub(super) meta: ChunkMeta,
    /// Changes applied since opened (a sync clears the dirty flag only if
    /// none came while it ran).
    pub(super) writes: u64,
}

/// A shared open chunk.
pub(super) type OpenRef = Arc<Mutex<OpenChunk>>;

/// Locks an open chunk (never contended, see [`OpenChunk`]).
pub(super) fn lock_open(c: &OpenRef) -> MutexGuard<'_, OpenChunk> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// The open chunks of a store.
pub(super) type OpenCache = Mutex<LruCache<(u64, u64), OpenRef>>;

/// An empty cache of at most `n` chunks.
pub(super) fn new_cache(n: usize) -> OpenCache {
    Mutex::new(LruCache::new(
        NonZeroUsize::new(n.max(1)).unwrap_or(NonZeroUsize::MIN),
    ))
}

/// How many chunks may stay open: the default, or fewer when the process
/// may not open that many files (after trying to raise its soft limit).
pub(super) fn open_chunk_budget() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 64;
        }
        // Up to three descriptors per chunk: data, sidecar, direct writes.
        let want = (DEFAULT_OPEN_CHUNKS as u64 * 3 + FD_RESERVE * 4).min(lim.rlim_max);
        if lim.rlim_cur < want {
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = want;
            }
        }
    }
    let cur = lim.rlim_cur;
    ((cur.saturating_sub(FD_RESERVE) / 3) as usize).clamp(16, DEFAULT_OPEN_CHUNKS)
}

impl ChunkStore {
    fn cache(&self) -> MutexGuard<'_, LruCache<(u64, u64), OpenRef>> {
        self.open_chunks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open chunk `(ino, index)` if it is open, without counting it
    /// as used.
    pub(super) fn cached(&self, ino: u64, index: u64) -> Option<OpenRef> {
        self.cache().peek(&(ino, index)).cloned()
    }

    /// The open chunk `(ino, index)` if it is open, without waiting for
    /// the cache.
    pub(super) fn try_cached(&self, ino: u64, index: u64) -> Option<OpenRef> {
        self.open_chunks
            .try_lock()
            .ok()?
            .get(&(ino, index))
            .cloned()
    }

    /// The open chunk `(ino, index)`: from the cache, or opened and
    /// verified now (`None` when the chunk does not exist). The caller holds
    /// the chunk's lock or the inode's exclusive lock.
    pub(super) fn open_chunk(&self, ino: u64, index: u64) -> Result<Option<OpenRef>> {
        if let Some(c) = self.cache().get(&(ino, index)) {
            return Ok(Some(c.clone()));
        }
        let Some(meta) = self.load_meta(ino, index)? else {
            return Ok(None);
        };
        let dpath = self.data_path(ino, index);
        let mpath = self.meta_path(ino, index);
        let data = self
            .disk
            .open(&dpath, OpenMode::Write)
            .map_err(io_err(&dpath))?;
        let meta_file = self
            .disk
            .open(&mpath, OpenMode::Write)
            .map_err(io_err(&mpath))?;
        Ok(Some(self.remember(
            ino,
            index,
            OpenChunk {
                data,
                meta_file,
                direct: None,
                meta,
                writes: 0,
            },
        )))
    }

    /// Creates a new, empty chunk's files (the caller holds its lock).
    pub(super) fn create_chunk(&self, ino: u64, index: u64) -> Result<OpenRef> {
        self.make_bucket(ino)?;
        let dpath = self.data_path(ino, index);
        let mpath = self.meta_path(ino, index);
        self.spares.take_to(&dpath);
        self.spares.take_to(&mpath);
        let data = self
            .disk
            .open(&dpath, OpenMode::CreateTruncate)
            .map_err(io_err(&dpath))?;
        let meta_file = self
            .disk
            .open(&mpath, OpenMode::CreateTruncate)
            .map_err(io_err(&mpath))?;
        self.name_made(ino);
        let oc = OpenChunk {
            data,
            meta_file,
            direct: None,
            // Needs no durable intent: until its first fsync a crash may
            // drop it whole (nothing of it was durable).
            meta: ChunkMeta::empty(FRESH),
            writes: 0,
        };
        Ok(self.remember(ino, index, oc))
    }

    fn remember(&self, ino: u64, index: u64, oc: OpenChunk) -> OpenRef {
        oc.data.advise_random();
        let c = Arc::new(Mutex::new(oc));
        self.cache().push((ino, index), c.clone());
        c
    }

    /// Drops a chunk from the open-chunk cache (its files changed by other
    /// means, or it is gone). The caller holds the chunk's lock.
    pub(super) fn forget(&self, ino: u64, index: u64) {
        self.cache().pop(&(ino, index));
    }

    /// A chunk's metadata: the open copy, or loaded from disk without
    /// opening the chunk (listings must not flush the cache).
    pub(super) fn meta_of(&self, ino: u64, index: u64) -> Result<Option<ChunkMeta>> {
        match self.cached(ino, index) {
            Some(c) => Ok(Some(lock_open(&c).meta.clone())),
            None => self.load_meta(ino, index),
        }
    }

    /// Number of chunks whose files are open.
    pub fn open_chunk_count(&self) -> usize {
        self.cache().len()
    }
}
