//! The on-disk chunk store.
//!
//! A chunk is identified by `(ino, index)`. Its bytes live in a sparse
//! file whose length is the chunk's stored length (bytes past it read as
//! zeros: a hole), in one of 4096 bucket directories (see [`layout`]);
//! next to it a sidecar holds the chunk's version and a crc32c per
//! [`BLOCK_SIZE`] block (see [`sidecar`]).
//!
//! All methods are synchronous and may block on disk I/O: async callers run
//! them on the blocking pool (see [`ChunkStore::blocking`]). Writers to one
//! chunk are serialized by a striped per-chunk lock; object-wide operations
//! (truncate, delete) take a striped per-inode lock exclusively (see
//! `locks`). Every file operation goes through a [`disk::Disk`], so that
//! tests can inject faults; named fail points are listed in [`faults`].

pub mod disk;
mod error;
pub mod faults;
mod install;
pub mod layout;
mod listing;
mod locks;
mod lost;
mod open_cache;
mod read;
mod remove;
mod scrub;
pub mod sidecar;
mod snaps;
mod stamped_copy;
mod sync;
mod write;

#[cfg(test)]
mod sim_disk;
#[cfg(test)]
mod snap_tests;
#[cfg(test)]
mod tests;

pub use error::{Result, StoreError};
pub use layout::{chunk_file, files_of};
pub use listing::ChunkData;
pub use open_cache::DEFAULT_OPEN_CHUNKS;
pub use sidecar::{content_digest, data_digest, sidecar_content, SnapStamp, BLOCK_SIZE};
pub use snaps::Trimmed;
pub use stamped_copy::StampedCopy;

use crate::spare_files::{SpareFiles, MAX_SPARES};
use avalon_proto::limits::{DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use disk::{Disk, StdDisk};
use error::io_err;
use layout::{parse_bucket_name, parse_chunk_name, FileKind, BUCKETS, SPARE_DIR};
use locks::Locks;
use open_cache::{new_cache, open_chunk_budget, OpenCache};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How a write picks the version it stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionMode {
    /// Primary: the current version + 1.
    Next,
    /// Primary: the next version stamped with map epoch `epoch`
    /// ([`crate::chunk_version::next`]).
    NextIn { epoch: u64 },
    /// Replica of a primary that names the version its copy held before
    /// the write: applied only on top of exactly `prev`. The stored
    /// `version` itself is a duplicate (applied again, as for `Exact`);
    /// anything below `version` is a gap or a diverged history
    /// ([`StoreError::VersionGap`]: peering replaces the copy), anything
    /// above it is refused ([`StoreError::StaleVersion`]).
    After { prev: u64, version: u64 },
    /// Replica: exactly the version the primary assigned. A version equal to
    /// the stored one is a duplicate (a retried forward, or the same version
    /// from a coordinator that took over): its bytes are applied again,
    /// which is idempotent for a retry and lets the newest coordinator win
    /// otherwise; an older one is refused ([`StoreError::StaleVersion`]);
    /// one that skips versions is refused ([`StoreError::VersionGap`])
    /// unless `force`.
    Exact { version: u64, force: bool },
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutcome {
    /// The chunk's version after the write.
    pub version: u64,
    /// Its version before the write.
    pub previous: u64,
    /// The write was a duplicate of the stored version and was not applied.
    pub duplicate: bool,
    /// A primary's cut of a chunk already that short, or absent: nothing
    /// changed and no version was taken.
    pub unchanged: bool,
}

/// The effective chunk size of a layout: 0 means the default; otherwise it
/// must lie within the protocol limits.
pub fn effective_chunk_size(chunk_size: u32) -> Result<u32> {
    let cs = if chunk_size == 0 {
        DEFAULT_CHUNK_SIZE
    } else {
        chunk_size
    };
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return Err(StoreError::InvalidArgument(format!(
            "chunk_size {cs} out of range [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
        )));
    }
    Ok(cs)
}

/// Checks that `[offset, offset+len)` lies inside a chunk of `chunk_size`.
pub fn check_range(offset: u64, len: u64, chunk_size: u32) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= u64::from(chunk_size) => Ok(()),
        _ => Err(StoreError::InvalidArgument(format!(
            "range offset {offset} + length {len} exceeds chunk size {chunk_size}"
        ))),
    }
}

/// A 64-bit mix (splitmix64's finalizer), for lock stripes and digests.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Chunk files of one OSD, with used-space accounting.
pub struct ChunkStore {
    /// Where every file operation goes.
    disk: Arc<dyn Disk>,
    root: PathBuf,
    locks: Locks,
    used: AtomicU64,
    chunks: AtomicU64,
    /// Chunks written without fsync since their last sync, by inode.
    dirty: Mutex<HashMap<u64, BTreeSet<u64>>>,
    /// Chunks whose write failed midway in this process: their blocks
    /// may disagree with their sidecar without any damage.
    torn_here: Mutex<HashSet<(u64, u64)>>,
    /// Copies lost to disk errors, until rebuilt.
    lost: lost::Lost,
    /// Recently used chunks: open files and verified metadata.
    open_chunks: OpenCache,
    /// Which bucket directories exist.
    buckets: Vec<AtomicBool>,
    /// Large writes go direct (off once the filesystem refused one).
    direct_writes: AtomicBool,
    /// A bucket was made since the root's last fsync (held across that
    /// fsync, see `sync_dir_of`).
    root_dirty: Mutex<bool>,
    /// Per bucket: chunk names made in it, and how many of those its last
    /// completed fsync covers. A sync write fsyncs the bucket only while
    /// they differ (a name there may not be durable yet, also one made by
    /// an earlier write without sync, or by a sync write still under way).
    names_made: Vec<AtomicU64>,
    names_synced: Vec<AtomicU64>,
    /// Emptied files of removed chunks, reused for new ones.
    spares: SpareFiles,
    /// Snapshot clones stored, and their bytes (see `snaps`).
    clones: AtomicU64,
    clone_bytes: AtomicU64,
    /// The clone directory exists.
    snaps_made: AtomicBool,
    /// Clones try a reflink of the head first (off once refused).
    reflinks: AtomicBool,
    /// Clone buckets made durably (held while one is made).
    snap_dirs: Mutex<HashSet<u64>>,
}

