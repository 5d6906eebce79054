//! The on-disk chunk store.
//!
//! A chunk is identified by `(ino, index)`. Its bytes live in
//! `ROOT/<bucket>/<ino as 16 hex>.<index as 16 hex>`, a sparse file whose
//! length is the chunk's stored length (bytes past it read as zeros: a
//! hole); the bucket is `ino % 4096` as 3 hex digits, a directory made
//! with its first chunk and kept. Next to it, `<name>.meta`
//! holds the chunk's version and a crc32c per 64 KiB block
//! of the stored bytes (the crc of a trailing partial block covers just the
//! stored bytes), protected by a crc of its own so that a torn sidecar is
//! detected.
//!
//! No directory per inode: on an ext4 without a journal every new inode
//! costs a scan past recently freed ones, and a small file's chunk took
//! three (directory, data, sidecar); the mkdir alone was a quarter of an
//! OSD's CPU while small files were written. A store of the older layout
//! (`ROOT/<ino>/<index>`) is moved into the buckets when opened.
//!
//! All methods are synchronous and may block on disk I/O: async callers run
//! them on the blocking pool (see [`ChunkStore::blocking`]). Writers to one
//! chunk are serialized by a striped per-chunk lock; object-wide operations
//! (truncate, delete) take a striped per-inode lock exclusively.

use crate::direct_io;
use crate::spare_files::{SpareFiles, MAX_SPARES};
use avalon_proto::limits::{DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use lru::LruCache;
use std::num::NonZeroUsize;

/// Checksum block size: one crc32c per this many bytes. A read verifies
/// (so reads from disk) every block it touches: a 4 KiB random read costs
/// one 16 KiB read (73 us on the test disk, against 144 us for 64 KiB),
/// for a 1 KiB sidecar per 4 MiB chunk.
pub const BLOCK_SIZE: u64 = 16 * 1024;
/// Checksum block size of sidecar format 1 (converted when opened).
const V1_BLOCK_SIZE: u64 = 64 * 1024;
const LOCK_STRIPES: usize = 1024;
const META_MAGIC: &[u8; 4] = b"AVCK";
const META_FORMAT: u32 = 2;
const META_SUFFIX: &str = ".meta";
/// Suffix of a chunk being installed whole (renamed into place when done).
const TMP_SUFFIX: &str = ".tmp";
/// Directory of the spare files (see `spare_files`), beside the buckets.
const SPARE_DIR: &str = "spare";
/// Directories the chunk files are spread over (by inode number).
const BUCKETS: u64 = 4096;
/// Header: magic, format, version, length, block count.
const META_HEADER: usize = 4 + 4 + 8 + 8 + 4;
/// Open chunks kept by default (two descriptors each), before the process
/// file limit lowers it. Opening a chunk whose directory entries and inodes
/// the kernel dropped costs several disk reads, more than reading a small
/// chunk itself: keep a working set of many small files open.
pub const DEFAULT_OPEN_CHUNKS: usize = 8192;
/// Descriptors left for sockets and everything else.
const FD_RESERVE: u64 = 256;

/// Errors of the chunk store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request itself is malformed (bad sizes, offsets, ids).
    #[error("{0}")]
    InvalidArgument(String),
    /// Stored data or metadata fails verification; read another replica.
    #[error("chunk {ino:016x}/{index:016x} is corrupt: {detail}")]
    Corruption {
        ino: u64,
        index: u64,
        detail: String,
    },
    /// A replicated write older than what the chunk already holds.
    #[error(
        "chunk {ino:016x}/{index:016x}: write version {got} is older than stored version {current}"
    )]
    StaleVersion {
        ino: u64,
        index: u64,
        current: u64,
        got: u64,
    },
    /// A replicated write that skips versions the chunk has not seen yet.
    #[error("chunk {ino:016x}/{index:016x}: write version {got} does not follow stored version {current}")]
    VersionGap {
        ino: u64,
        index: u64,
        current: u64,
        got: u64,
    },
    /// An operating system error on a store file.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A blocking task panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Shorthand for store results.
pub type Result<T> = std::result::Result<T, StoreError>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How a write picks the version it stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionMode {
    /// Primary: the current version + 1.
    Next,
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
    /// The write was a duplicate of the stored version and was not applied.
    pub duplicate: bool,
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

fn blocks_for(len: u64) -> usize {
    len.div_ceil(BLOCK_SIZE) as usize
}

/// Checksum block size of a sidecar format.
fn format_block_size(format: u32) -> Option<u64> {
    match format {
        1 => Some(V1_BLOCK_SIZE),
        META_FORMAT => Some(BLOCK_SIZE),
        _ => None,
    }
}

/// The sidecar metadata of one chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChunkMeta {
    version: u64,
    len: u64,
    crcs: Vec<u32>,
}

impl ChunkMeta {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(META_HEADER + 4 * self.crcs.len() + 4);
        b.extend_from_slice(META_MAGIC);
        b.extend_from_slice(&META_FORMAT.to_le_bytes());
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.len.to_le_bytes());
        b.extend_from_slice(&(self.crcs.len() as u32).to_le_bytes());
        for c in &self.crcs {
            b.extend_from_slice(&c.to_le_bytes());
        }
        let own = crc32c::crc32c(&b);
        b.extend_from_slice(&own.to_le_bytes());
        b
    }

    /// Size of the encoded sidecar.
    fn encoded_len(&self) -> u64 {
        (META_HEADER + 4 * self.crcs.len() + 4) as u64
    }

    /// Decodes a sidecar of the current format.
    #[cfg(test)]
    fn decode(b: &[u8]) -> std::result::Result<ChunkMeta, String> {
        match Self::decode_any(b)? {
            (m, BLOCK_SIZE) => Ok(m),
            (_, block) => Err(format!(
                "metadata sidecar has {block}-byte checksum blocks, not {BLOCK_SIZE}"
            )),
        }
    }

    /// Decodes a sidecar of any known format: the metadata and the size of
    /// the blocks its crcs cover.
    fn decode_any(b: &[u8]) -> std::result::Result<(ChunkMeta, u64), String> {
        if b.len() < META_HEADER + 4 {
            return Err(format!("metadata sidecar too short ({} bytes)", b.len()));
        }
        let (body, own) = b.split_at(b.len() - 4);
        let own = u32::from_le_bytes([own[0], own[1], own[2], own[3]]);
        if crc32c::crc32c(body) != own {
            return Err("metadata sidecar checksum mismatch".into());
        }
        if &body[0..4] != META_MAGIC {
            return Err("metadata sidecar has a bad magic".into());
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([body[o], body[o + 1], body[o + 2], body[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let format = u32_at(4);
        let Some(block) = format_block_size(format) else {
            return Err(format!("metadata sidecar format {format} unknown"));
        };
        let version = u64_at(8);
        let len = u64_at(16);
        let count = u32_at(24) as usize;
        if body.len() != META_HEADER + 4 * count {
            return Err("metadata sidecar length does not match its block count".into());
        }
        if count as u64 != len.div_ceil(block) {
            return Err(format!(
                "metadata sidecar has {count} block checksums for length {len}"
            ));
        }
        let crcs = (0..count).map(|i| u32_at(META_HEADER + 4 * i)).collect();
        Ok((ChunkMeta { version, len, crcs }, block))
    }

    /// Digest of the chunk's content (length and block crcs): two copies at
    /// the same version must have the same digest.
    fn digest(&self) -> u64 {
        content_digest(self.len, &self.crcs)
    }
}

/// Digest of a chunk's content from its length and block crcs (never 0).
pub fn content_digest(len: u64, crcs: &[u32]) -> u64 {
    let mut h = mix(len ^ 0x5a5a_5a5a);
    for &c in crcs {
        h = mix(h ^ u64::from(c));
    }
    h.max(1)
}

/// The crc of every [`BLOCK_SIZE`] block of `data`, as a sidecar keeps them.
fn block_crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK_SIZE as usize)
        .map(crc32c::crc32c)
        .collect()
}

/// Digest of `data` as [`content_digest`] computes it for a stored chunk.
pub fn data_digest(data: &[u8]) -> u64 {
    content_digest(data.len() as u64, &block_crcs(data))
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Chunk files of one OSD, with used-space accounting.
pub struct ChunkStore {
    root: PathBuf,
    ino_locks: Vec<RwLock<()>>,
    chunk_locks: Vec<Mutex<()>>,
    used: AtomicU64,
    chunks: AtomicU64,
    /// Chunks written without fsync since their last sync, by inode.
    dirty: Mutex<HashMap<u64, BTreeSet<u64>>>,
    /// Recently used chunks: open files and verified metadata, so that a
    /// request neither reopens the files nor rereads the sidecar.
    open_chunks: Mutex<LruCache<(u64, u64), OpenRef>>,
    /// Which bucket directories exist.
    buckets: Vec<AtomicBool>,
    /// Large writes go direct (off once the filesystem refused one).
    direct_writes: AtomicBool,
    /// A bucket was made since the root's last fsync (held across that
    /// fsync, see `sync_dir_of`).
    root_dirty: Mutex<bool>,
    /// Emptied files of removed chunks, reused for new ones.
    spares: SpareFiles,
}

/// A chunk whose files are open, with its metadata as last stored.
///
/// Only used under the chunk's lock (or the inode's exclusive lock), so
/// its own mutex is never contended. The sidecar on disk is rewritten (one
/// `pwrite`, to the page cache) by every change before the change is
/// acknowledged, so it always matches `meta` for a process that is killed;
/// after a power loss, data and sidecar that disagree are detected by the
/// block checksums and the sidecar's own checksum.
#[derive(Debug)]
struct OpenChunk {
    data: Arc<File>,
    meta_file: Arc<File>,
    /// The data file opened for direct writes, at the first that needs it.
    direct: Option<File>,
    meta: ChunkMeta,
}

type OpenRef = Arc<Mutex<OpenChunk>>;

fn lock_open(c: &OpenRef) -> MutexGuard<'_, OpenChunk> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// Turns off the kernel's readahead on a chunk's data file. Every read
/// asks for exactly what it needs (a few checksum blocks, or the whole chunk
/// for a client's sequential readahead), while the disk's readahead (often
/// megabytes) would turn each small random read into a large one.
fn no_readahead(f: &File) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a valid open descriptor; the call only sets a hint.
    // A failure only leaves the default readahead: nothing to report.
    let _ = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
}

/// How many chunks may stay open: the default, or fewer when the process
/// may not open that many files (after trying to raise its soft limit).
fn open_chunk_budget() -> usize {
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

/// What a write stores.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// These bytes at the offset.
    Data(&'a [u8]),
    /// Zeros over this many bytes at the offset (a punched hole); never
    /// extends the stored length.
    Zero(u32),
}

impl Payload<'_> {
    fn len(&self) -> u64 {
        match self {
            Payload::Data(d) => d.len() as u64,
            Payload::Zero(n) => u64::from(*n),
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

/// Punches a hole over `[off, off+len)` of `file` (keeping its size), or
/// writes zeros where the filesystem cannot punch holes.
fn zero_range(file: &File, path: &Path, off: u64, len: u64) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain syscall on a valid open descriptor.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
            let zeros = vec![0u8; BLOCK_SIZE as usize];
            let mut pos = off;
            while pos < off + len {
                let n = (off + len - pos).min(BLOCK_SIZE);
                file.write_all_at(&zeros[..n as usize], pos)
                    .map_err(io_err(path))?;
                pos += n;
            }
            Ok(())
        }
        _ => Err(io_err(path)(e)),
    }
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

fn parse_hex_name(name: &str) -> Option<u64> {
    if name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        u64::from_str_radix(name, 16).ok()
    } else {
        None
    }
}

fn parse_bucket_name(name: &str) -> Option<u64> {
    if name.len() == 3 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        u64::from_str_radix(name, 16).ok()
    } else {
        None
    }
}

