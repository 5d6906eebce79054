//! What this client has open: per regular file its state (the size as this
//! client knows it, pending size commits, shared-write mode, the quota
//! window), the opens of each file and directory (reported in heartbeats),
//! the write gates, and the creates in flight. Knows nothing of the MDS.

use avalon_proto::pb::Attr;
use dashmap::DashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Per-inode state the client keeps while it has written data whose size
/// the MDS has not been told yet.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileState {
    /// Largest file size this client has seen from the MDS or set itself.
    pub size: u64,
    /// The file's chunk size (layout).
    pub chunk_size: u32,
    /// True when writes (their size, mtime and ctime) are not yet
    /// committed to the MDS.
    pub dirty: bool,
    /// True when those writes grew the file past the size the MDS holds:
    /// even fdatasync must commit it.
    pub grown: bool,
    /// Another session writes the file too (shared-write mode): writes go
    /// through uncached, O_APPEND offsets come from the MDS, reads ask for
    /// the size. Until this client's last close of the file.
    pub shared: bool,
    /// Size commits to the MDS started and finished: an attribute reply
    /// asked for while none was under way, with none started since, holds
    /// every size this client committed before it.
    pub commits_started: u32,
    /// See `commits_started`.
    pub commits_done: u32,
    /// Under a directory byte quota: the size is committed before a write
    /// takes the file more than this past `mds_size` (0: no quota).
    pub quota_window: u64,
    /// The size the MDS holds, as far as this client knows.
    pub mds_size: u64,
    /// This session's write grant on the file: the size up to which an
    /// fsync may leave size and times to the next commit (0: none).
    pub grant: u64,
    /// The lease generation the grant was recorded under
    /// (`MetaCache::lease_held`).
    pub grant_gen: u64,
    /// The lease generation under which the MDS answered that this session
    /// is the file's only writer (an open or create reply, a delegation):
    /// true while that lease holds unbroken (see `client/sole_writer.rs`).
    pub sole_gen: Option<u64>,
    /// O_APPEND writes made as the only writer and not committed yet: the
    /// size the MDS held when the first of them was made (where they start).
    pub append_base: Option<u64>,
    /// The MDS refused to confirm this session's appends (another writer
    /// came in while its lease was broken): what is still buffered for the
    /// file is dropped, and its fsync and close fail with EIO.
    pub fenced: bool,
    /// Fences of the file so far: each handle open at a fence reports it
    /// once, at its next fsync or close (as Linux's errseq does).
    pub fences: u32,
}

impl FileState {
    /// Gives up the growth not committed: the size goes back to the MDS's
    /// (the data past it was not stored, or its appends not acknowledged).
    pub fn give_up_growth(&mut self) {
        self.size = self.mds_size;
        self.grown = false;
        self.append_base = None;
    }

    /// The MDS holds `size` and this client's times: nothing is pending,
    /// unless writes raced past `size`.
    pub fn committed(&mut self, size: u64) {
        self.mds_size = self.mds_size.max(size);
        if self.size <= size {
            self.dirty = false;
            self.grown = false;
            self.append_base = None;
        } else if let Some(b) = self.append_base {
            self.append_base = Some(b.max(size));
        }
    }
}

/// Opens of one inode by this client.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenCount {
    /// All opens (and opens in flight).
    pub all: u32,
    /// Those for writing.
    pub writes: u32,
}

/// True if open(2) flags open for writing.
pub fn opens_for_write(flags: u32) -> bool {
    flags as i32 & libc::O_ACCMODE != libc::O_RDONLY
}

/// The open files and directories of one client.
#[derive(Default)]
pub struct OpenFiles {
    /// Per regular file this client opened or wrote.
    pub(crate) files: DashMap<u64, FileState>,
    /// Open handles per inode, reported in heartbeats so that a new MDS
    /// leader knows which unlinked files are still in use (and which have
    /// several writers).
    opens: DashMap<u64, OpenCount>,
    /// Per file: buffered writes hold it shared while they run; entering
    /// shared-write mode takes it exclusively, so that no buffered write
    /// is left behind the flush that mode starts with.
    write_gates: DashMap<u64, Arc<tokio::sync::RwLock<()>>>,
    /// Creates in flight (see [`OpenFiles::begin_create`]).
    creating: AtomicU32,
    /// Open directories: count, and whether the MDS counts one open of
    /// ours (registered before this client removes one, see
    /// `Client::rmdir`). Reported in heartbeats like files.
    pub(crate) dirs: DashMap<u64, (u32, bool)>,
}

impl OpenFiles {
    /// This client's opens of `ino`.
    pub fn count(&self, ino: u64) -> OpenCount {
        self.opens.get(&ino).map(|n| *n).unwrap_or_default()
    }

    /// Counts an open of `ino` with open flags `flags`.
    pub fn count_open(&self, ino: u64, flags: u32) {
        let mut n = self.opens.entry(ino).or_default();
        n.all += 1;
        if opens_for_write(flags) {
            n.writes += 1;
        }
    }

    /// Uncounts an open; true if it was this client's last of `ino`.
    pub fn uncount_open(&self, ino: u64, flags: u32) -> bool {
        let last = match self.opens.get_mut(&ino) {
            Some(mut n) => {
                n.all = n.all.saturating_sub(1);
                if opens_for_write(flags) {
                    n.writes = n.writes.saturating_sub(1);
                }
                n.all == 0
            }
            None => true,
        };
        if last {
            self.opens.remove_if(&ino, |_, n| n.all == 0);
            // Shared-write mode lasts until the last close (which stored
            // or dropped what was buffered), and so does a fence.
            if let Some(mut st) = self.files.get_mut(&ino) {
                st.shared = false;
                st.fenced = false;
            }
            self.write_gates.remove(&ino);
        }
        last
    }

