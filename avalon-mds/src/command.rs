//! Raft log commands and their responses.
//!
//! A [`MetaCommand`] carries everything the state machine needs to apply it
//! deterministically: the leader stamps the time, and file layouts come from
//! the cluster-wide settings (`settings.rs`). Inode, generation, OSD and session numbers are
//! allocated by the state machine itself.

use serde::{Deserialize, Serialize};

/// File layout given to new regular files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub chunk_size: u32,
    pub replicas: u32,
    pub write_quorum: u32,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            chunk_size: avalon_proto::limits::DEFAULT_CHUNK_SIZE,
            replicas: 3,
            write_quorum: 2,
        }
    }
}

/// How SetAttr changes a timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeSpec {
    /// The command's `now_ns` (UTIME_NOW).
    Now,
    /// An explicit time in nanoseconds.
    Ns(i64),
}

/// OSD state in the cluster map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OsdState {
    Up,
    Down,
    /// Out after being down for `osd_out_after_ms`: placement skips it; it
    /// comes back up by itself when it heartbeats again.
    Out,
    /// Taken out by hand (`avalonctl osd out|drain`): stays out, also
    /// across restarts, until `avalonctl osd in`.
    OutByAdmin,
}

impl OsdState {
    /// Out of placement (automatically or by hand).
    pub fn is_out(self) -> bool {
        matches!(self, OsdState::Out | OsdState::OutByAdmin)
    }
}