/// What a file in a bucket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Data,
    Meta,
    Tmp,
}

/// `<ino>.<index>[.meta|.tmp|.meta.tmp]`: the chunk and the kind of file.
fn parse_chunk_name(name: &str) -> Option<(u64, u64, FileKind)> {
    let (stem, kind) = if let Some(s) = name.strip_suffix(TMP_SUFFIX) {
        (s.strip_suffix(META_SUFFIX).unwrap_or(s), FileKind::Tmp)
    } else if let Some(s) = name.strip_suffix(META_SUFFIX) {
        (s, FileKind::Meta)
    } else {
        (name, FileKind::Data)
    };
    let (ino, index) = stem.split_once('.')?;
    Some((parse_hex_name(ino)?, parse_hex_name(index)?, kind))
}

/// Name of a chunk's data file (its sidecar adds [`META_SUFFIX`]).
fn chunk_name(ino: u64, index: u64) -> String {
    format!("{ino:016x}.{index:016x}")
}

/// Path of chunk `(ino, index)`'s data file in the store rooted at `root`
/// (for tools and tests that look at the files).
pub fn chunk_file(root: &Path, ino: u64, index: u64) -> PathBuf {
    root.join(format!("{:03x}", ino % BUCKETS))
        .join(chunk_name(ino, index))
}

/// Every file (data, sidecar, unfinished install) of inode `ino` in the
/// store rooted at `root`, sorted.
pub fn files_of(root: &Path, ino: u64) -> io::Result<Vec<PathBuf>> {
    let dir = root.join(format!("{:03x}", ino % BUCKETS));
    let mut out = Vec::new();
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for ent in rd {
        let ent = ent?;
        if let Some((i, _, _)) = ent.file_name().to_str().and_then(parse_chunk_name) {
            if i == ino {
                out.push(ent.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes at least this large start their way to the disk at once.
const EARLY_WRITEBACK_BYTES: usize = 256 << 10;

/// Starts writing `[off, off+len)` of `file` back to the disk without
/// waiting for it: a large write's later fsync then finds most of it
/// there already, instead of flushing gigabytes at the end of a stream.
/// A hint only: its failure shows in the fsync that matters.
fn start_writeback(file: &File, off: u64, len: usize) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a valid descriptor; the call only reads its arguments.
    let r = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if r != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "sync_file_range");
    }
}

fn fsync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err(path))
}

/// The checksum blocks a read of `len` bytes at `offset` touches, clipped
/// to the chunk's stored length: the bytes read from disk are
/// `start..stop`, the caller wants `off..end` of them.
struct BlockSpan {
    first: u64,
    last: u64,
    start: u64,
    stop: u64,
    off: u64,
    end: u64,
}

impl BlockSpan {
    /// None when nothing of the range is stored.
    fn of(offset: u32, len: u32, chunk_len: u64) -> Option<BlockSpan> {
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
    fn buffer(&self) -> Vec<u8> {
        vec![0u8; (self.stop - self.start) as usize]
    }

    /// Checks every block of `buf` against its stored crc.
    fn verify(&self, buf: &[u8], crcs: &[u32]) -> std::result::Result<(), String> {
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
    fn cut(&self, mut buf: Vec<u8>) -> Vec<u8> {
        buf.truncate((self.end - self.start) as usize);
        buf.drain(..(self.off - self.start) as usize);
        buf
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
        let root = root.into();
        fs::create_dir_all(&root).map_err(io_err(&root))?;
        let spare_dir = root.join(SPARE_DIR);
        let spares = SpareFiles::open(spare_dir.clone(), MAX_SPARES).map_err(io_err(&spare_dir))?;
        let store = ChunkStore {
            root,
            ino_locks: (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            chunk_locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            used: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            dirty: Mutex::new(HashMap::new()),
            open_chunks: Mutex::new(LruCache::new(
                NonZeroUsize::new(open_chunks.max(1)).unwrap_or(NonZeroUsize::MIN),
            )),
            buckets: (0..BUCKETS).map(|_| AtomicBool::new(false)).collect(),
            direct_writes: AtomicBool::new(true),
            root_dirty: Mutex::new(false),
            spares,
        };
        for ent in fs::read_dir(&store.root).map_err(io_err(&store.root))? {
            let ent = ent.map_err(io_err(&store.root))?;
            if let Some(b) = ent.file_name().to_str().and_then(parse_bucket_name) {
                store.buckets[b as usize].store(true, Ordering::Relaxed);
            }
        }
        store.move_old_layout()?;
        let (mut used, mut chunks) = (0u64, 0u64);
        for b in store.made_buckets() {
            let dir = store.bucket(b);
            for f in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let f = f.map_err(io_err(&dir))?;
                match f.file_name().to_str().and_then(parse_chunk_name) {
                    Some((_, _, FileKind::Data)) => {
                        let md = f.metadata().map_err(io_err(&f.path()))?;
                        if md.is_file() {
                            used += md.len();
                            chunks += 1;
                        }
                    }
                    // An install cut short by a crash: never renamed into
                    // place, so nothing refers to it.
                    Some((_, _, FileKind::Tmp)) => {
                        let p = f.path();
                        fs::remove_file(&p).map_err(io_err(&p))?;
                    }
                    _ => {}
                }
            }
        }
        store.used.store(used, Ordering::Relaxed);
        store.chunks.store(chunks, Ordering::Relaxed);
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

    fn bucket(&self, b: u64) -> PathBuf {
        self.root.join(format!("{b:03x}"))
    }

    /// The directory holding `ino`'s chunk files.
    fn ino_dir(&self, ino: u64) -> PathBuf {
        self.bucket(ino % BUCKETS)
    }

    /// The buckets that exist.
    fn made_buckets(&self) -> impl Iterator<Item = u64> + '_ {
        (0..BUCKETS).filter(|&b| self.buckets[b as usize].load(Ordering::Relaxed))
    }

    /// Makes `ino`'s bucket if it does not exist yet (durably: a chunk
    /// synced in it must not vanish with it).
    fn make_bucket(&self, ino: u64) -> Result<()> {
        let b = ino % BUCKETS;
        if self.buckets[b as usize].load(Ordering::Acquire) {
            return Ok(());
        }
        let dir = self.bucket(b);
        match fs::create_dir(&dir) {
            // Also when another thread just made it: it may not have
            // marked the root yet.
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
        *self.root_dirty.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.buckets[b as usize].store(true, Ordering::Release);
        Ok(())
    }

    /// fsyncs the directory of `ino`'s chunks, and first the root if a
    /// bucket was made since its last fsync. The root waits for the first
    /// sync that needs it: a fresh store makes a bucket for nearly every
    /// new file, and an fsync of the root for each was most of the disk
    /// traffic of writing small files.
    fn sync_dir_of(&self, ino: u64) -> Result<()> {
        {
            // Held across the fsync: a sync that finds the flag cleared by
            // another must not return before that one's fsync is done.
            let mut dirty = self.root_dirty.lock().unwrap_or_else(|e| e.into_inner());
            if *dirty {
                fsync_dir(&self.root)?;
                *dirty = false;
            }
        }
        fsync_dir(&self.ino_dir(ino))
    }

    /// Path of a chunk's data file.
    pub fn data_path(&self, ino: u64, index: u64) -> PathBuf {
        chunk_file(&self.root, ino, index)
    }

    fn meta_path(&self, ino: u64, index: u64) -> PathBuf {
        self.ino_dir(ino)
            .join(format!("{}{META_SUFFIX}", chunk_name(ino, index)))
    }

    /// Moves the chunks of a store written with a directory per inode
    /// (`ROOT/<ino>/<index>[.meta]`) into the buckets, then drops the
    /// emptied directories. Files are renamed, so a crash midway leaves
    /// every chunk in one place or the other, and the next open goes on.
    fn move_old_layout(&self) -> Result<()> {
        let mut moved = false;
        for ent in fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let ent = ent.map_err(io_err(&self.root))?;
            let Some(ino) = ent.file_name().to_str().and_then(parse_hex_name) else {
                continue;
            };
            let old = ent.path();
            if !old.is_dir() {
                continue;
            }
            self.make_bucket(ino)?;
            for f in fs::read_dir(&old).map_err(io_err(&old))? {
                let f = f.map_err(io_err(&old))?;
                let name = f.file_name();
                let Some(name) = name.to_str() else { continue };
                let (stem, suffix) = match name.strip_suffix(META_SUFFIX) {
                    Some(stem) => (stem, META_SUFFIX),
                    None => (name, ""),
                };
                let Some(index) = parse_hex_name(stem) else {
                    continue; // an unfinished install: dropped with the directory
                };
                let to = self
                    .ino_dir(ino)
                    .join(format!("{}{suffix}", chunk_name(ino, index)));
                fs::rename(f.path(), &to).map_err(io_err(&to))?;
            }
            fsync_dir(&self.ino_dir(ino))?;
            fs::remove_dir_all(&old).map_err(io_err(&old))?;
            moved = true;
        }
        if moved {
            fsync_dir(&self.root)?;
        }
        Ok(())
    }

    fn lock_ino_shared(&self, ino: u64) -> RwLockReadGuard<'_, ()> {
        let i = (mix(ino) % LOCK_STRIPES as u64) as usize;
        self.ino_locks[i].read().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_ino_exclusive(&self, ino: u64) -> RwLockWriteGuard<'_, ()> {
        let i = (mix(ino) % LOCK_STRIPES as u64) as usize;
        self.ino_locks[i].write().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_chunk(&self, ino: u64, index: u64) -> MutexGuard<'_, ()> {
        let i = (mix(mix(ino) ^ index) % LOCK_STRIPES as u64) as usize;
        self.chunk_locks[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn corrupt(ino: u64, index: u64, detail: impl Into<String>) -> StoreError {
        StoreError::Corruption {
            ino,
            index,
            detail: detail.into(),
        }
    }

    /// Loads a chunk's metadata and checks it against the data file.
    /// `None` when the chunk does not exist.
    fn load_meta(&self, ino: u64, index: u64) -> Result<Option<ChunkMeta>> {
        let mpath = self.meta_path(ino, index);
        let dpath = self.data_path(ino, index);
        let data_len = match fs::metadata(&dpath) {
            Ok(m) => Some(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&dpath)(e)),
        };
        let raw = match fs::read(&mpath) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return match data_len {
                    None => Ok(None),
                    Some(_) => Err(Self::corrupt(ino, index, "metadata sidecar missing")),
                };
            }
            Err(e) => return Err(io_err(&mpath)(e)),
        };
        let (meta, block) =
            ChunkMeta::decode_any(&raw).map_err(|d| Self::corrupt(ino, index, d))?;
        match data_len {
            None => Err(Self::corrupt(ino, index, "data file missing")),
            Some(l) if l != meta.len => Err(Self::corrupt(
                ino,
                index,
                format!("data file holds {l} bytes, metadata says {}", meta.len),
            )),
            Some(_) if block == BLOCK_SIZE => Ok(Some(meta)),
            Some(_) => self.convert_meta(ino, index, meta, block).map(Some),
        }
    }