/// What a write stores.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// These bytes at the offset.
    Data(&'a [u8]),
    /// Zeros over this many bytes at the offset (a punched hole); never
    /// extends the stored length.
    Zero(u32),
    /// Cuts the chunk to the offset (a file truncate); never extends it.
    Cut,
}

impl Payload<'_> {
    fn len(&self) -> u64 {
        match self {
            Payload::Data(d) => d.len() as u64,
            Payload::Zero(n) => u64::from(*n),
            Payload::Cut => 0,
        }
    }
}

/// One stored chunk as listed by [`ChunkStore::list`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedChunk {
    pub ino: u64,
    pub index: u64,
    /// `None` when the chunk's metadata fails verification.
    pub state: Option<(u64, u64)>,
    /// Content digest ([`content_digest`]); 0 when corrupt.
    pub digest: u64,
}

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore")
            .field("root", &self.root)
            .field("used", &self.used_bytes())
            .field("chunks", &self.chunk_count())
            .finish()
    }
}

impl ChunkStore {
    /// Opens (creating if needed) the store rooted at `root` and counts the
    /// chunks and bytes it holds.
    pub fn open(root: impl Into<PathBuf>) -> Result<ChunkStore> {
        Self::open_with_cache(root, open_chunk_budget())
    }

    /// Like [`ChunkStore::open`], keeping at most `open_chunks` chunks open.
    pub fn open_with_cache(root: impl Into<PathBuf>, open_chunks: usize) -> Result<ChunkStore> {
        Self::open_on(Arc::new(StdDisk), root, open_chunks)
    }

    /// Like [`ChunkStore::open_with_cache`] on `disk`.
    pub fn open_on(
        disk: Arc<dyn Disk>,
        root: impl Into<PathBuf>,
        open_chunks: usize,
    ) -> Result<ChunkStore> {
        let root = root.into();
        disk.create_dir_all(&root).map_err(io_err(&root))?;
        let spare_dir = root.join(SPARE_DIR);
        let spares = SpareFiles::open(disk.clone(), spare_dir.clone(), MAX_SPARES)
            .map_err(io_err(&spare_dir))?;
        let store = ChunkStore {
            disk,
            root,
            locks: Locks::new(),
            used: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            dirty: Mutex::new(HashMap::new()),
            lost: lost::Lost::default(),
            torn_here: Mutex::new(HashSet::new()),
            open_chunks: new_cache(open_chunks),
            buckets: (0..BUCKETS).map(|_| AtomicBool::new(false)).collect(),
            direct_writes: AtomicBool::new(true),
            root_dirty: Mutex::new(false),
            names_made: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            names_synced: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            spares,
            clones: AtomicU64::new(0),
            clone_bytes: AtomicU64::new(0),
            snaps_made: AtomicBool::new(false),
            reflinks: AtomicBool::new(true),
            snap_dirs: Mutex::new(HashSet::new()),
        };
        for ent in store
            .disk
            .read_dir(&store.root)
            .map_err(io_err(&store.root))?
        {
            if let Some(b) = parse_bucket_name(&ent.name) {
                store.buckets[b as usize].store(true, Ordering::Relaxed);
            }
        }
        store.move_old_layout()?;
        let (mut used, mut chunks) = (0u64, 0u64);
        for b in store.made_buckets() {
            let dir = store.bucket(b);
            for f in store.disk.read_dir(&dir).map_err(io_err(&dir))? {
                let p = dir.join(&f.name);
                match parse_chunk_name(&f.name) {
                    Some((_, _, FileKind::Data)) => {
                        let (len, is_file) = store.disk.stat(&p).map_err(io_err(&p))?;
                        if is_file {
                            used += len;
                            chunks += 1;
                        }
                    }
                    // An install cut short by a crash: never renamed into
                    // place, so nothing refers to it.
                    Some((_, _, FileKind::Tmp)) => {
                        store.disk.remove_file(&p).map_err(io_err(&p))?;
                    }
                    _ => {}
                }
            }
        }
        store.used.store(used, Ordering::Relaxed);
        store.chunks.store(chunks, Ordering::Relaxed);
        store.open_snaps()?;
        Ok(store)
    }

    /// The directory holding the chunks.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Sum of the stored lengths of all chunks.
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Number of chunks stored.
    pub fn chunk_count(&self) -> u64 {
        self.chunks.load(Ordering::Relaxed)
    }

    /// Runs `f` on the blocking thread pool.
    pub async fn blocking<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&ChunkStore) -> Result<T> + Send + 'static,
    {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| StoreError::Internal(format!("store task failed: {e}")))?
    }
}