/// One mutation of the metadata state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    SetAttr {
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeSpec>,
        mtime: Option<TimeSpec>,
        ctime_ns: Option<i64>,
    },
    Mknod {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
        exclusive: bool,
        layout: Layout,
    },
    Mkdir {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Symlink {
        parent: u64,
        name: Vec<u8>,
        target: Vec<u8>,
        uid: u32,
        gid: u32,
    },
    Unlink {
        parent: u64,
        name: Vec<u8>,
        /// Open-file guard (see [`Op::Rename::guard`]).
        guard: Option<u64>,
    },
    Rmdir {
        parent: u64,
        name: Vec<u8>,
    },
    Link {
        ino: u64,
        new_parent: u64,
        new_name: Vec<u8>,
    },
    Rename {
        parent: u64,
        name: Vec<u8>,
        new_parent: u64,
        new_name: Vec<u8>,
        flags: u32,
        /// Open-file guard for the last link of a regular file (or the
        /// directory) this removes: `None` deletes it (no open-file
        /// tracking); `Some(ino)` deletes it only if it is `ino` (which the
        /// leader saw closed), otherwise it becomes an orphan (nlink 0,
        /// kept until reclaimed).
        guard: Option<u64>,
    },
    SetXattr {
        ino: u64,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: u32,
    },
    RemoveXattr {
        ino: u64,
        name: Vec<u8>,
    },
    CommitWrite {
        ino: u64,
        size: u64,
    },
    RegisterOsd {
        osd_id: u64,
        addr: String,
        capacity_bytes: u64,
        used_bytes: u64,
        failure_domain: String,
        pid: u32,
    },
    /// Capacity/usage report of a known OSD (no epoch bump unless the
    /// address changes).
    OsdReport {
        osd_id: u64,
        addr: String,
        capacity_bytes: u64,
        used_bytes: u64,
        pid: u32,
    },
    SetOsdState {
        osd_id: u64,
        state: OsdState,
    },
    RegisterClient {
        hostname: String,
        mountpoint: Vec<u8>,
        pid: u32,
        subdir: Vec<u8>,
    },
    /// Data of these inodes was deleted on every OSD: drop them from the
    /// GC queue.
    GcDone {
        inos: Vec<u64>,
    },
    /// Nobody has these orphans open any more: delete them and queue their
    /// data for GC (non-orphans are ignored).
    ReclaimOrphans {
        inos: Vec<u64>,
    },
    /// The session stopped heartbeating: forget it.
    ExpireSession {
        session_id: u64,
    },
    /// A [`Op::CommitWrite`] (unless `commit` is false) that also records (`max_size` > 0: grows to at
    /// least that) or drops (`max_size` 0) `session`'s write grant on
    /// `ino` (`grants.rs`). Proposed only while every voter has
    /// `FEATURE_WRITE_GRANTS`.
    CommitWriteGrant {
        ino: u64,
        size: u64,
        /// False: only the grant changes (no size, no times).
        commit: bool,
        session: u64,
        max_size: u64,
    },
    /// A lost session's grants, recovered from the OSDs (`grants.rs`): for
    /// each `(ino, size)` the size grows to at least `size`, mtime and
    /// ctime move to the entry's time, and the grant goes; then the
    /// session itself goes (as [`Op::ExpireSession`]). Grants not listed
    /// stay (recovered later).
    RecoverGrants {
        session: u64,
        sizes: Vec<(u64, u64)>,
        /// The session stays (its holder did not answer another session's
        /// demand for one file, and can no longer act on its lease).
        keep_session: bool,
    },
    /// Sets or clears a byte-range lock of `(session, owner)` on `ino`
    /// (see `locks.rs`); EAGAIN on a conflict.
    SetLock {
        ino: u64,
        session: u64,
        owner: u64,
        pid: u32,
        start: u64,
        end: u64,
        kind: crate::locks::LockKind,
    },
    /// Drops every lock of `(session, owner)` on `ino` (close, flock
    /// release).
    ReleaseLocks {
        ino: u64,
        session: u64,
        owner: u64,
    },
    /// An O_APPEND write of `len` bytes to a file with several writers:
    /// grows the size by `len` (the writer stores its data at the old
    /// size) and stamps mtime/ctime.
    AppendWrite {
        ino: u64,
        len: u64,
    },
    /// Rmdir with an open-file guard (see [`Op::Rename::guard`]): a
    /// directory that is still open is kept as an orphan, so that fstat on
    /// it gives nlink 0 rather than ENOENT. A variant of its own, added
    /// last, so that logs written with [`Op::Rmdir`] still decode.
    RmdirGuarded {
        parent: u64,
        name: Vec<u8>,
        guard: Option<u64>,
    },
    /// A read's access-time update: atime only, ctime unchanged.
    Touch {
        ino: u64,
        atime: TimeSpec,
    },
    /// A create a client made under its delegation: inode number (from a
    /// range reserved with [`Op::ReserveInos`]) and mode (umask applied)
    /// chosen by the client. `mode`'s type is S_IFREG, S_IFDIR or S_IFLNK
    /// (then `target` is set).
    CreateAs {
        ino: u64,
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
        target: Option<Vec<u8>>,
        layout: Layout,
    },
    /// Changes a client made under its delegations, in its order, each
    /// with the time it stamped; applied one after the other, each on its
    /// own ([`Reply::Batch`] has their errnos).
    Batch {
        ops: Vec<(i64, Op)>,
    },
    /// Takes `count` inode numbers out of the allocator for a client's
    /// creates under delegation ([`Reply::Inos`] has the first).
    ReserveInos {
        count: u64,
    },
    /// Commands of several clients proposed together (group commit, see
    /// `proposer.rs`): each applied as if alone, with its own dedup;
    /// [`Reply::Multi`] has their answers in order.
    Multi(Vec<MetaCommand>),
    /// The cluster-wide settings, written once by the first leader (or by
    /// the first leader of a cluster created before they were stored,
    /// from its configuration); ignored when settings exist.
    InitSettings {
        settings: crate::settings::ClusterSettings,
    },
    /// Changes replicas and write quorum (`avalonctl pool set`): a new
    /// map, after which the OSDs re-peer and copy (or drop) chunks.
    SetReplicas {
        replicas: u32,
        write_quorum: u32,
    },
    /// Sets (or, with `None`, drops) a client identity's capabilities
    /// (`caps.rs`); a revoked entry also drops the identity's sessions.
    SetClientCaps {
        name: String,
        caps: Option<crate::caps::ClientCaps>,
    },
    /// [`Op::RegisterClient`] by a client identity, which then owns the
    /// session; `subdir` is already within its capabilities' subtree.
    RegisterClientAs {
        hostname: String,
        mountpoint: Vec<u8>,
        pid: u32,
        subdir: Vec<u8>,
        identity: String,
    },
    /// A client registration under a session id the leader chose at random
    /// (so ids cannot be guessed); `identity`, when set, owns the session.
    /// Fails with EEXIST if the id is taken (the leader draws again).
    RegisterClientWithId {
        hostname: String,
        mountpoint: Vec<u8>,
        pid: u32,
        subdir: Vec<u8>,
        identity: Option<String>,
        session_id: u64,
    },
    /// Puts trash entry `id` back (`trash.rs`): at its original place, or
    /// at `to` (a path from the root: into it if it is a directory, else
    /// as it). [`Reply::Attr`] has the restored inode's attributes.
    TrashRestore {
        id: u64,
        to: Option<Vec<u8>>,
    },
    /// Frees trash entries now (with what was deleted from those that
    /// are directories), or all of them; [`Reply::Count`] says how many.
    TrashPurge {
        ids: Vec<u64>,
        all: bool,
    },
    /// Frees the trash entries due at the command's time (the leader's
    /// clock, proposed by the leader); [`Reply::Count`] says how many.
    TrashExpire,
    /// Takes snapshot `id` (one more than the newest, else EAGAIN) named
    /// `name` of directory `dir` (`snapshots.rs`); [`Reply::Count`] is the id.
    SnapCreate {
        id: u64,
        dir: u64,
        name: Vec<u8>,
    },
    /// Removes snapshot `name` of directory `dir`; [`Reply::Count`] is its
    /// id. The OSDs drop its clones at the next trim.
    SnapRemove {
        dir: u64,
        name: Vec<u8>,
    },
    /// The OSDs were told to trim after the first `removals` removals.
    SnapTrimmed {
        removals: u64,
    },
    /// [`Op::SetClientCaps`] with the identity's uid/gid mapping (empty or
    /// `caps` `None`: the mapping is dropped). Proposed only once every
    /// voter has `FEATURE_ID_MAP`.
    SetClientCapsMapped {
        name: String,
        caps: Option<crate::caps::ClientCaps>,
        ids: crate::caps::IdMap,
    },
    /// [`Op::CommitWrite`] only if the file's size is `expect` (else
    /// ESTALE): the appends of a session that wrote as the file's only
    /// writer from size `expect` on, confirmed after its lease broke.
    /// Proposed only once every voter has `FEATURE_FENCED_APPENDS`.
    CommitWriteIf {
        ino: u64,
        size: u64,
        expect: u64,
    },
}