    /// The write gate of `ino` (see `write_gates`).
    pub fn write_gate(&self, ino: u64) -> Arc<tokio::sync::RwLock<()>> {
        self.write_gates.entry(ino).or_default().clone()
    }

    /// A create starts: until [`OpenFiles::end_create`], a shared-write
    /// demand may concern the file it makes (known only from its reply).
    pub fn begin_create(&self) {
        self.creating.fetch_add(1, Ordering::SeqCst);
    }

    /// A create begun with [`OpenFiles::begin_create`] ended.
    pub fn end_create(&self) {
        self.creating.fetch_sub(1, Ordering::SeqCst);
    }

    /// True if a shared-write demand for `ino` may concern this client:
    /// it has the file open, or a create is in flight.
    pub fn may_have_open(&self, ino: u64) -> bool {
        self.opens.contains_key(&ino) || self.creating.load(Ordering::SeqCst) != 0
    }

    /// Inodes open here (files and directories), for heartbeats.
    pub fn open_inos(&self) -> Vec<u64> {
        self.opens
            .iter()
            .map(|e| *e.key())
            .chain(self.dirs.iter().map(|e| *e.key()))
            .collect()
    }

    /// Files open here for writing.
    pub fn write_inos(&self) -> Vec<u64> {
        self.opens
            .iter()
            .filter(|e| e.writes > 0)
            .map(|e| *e.key())
            .collect()
    }

    /// True if `ino` is in shared-write mode here.
    pub fn is_shared(&self, ino: u64) -> bool {
        self.files.get(&ino).is_some_and(|s| s.shared)
    }

    /// Puts `ino` in shared-write mode.
    pub fn set_shared(&self, ino: u64) {
        self.files.entry(ino).or_default().shared = true;
    }

    /// An answer given under lease generation `held` (None: the lease
    /// broke around it) says this session is `ino`'s only writer. Appends
    /// made under an older, broken lease keep their generation: they are
    /// still to be confirmed.
    pub fn note_sole(&self, ino: u64, held: Option<u64>) {
        let mut st = self.files.entry(ino).or_default();
        if st.append_base.is_none() || st.sole_gen == held {
            st.sole_gen = held;
        }
    }

    /// The state of regular file `ino`, if this client has one.
    pub fn known(&self, ino: u64) -> Option<FileState> {
        self.files.get(&ino).map(|s| *s)
    }

    /// Takes an attribute reply's size of regular file `a.ino` and returns
    /// the size this client reports. `sole_writer`: this client is the
    /// file's only writer, so the MDS's size can only lag behind its own.
    pub fn note_size(&self, a: &Attr, sole_writer: bool) -> u64 {
        let mut st = self.files.entry(a.ino).or_default();
        st.chunk_size = a.chunk_size;
        // An only writer's appends start from the MDS's size: a reply
        // older than one of its commits must not take that back.
        if !sole_writer || a.size > st.mds_size {
            st.mds_size = a.size;
        }
        if st.dirty || sole_writer {
            st.size = st.size.max(a.size);
        } else {
            st.size = a.size;
        }
        st.size
    }

    /// Records the quota window the MDS gave with an open or create reply.
    pub fn note_quota(&self, ino: u64, window: u64) {
        if let Some(mut st) = self.files.get_mut(&ino) {
            st.quota_window = window;
        } else if window > 0 {
            self.files.entry(ino).or_default().quota_window = window;
        }
    }

    /// Counts `ino`'s size commits done, if none is under way (see
    /// [`FileState::commits_started`]).
    pub fn commits_before(&self, ino: u64) -> Option<u32> {
        match self.files.get(&ino) {
            Some(st) if st.commits_started != st.commits_done => None,
            Some(st) => Some(st.commits_done),
            None => Some(0),
        }
    }

    /// Takes the size of an open's reply: the MDS's size is the file's
    /// (a truncate by another session may have lowered it) unless writes
    /// of this client are pending or its commits crossed the request
    /// (`commits`: from [`OpenFiles::commits_before`] when it was sent).
    pub fn note_open_size(&self, a: &Attr, commits: Option<u32>) {
        if a.mode & libc::S_IFMT != libc::S_IFREG {
            return;
        }
        let mut st = self.files.entry(a.ino).or_default();
        st.chunk_size = a.chunk_size;
        st.mds_size = a.size;
        let fresh = commits == Some(st.commits_started) && st.commits_started == st.commits_done;
        if fresh && !st.dirty {
            st.size = a.size;
        } else {
            st.size = st.size.max(a.size);
        }
    }

    /// Counts an open of directory `ino`.
    pub fn open_dir(&self, ino: u64) {
        self.dirs.entry(ino).or_insert((0, false)).0 += 1;
    }

    /// Ends one open of directory `ino`: true if it was the last and the
    /// MDS counted an open of ours.
    pub fn release_dir(&self, ino: u64) -> bool {
        let mut registered = false;
        let last = match self.dirs.get_mut(&ino) {
            Some(mut e) => {
                e.0 = e.0.saturating_sub(1);
                registered = e.1 && e.0 == 0;
                e.0 == 0
            }
            None => false,
        };
        if last {
            self.dirs.remove_if(&ino, |_, e| e.0 == 0);
        }
        registered
    }
}