    /// Rewrites an older sidecar (checksums over `block`-byte blocks) for
    /// [`BLOCK_SIZE`] blocks, once, after verifying the data against it. The
    /// caller holds the chunk's lock.
    fn convert_meta(&self, ino: u64, index: u64, old: ChunkMeta, block: u64) -> Result<ChunkMeta> {
        let dpath = self.data_path(ino, index);
        let data = fs::read(&dpath).map_err(io_err(&dpath))?;
        if data.len() as u64 != old.len {
            return Err(Self::corrupt(ino, index, "data file changed length"));
        }
        let verified = data
            .chunks(block as usize)
            .zip(&old.crcs)
            .all(|(b, &c)| crc32c::crc32c(b) == c);
        if !verified {
            return Err(Self::corrupt(ino, index, "block checksum mismatch"));
        }
        let meta = ChunkMeta {
            version: old.version,
            len: old.len,
            crcs: block_crcs(&data),
        };
        self.store_meta(ino, index, &meta, true)?;
        tracing::debug!(ino, index, "chunk sidecar converted to the current format");
        Ok(meta)
    }

    fn store_meta(&self, ino: u64, index: u64, meta: &ChunkMeta, sync: bool) -> Result<()> {
        let path = self.meta_path(ino, index);
        let bytes = meta.encode();
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        f.write_all_at(&bytes, 0).map_err(io_err(&path))?;
        f.set_len(bytes.len() as u64).map_err(io_err(&path))?;
        if sync {
            f.sync_all().map_err(io_err(&path))?;
        }
        Ok(())
    }

    /// Rewrites an open chunk's sidecar in place (one `pwrite`; cut only
    /// when it shrank), so a killed process leaves it matching the data.
    fn persist_meta(&self, ino: u64, index: u64, oc: &OpenChunk, old_len: u64) -> Result<()> {
        let bytes = oc.meta.encode();
        let path = || self.meta_path(ino, index);
        oc.meta_file
            .write_all_at(&bytes, 0)
            .map_err(|e| io_err(&path())(e))?;
        if (bytes.len() as u64) < old_len {
            oc.meta_file
                .set_len(bytes.len() as u64)
                .map_err(|e| io_err(&path())(e))?;
        }
        Ok(())
    }