/// A raft log entry payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaCommand {
    /// Leader's wall clock when it accepted the request.
    pub now_ns: i64,
    /// Client session (0 = none: no dedup).
    pub session_id: u64,
    /// Request id inside the session (0 = no dedup).
    pub request_id: u64,
    pub op: Op,
}

/// Inode attributes as stored (mirrors the proto `Attr`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub crtime_ns: i64,
    pub generation: u64,
    pub chunk_size: u32,
    pub replicas: u32,
    pub write_quorum: u32,
}

/// Successful outcome of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    None,
    Attr(Attr),
    OsdRegistered {
        osd_id: u64,
        epoch: u64,
    },
    ClientRegistered {
        session_id: u64,
        root_ino: u64,
    },
    /// Per op of an [`Op::Batch`]: 0 or its errno.
    Batch(Vec<i32>),
    /// First of the numbers [`Op::ReserveInos`] reserved.
    Inos(u64),
    /// Per command of an [`Op::Multi`], its answer.
    Multi(Vec<MetaResponse>),
    /// The settings in force after [`Op::InitSettings`] or
    /// [`Op::SetReplicas`].
    Settings(crate::settings::ClusterSettings),
    /// How many entries a trash purge or expiry freed.
    Count(u64),
    /// [`Op::CommitWriteGrant`]: the attributes and the size the session's
    /// grant now reaches (0: none recorded).
    Granted(Attr, u64),
}

/// What applying one log entry produced: a reply or a Linux errno.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaResponse(pub Result<Reply, i32>);

impl Default for MetaResponse {
    fn default() -> Self {
        MetaResponse(Ok(Reply::None))
    }
}