    /// The open chunk `(ino, index)`: from the cache, or opened and
    /// verified now (`None` when the chunk does not exist). The caller holds
    /// the chunk's lock or the inode's exclusive lock.
    fn open_chunk(&self, ino: u64, index: u64) -> Result<Option<OpenRef>> {
        if let Some(c) = self
            .open_chunks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(ino, index))
        {
            return Ok(Some(c.clone()));
        }
        let Some(meta) = self.load_meta(ino, index)? else {
            return Ok(None);
        };
        let dpath = self.data_path(ino, index);
        let mpath = self.meta_path(ino, index);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dpath)
            .map_err(io_err(&dpath))?;
        let meta_file = OpenOptions::new()
            .write(true)
            .open(&mpath)
            .map_err(io_err(&mpath))?;
        Ok(Some(self.remember(
            ino,
            index,
            OpenChunk {
                data: Arc::new(data),
                meta_file: Arc::new(meta_file),
                direct: None,
                meta,
            },
        )))
    }

    /// Creates a new, empty chunk's files (the caller holds its lock).
    fn create_chunk(&self, ino: u64, index: u64) -> Result<OpenRef> {
        self.make_bucket(ino)?;
        let dpath = self.data_path(ino, index);
        let mpath = self.meta_path(ino, index);
        self.spares.take_to(&dpath);
        self.spares.take_to(&mpath);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dpath)
            .map_err(io_err(&dpath))?;
        let meta_file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&mpath)
            .map_err(io_err(&mpath))?;
        let oc = OpenChunk {
            data: Arc::new(data),
            meta_file: Arc::new(meta_file),
            direct: None,
            meta: ChunkMeta {
                version: 0,
                len: 0,
                crcs: Vec::new(),
            },
        };
        Ok(self.remember(ino, index, oc))
    }

    fn remember(&self, ino: u64, index: u64, oc: OpenChunk) -> OpenRef {
        no_readahead(&oc.data);
        let c = Arc::new(Mutex::new(oc));
        self.open_chunks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((ino, index), c.clone());
        c
    }

    /// Drops a chunk from the open-chunk cache (its files changed by other
    /// means, or it is gone). The caller holds the chunk's lock.
    fn forget(&self, ino: u64, index: u64) {
        self.open_chunks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop(&(ino, index));
    }

    /// A chunk's metadata: the open copy, or loaded from disk without
    /// opening the chunk (listings must not flush the cache).
    fn meta_of(&self, ino: u64, index: u64) -> Result<Option<ChunkMeta>> {
        let cached = self
            .open_chunks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .peek(&(ino, index))
            .cloned();
        match cached {
            Some(c) => Ok(Some(lock_open(&c).meta.clone())),
            None => self.load_meta(ino, index),
        }
    }

    /// Number of chunks whose files are open.
    pub fn open_chunk_count(&self) -> usize {
        self.open_chunks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// The version recorded in a chunk's metadata sidecar, even when its
    /// data is corrupt; `None` when the sidecar is missing or unreadable.
    pub fn meta_version(&self, ino: u64, index: u64) -> Option<u64> {
        let raw = fs::read(self.meta_path(ino, index)).ok()?;
        ChunkMeta::decode_any(&raw).ok().map(|(m, _)| m.version)
    }

    /// The stored version of a chunk (0 when it does not exist).
    pub fn version(&self, ino: u64, index: u64) -> Result<u64> {
        let _i = self.lock_ino_shared(ino);
        let _c = self.lock_chunk(ino, index);
        Ok(self
            .open_chunk(ino, index)?
            .map_or(0, |c| lock_open(&c).meta.version))
    }

    /// Writes `data` at `offset` of chunk `(ino, index)` of a file whose
    /// chunks are `chunk_size` bytes, storing the version `mode` picks.
    /// With `sync`, the data, metadata and directories are fsynced before
    /// returning.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &self,
        ino: u64,
        index: u64,
        offset: u32,
        data: &[u8],
        chunk_size: u32,
        mode: VersionMode,
        sync: bool,
    ) -> Result<WriteOutcome> {
        self.apply(
            ino,
            index,
            offset,
            Payload::Data(data),
            chunk_size,
            mode,
            sync,
        )
    }

    /// Like [`ChunkStore::write`] for any [`Payload`]: a `Zero` payload
    /// makes the range read as zeros (punching a hole) without extending the
    /// chunk, and is versioned like a write.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        ino: u64,
        index: u64,
        offset: u32,
        payload: Payload<'_>,
        chunk_size: u32,
        mode: VersionMode,
        sync: bool,
    ) -> Result<WriteOutcome> {
        self.apply_items(ino, index, &[(offset, payload)], chunk_size, mode, sync)
    }

    /// Applies several ranges to one chunk, in order, as one write with one
    /// version (a client's coalesced write-back): all of them or, on an
    /// error, possibly some of them but never a version that claims them.
    pub fn apply_items(
        &self,
        ino: u64,
        index: u64,
        items: &[(u32, Payload<'_>)],
        chunk_size: u32,
        mode: VersionMode,
        sync: bool,
    ) -> Result<WriteOutcome> {
        if ino == 0 {
            return Err(StoreError::InvalidArgument("ino must not be 0".into()));
        }
        let cs = effective_chunk_size(chunk_size)?;
        for (offset, payload) in items {
            check_range(u64::from(*offset), payload.len(), cs)?;
        }
        if let VersionMode::Exact { version: 0, .. } = mode {
            return Err(StoreError::InvalidArgument(
                "a replicated write needs a version > 0".into(),
            ));
        }
        let _i = self.lock_ino_shared(ino);
        let _c = self.lock_chunk(ino, index);

        let found = self.open_chunk(ino, index)?;
        let current = found.as_ref().map_or(0, |c| lock_open(c).meta.version);
        let duplicate = matches!(mode, VersionMode::Exact { version, .. } if version == current);
        let new_version = match mode {
            VersionMode::Next => current
                .checked_add(1)
                .ok_or_else(|| StoreError::InvalidArgument("chunk version overflow".to_string()))?,
            VersionMode::Exact { version, force } => {
                if version < current {
                    return Err(StoreError::StaleVersion {
                        ino,
                        index,
                        current,
                        got: version,
                    });
                }
                if version > current + 1 && !force {
                    return Err(StoreError::VersionGap {
                        ino,
                        index,
                        current,
                        got: version,
                    });
                }
                version
            }
        };
        let (entry, existed) = match found {
            Some(c) => (c, true),
            None => (self.create_chunk(ino, index)?, false),
        };
        let mut oc = lock_open(&entry);
        let old_meta_len = oc.meta.encoded_len();
        let old_len = oc.meta.len;
        match self.apply_to(ino, index, &mut oc, items, new_version) {
            Ok(()) => {}
            Err(e) => {
                // Files and memory may disagree now: reload from disk next
                // time (a torn write there fails verification).
                drop(oc);
                self.forget(ino, index);
                return Err(e);
            }
        }
        let dpath = self.data_path(ino, index);
        let done = self
            .persist_meta(ino, index, &oc, old_meta_len)
            .and_then(|()| {
                if sync {
                    oc.meta_file
                        .sync_all()
                        .map_err(io_err(&self.meta_path(ino, index)))?;
                    oc.data.sync_all().map_err(io_err(&dpath))?;
                    if !existed {
                        self.sync_dir_of(ino)?;
                    }
                }
                Ok(())
            });
        let new_len = oc.meta.len;
        drop(oc);
        if let Err(e) = done {
            self.forget(ino, index);
            return Err(e);
        }
        if !sync {
            self.mark_dirty(ino, index);
        }
        self.used.fetch_add(new_len - old_len, Ordering::Relaxed);
        if !existed {
            self.chunks.fetch_add(1, Ordering::Relaxed);
        }
        Ok(WriteOutcome {
            version: new_version,
            duplicate,
        })
    }

    /// Writes `data` at `off` of a chunk's data file: the aligned middle
    /// of a large write direct (see `direct_io`), the rest buffered.
    fn write_data(&self, oc: &mut OpenChunk, dpath: &Path, data: &[u8], off: u64) -> Result<()> {
        let direct = self.direct_writes.load(Ordering::Relaxed);
        if let Some(mid) = direct
            .then(|| direct_io::aligned_part(off, data.len()))
            .flatten()
        {
            match Self::write_direct(oc, dpath, &data[mid.clone()], off + mid.start as u64) {
                Ok(n) => {
                    let rest = mid.start + n;
                    oc.data
                        .write_all_at(&data[..mid.start], off)
                        .and_then(|()| oc.data.write_all_at(&data[rest..], off + rest as u64))
                        .map_err(io_err(dpath))?;
                    return Ok(());
                }
                // This filesystem takes no direct I/O (or not so aligned).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(error = %e, path = %dpath.display(), "direct writes off");
                    self.direct_writes.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(io_err(dpath)(e)),
            }
        }
        oc.data.write_all_at(data, off).map_err(io_err(dpath))?;
        if data.len() >= EARLY_WRITEBACK_BYTES {
            start_writeback(&oc.data, off, data.len());
        }
        Ok(())
    }

    fn write_direct(oc: &mut OpenChunk, dpath: &Path, data: &[u8], off: u64) -> io::Result<usize> {
        if oc.direct.is_none() {
            oc.direct = Some(direct_io::open(dpath)?);
        }
        direct_io::write(oc.direct.as_ref().expect("just opened"), data, off)
    }

    /// Writes `items` into an open chunk's data file and updates its
    /// in-memory metadata (block checksums, length, version).
    fn apply_to(
        &self,
        ino: u64,
        index: u64,
        oc: &mut OpenChunk,
        items: &[(u32, Payload<'_>)],
        new_version: u64,
    ) -> Result<()> {
        let dpath = self.data_path(ino, index);
        let mut len = oc.meta.len;
        // Blocks whose bytes changed, with their crc when one data range
        // covers the whole block (else it is recomputed from the file).
        let mut touched: std::collections::BTreeMap<u64, Option<u32>> = Default::default();
        for &(offset, payload) in items {
            let off = u64::from(offset);
            match payload {
                Payload::Zero(zl) => {
                    let end = (off + u64::from(zl)).min(len);
                    if off < end {
                        zero_range(&oc.data, &dpath, off, end - off)?;
                        for b in off / BLOCK_SIZE..=(end - 1) / BLOCK_SIZE {
                            touched.insert(b, None);
                        }
                    }
                }
                Payload::Data(data) => {
                    if data.is_empty() {
                        continue;
                    }
                    self.write_data(oc, &dpath, data, off)?;
                    let end = off + data.len() as u64;
                    // Past the old end, the old tail block and any gap
                    // blocks change too.
                    let first = off.min(len) / BLOCK_SIZE;
                    len = len.max(end);
                    for b in first..=(end - 1) / BLOCK_SIZE {
                        let bs = b * BLOCK_SIZE;
                        let be = (bs + BLOCK_SIZE).min(len);
                        let crc = (bs >= off && be <= end).then(|| {
                            crc32c::crc32c(&data[(bs - off) as usize..(be - off) as usize])
                        });
                        touched.insert(b, crc);
                    }
                }
            }
        }
        let meta = &mut oc.meta;
        meta.crcs.resize(blocks_for(len), 0);
        meta.len = len;
        let mut buf = Vec::new();
        for (b, crc) in touched {
            let crc = match crc {
                Some(c) => c,
                None => {
                    let bs = b * BLOCK_SIZE;
                    let be = (bs + BLOCK_SIZE).min(len);
                    buf.resize((be - bs) as usize, 0);
                    oc.data
                        .read_exact_at(&mut buf, bs)
                        .map_err(io_err(&dpath))?;
                    crc32c::crc32c(&buf)
                }
            };
            meta.crcs[b as usize] = crc;
        }
        meta.version = new_version;
        Ok(())
    }

    /// fsyncs a chunk's data and sidecar (open ones through the cache).
    /// `false` when the chunk does not exist.
    fn sync_files(&self, ino: u64, index: u64) -> Result<bool> {
        let cached = self
            .open_chunks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .peek(&(ino, index))
            .cloned();
        if let Some(c) = cached {
            // fsync without holding the chunk: writes go on meanwhile.
            let (data, meta) = {
                let oc = lock_open(&c);
                (oc.data.clone(), oc.meta_file.clone())
            };
            data.sync_all()
                .map_err(io_err(&self.data_path(ino, index)))?;
            meta.sync_all()
                .map_err(io_err(&self.meta_path(ino, index)))?;
            return Ok(true);
        }
        for path in [self.data_path(ino, index), self.meta_path(ino, index)] {
            match File::open(&path) {
                Ok(f) => f.sync_all().map_err(io_err(&path))?,
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

    fn mark_dirty(&self, ino: u64, index: u64) {
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

    /// Every stored chunk for which `want(ino, index)` holds, with its
    /// version and length (`None` when its metadata is corrupt).
    pub fn list(&self, mut want: impl FnMut(u64, u64) -> bool) -> Result<Vec<ListedChunk>> {
        let mut out = Vec::new();
        for (ino, index) in self.all_chunks()? {
            if !want(ino, index) {
                continue;
            }
            let _i = self.lock_ino_shared(ino);
            let _c = self.lock_chunk(ino, index);
            let (state, digest) = match self.meta_of(ino, index) {
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

    /// Replaces a whole chunk by a copy from another replica: `data` (its
    /// full stored bytes) at `version`. Installed only when the local copy
    /// is older, missing or corrupt, or (with `replace_equal`) of the same
    /// version. Durable on return. Returns whether it was installed.
    pub fn install(
        &self,
        ino: u64,
        index: u64,
        data: &[u8],
        version: u64,
        replace_equal: bool,
    ) -> Result<bool> {
        if ino == 0 || version == 0 {
            return Err(StoreError::InvalidArgument(
                "install needs an ino and a version > 0".into(),
            ));
        }
        check_range(0, data.len() as u64, MAX_CHUNK_SIZE)?;
        let _i = self.lock_ino_shared(ino);
        let _c = self.lock_chunk(ino, index);
        let (existed, old_len) = match self.meta_of(ino, index) {
            Ok(Some(m)) => {
                if m.version > version || (m.version == version && !replace_equal) {
                    return Ok(false);
                }
                (true, m.len)
            }
            Ok(None) => (false, 0),
            Err(StoreError::Corruption { .. }) => {
                let dl = fs::metadata(self.data_path(ino, index)).map_or(0, |m| m.len());
                (self.data_path(ino, index).exists(), dl)
            }
            Err(e) => return Err(e),
        };
        self.make_bucket(ino)?;
        let dir = self.ino_dir(ino);
        let dpath = self.data_path(ino, index);
        let mpath = self.meta_path(ino, index);
        let name = chunk_name(ino, index);
        let dtmp = dir.join(format!("{name}{TMP_SUFFIX}"));
        let mtmp = dir.join(format!("{name}{META_SUFFIX}{TMP_SUFFIX}"));
        self.spares.take_to(&dtmp);
        self.spares.take_to(&mtmp);
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dtmp)
            .map_err(io_err(&dtmp))?;
        let mut crcs = Vec::with_capacity(blocks_for(data.len() as u64));
        for (b, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
            crcs.push(crc32c::crc32c(block));
            if block.iter().any(|&x| x != 0) {
                f.write_all_at(block, b as u64 * BLOCK_SIZE)
                    .map_err(io_err(&dtmp))?;
            }
        }
        f.set_len(data.len() as u64).map_err(io_err(&dtmp))?;
        f.sync_all().map_err(io_err(&dtmp))?;
        let meta = ChunkMeta {
            version,
            len: data.len() as u64,
            crcs,
        };
        let mf = File::create(&mtmp).map_err(io_err(&mtmp))?;
        mf.write_all_at(&meta.encode(), 0).map_err(io_err(&mtmp))?;
        mf.sync_all().map_err(io_err(&mtmp))?;
        // The open files (if any) are the replaced ones from here on.
        self.forget(ino, index);
        fs::rename(&dtmp, &dpath).map_err(io_err(&dpath))?;
        fs::rename(&mtmp, &mpath).map_err(io_err(&mpath))?;
        self.sync_dir_of(ino)?;
        if existed {
            self.used.fetch_sub(old_len, Ordering::Relaxed);
        } else {
            self.chunks.fetch_add(1, Ordering::Relaxed);
        }
        self.used.fetch_add(meta.len, Ordering::Relaxed);
        Ok(true)
    }

    /// Reads up to `len` bytes at `offset` of a chunk, verifying the crc of
    /// every block touched. Returns the bytes (shorter than asked past the
    /// stored end: a hole) and the chunk's version (0 for a missing chunk).
    pub fn read(&self, ino: u64, index: u64, offset: u32, len: u32) -> Result<(Vec<u8>, u64)> {
        if ino == 0 {
            return Err(StoreError::InvalidArgument("ino must not be 0".into()));
        }
        check_range(u64::from(offset), u64::from(len), MAX_CHUNK_SIZE)?;
        let _i = self.lock_ino_shared(ino);
        let _c = self.lock_chunk(ino, index);
        let Some(entry) = self.open_chunk(ino, index)? else {
            return Ok((Vec::new(), 0));
        };
        let oc = lock_open(&entry);
        let meta = &oc.meta;
        // Only the checksum blocks the range touches are read and verified.
        let Some(span) = BlockSpan::of(offset, len, meta.len) else {
            return Ok((Vec::new(), meta.version));
        };
        let mut buf = span.buffer();
        oc.data.read_exact_at(&mut buf, span.start).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Self::corrupt(ino, index, "data file shorter than its metadata")
            } else {
                io_err(&self.data_path(ino, index))(e)
            }
        })?;
        span.verify(&buf, &meta.crcs)
            .map_err(|m| Self::corrupt(ino, index, m))?;
        let version = meta.version;
        drop(oc);
        Ok((span.cut(buf), version))
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
        use std::os::unix::io::AsRawFd;
        if ino == 0 || check_range(u64::from(offset), u64::from(len), MAX_CHUNK_SIZE).is_err() {
            return None;
        }
        let i = (mix(ino) % LOCK_STRIPES as u64) as usize;
        let _i = self.ino_locks[i].try_read().ok()?;
        let c = (mix(mix(ino) ^ index) % LOCK_STRIPES as u64) as usize;
        let _c = self.chunk_locks[c].try_lock().ok()?;
        let entry = self
            .open_chunks
            .try_lock()
            .ok()?
            .get(&(ino, index))
            .cloned()?;
        let oc = entry.try_lock().ok()?;
        let meta = &oc.meta;
        let Some(span) = BlockSpan::of(offset, len, meta.len) else {
            return Some(Ok((Vec::new(), meta.version)));
        };
        let mut buf = span.buffer();
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: one iovec over `buf`, which outlives the call.
        let n = unsafe {
            libc::preadv2(
                oc.data.as_raw_fd(),
                &iov,
                1,
                span.start as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n < 0 || n as usize != buf.len() {
            // Not (all) cached, or unsupported: the blocking path decides.
            return None;
        }
        if let Err(m) = span.verify(&buf, &meta.crcs) {
            return Some(Err(Self::corrupt(ino, index, m)));
        }
        let version = meta.version;
        drop(oc);
        Some(Ok((span.cut(buf), version)))
    }

    /// Verifies a whole chunk for the scrubber: every block against its
    /// checksum and, for a chunk held open, the sidecar on disk against the
    /// verified copy in memory (so a damaged sidecar is found before a
    /// restart would trip over it). Does not open the chunk for later use.
    /// Returns the bytes verified.
    pub fn scrub_chunk(&self, ino: u64, index: u64) -> Result<u64> {
        let _i = self.lock_ino_shared(ino);
        let _c = self.lock_chunk(ino, index);
        let cached = self
            .open_chunks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .peek(&(ino, index))
            .cloned();
        let meta = match cached {
            Some(c) => {
                let meta = lock_open(&c).meta.clone();
                let raw = fs::read(self.meta_path(ino, index))
                    .map_err(io_err(&self.meta_path(ino, index)))?;
                if raw != meta.encode() {
                    return Err(Self::corrupt(
                        ino,
                        index,
                        "metadata sidecar on disk differs from the verified copy",
                    ));
                }
                meta
            }
            None => match self.load_meta(ino, index)? {
                Some(m) => m,
                None => return Ok(0),
            },
        };
        let dpath = self.data_path(ino, index);
        let file = File::open(&dpath).map_err(io_err(&dpath))?;
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        for (b, want) in meta.crcs.iter().enumerate() {
            let bs = b as u64 * BLOCK_SIZE;
            let n = (meta.len - bs).min(BLOCK_SIZE) as usize;
            file.read_exact_at(&mut buf[..n], bs).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    Self::corrupt(ino, index, "data file shorter than its metadata")
                } else {
                    io_err(&dpath)(e)
                }
            })?;
            let got = crc32c::crc32c(&buf[..n]);
            if got != *want {
                return Err(Self::corrupt(
                    ino,
                    index,
                    format!("block {b} checksum mismatch (stored {want:08x}, computed {got:08x})"),
                ));
            }
        }
        Ok(meta.len)
    }

    /// Chunk indexes present for `ino` (data or metadata file).
    fn indexes(&self, ino: u64) -> Result<BTreeSet<u64>> {
        let dir = self.ino_dir(ino);
        let mut out = BTreeSet::new();
        if !self.buckets[(ino % BUCKETS) as usize].load(Ordering::Acquire) {
            return Ok(out);
        }
        for ent in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let ent = ent.map_err(io_err(&dir))?;
            match ent.file_name().to_str().and_then(parse_chunk_name) {
                Some((i, index, FileKind::Data | FileKind::Meta)) if i == ino => {
                    out.insert(index);
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Every chunk stored here (data or metadata file), in order.
    fn all_chunks(&self) -> Result<BTreeSet<(u64, u64)>> {
        let mut out = BTreeSet::new();
        for b in self.made_buckets() {
            let dir = self.bucket(b);
            for ent in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let ent = ent.map_err(io_err(&dir))?;
                if let Some((ino, index, FileKind::Data | FileKind::Meta)) =
                    ent.file_name().to_str().and_then(parse_chunk_name)
                {
                    out.insert((ino, index));
                }
            }
        }
        Ok(out)
    }

    fn remove_chunk_files(&self, ino: u64, index: u64) -> Result<()> {
        self.forget(ino, index);
        let dpath = self.data_path(ino, index);
        match fs::metadata(&dpath) {
            Ok(m) => {
                self.spares.discard(&dpath).map_err(io_err(&dpath))?;
                self.used.fetch_sub(m.len(), Ordering::Relaxed);
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
        let _i = self.lock_ino_exclusive(ino);
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
                    File::create(&dpath)
                        .and_then(|f| f.sync_all())
                        .map_err(io_err(&dpath))?;
                    let meta = ChunkMeta {
                        version: v.saturating_add(1),
                        len: 0,
                        crcs: Vec::new(),
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
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dpath)
                .map_err(io_err(&dpath))?;
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
                    return Err(Self::corrupt(
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
            self.store_meta(ino, index, &meta, true)?;
            file.sync_all().map_err(io_err(&dpath))?;
            self.used.fetch_sub(old_len - keep, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Removes one chunk if its version is at most `max_version` (a copy
    /// the current members hold at least as new). Returns whether it was
    /// removed.
    pub fn remove_chunk(&self, ino: u64, index: u64, max_version: u64) -> Result<bool> {
        let _i = self.lock_ino_shared(ino);
        let _c = self.lock_chunk(ino, index);
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
            let _i = self.lock_ino_shared(ino);
            let _c = self.lock_chunk(ino, index);
            let len = match self.meta_of(ino, index) {
                Ok(Some(m)) => m.len,
                Ok(None) => continue,
                // Unknown content: say data, never a false hole.
                Err(StoreError::Corruption { .. }) => u64::MAX,
                Err(e) => return Err(e),
            };
            let dpath = self.data_path(ino, index);
            let file = match File::open(&dpath) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&dpath)(e)),
            };
            let len = len.min(file.metadata().map_err(io_err(&dpath))?.len());
            out.push((index, data_ranges(&file, len)));
        }
        Ok((out, false))
    }

    /// Inode numbers with chunks stored here.
    pub fn inos(&self) -> Result<Vec<u64>> {
        let mut out: Vec<u64> = self.all_chunks()?.into_iter().map(|c| c.0).collect();
        out.dedup();
        Ok(out)
    }

    /// Removes every chunk of `ino`.
    pub fn delete_object(&self, ino: u64) -> Result<()> {
        if ino == 0 {
            return Err(StoreError::InvalidArgument("ino must not be 0".into()));
        }
        let _i = self.lock_ino_exclusive(ino);
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
        fsync_dir(&self.ino_dir(ino))
    }
}

/// A chunk index and the byte ranges of it that hold data.
pub type ChunkData = (u64, Vec<(u64, u64)>);

/// Data ranges of the first `len` bytes of `file`, per SEEK_DATA and
/// SEEK_HOLE; all of it when the filesystem cannot tell.
fn data_ranges(file: &File, len: u64) -> Vec<(u64, u64)> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a valid descriptor has no memory effects.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole up to the end
            }
            out.push((pos, len));
            break;
        }
        let start = data as u64;
        if start >= len {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            len
        } else {
            (hole as u64).min(len)
        };
        out.push((start, end));
        pos = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CS: u32 = 256 * 1024;
    const B: usize = BLOCK_SIZE as usize;

    fn store() -> (tempfile::TempDir, ChunkStore) {
        let d = tempfile::tempdir().expect("tempdir");
        let s = ChunkStore::open(d.path().join("chunks")).expect("open");
        (d, s)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn w(s: &ChunkStore, ino: u64, idx: u64, off: u32, data: &[u8]) -> u64 {
        s.write(ino, idx, off, data, CS, VersionMode::Next, false)
            .expect("write")
            .version
    }

    fn r(s: &ChunkStore, ino: u64, idx: u64, off: u32, len: u32) -> Vec<u8> {
        s.read(ino, idx, off, len).expect("read").0
    }

    /// A format-1 sidecar (crcs over 64 KiB blocks) for `data`.
    fn v1_sidecar(version: u64, data: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(META_MAGIC);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&(data.len() as u64).to_le_bytes());
        let crcs: Vec<u32> = data
            .chunks(V1_BLOCK_SIZE as usize)
            .map(crc32c::crc32c)
            .collect();
        b.extend_from_slice(&(crcs.len() as u32).to_le_bytes());
        for c in crcs {
            b.extend_from_slice(&c.to_le_bytes());
        }
        let own = crc32c::crc32c(&b);
        b.extend_from_slice(&own.to_le_bytes());
        b
    }

    #[test]
    fn format_1_sidecars_are_converted_once_verified() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("chunks");
        let data = pattern(3 * V1_BLOCK_SIZE as usize + 1000, 7);
        {
            let s = ChunkStore::open(&root).expect("open");
            w(&s, 51, 0, 0, &data);
            w(&s, 52, 0, 0, &data);
            // As an older OSD left them.
            fs::write(s.meta_path(51, 0), v1_sidecar(1, &data)).expect("meta");
            fs::write(s.meta_path(52, 0), v1_sidecar(1, &data)).expect("meta");
            let mut bad = data.clone();
            bad[70_000] ^= 1;
            fs::write(s.data_path(52, 0), &bad).expect("data");
        }
        let s = ChunkStore::open(&root).expect("restart");
        assert_eq!(s.meta_version(51, 0), Some(1));
        assert_eq!(r(&s, 51, 0, 0, data.len() as u32), data);
        let raw = fs::read(s.meta_path(51, 0)).expect("meta");
        let m = ChunkMeta::decode(&raw).expect("current format on disk");
        assert_eq!(m.crcs.len(), blocks_for(data.len() as u64));
        assert_eq!(m.version, 1);
        // A copy that does not match its old checksums is corrupt, not
        // blessed with new ones.
        assert!(matches!(
            s.read(52, 0, 0, 10),
            Err(StoreError::Corruption { .. })
        ));
    }

    #[test]
    fn missing_chunk_is_a_hole() {
        let (_d, s) = store();
        assert_eq!(s.read(5, 0, 0, 100).expect("read"), (vec![], 0));
        assert_eq!(s.version(5, 0).expect("version"), 0);
    }

    #[test]
    fn block_boundaries() {
        let (_d, s) = store();
        let a = pattern(B, 1);
        assert_eq!(w(&s, 1, 0, 0, &a), 1);
        assert_eq!(r(&s, 1, 0, 0, CS), a);
        // Exactly the next block.
        let b = pattern(B, 2);
        assert_eq!(w(&s, 1, 0, B as u32, &b), 2);
        let mut want = a.clone();
        want.extend_from_slice(&b);
        assert_eq!(r(&s, 1, 0, 0, CS), want);
        // Straddling a boundary.
        let c = pattern(100, 3);
        w(&s, 1, 0, (B - 50) as u32, &c);
        want[B - 50..B + 50].copy_from_slice(&c);
        assert_eq!(r(&s, 1, 0, 0, CS), want);
        assert_eq!(r(&s, 1, 0, (B - 10) as u32, 20), want[B - 10..B + 10]);
        // Up to the end of the chunk.
        let d = pattern(10, 4);
        w(&s, 1, 0, CS - 10, &d);
        want.resize(CS as usize, 0);
        want[CS as usize - 10..].copy_from_slice(&d);
        assert_eq!(r(&s, 1, 0, 0, CS), want);
        assert_eq!(s.used_bytes(), u64::from(CS));
        assert_eq!(s.chunk_count(), 1);
    }

    #[test]
    fn zero_length_write_and_read() {
        let (_d, s) = store();
        assert_eq!(w(&s, 2, 3, 100, &[]), 1);
        assert_eq!(s.read(2, 3, 0, 10).expect("read"), (vec![], 1));
        assert_eq!(s.chunk_count(), 1);
        assert_eq!(s.used_bytes(), 0);
        w(&s, 2, 3, 0, b"hello");
        assert_eq!(s.read(2, 3, 0, 0).expect("read"), (vec![], 2));
        assert_eq!(r(&s, 2, 3, 1, 3), b"ell");
    }

    #[test]
    fn write_past_end_leaves_zero_hole() {
        let (_d, s) = store();
        w(&s, 3, 0, 0, b"abc");
        w(&s, 3, 0, (2 * B + 7) as u32, b"xyz");
        let got = r(&s, 3, 0, 0, CS);
        assert_eq!(got.len(), 2 * B + 10);
        assert_eq!(&got[..3], b"abc");
        assert!(got[3..2 * B + 7].iter().all(|&b| b == 0));
        assert_eq!(&got[2 * B + 7..], b"xyz");
        // Short read past the end.
        assert_eq!(r(&s, 3, 0, (2 * B + 8) as u32, 100), b"yz");
        assert_eq!(r(&s, 3, 0, (2 * B + 20) as u32, 100), b"");
    }

    #[test]
    fn overwrite_and_versions() {
        let (_d, s) = store();
        w(&s, 4, 1, 0, &pattern(1000, 1));
        w(&s, 4, 1, 0, &pattern(1000, 9));
        assert_eq!(r(&s, 4, 1, 0, 1000), pattern(1000, 9));
        assert_eq!(s.version(4, 1).expect("v"), 2);
        // Replicated writes.
        let ex = |v, force| VersionMode::Exact { version: v, force };
        let o = s
            .write(4, 1, 0, b"x", CS, ex(2, false), false)
            .expect("dup");
        assert!(o.duplicate);
        assert_eq!(o.version, 2);
        assert_eq!(r(&s, 4, 1, 0, 1), b"x");
        assert!(matches!(
            s.write(4, 1, 0, b"x", CS, ex(1, false), false),
            Err(StoreError::StaleVersion { .. })
        ));
        assert!(matches!(
            s.write(4, 1, 0, b"x", CS, ex(4, false), false),
            Err(StoreError::VersionGap { .. })
        ));
        assert_eq!(
            s.write(4, 1, 0, b"y", CS, ex(3, false), true)
                .expect("v3")
                .version,
            3
        );
        assert_eq!(
            s.write(4, 1, 0, b"z", CS, ex(9, true), true)
                .expect("v9")
                .version,
            9
        );
        assert_eq!(r(&s, 4, 1, 0, 2), vec![b'z', pattern(1000, 9)[1]]);
        s.sync_chunk(4, 1).expect("sync");
        s.sync_chunk(4, 77).expect("sync missing");
    }

    #[test]
    fn truncate_and_delete() {
        let (_d, s) = store();
        for i in 0..4 {
            w(&s, 7, i, 0, &pattern(CS as usize, i as u8));
        }
        assert_eq!(s.chunk_count(), 4);
        // Cut inside chunk 1, inside its second block.
        let size = u64::from(CS) + B as u64 + 123;
        s.truncate_object(7, size, CS).expect("truncate");
        // Emptied chunks stay as tombstones one version newer.
        assert_eq!(s.chunk_count(), 4);
        assert_eq!(s.used_bytes(), size);
        assert_eq!(r(&s, 7, 0, 0, CS), pattern(CS as usize, 0));
        assert_eq!(s.version(7, 0).expect("v"), 1);
        assert_eq!(r(&s, 7, 1, 0, CS), pattern(CS as usize, 1)[..B + 123]);
        assert_eq!(s.version(7, 1).expect("v"), 2);
        assert_eq!(s.read(7, 2, 0, 10).expect("read"), (vec![], 2));
        // A repeated truncate changes nothing.
        s.truncate_object(7, size, CS).expect("truncate again");
        assert_eq!(s.version(7, 1).expect("v"), 2);
        assert_eq!(s.version(7, 3).expect("v"), 2);
        // Growing again after a truncate keeps the tail checksums right.
        w(&s, 7, 1, (B + 200) as u32, b"q");
        let got = r(&s, 7, 1, 0, CS);
        assert_eq!(got.len(), B + 201);
        assert!(got[B + 123..B + 200].iter().all(|&b| b == 0));
        // Truncate at a chunk boundary empties the chunk.
        s.truncate_object(7, u64::from(CS), CS).expect("truncate");
        assert_eq!(s.chunk_count(), 4);
        assert_eq!(s.version(7, 1).expect("v"), 4);
        assert_eq!(s.used_bytes(), u64::from(CS));
        s.delete_object(7).expect("delete");
        assert_eq!(s.chunk_count(), 0);
        assert_eq!(s.used_bytes(), 0);
        assert_eq!(files_of(s.root(), 7).expect("list"), Vec::<PathBuf>::new());
        s.delete_object(7).expect("delete twice");
        s.truncate_object(7, 0, CS).expect("truncate missing");
    }

    #[test]
    fn flipped_byte_is_corruption() {
        let (_d, s) = store();
        let data = pattern(3 * B, 5);
        w(&s, 9, 2, 0, &data);
        let path = s.data_path(9, 2);
        let mut raw = fs::read(&path).expect("read raw");
        raw[B + 17] ^= 0x40;
        fs::write(&path, &raw).expect("write raw");
        // Untouched blocks still read fine.
        assert_eq!(r(&s, 9, 2, 0, B as u32), data[..B]);
        assert_eq!(r(&s, 9, 2, 2 * B as u32, B as u32), data[2 * B..]);
        match s.read(9, 2, (B + 10) as u32, 10) {
            Err(StoreError::Corruption { detail, .. }) => assert!(detail.contains("block 1")),
            other => panic!("expected corruption, got {other:?}"),
        }
        // A damaged sidecar is corruption too (once loaded: a running
        // store trusts the copy it verified and keeps writing).
        let mpath = s.meta_path(9, 2);
        let mut m = fs::read(&mpath).expect("meta");
        m[10] ^= 1;
        fs::write(&mpath, &m).expect("meta write");
        let s = ChunkStore::open(s.root()).expect("restart");
        assert!(matches!(
            s.read(9, 2, 0, 1),
            Err(StoreError::Corruption { .. })
        ));
        // A data file that lost its tail.
        w(&s, 9, 3, 0, &data);
        File::options()
            .write(true)
            .open(s.data_path(9, 3))
            .and_then(|f| f.set_len(10))
            .expect("cut");
        assert!(matches!(
            s.read(9, 3, 0, 1),
            Err(StoreError::Corruption { .. })
        ));
    }

    #[test]
    fn bad_arguments_rejected() {
        let (_d, s) = store();
        let bad = |r: Result<WriteOutcome>| matches!(r, Err(StoreError::InvalidArgument(_)));
        assert!(bad(s.write(0, 0, 0, b"x", CS, VersionMode::Next, false)));
        assert!(bad(s.write(1, 0, CS, b"x", CS, VersionMode::Next, false)));
        assert!(bad(s.write(
            1,
            0,
            u32::MAX,
            b"x",
            CS,
            VersionMode::Next,
            false
        )));
        assert!(bad(s.write(1, 0, 0, b"x", 1, VersionMode::Next, false)));
        assert!(bad(s.write(
            1,
            0,
            0,
            b"x",
            u32::MAX,
            VersionMode::Next,
            false
        )));
        assert!(bad(s.write(
            1,
            0,
            0,
            b"x",
            CS,
            VersionMode::Exact {
                version: 0,
                force: false
            },
            false
        )));
        assert!(matches!(
            s.read(1, 0, u32::MAX, u32::MAX),
            Err(StoreError::InvalidArgument(_))
        ));
        assert!(matches!(
            s.read(0, 0, 0, 1),
            Err(StoreError::InvalidArgument(_))
        ));
        assert!(s.truncate_object(1, 0, 7).is_err());
        assert!(s.delete_object(0).is_err());
        // Index overflow in truncate is treated as "past the size".
        w(&s, 1, u64::MAX, 0, b"x");
        s.truncate_object(1, u64::MAX, CS).expect("truncate");
        assert_eq!(s.read(1, u64::MAX, 0, 10).expect("read"), (vec![], 2));
        assert_eq!(s.used_bytes(), 0);
        assert_eq!(
            effective_chunk_size(0).expect("default"),
            DEFAULT_CHUNK_SIZE
        );
        assert!(check_range(u64::MAX, 1, CS).is_err());
    }

    #[test]
    fn extents_show_written_ranges_only() {
        let (_d, s) = store();
        // Chunk 0: data in its first block, then a never-written gap, then
        // data in block 3; chunk 2: data in block 1 only; chunk 1 absent.
        w(&s, 5, 0, 0, &pattern(B, 1));
        w(&s, 5, 0, (3 * B) as u32, &pattern(10, 2));
        w(&s, 5, 2, B as u32, &pattern(B, 3));
        let (all, more) = s.extents(5, 0, 10).expect("extents");
        assert!(!more);
        let idx: Vec<u64> = all.iter().map(|c| c.0).collect();
        assert_eq!(idx, vec![0, 2]);
        // The local filesystem may allocate more coarsely, never less.
        let covers = |r: &[(u64, u64)], a: u64, b: u64| r.iter().any(|x| x.0 <= a && b <= x.1);
        assert!(covers(&all[0].1, 0, B as u64));
        assert!(covers(&all[0].1, 3 * B as u64, 3 * B as u64 + 10));
        assert!(all[0].1.iter().all(|x| x.1 <= 3 * B as u64 + 10));
        assert!(covers(&all[1].1, B as u64, 2 * B as u64));
        // A punched block becomes a hole where the filesystem can punch.
        s.apply(
            5,
            2,
            B as u32,
            Payload::Zero(B as u32),
            CS,
            VersionMode::Next,
            false,
        )
        .expect("zero");
        let (c2, _) = s.extents(5, 2, 10).expect("extents");
        assert_eq!(c2.len(), 1);
        // From an index on, and at most `max` chunks.
        let (first, more) = s.extents(5, 0, 1).expect("extents");
        assert_eq!((first.len(), first[0].0, more), (1, 0, true));
        assert!(s.extents(5, 3, 10).expect("extents").0.is_empty());
        assert!(s.extents(6, 0, 10).expect("extents").0.is_empty());
    }

    #[test]
    fn zero_range_punches_and_versions() {
        let (_d, s) = store();
        let data = pattern(3 * B, 7);
        w(&s, 11, 0, 0, &data);
        let z = |off, len| {
            s.apply(11, 0, off, Payload::Zero(len), CS, VersionMode::Next, false)
                .expect("zero")
                .version
        };
        // Across a block boundary.
        assert_eq!(z((B - 10) as u32, 20), 2);
        let mut want = data.clone();
        want[B - 10..B + 10].fill(0);
        assert_eq!(r(&s, 11, 0, 0, CS), want);
        // Whole aligned block.
        z(2 * B as u32, B as u32);
        want[2 * B..].fill(0);
        assert_eq!(r(&s, 11, 0, 0, CS), want);
        // Past the stored end: extends nothing.
        z((3 * B + 5) as u32, 100);
        assert_eq!(r(&s, 11, 0, 0, CS).len(), 3 * B);
        // Straddling the end: zeros up to it, no growth.
        z((3 * B - 5) as u32, 100);
        want[3 * B - 5..].fill(0);
        assert_eq!(r(&s, 11, 0, 0, CS), want);
        assert_eq!(s.version(11, 0).expect("v"), 5);
        // Zero length: a version bump only.
        assert_eq!(z(0, 0), 6);
        assert!(s
            .apply(
                11,
                0,
                CS - 1,
                Payload::Zero(2),
                CS,
                VersionMode::Next,
                false
            )
            .is_err());
        // Survives a reopen (crcs right).
        let s2 = ChunkStore::open(s.root()).expect("reopen");
        assert_eq!(r(&s2, 11, 0, 0, CS), want);
        assert_eq!(s2.used_bytes(), 3 * B as u64);
    }

    #[test]
    fn dirty_tracking_and_sync() {
        let (_d, s) = store();
        w(&s, 1, 0, 0, b"a");
        w(&s, 1, 1, 0, b"b");
        w(&s, 2, 0, 0, b"c");
        s.write(3, 0, 0, b"d", CS, VersionMode::Next, true)
            .expect("sync write");
        assert_eq!(s.dirty_count(), 3);
        s.sync_objects(&[1, 99]).expect("sync");
        assert_eq!(s.dirty_count(), 1);
        s.delete_object(2).expect("delete");
        assert_eq!(s.dirty_count(), 0);
        s.sync_objects(&[2]).expect("sync deleted");
    }

    #[test]
    fn list_and_install() {
        let (_d, s) = store();
        w(&s, 5, 0, 0, b"old");
        w(&s, 5, 3, 0, b"x");
        let l = s.list(|_, _| true).expect("list");
        assert_eq!(
            l.iter()
                .map(|c| (c.ino, c.index, c.state))
                .collect::<Vec<_>>(),
            vec![(5, 0, Some((1, 3))), (5, 3, Some((1, 1)))]
        );
        assert_eq!(s.list(|_, i| i == 3).expect("list").len(), 1);
        // Newer copy replaces; older or equal does not (unless asked).
        let mut copy = pattern(2 * B + 3, 1);
        copy[B..2 * B].fill(0);
        assert!(s.install(5, 0, &copy, 4, false).expect("install"));
        assert_eq!(s.read(5, 0, 0, CS).expect("read"), (copy.clone(), 4));
        assert!(!s.install(5, 0, b"zz", 3, false).expect("older"));
        assert!(!s.install(5, 0, b"zz", 4, false).expect("equal"));
        assert!(s.install(5, 0, &copy, 4, true).expect("equal, forced"));
        assert_eq!(s.used_bytes(), copy.len() as u64 + 1);
        // Into a missing chunk and a corrupt one.
        assert!(s.install(6, 2, b"new", 9, false).expect("missing"));
        assert_eq!(s.read(6, 2, 0, 10).expect("read"), (b"new".to_vec(), 9));
        let path = s.data_path(5, 3);
        fs::write(&path, b"y").expect("flip");
        assert!(matches!(
            s.read(5, 3, 0, 1),
            Err(StoreError::Corruption { .. })
        ));
        assert_eq!(s.meta_version(5, 3), Some(1));
        assert!(s.install(5, 3, b"x", 1, true).expect("repair"));
        assert_eq!(s.read(5, 3, 0, 1).expect("read"), (b"x".to_vec(), 1));
        assert_eq!(s.chunk_count(), 3);
        let reopened = ChunkStore::open(s.root()).expect("reopen");
        assert_eq!(reopened.chunk_count(), 3);
        assert_eq!(reopened.used_bytes(), s.used_bytes());
        // Corrupt metadata is listed without a state (after a restart:
        // a running store lists the copy it verified).
        fs::write(s.meta_path(6, 2), b"junk").expect("junk");
        let s = ChunkStore::open(s.root()).expect("restart");
        let l = s.list(|i, _| i == 6).expect("list");
        assert_eq!(l[0].state, None);
        assert!(s.install(0, 0, b"", 1, false).is_err());
        assert!(s.install(1, 0, b"", 0, false).is_err());
    }

    #[test]
    fn reopen_counts_usage() {
        let d = tempfile::tempdir().expect("tempdir");
        {
            let s = ChunkStore::open(d.path()).expect("open");
            w(&s, 1, 0, 0, &pattern(1000, 1));
            w(&s, 2, 5, 10, &pattern(20, 1));
        }
        let s = ChunkStore::open(d.path()).expect("reopen");
        assert_eq!(s.chunk_count(), 2);
        assert_eq!(s.used_bytes(), 1030);
    }

    #[test]
    fn open_chunk_cache_is_bounded_and_follows_changes() {
        let d = tempfile::tempdir().expect("tempdir");
        let s = ChunkStore::open_with_cache(d.path(), 2).expect("open");
        for i in 0..6u64 {
            w(&s, 21, i, 0, &pattern(3 * B + 5, i as u8));
            assert!(s.open_chunk_count() <= 2);
        }
        // Evicted chunks reopen from disk; every read still verifies.
        for i in 0..6u64 {
            assert_eq!(r(&s, 21, i, 0, CS), pattern(3 * B + 5, i as u8));
            assert_eq!(s.version(21, i).expect("v"), 1);
        }
        assert_eq!(s.open_chunk_count(), 2);
        // An install replaces the files under an open chunk.
        r(&s, 21, 5, 0, 1);
        assert!(s.install(21, 5, b"fresh", 7, false).expect("install"));
        assert_eq!(s.read(21, 5, 0, 100).expect("read"), (b"fresh".to_vec(), 7));
        w(&s, 21, 5, 5, b"!");
        assert_eq!(
            s.read(21, 5, 0, 100).expect("read"),
            (b"fresh!".to_vec(), 8)
        );
        // Truncate and delete work on the files; the open copies follow.
        s.truncate_object(21, u64::from(CS) * 5 + 2, CS)
            .expect("truncate");
        assert_eq!(s.read(21, 5, 0, 100).expect("read"), (b"fr".to_vec(), 9));
        w(&s, 21, 5, 2, b"X");
        assert_eq!(r(&s, 21, 5, 0, 100), b"frX");
        assert!(s.remove_chunk(21, 4, u64::MAX).expect("remove"));
        assert_eq!(s.read(21, 4, 0, 10).expect("read"), (vec![], 0));
        s.delete_object(21).expect("delete");
        assert_eq!(s.read(21, 5, 0, 10).expect("read"), (vec![], 0));
        assert_eq!(s.chunk_count(), 0);
        // Under a small process file limit the budget shrinks, never to 0.
        assert!(open_chunk_budget() >= 16);
    }

    #[test]
    fn nonblocking_reads_match_blocking_ones() {
        let (_d, s) = store();
        let data = pattern(3 * B + 77, 4);
        w(&s, 61, 0, 0, &data);
        for (off, len) in [
            (0u32, 10u32),
            (B as u32 - 3, 9),
            (0, CS),
            (3 * B as u32 + 70, 100),
        ] {
            if let Some(got) = s.try_read_cached(61, 0, off, len) {
                assert_eq!(got.expect("read"), s.read(61, 0, off, len).expect("read"));
            }
        }
        // Not open: the caller must use the blocking path.
        assert!(s.try_read_cached(61, 1, 0, 10).is_none());
        // Corruption is still detected.
        let path = s.data_path(61, 0);
        let mut raw = fs::read(&path).expect("raw");
        raw[3] ^= 1;
        fs::write(&path, &raw).expect("flip");
        if let Some(r) = s.try_read_cached(61, 0, 0, 10) {
            assert!(matches!(r, Err(StoreError::Corruption { .. })));
        }
    }

    #[test]
    fn scrub_checks_data_and_sidecar() {
        let (_d, s) = store();
        w(&s, 51, 0, 0, &pattern(2 * B + 9, 1));
        assert_eq!(s.scrub_chunk(51, 0).expect("clean"), 2 * B as u64 + 9);
        assert_eq!(s.scrub_chunk(51, 9).expect("missing"), 0);
        // A damaged sidecar of an open chunk.
        let mpath = s.meta_path(51, 0);
        let mut m = fs::read(&mpath).expect("meta");
        m[12] ^= 1;
        fs::write(&mpath, &m).expect("damage");
        assert!(matches!(
            s.scrub_chunk(51, 0),
            Err(StoreError::Corruption { .. })
        ));
        // A damaged block of a chunk that is not open.
        let s2 = ChunkStore::open_with_cache(s.root(), 1).expect("reopen");
        w(&s2, 52, 0, 0, &pattern(B, 2));
        w(&s2, 52, 1, 0, &pattern(B, 3));
        let path = s2.data_path(52, 0);
        let mut raw = fs::read(&path).expect("raw");
        raw[5] ^= 1;
        fs::write(&path, &raw).expect("flip");
        assert!(matches!(
            s2.scrub_chunk(52, 0),
            Err(StoreError::Corruption { .. })
        ));
        assert_eq!(s2.open_chunk_count(), 1);
    }

    #[test]
    fn large_writes_with_unaligned_edges_read_back_and_scrub_clean() {
        let (d, s) = store();
        // Chunks larger than the tests' usual, to hold large writes.
        let w = |s: &ChunkStore, ino, idx, off, data: &[u8]| {
            s.write(ino, idx, off, data, 4 << 20, VersionMode::Next, false)
                .expect("write")
        };
        let big = direct_io::MIN_DIRECT + 3 * direct_io::ALIGN + 123;
        // Buffered first, so the direct write lands over cached pages.
        w(&s, 41, 0, 0, &pattern(5000, 9));
        w(&s, 41, 0, 100, &pattern(big, 1));
        w(&s, 41, 0, 4090, b"small, buffered, across a page edge");
        let mut want = pattern(5000, 9);
        want.resize(100 + big, 0);
        want[100..].copy_from_slice(&pattern(big, 1));
        want[4090..4090 + 35].copy_from_slice(b"small, buffered, across a page edge");
        // An aligned write past the end over a hole, then one inside it.
        let far = 2 * direct_io::MIN_DIRECT;
        w(&s, 41, 0, far as u32, &pattern(direct_io::MIN_DIRECT, 3));
        w(
            &s,
            41,
            0,
            direct_io::ALIGN as u32,
            &pattern(direct_io::MIN_DIRECT, 5),
        );
        want.resize(far, 0);
        want.extend_from_slice(&pattern(direct_io::MIN_DIRECT, 3));
        want[direct_io::ALIGN..direct_io::ALIGN + direct_io::MIN_DIRECT]
            .copy_from_slice(&pattern(direct_io::MIN_DIRECT, 5));
        assert_eq!(r(&s, 41, 0, 0, want.len() as u32), want);
        s.scrub_chunk(41, 0).expect("scrub");
        // Unless this filesystem refuses O_DIRECT, that went direct.
        if direct_io::open(&s.data_path(41, 0)).is_ok() {
            assert!(s.direct_writes.load(Ordering::Relaxed));
        }
        // And from the disk, by a store that opens the files afresh.
        s.sync_objects(&[41]).expect("sync");
        drop(s);
        let s = ChunkStore::open(d.path().join("chunks")).expect("reopen");
        assert_eq!(r(&s, 41, 0, 0, want.len() as u32), want);
        s.scrub_chunk(41, 0).expect("scrub after reopen");
    }

    #[test]
    fn vectored_write_is_one_version() {
        let (_d, s) = store();
        w(&s, 31, 0, 0, &pattern(2 * B, 1));
        let items = [
            (10u32, Payload::Data(b"aaaa")),
            (B as u32 - 2, Payload::Data(b"bbbb")),
            (12u32, Payload::Data(b"c")),
            (3 * B as u32, Payload::Data(b"tail")),
            (0u32, Payload::Zero(2)),
        ];
        let o = s
            .apply_items(31, 0, &items, CS, VersionMode::Next, false)
            .expect("vectored");
        assert_eq!(o.version, 2);
        let mut want = pattern(2 * B, 1);
        want[10..14].copy_from_slice(b"aaaa");
        want[B - 2..B + 2].copy_from_slice(b"bbbb");
        want[12] = b'c';
        want.resize(3 * B, 0);
        want.extend_from_slice(b"tail");
        want[..2].fill(0);
        assert_eq!(r(&s, 31, 0, 0, CS), want);
        // A replica applies the same items at the primary's version.
        let (_d2, s2) = store();
        w(&s2, 31, 0, 0, &pattern(2 * B, 1));
        let ex = VersionMode::Exact {
            version: 2,
            force: false,
        };
        s2.apply_items(31, 0, &items, CS, ex, false)
            .expect("replica");
        let (a, b) = (
            s.list(|_, _| true).expect("l"),
            s2.list(|_, _| true).expect("l"),
        );
        assert_eq!(a, b, "same version, length and digest");
        // Checksums hold after a restart (the sidecar on disk is current).
        let s3 = ChunkStore::open(s.root()).expect("reopen");
        assert_eq!(r(&s3, 31, 0, 0, CS), want);
        // A bad item refuses the whole write.
        assert!(s
            .apply_items(
                31,
                0,
                &[(0, Payload::Data(b"x")), (CS, Payload::Data(b"y"))],
                CS,
                VersionMode::Next,
                false
            )
            .is_err());
        assert_eq!(s.version(31, 0).expect("v"), 2);
    }

    /// What a kill -9 or a power loss can leave: the sidecar of an
    /// acknowledged write is on disk (page cache) at once; a data file
    /// ahead of its sidecar, or a torn sidecar, is never served, and
    /// listings report the old version (or corruption) so that peering
    /// pulls the copy back.
    #[test]
    fn torn_updates_are_detected() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("chunks");
        {
            let s = ChunkStore::open(&root).expect("open");
            w(&s, 41, 0, 0, &pattern(2 * B, 1));
            w(&s, 41, 0, 100, b"second");
            // Without any sync, the sidecar on disk already says version 2
            // and matches the data (what a killed process leaves).
            let raw = fs::read(s.meta_path(41, 0)).expect("meta");
            let m = ChunkMeta::decode(&raw).expect("decode");
            assert_eq!(m.version, 2);
            assert_eq!(m.crcs.len(), 2);
            w(&s, 41, 1, 0, &pattern(B, 3));
            w(&s, 41, 2, 0, &pattern(B, 4));
            // The process dies here (no clean shutdown).
            std::mem::forget(s);
        }
        let s = ChunkStore::open(&root).expect("restart");
        let mut want = pattern(2 * B, 1);
        want[100..106].copy_from_slice(b"second");
        assert_eq!(s.read(41, 0, 0, CS).expect("read"), (want, 2));
        drop(s);
        // Data written, sidecar not (crash between the two writes).
        let f = OpenOptions::new()
            .write(true)
            .open(chunk_file(&root, 41, 1))
            .expect("data");
        f.write_all_at(b"new bytes", 7).expect("write");
        // Sidecar torn: the first half of a new sidecar over the old one.
        let mpath = s_meta_path(&root, 41, 2);
        let old = fs::read(&mpath).expect("meta");
        let newer = ChunkMeta {
            version: 9,
            len: 2 * B as u64,
            crcs: vec![1, 2],
        }
        .encode();
        let mut torn = old.clone();
        torn[..newer.len() / 2].copy_from_slice(&newer[..newer.len() / 2]);
        fs::write(&mpath, &torn).expect("torn");
        let s = ChunkStore::open(&root).expect("restart");
        assert!(matches!(
            s.read(41, 1, 0, 10),
            Err(StoreError::Corruption { .. })
        ));
        assert!(matches!(
            s.read(41, 2, 0, 10),
            Err(StoreError::Corruption { .. })
        ));
        let l = s.list(|_, _| true).expect("list");
        let state = |i: u64| l.iter().find(|c| c.index == i).map(|c| c.state);
        assert_eq!(
            state(1),
            Some(Some((1, B as u64))),
            "old version: peering pulls a newer copy"
        );
        assert_eq!(state(2), Some(None), "corrupt: repaired from a peer");
        // Repair by install, as recovery does.
        assert!(s.install(41, 1, &pattern(B, 5), 2, false).expect("install"));
        assert!(s.install(41, 2, &pattern(B, 6), 1, true).expect("install"));
        assert_eq!(r(&s, 41, 1, 0, CS), pattern(B, 5));
        assert_eq!(r(&s, 41, 2, 0, CS), pattern(B, 6));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write {
            idx: u64,
            off: u32,
            len: u32,
            seed: u8,
        },
        Read {
            idx: u64,
            off: u32,
            len: u32,
        },
        Truncate {
            size: u64,
        },
        Zero {
            idx: u64,
            off: u32,
            len: u32,
        },
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        let off = prop_oneof![
            0u32..CS,
            (0u32..4).prop_map(|b| b * BLOCK_SIZE as u32),
            (1u32..4).prop_map(|b| b * BLOCK_SIZE as u32 - 1),
        ];
        prop_oneof![
            4 => (0u64..3, off.clone(), 0u32..(150 * 1024), any::<u8>()).prop_map(|(idx, off, len, seed)| {
                Op::Write { idx, off, len: len.min(CS - off), seed }
            }),
            3 => (0u64..3, off, 0u32..CS).prop_map(|(idx, off, len)| Op::Read { idx, off, len }),
            1 => (0u64..(3 * u64::from(CS) + 10)).prop_map(|size| Op::Truncate { size }),
            2 => (0u64..3, 0u32..CS, 0u32..CS).prop_map(|(idx, off, len)| {
                Op::Zero { idx, off, len: len.min(CS - off) }
            }),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn matches_model(ops in proptest::collection::vec(op(), 1..25)) {
            let d = tempfile::tempdir().expect("tempdir");
            let mut s = ChunkStore::open(d.path()).expect("open");
            // Per chunk: stored bytes and version; None = absent.
            let mut model: Vec<Option<(Vec<u8>, u64)>> = vec![None; 3];
            for op in ops {
                match op {
                    Op::Write { idx, off, len, seed } => {
                        let data = pattern(len as usize, seed);
                        let v = s.write(42, idx, off, &data, CS, VersionMode::Next, false).expect("write").version;
                        let (bytes, ver) = model[idx as usize].get_or_insert((Vec::new(), 0));
                        let end = off as usize + data.len();
                        if !data.is_empty() && bytes.len() < end {
                            bytes.resize(end, 0);
                        }
                        bytes[off as usize..end].copy_from_slice(&data);
                        *ver += 1;
                        prop_assert_eq!(v, *ver);
                    }
                    Op::Read { idx, off, len } => {
                        let (got, v) = s.read(42, idx, off, len).expect("read");
                        let (want, wv) = match &model[idx as usize] {
                            None => (Vec::new(), 0),
                            Some((b, v)) => {
                                let lo = (off as usize).min(b.len());
                                let hi = (off as usize + len as usize).min(b.len());
                                (b[lo..hi].to_vec(), *v)
                            }
                        };
                        prop_assert_eq!(got, want);
                        prop_assert_eq!(v, wv);
                    }
                    Op::Truncate { size } => {
                        s.truncate_object(42, size, CS).expect("truncate");
                        for (i, m) in model.iter_mut().enumerate() {
                            let start = i as u64 * u64::from(CS);
                            let keep = size.saturating_sub(start) as usize;
                            if let Some((b, v)) = m {
                                if keep < b.len() {
                                    b.truncate(keep);
                                    *v += 1;
                                }
                            }
                        }
                    }
                    Op::Zero { idx, off, len } => {
                        let v = s
                            .apply(42, idx, off, Payload::Zero(len), CS, VersionMode::Next, false)
                            .expect("zero")
                            .version;
                        let (bytes, ver) = model[idx as usize].get_or_insert((Vec::new(), 0));
                        let end = (off as usize + len as usize).min(bytes.len());
                        if (off as usize) < end {
                            bytes[off as usize..end].fill(0);
                        }
                        *ver += 1;
                        prop_assert_eq!(v, *ver);
                    }
                    Op::Reopen => {
                        s = ChunkStore::open(d.path()).expect("reopen");
                    }
                }
                let used: u64 = model.iter().flatten().map(|(b, _)| b.len() as u64).sum();
                prop_assert_eq!(s.used_bytes(), used);
                prop_assert_eq!(s.chunk_count(), model.iter().flatten().count() as u64);
            }
        }
    }

    /// A chunk's sidecar path (the store is closed).
    fn s_meta_path(root: &Path, ino: u64, index: u64) -> PathBuf {
        let mut p = chunk_file(root, ino, index).into_os_string();
        p.push(META_SUFFIX);
        PathBuf::from(p)
    }

    #[test]
    fn a_store_with_a_directory_per_inode_is_moved_into_buckets() {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().join("chunks");
        {
            let s = ChunkStore::open(&root).expect("open");
            w(&s, 0x1234, 0, 0, b"first chunk");
            w(&s, 0x1234, 3, 5, b"fourth");
            w(&s, 0x99, 0, 0, b"other");
        }
        // Rewrite the files as the older layout had them.
        for (ino, index) in [(0x1234u64, 0u64), (0x1234, 3), (0x99, 0)] {
            let old = root.join(format!("{ino:016x}"));
            fs::create_dir_all(&old).expect("dir");
            fs::rename(
                chunk_file(&root, ino, index),
                old.join(format!("{index:016x}")),
            )
            .expect("data");
            fs::rename(
                s_meta_path(&root, ino, index),
                old.join(format!("{index:016x}{META_SUFFIX}")),
            )
            .expect("meta");
        }
        fs::write(
            root.join(format!("{:016x}/{:016x}.tmp", 0x1234, 7)),
            b"junk",
        )
        .expect("tmp");
        let s = ChunkStore::open(&root).expect("reopen");
        assert_eq!(s.chunk_count(), 3);
        assert_eq!(r(&s, 0x1234, 0, 0, 11), b"first chunk");
        assert_eq!(r(&s, 0x1234, 3, 5, 6), b"fourth");
        assert_eq!(r(&s, 0x99, 0, 0, 5), b"other");
        assert!(!root.join(format!("{:016x}", 0x1234)).exists());
        assert_eq!(s.inos().expect("inos"), vec![0x99, 0x1234]);
        s.delete_object(0x1234).expect("delete");
        assert_eq!(
            files_of(&root, 0x1234).expect("files"),
            Vec::<PathBuf>::new()
        );
        assert_eq!(s.chunk_count(), 1);
    }
}
