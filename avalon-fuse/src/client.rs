//! The client library: a session with the metadata service plus the state a
//! mounted client keeps per inode. FUSE-independent, so it can be driven
//! directly from tests and tools.
//!
//! Layers, each using only the ones below it:
//!
//! 1. `session.rs`: the MDS connection, session and request ids, the
//!    recall stream's state.
//! 2. State owners that know nothing of `Client`: `meta_cache.rs`
//!    (attributes, entries, listings), `page_cache.rs` (kernel page
//!    versions), `chunk_cache.rs`, `osd_io.rs` (cluster map, OSD
//!    requests, with `chunk_caps.rs`), `open_files.rs`, `write_buffer.rs`,
//!    `sync_marks.rs`, `delegation.rs` (delegations and their queue),
//!    `dir_read_ahead.rs`, `changing_names.rs`, `lost_changes.rs`.
//! 3. `Client` (this file): composes them and implements the operations:
//!    metadata here, data in `data_path.rs`, changes under delegations in
//!    `client/delegated.rs`.
//! 4. On top of `Client`: `locks.rs` (one mount's lock owners),
//!    `dir_stream.rs`, `acl.rs`, `recall.rs` (applies the recall stream).
//! 5. `fs.rs`: the FUSE mapping only.

use crate::delegation::NewNode;
use crate::error::{ClientError, Result};
use crate::meta_cache::{Cached, MetaCache};
use crate::open_files::OpenFiles;
pub use crate::open_files::{opens_for_write, FileState, OpenCount};
use crate::osd_io::OsdIo;
use crate::session::Session;
use avalon_proto::pb::{self, time_set::How, Attr, ClusterMap, TimeSet};
use avalon_proto::request_id::Traced;
use bytes::Bytes;
use dashmap::DashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod delegated;
mod sole_writer;

/// The extended attribute holding a file's SELinux label.
const SELINUX_XATTR: &[u8] = b"security.selinux";
/// Prefix of the xattrs the MDS computes (`avalon.dir.*` recursive
/// statistics, `avalon.quota.*`): never cached here.
const VIRTUAL_XATTRS: &[u8] = b"avalon.";

/// How a timestamp changes in [`Client::setattr`].
#[derive(Debug, Clone, Copy)]
pub enum TimeChange {
    /// To the server's current time.
    Now,
    /// To this many nanoseconds since the epoch.
    At(i64),
}

/// Attribute changes for [`Client::setattr`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeChange>,
    pub mtime: Option<TimeChange>,
    pub ctime_ns: Option<i64>,
    /// Made through an open file (see `SetAttrRequest.by_handle`).
    pub by_handle: bool,
}

/// When reads update a file's access time (the mount's atime options).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AtimeMode {
    /// noatime, or a read-only mount.
    Never,
    /// relatime (Linux's default): when atime is not after mtime or ctime,
    /// or a day old.
    #[default]
    Relative,
    /// strictatime: on every read (here: the first read of each open).
    Always,
}

/// Most times a lookup is asked again because another mount changed the
/// name while it was in flight (it is the newest answer after that).
const LOOKUP_TRIES: u32 = 3;

/// How long one heartbeat waits for an MDS before asking the others: a
/// leader paused without closing its connections must not keep this
/// client from its successor, which waits for every session's report of
/// the files it writes only for the orphan grace (5 s by default). An
/// answer later than this would renew a lease that is over already (the
/// lease, 2 s by default, counts from the sending).
const HEARTBEAT_ATTEMPT: std::time::Duration = std::time::Duration::from_secs(2);

/// How old an access time relatime renews anyway.
const RELATIME_MAX_AGE_NS: i64 = 24 * 3600 * 1_000_000_000;

/// A connected client session.
pub struct Client {
    /// The MDS session and its recall stream.
    pub session: Session,
    /// MDS inode that the mount's root stands for.
    pub root_ino: u64,
    /// The cluster map, OSD connections and chunk capabilities.
    pub(crate) osd_io: OsdIo,
    /// Open files and directories, and per-file state.
    pub(crate) open_files: OpenFiles,
    /// Files with chunk writes sent without sync since their last fsync.
    pub(crate) sync_marks: crate::sync_marks::SyncMarks,
    /// Names this client's changes in flight touch: not looked up in the
    /// cache meanwhile (see `changing_names.rs`).
    changing: crate::changing_names::ChangingNames,
    /// Whole chunks fetched by sequential readahead.
    pub(crate) cache: crate::chunk_cache::ChunkCache,
    /// Attributes and entries cached under the metadata lease.
    pub meta: MetaCache,
    /// Directory listings read ahead for tree walks.
    pub(crate) dir_ahead: crate::dir_read_ahead::DirReadAhead,
    /// Directories delegated to this session, and the changes made under
    /// them not yet sent (`delegation.rs`).
    pub deleg: crate::delegation::Delegations,
    /// Which files' kernel pages an open may keep.
    pub page_versions: crate::page_cache::PageVersions,
    /// Writes acknowledged to the kernel, not yet sent to the OSDs.
    pub(crate) wbuf: crate::write_buffer::WriteBuffer,
    atime_mode: AtimeMode,
    /// Whether `security.selinux` is stored (mount option `selinux`).
    selinux_labels: bool,
    /// Files opened since their atime was due (see [`Client::note_open_atime`]):
    /// the next read updates it, so at most one MDS write per open.
    atime_due: DashSet<u64>,
    /// Files' snapshot sequences and frozen attributes (`snapshots.rs`).
    pub(crate) snaps: crate::snapshots::Snaps,
    /// The mount's fcntl, flock and OFD locks (`locks.rs`).
    pub locks: Arc<crate::locks::Locks>,
    /// One confirmation of appends at a time (`client/sole_writer.rs`).
    confirming: tokio::sync::Mutex<()>,
    /// Per open handle: its file and the file's fences it has reported.
    seen_fences: dashmap::DashMap<u64, (u64, u32)>,
}

fn time_set(t: Option<TimeChange>) -> Option<TimeSet> {
    t.map(|t| TimeSet {
        how: Some(match t {
            TimeChange::Now => How::Now(pb::Empty {}),
            TimeChange::At(ns) => How::Ns(ns),
        }),
    })
}

impl Client {
    /// Opens a session: registers with the MDS (trying for at most
    /// `budget`), resolves the subdirectory and loads the cluster map.
    pub async fn connect(
        mds_addrs: Vec<String>,
        subdir: &[u8],
        mountpoint: &[u8],
        budget: Duration,
        tls: avalon_proto::tls::ClientTls,
    ) -> Result<Client> {
        let reg = Session::register(mds_addrs, subdir, mountpoint, budget, tls.clone()).await?;
        let map = reg.map;
        Ok(Client {
            session: reg.session,
            root_ino: reg.root_ino,
            osd_io: OsdIo::new(map, tls),
            open_files: OpenFiles::default(),
            sync_marks: Default::default(),
            page_versions: Default::default(),
            changing: Default::default(),
            cache: crate::chunk_cache::ChunkCache::new(
                32 * u64::from(avalon_proto::limits::DEFAULT_CHUNK_SIZE),
            ),
            meta: MetaCache::new(),
            dir_ahead: Default::default(),
            deleg: Default::default(),
            wbuf: crate::write_buffer::WriteBuffer::new(
                crate::write_buffer::WriteBuffer::budget_from_env(),
            ),
            atime_mode: AtimeMode::default(),
            selinux_labels: false,
            atime_due: DashSet::new(),
            snaps: Default::default(),
            locks: Default::default(),
            confirming: Default::default(),
            seen_fences: Default::default(),
        })
    }

    /// Sets the memory budget of the chunk cache (before sharing the client).
    pub fn set_cache_budget(&mut self, bytes: u64) {
        self.cache = crate::chunk_cache::ChunkCache::new(bytes);
    }

    /// Stores SELinux labels (`security.selinux`) like any other xattr
    /// (before sharing the client). Off by default, as GlusterFS's
    /// `selinux` mount option: without a security module answering for it
    /// in the kernel, ls -l asks for it on every file, and an EOPNOTSUPP
    /// lets it stop asking after the first instead of a round trip each.
    pub fn set_selinux_labels(&mut self, on: bool) {
        self.selinux_labels = on;
    }

    /// The error for `name` if it is an SELinux label and labels are off.
    fn unstored_xattr(&self, name: &[u8]) -> Result<()> {
        if !self.selinux_labels && name == SELINUX_XATTR {
            return Err(ClientError::posix(
                libc::EOPNOTSUPP,
                "SELinux labels are not stored (mount option selinux)",
            ));
        }
        Ok(())
    }

    /// Sets when reads update access times (before sharing the client).
    pub fn set_atime_mode(&mut self, mode: AtimeMode) {
        self.atime_mode = mode;
    }

    /// An open of `a.ino` with open flags `flags` whose pages the kernel
    /// may keep (`keep`): marks its access time due if the mount's atime
    /// mode says so, and returns whether the pages are still kept. Reads
    /// served from kept pages never reach the client, so an open whose
    /// atime is due drops them (not the client's chunks, which are
    /// current) and its first read renews atime alongside the data.
    /// Relatime does so only for O_RDONLY opens (due once per change), so
    /// O_RDWR opens of a file being written keep their pages.
    fn note_open_atime(&self, a: &Attr, flags: u32, keep: bool) -> bool {
        let how = flags as i32;
        if how & libc::O_ACCMODE == libc::O_WRONLY || how & libc::O_NOATIME != 0 {
            return keep;
        }
        let due = match self.atime_mode {
            AtimeMode::Never => false,
            AtimeMode::Always => true,
            AtimeMode::Relative => {
                let now_ns = crate::attr::ns_of(std::time::SystemTime::now());
                a.atime_ns <= a.mtime_ns
                    || a.atime_ns <= a.ctime_ns
                    || now_ns.saturating_sub(a.atime_ns) >= RELATIME_MAX_AGE_NS
            }
        };
        if !due {
            return keep;
        }
        self.atime_due.insert(a.ino);
        let read_only = how & libc::O_ACCMODE == libc::O_RDONLY;
        keep && self.atime_mode == AtimeMode::Relative && !read_only
    }

    /// Renews the access time of `ino` if an open made it due (called on
    /// reads; an MDS write only for the first read after such an open).
    pub async fn touch_atime_if_due(&self, ino: u64) -> Result<()> {
        if self.atime_due.remove(&ino).is_none() {
            return Ok(());
        }
        if self.touch_delegated(ino) {
            return Ok(());
        }
        let epoch = self.meta.epoch();
        let req = pb::SetAttrRequest {
            header: self.session.header(),
            ino,
            atime: time_set(Some(TimeChange::Now)),
            access: true,
            ..Default::default()
        };
        let r = self
            .rpc(req, |mut c, r| async move { c.set_attr(r).await })
            .await?;
        let a = Self::ok_attr(r.attr)?;
        self.meta.put_attr(epoch, &a);
        Ok(())
    }

    /// A request to the MDS, after every delegated change made before it
    /// (see `delegation.rs`).
    pub(crate) async fn rpc<R, T, F, Fut>(
        &self,
        req: R,
        f: F,
    ) -> std::result::Result<T, tonic::Status>
    where
        R: Clone,
        F: FnMut(pb::meta_client::MetaClient<Traced>, R) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        // Never ahead of a change made before it: not while the queue is
        // not applied, nor when some of it was lost (the request would act
        // on a state without those changes).
        if let Err(e) = self.barrier().await {
            return Err(match e {
                ClientError::Posix { errno, message } => {
                    avalon_proto::errno::status(errno, message)
                }
                e => tonic::Status::unavailable(e.to_string()),
            });
        }
        self.session.mds.request(req, f).await
    }

    /// The MDS refused a change of names (`names`: directory and name) as
    /// absent, present or of the wrong kind, where this client's cache may
    /// still say otherwise: the recall of another session's change is on
    /// its way. Those names are forgotten at once, so that no later look
    /// through this mount is older than what this answer showed.
    fn contradicted(&self, e: &tonic::Status, names: &[(u64, &[u8])]) {
        let errno = avalon_proto::errno::errno_of(e);
        let stale = [
            libc::ENOENT,
            libc::EEXIST,
            libc::ENOTEMPTY,
            libc::ENOTDIR,
            libc::EISDIR,
        ];
        if stale.contains(&errno) {
            for (dir, name) in names {
                self.meta.forget_entry(*dir, name);
            }
        }
    }

    /// The cached cluster map.
    pub fn map(&self) -> Arc<ClusterMap> {
        self.osd_io.map()
    }

    /// Fetches the cluster map from the MDS and caches it.
    pub async fn refresh_map(&self) -> Result<Arc<ClusterMap>> {
        self.osd_io.refresh_map(&self.session).await
    }

    /// Tells the MDS this session is alive, which renews its metadata
    /// lease (counted from the sending: the MDS's runs out later).
    pub async fn heartbeat(&self) -> Result<()> {
        let stream = self.session.open_stream();
        let req = pb::ClientHeartbeatRequest {
            header: self.session.header(),
            open_inos: self.open_files.open_inos(),
            dropped_cache: self.meta.take_dropped(),
            write_inos: self.open_files.write_inos(),
            version: Some(avalon_proto::version::local()),
            totals: crate::metrics::totals(),
        };
        let sent = Instant::now();
        let r = self
            .session
            .mds
            .request_each_within(HEARTBEAT_ATTEMPT, req, |mut c, r| async move {
                c.client_heartbeat(r).await
            })
            .await;
        // A heartbeat that renews nothing (an error, or no lease from a
        // leader that could not confirm itself in time) takes nothing away
        // either: what this client holds stays good until its lease runs
        // out, which the MDS waits for before revoking anything unheard.
        // Dropping it all at once turned one slow quorum check under load
        // into seconds of synchronous work. Once the lease ran out, though,
        // the MDS may have revoked delegations unheard: they go, and the
        // cache with them.
        let lease = match &r {
            Ok(r) => {
                // The stream was open before this heartbeat left, so the
                // leader would have it unless it went to another MDS.
                if let Some(g) = stream.filter(|_| r.no_stream) {
                    self.session.stream_missing(g);
                }
                Duration::from_millis(u64::from(r.lease_ms))
            }
            Err(e) => {
                // Only the leader says so, after a linearizable read: the
                // session expired, and with it what is queued.
                if e.code() == tonic::Code::NotFound {
                    self.deleg.lose_session();
                }
                Duration::ZERO
            }
        };
        if self.meta.lapsed() {
            tracing::warn!("metadata lease ran out unrenewed: delegations and cache dropped");
            self.deleg.drop_all();
            if lease.is_zero() {
                self.meta.clear();
            }
        }
        if lease.is_zero() {
            tracing::debug!("heartbeat renewed no lease");
        } else {
            // Empties the cache first if the lease had lapsed.
            self.meta.renew(sent, lease);
        }
        // A new leader: it needs this session's locks (sent by the
        // heartbeat loop, `Locks::spawn_asked_reclaim`).
        if r.as_ref().is_ok_and(|r| r.reclaim_locks) {
            self.locks.ask_reclaim();
        }
        r.map(|_| ()).map_err(Into::into)
    }

    /// Caches what a namespace change reply says: the new entry and its
    /// attributes, and the parent directory's attributes.
    fn note_entry(&self, mut epoch: u64, parent: u64, name: &[u8], r: &pb::EntryReply) {
        if let Some(a) = &r.attr {
            epoch = self.meta.created(epoch, parent, name, a.ino);
            self.meta.put_attr(epoch, a);
            if r.no_xattrs {
                self.meta.put_no_xattrs(epoch, a.ino);
            }
        }
        match &r.parent {
            Some(p) => self.meta.put_attr(epoch, p),
            None => self.meta.forget_attr(parent),
        }
    }

    fn note_dirs(&self, epoch: u64, dirs: &[u64], r: &pb::DirChangeReply) {
        for d in dirs {
            self.meta.forget_attr(*d);
        }
        for a in r.parent.iter().chain(r.new_parent.iter()) {
            self.meta.put_attr(epoch, a);
        }
    }

    /// Records what an attribute reply says about an inode and returns the
    /// size this client should report (pending writes included).
    pub fn note_attr(&self, a: &Attr) -> u64 {
        if a.mode & libc::S_IFMT != libc::S_IFREG {
            return a.size;
        }
        // This client's only writer of the file: the MDS's size can only
        // lag behind its own (a reply may have been sent before one of
        // its commits), and its O_APPEND writes go at this size.
        let sole_writer = !self.is_shared(a.ino) && self.open_files.count(a.ino).writes > 0;
        self.open_files.note_size(a, sole_writer)
    }

    /// The size of a regular file as this client knows it.
    pub fn known_size(&self, ino: u64) -> Option<FileState> {
        self.open_files.known(ino)
    }

    fn ok_attr(r: Option<Attr>) -> Result<Attr> {
        r.ok_or_else(|| ClientError::Unavailable("MDS reply without attributes".into()))
    }

    /// Looks a name up in a directory.
    pub async fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        // A name too long is that, not absent (complete directories).
        if name.len() > avalon_proto::limits::NAME_MAX {
            return Err(ClientError::posix(libc::ENAMETOOLONG, "name too long"));
        }
        let changing = self.changing.contains(parent, name);
        if !changing {
            match self.meta.lookup(parent, name) {
                Some(Cached::Found(a)) => return Ok(a),
                Some(Cached::Absent) => {
                    return Err(ClientError::posix(libc::ENOENT, "no such entry"))
                }
                None => {}
            }
        }
        let req = pb::LookupRequest {
            header: self.session.header(),
            parent,
            name: Bytes::copy_from_slice(name),
        };
        let mut tries = 0;
        let (epoch, r) = loop {
            let epoch = self.meta.epoch();
            let mark = self.meta.moved.mark();
            let r = self
                .rpc(req.clone(), |mut c, r| async move { c.lookup(r).await })
                .await;
            // Read before another mount's change of this very name, whose
            // recall its mark made us apply: ask again (moved_names.rs).
            tries += 1;
            if tries < LOOKUP_TRIES && self.meta.moved.touched_since(mark, parent, name) {
                continue;
            }
            break (epoch, r);
        };
        match r {
            Ok(r) => {
                let a = Self::ok_attr(r.attr)?;
                self.meta.put_attr(epoch, &a);
                if !changing && !self.changing.contains(parent, name) {
                    self.meta.put_entry(epoch, parent, name, a.ino);
                }
                Ok(a)
            }
            Err(e) => {
                let e = ClientError::from(e);
                let keep = !changing && !self.changing.contains(parent, name);
                if e.errno() == libc::ENOENT && keep {
                    self.meta.put_entry(epoch, parent, name, 0);
                }
                Err(e)
            }
        }
    }

    /// Fresh attributes of an inode.
    pub async fn getattr(&self, ino: u64) -> Result<Attr> {
        if let Some(a) = self.meta.attr(ino) {
            return Ok(a);
        }
        let epoch = self.meta.epoch();
        let req = pb::GetAttrRequest {
            header: self.session.header(),
            ino,
        };
        let r = self
            .rpc(req, |mut c, r| async move { c.get_attr(r).await })
            .await?;
        let a = Self::ok_attr(r.attr)?;
        self.meta.put_attr(epoch, &a);
        Ok(a)
    }

    /// Changes attributes. A size change also cuts or extends the data.
    pub async fn setattr(&self, ino: u64, ch: SetAttr) -> Result<Attr> {
        // Writes this client made must not be overtaken by the change.
        if ch.mtime.is_some() || ch.size.is_some() {
            self.commit_size(ino).await?;
        }
        if let Some(a) = self.setattr_delegated(ino, &ch) {
            return Ok(a);
        }
        if ch.size.is_some() {
            self.page_versions.changed(ino);
        }
        if let Some(size) = ch.size {
            self.truncate_data(ino, size).await?;
        }
        let epoch = self.meta.epoch();
        self.meta.forget_attr(ino);
        let req = pb::SetAttrRequest {
            header: self.session.header(),
            ino,
            mode: ch.mode.map(|m| m & 0o7777),
            uid: ch.uid,
            gid: ch.gid,
            size: ch.size,
            atime: time_set(ch.atime),
            mtime: time_set(ch.mtime),
            ctime_ns: ch.ctime_ns,
            access: false,
            by_handle: ch.by_handle,
        };
        let r = self
            .rpc(req, |mut c, r| async move { c.set_attr(r).await })
            .await?;
        let a = Self::ok_attr(r.attr)?;
        self.meta.put_attr(epoch, &a);
        if let Some(size) = ch.size {
            if let Some(mut st) = self.open_files.files.get_mut(&ino) {
                st.size = size;
                st.mds_size = size;
                st.committed(size);
            }
        }
        Ok(a)
    }

    /// Creates a non-directory node.
    #[allow(clippy::too_many_arguments)]
    pub async fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
        exclusive: bool,
    ) -> Result<Attr> {
        if mode & libc::S_IFMT == libc::S_IFREG || mode & libc::S_IFMT == 0 {
            if let Some(a) = self
                .create_delegated(parent, name, mode, uid, gid, NewNode::File)
                .await
            {
                return Ok(a);
            }
        }
        let r = self
            .make_node(parent, name, mode, rdev, uid, gid, exclusive, 0)
            .await?;
        Self::ok_attr(r.attr)
    }

    /// Creates (or, without `exclusive`, finds) a regular file and counts
    /// it open with `flags`; also says whether it is in shared-write mode.
    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
        flags: u32,
    ) -> Result<(Attr, bool)> {
        if let Some(a) = self
            .create_delegated(parent, name, mode, uid, gid, NewNode::File)
            .await
        {
            self.note_created_open(a.ino, flags);
            self.note_unregistered_open(a.ino, flags);
            self.open_files.note_sole(a.ino, self.deleg.lease_of(a.ino));
            return Ok((a, false));
        }
        // The inode is known only from the reply: a shared-write demand
        // that comes before it must not be dropped as "not open here".
        self.open_files.begin_create();
        let lease = self.meta.lease_held();
        let r = self
            .make_node(parent, name, mode, 0, uid, gid, exclusive, flags)
            .await;
        let r = r.and_then(|r| Ok((Self::ok_attr(r.attr)?, r.shared_write, r.quota_window)));
        let r = r.map(|(a, shared, window)| {
            // Counted open before the create stops counting as in flight:
            // a demand in between must not find the file "not open here".
            self.note_created_open(a.ino, flags);
            self.open_files.note_quota(a.ino, window);
            (a, shared)
        });
        self.open_files.end_create();
        let (a, shared_write) = r?;
        if shared_write {
            if let Err(e) = self.share_writes(a.ino).await {
                self.keep_write_error(a.ino, &e);
            }
        } else {
            self.note_sole(a.ino, lease);
        }
        Ok((a, self.is_shared(a.ino)))
    }

    #[allow(clippy::too_many_arguments)]
    async fn make_node(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
        exclusive: bool,
        open_flags: u32,
    ) -> Result<pb::EntryReply> {
        let epoch = self.meta.epoch();
        let req = pb::MknodRequest {
            header: self.session.header(),
            parent,
            name: Bytes::copy_from_slice(name),
            mode,
            rdev,
            uid,
            gid,
            exclusive,
            open_flags,
        };
        let _changing = self.changing.begin(&[(parent, name)]);
        let r = self
            .rpc(req, |mut c, r| async move { c.mknod(r).await })
            .await
            .inspect_err(|e| self.contradicted(e, &[(parent, name)]))?;
        self.note_entry(epoch, parent, name, &r);
        if let Some(a) = &r.attr {
            if !r.chunk_cap.is_empty() {
                self.osd_io.caps.put(a.ino, r.chunk_cap.clone());
            }
        }
        Ok(r)
    }

    /// Creates a directory.
    pub async fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        if let Some(a) = self
            .create_delegated(parent, name, mode, uid, gid, NewNode::Dir)
            .await
        {
            return Ok(a);
        }
        let epoch = self.meta.epoch();
        let req = pb::MkdirRequest {
            header: self.session.header(),
            parent,
            name: Bytes::copy_from_slice(name),
            mode,
            uid,
            gid,
        };
        let _changing = self.changing.begin(&[(parent, name)]);
        let r = self
            .rpc(req, |mut c, r| async move { c.mkdir(r).await })
            .await
            .inspect_err(|e| self.contradicted(e, &[(parent, name)]))?;
        self.note_entry(epoch, parent, name, &r);
        if let Some(a) = &r.attr {
            self.meta.put_complete(epoch, parent, name, a.ino);
        }
        Self::ok_attr(r.attr)
    }

    /// Creates a symbolic link.
    pub async fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        if let Some(a) = self
            .create_delegated(parent, name, 0, uid, gid, NewNode::Symlink(target))
            .await
        {
            return Ok(a);
        }
        let epoch = self.meta.epoch();
        let req = pb::SymlinkRequest {
            header: self.session.header(),
            parent,
            name: Bytes::copy_from_slice(name),
            target: Bytes::copy_from_slice(target),
            uid,
            gid,
        };
        let _changing = self.changing.begin(&[(parent, name)]);
        let r = self
            .rpc(req, |mut c, r| async move { c.symlink(r).await })
            .await
            .inspect_err(|e| self.contradicted(e, &[(parent, name)]))?;
        self.note_entry(epoch, parent, name, &r);
        Self::ok_attr(r.attr)
    }

    /// Removes a non-directory entry.
    pub async fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        if self.unlink_delegated(parent, name) {
            return Ok(());
        }
        self.register_opens().await;
        let req = pb::UnlinkRequest {
            header: self.session.header(),
            parent,
            name: Bytes::copy_from_slice(name),
        };
        let epoch = self.meta.epoch();
        let _changing = self.changing.begin(&[(parent, name)]);
        let r = self
            .rpc(req, |mut c, r| async move { c.unlink(r).await })
            .await
            .inspect_err(|e| self.contradicted(e, &[(parent, name)]))?;
        let epoch = self.meta.removed(epoch, parent, name);
        self.note_dirs(epoch, &[parent], &r);
        Ok(())
    }

    /// Removes an empty directory. One this client has open stays on the
    /// MDS until closed (fstat gives nlink 0).
    pub async fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        if self.rmdir_delegated(parent, name) {
            return Ok(());
        }
        self.register_open_dir(parent, name).await;
        let req = pb::UnlinkRequest {
            header: self.session.header(),
            parent,
            name: Bytes::copy_from_slice(name),
        };
        let epoch = self.meta.epoch();
        let _changing = self.changing.begin(&[(parent, name)]);
        let r = self
            .rpc(req, |mut c, r| async move { c.rmdir(r).await })
            .await
            .inspect_err(|e| self.contradicted(e, &[(parent, name)]))?;
        let epoch = self.meta.removed(epoch, parent, name);
        self.note_dirs(epoch, &[parent], &r);
        Ok(())
    }

    /// Target of a symbolic link.
    pub async fn readlink(&self, ino: u64) -> Result<Bytes> {
        let req = pb::GetAttrRequest {
            header: self.session.header(),
            ino,
        };
        let r = self
            .rpc(req, |mut c, r| async move { c.readlink(r).await })
            .await?;
        Ok(r.target)
    }

    /// Adds a hard link.
    pub async fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> Result<Attr> {
        let epoch = self.meta.epoch();
        self.meta.forget_attr(ino);
        let req = pb::LinkRequest {
            header: self.session.header(),
            ino,
            new_parent,
            new_name: Bytes::copy_from_slice(new_name),
        };
        let _changing = self.changing.begin(&[(new_parent, new_name)]);
        let r = self
            .rpc(req, |mut c, r| async move { c.link(r).await })
            .await
            .inspect_err(|e| self.contradicted(e, &[(new_parent, new_name)]))?;
        self.note_entry(epoch, new_parent, new_name, &r);
        Self::ok_attr(r.attr)
    }

    /// Renames an entry (renameat2 flags).
    pub async fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        if self.rename_delegated(parent, name, new_parent, new_name, flags) {
            return Ok(());
        }
        self.register_opens().await;
        if flags & libc::RENAME_EXCHANGE == 0 {
            // A directory replaced while open stays, as with rmdir.
            self.register_open_dir(new_parent, new_name).await;
        }
        let req = pb::RenameRequest {
            header: self.session.header(),
            parent,
            name: Bytes::copy_from_slice(name),
            new_parent,
            new_name: Bytes::copy_from_slice(new_name),
            flags,
        };
        let epoch = self.meta.epoch();
        let _changing = self
            .changing
            .begin(&[(parent, name), (new_parent, new_name)]);
        let r = self
            .rpc(req, |mut c, r| async move { c.rename(r).await })
            .await
            .inspect_err(|e| self.contradicted(e, &[(parent, name), (new_parent, new_name)]))?;
        // The moved inode's ctime changed and an exchange moved the other
        // too: drop both names and let the next lookup ask.
        let epoch = if flags & libc::RENAME_EXCHANGE != 0 {
            self.meta.forget_entry(parent, name);
            self.meta.forget_entry(new_parent, new_name);
            epoch
        } else {
            self.meta.renamed(epoch, parent, name, new_parent, new_name)
        };
        self.note_dirs(epoch, &[parent, new_parent], &r);
        Ok(())
    }

    /// One page of a directory, after `cookie`.
    pub async fn readdir(
        &self,
        ino: u64,
        cookie: u64,
        max_entries: u32,
        plus: bool,
    ) -> Result<pb::ReadDirReply> {
        let epoch = self.meta.epoch();
        self.dir_ahead.wait(ino).await;
        if let Some(r) = self.meta.take_listing(ino, cookie) {
            // Noted only now: the kernel holds the directory's lock while
            // it lists, so no change of ours to it runs meanwhile.
            self.note_listing(epoch, ino, &r);
            return Ok(r);
        }
        let req = pb::ReadDirRequest {
            header: self.session.header(),
            ino,
            cookie,
            max_entries,
            plus,
        };
        if let Some(r) = self.readdir_unqueued(&req).await {
            let (epoch, r) = r?;
            self.note_listing(epoch, ino, &r);
            return Ok(r);
        }
        let epoch = self.meta.epoch();
        let r = self
            .rpc(req, |mut c, r| async move { c.read_dir(r).await })
            .await?;
        self.note_listing(epoch, ino, &r);
        Ok(r)
    }

    /// Starts reading ahead the subdirectories listed in `page` (entries
    /// after `cookie`, at most `max` per page, as the walk will ask; see
    /// `dir_read_ahead.rs`).
    pub fn read_ahead_dirs(self: &Arc<Self>, page: &pb::ReadDirReply, cookie: u64, max: u32) {
        let dirs = page
            .entries
            .iter()
            .filter(|e| e.mode & libc::S_IFMT == libc::S_IFDIR)
            .map(|e| e.ino)
            // One with changes queued here would wait for them (the walk
            // would wait for that): the walk lists it itself. One whose
            // entries are all cached is listed from the cache.
            .filter(|ino| {
                !self.meta.is_complete(*ino)
                    && !self.meta.has_listing(*ino)
                    && !self.dir_ahead.running(*ino)
                    && !self.deleg.changes_dir(*ino)
            })
            .take(crate::dir_read_ahead::PER_LISTING);
        for dir in dirs {
            let c = self.clone();
            self.dir_ahead.start(dir, move || {
                if c.meta.has_listing(dir) {
                    return None;
                }
                Some(async move {
                    let (epoch, gen) = (c.meta.epoch(), c.meta.ns_gen());
                    let req = pb::ReadDirRequest {
                        header: c.session.header(),
                        ino: dir,
                        cookie,
                        max_entries: max,
                        plus: true,
                    };
                    // Its entries go into the cache only when it is used:
                    // a change of ours may run beside this (no kernel lock).
                    if let Some(Ok((_, r))) = c.readdir_unqueued(&req).await {
                        c.meta.put_listing(epoch, gen, dir, cookie, r);
                    }
                })
            });
        }
    }

    /// A listing that needs not wait for the queue of delegated changes:
    /// none of them adds, removes or moves entries of this directory (rm
    /// -rf lists each directory while the removals made in the previous
    /// one are queued); queued attribute changes of its entries are this
    /// client's own, and its cache has them. None: it must wait. With the
    /// recall epoch it started in; not cached yet.
    pub(crate) async fn readdir_unqueued(
        &self,
        req: &pb::ReadDirRequest,
    ) -> Option<Result<(u64, pb::ReadDirReply)>> {
        if self.deleg.changes_dir(req.ino) {
            return None;
        }
        let epoch = self.meta.epoch();
        let r = match self
            .session
            .mds
            .request(req.clone(), |mut c, r| async move { c.read_dir(r).await })
            .await
        {
            Ok(r) => r,
            Err(e) => return Some(Err(e.into())),
        };
        Some(Ok((epoch, self.own_attrs(r)?)))
    }

    /// Puts this client's attributes of inodes under its delegations into
    /// listing `r` (the MDS may not have their queued changes yet); None
    /// if one of them is not cached.
    fn own_attrs(&self, mut r: pb::ReadDirReply) -> Option<pb::ReadDirReply> {
        for e in &mut r.entries {
            if let Some(a) = &mut e.attr {
                if self.deleg.owns(a.ino) {
                    *a = self.meta.attr(a.ino)?;
                }
            }
        }
        Some(r)
    }

    /// Caches the entries of a listing of `dir` started in `epoch`.
    fn note_listing(&self, epoch: u64, dir: u64, r: &pb::ReadDirReply) {
        for e in &r.entries {
            if let Some(a) = &e.attr {
                self.meta.put_attr(epoch, a);
                self.meta.put_entry(epoch, dir, &e.name, a.ino);
                if e.no_xattrs {
                    self.meta.put_no_xattrs(epoch, a.ino);
                }
            }
        }
    }

    /// Filesystem capacity and usage.
    pub async fn statfs(&self) -> Result<pb::StatFsReply> {
        let req = pb::GetAttrRequest {
            header: self.session.header(),
            ino: self.root_ino,
        };
        Ok(self
            .rpc(req, |mut c, r| async move { c.stat_fs(r).await })
            .await?)
    }

    /// Sets an extended attribute.
    pub async fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: u32) -> Result<()> {
        self.setxattr_as(ino, name, value, flags, None).await
    }

    /// Sets an extended attribute as caller `uid` (the MDS lets only root
    /// set quotas).
    pub async fn setxattr_as(
        &self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: u32,
        uid: Option<u32>,
    ) -> Result<()> {
        self.unstored_xattr(name)?;
        let req = pb::SetXattrRequest {
            header: self.session.header(),
            ino,
            name: Bytes::copy_from_slice(name),
            value: Bytes::copy_from_slice(value),
            flags,
            uid: uid.unwrap_or(0),
            has_cred: uid.is_some(),
        };
        self.rpc(req, |mut c, r| async move { c.set_xattr(r).await })
            .await?;
        self.meta.forget_attr(ino);
        Ok(())
    }

    /// Value of an extended attribute.
    pub async fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Bytes> {
        self.unstored_xattr(name)?;
        if name.starts_with(VIRTUAL_XATTRS) {
            return self.virtual_xattr(ino, name).await;
        }
        // The kernel asks for security.capability before every write and
        // ls -l for system.posix_acl_access of every file: answer from the
        // cache while the lease holds (setxattr elsewhere recalls the inode).
        match self.meta.xattr(ino, name) {
            Some(Some(v)) => return Ok(v),
            Some(None) => return Err(ClientError::posix(libc::ENODATA, "no such attribute")),
            None => {}
        }
        let epoch = self.meta.epoch();
        match self.get_xattr_rpc(ino, name).await {
            Ok(r) => {
                self.meta.put_xattr(epoch, ino, name, Some(r.value.clone()));
                Ok(r.value)
            }
            Err(e) => {
                if e.errno() == libc::ENODATA {
                    self.meta.put_xattr(epoch, ino, name, None);
                }
                Err(e)
            }
        }
    }

    /// A value the MDS computes (recursive statistics, quotas): never
    /// cached, and asked after this client's delegated changes are sent,
    /// so that they count.
    async fn virtual_xattr(&self, ino: u64, name: &[u8]) -> Result<Bytes> {
        self.flush_delegated().await?;
        Ok(self.get_xattr_rpc(ino, name).await?.value)
    }

    /// Asks the MDS for one extended attribute of `ino`.
    async fn get_xattr_rpc(&self, ino: u64, name: &[u8]) -> Result<pb::XattrReply> {
        let req = pb::XattrRequest {
            header: self.session.header(),
            ino,
            name: Bytes::copy_from_slice(name),
            ..Default::default()
        };
        Ok(self
            .rpc(req, |mut c, r| async move { c.get_xattr(r).await })
            .await?)
    }

    /// Names of the extended attributes of an inode.
    pub async fn listxattr(&self, ino: u64) -> Result<Vec<Bytes>> {
        let req = pb::GetAttrRequest {
            header: self.session.header(),
            ino,
        };
        let r = self
            .rpc(req, |mut c, r| async move { c.list_xattr(r).await })
            .await?;
        let mut names = r.names;
        if !self.selinux_labels {
            names.retain(|n| n.as_ref() != SELINUX_XATTR);
        }
        Ok(names)
    }

    /// Removes an extended attribute as caller `uid` (see
    /// [`Client::setxattr_as`]).
    pub async fn removexattr(&self, ino: u64, name: &[u8], uid: Option<u32>) -> Result<()> {
        self.unstored_xattr(name)?;
        let req = pb::XattrRequest {
            header: self.session.header(),
            ino,
            name: Bytes::copy_from_slice(name),
            uid: uid.unwrap_or(0),
            has_cred: uid.is_some(),
        };
        self.rpc(req, |mut c, r| async move { c.remove_xattr(r).await })
            .await?;
        self.meta.forget_attr(ino);
        Ok(())
    }

    /// Tells the MDS the size this client's writes reached (and so stamps
    /// mtime), if anything is pending.
    pub async fn commit_size(&self, ino: u64) -> Result<Option<Attr>> {
        self.commit_pending(ino, false).await
    }

    /// [`Client::commit_size`]; with `times_only`, only if the writes did
    /// not grow the file past the size the MDS holds (then nothing is
    /// committed and `Ok(None)` returned): such a commit may run while the
    /// data is still on its way, since it moves only mtime and ctime.
    async fn commit_pending(&self, ino: u64, times_only: bool) -> Result<Option<Attr>> {
        self.commit_pending_with(ino, times_only, false).await
    }

    /// [`Client::commit_pending`], asking (`want_grant`) for a write grant
    /// with the commit where this session may hold one (see
    /// [`Client::fsync`]).
    async fn commit_pending_with(
        &self,
        ino: u64,
        times_only: bool,
        want_grant: bool,
    ) -> Result<Option<Attr>> {
        if self.appends_unconfirmed(ino) {
            self.confirm_sole_writes(ino).await?;
        }
        let (size, want, appends) = match self.open_files.files.get(&ino) {
            Some(st) if st.dirty && !(times_only && st.grown) => {
                let want = want_grant && self.may_hold_grant(&st);
                let appends = st.append_base.is_some();
                (st.size, if want { st.size.max(1) } else { 0 }, appends)
            }
            _ => return Ok(None),
        };
        // Queued under a delegation, the commit would go out after the
        // data (the queue stores a file's data before its size): a times
        // commit goes the synchronous way, behind the queue (`rpc`).
        if !times_only && want == 0 {
            if let Some(a) = self.commit_delegated(ino, size) {
                if let Some(mut st) = self.open_files.files.get_mut(&ino) {
                    st.committed(size);
                }
                return Ok(Some(a));
            }
        }
        let req = pb::CommitWriteRequest {
            header: self.session.header(),
            ino,
            size,
            want_grant: want,
            ..Default::default()
        };
        // The lease the grant will be used under: taken before the
        // request, so a lapse while it is out voids the grant.
        let lease = self.meta.lease_held();
        // The reply's attributes are as new as it gets.
        self.meta.forget_attr(ino);
        if let Some(mut st) = self.open_files.files.get_mut(&ino) {
            st.commits_started = st.commits_started.wrapping_add(1);
        }
        let r = self
            .rpc(req, |mut c, r| async move { c.commit_write(r).await })
            .await;
        let mut unwanted = false;
        if let Some(mut st) = self.open_files.files.get_mut(&ino) {
            st.commits_done = st.commits_done.wrapping_add(1);
            // Writes that raced past `size` stay dirty.
            if let Ok(r) = &r {
                st.committed(size);
                if let (true, Some(gen)) = (r.grant_max_size > 0 && !st.shared, lease) {
                    st.grant = r.grant_max_size;
                    st.grant_gen = gen;
                } else if r.grant_max_size > 0 && st.shared && st.grant == 0 {
                    // Shared-write mode came while the request was out: the
                    // MDS recorded a grant this client will not use (no new
                    // one is asked for before the last close). Given back,
                    // so that other sessions' reads need not recover it
                    // from the OSDs.
                    unwanted = true;
                }
            }
        }
        if unwanted {
            self.give_back_grant(ino).await;
        }
        let r = r?;
        // Only-writer appends committed by a request that the lease did
        // not cover to its end (held up across a partition, say) may have
        // been applied after the MDS let another writer append at the same
        // end: not acknowledged, and the file is fenced
        // (`client/sole_writer.rs`).
        if appends && (lease.is_none() || self.meta.lease_held() != lease) {
            return Err(self.fence(
                ino,
                "appends committed across a broken lease are not acknowledged",
            ));
        }
        r.attr
            .map(Some)
            .ok_or_else(|| ClientError::Unavailable("MDS reply without attributes".into()))
    }

    /// After an O_SYNC (`datasync` false) or O_DSYNC write made its data
    /// durable: commits the size and times, or with O_DSYNC only a size
    /// the writes grew (as [`Client::fsync`] and fdatasync do); nothing
    /// under a write grant that covers the size.
    pub async fn commit_synced_write(&self, ino: u64, datasync: bool) -> Result<()> {
        if self.granted(ino) {
            return Ok(());
        }
        if !datasync || self.known_size(ino).is_some_and(|st| st.grown) {
            self.commit_pending_with(ino, false, true).await?;
        }
        Ok(())
    }

    /// Whether this client asks for write grants: it has the feature (the
    /// MDS grants only while every voter has it), and the file is neither
    /// in shared-write mode (writes commit through) nor under a byte quota
    /// (whose window bounds uncommitted growth).
    fn may_hold_grant(&self, st: &FileState) -> bool {
        avalon_proto::version::features() & avalon_proto::version::FEATURE_WRITE_GRANTS != 0
            && !st.shared
            && st.quota_window == 0
    }

    /// True if the data of `ino` this client has written (and made
    /// durable) may go without an MDS commit: this session's write grant
    /// covers the size, and the lease it was recorded under holds now,
    /// unbroken (`MetaCache::lease_held`). Asked after the OSDs
    /// acknowledged the data: the MDS recovers a lost session's grants
    /// from the OSDs only after that lease ran out.
    fn granted(&self, ino: u64) -> bool {
        let Some(st) = self.known_size(ino) else {
            return false;
        };
        st.grant > 0
            && st.size <= st.grant
            && !st.shared
            && self.meta.lease_held() == Some(st.grant_gen)
    }

    /// Drops this session's write grant on `ino` at the MDS (last close,
    /// shared-write mode), without a commit of its own.
    async fn release_grant(&self, ino: u64) -> Result<()> {
        let held = match self.open_files.files.get_mut(&ino) {
            Some(mut st) if st.grant > 0 => {
                st.grant = 0;
                true
            }
            _ => false,
        };
        if !held {
            return Ok(());
        }
        self.send_grant_release(ino).await
    }

    /// Gives back a grant the MDS recorded but this client does not keep;
    /// a failure only leaves it for the MDS to recover.
    async fn give_back_grant(&self, ino: u64) {
        if let Err(e) = self.send_grant_release(ino).await {
            tracing::debug!(ino, error = %e, "could not give back an unused write grant");
        }
    }

    async fn send_grant_release(&self, ino: u64) -> Result<()> {
        let req = pb::CommitWriteRequest {
            header: self.session.header(),
            ino,
            release_grant: true,
            grant_only: true,
            ..Default::default()
        };
        self.rpc(req, |mut c, r| async move { c.commit_write(r).await })
            .await?;
        Ok(())
    }

    /// Under a byte quota, a write that would take the file more than the
    /// window past the size the MDS holds first commits what was written
    /// so far. Once the quota is full the MDS refuses that (EDQUOT) and
    /// this write fails with it: a writer stops within one window
    /// (`quota.rs` in the MDS has the bound).
    pub(crate) async fn keep_in_quota(&self, ino: u64, end: u64) -> Result<()> {
        let due = match self.open_files.files.get(&ino) {
            Some(st) if st.quota_window > 0 => {
                st.dirty && end > st.mds_size.saturating_add(st.quota_window)
            }
            _ => false,
        };
        if due {
            if let Err(e) = self.commit_size(ino).await {
                if e.errno() == libc::EDQUOT {
                    // The file stays at the size the MDS accepted (what
                    // was written past it is not part of it, as every
                    // mount sees), and this file's later writes, fsync
                    // and close report EDQUOT until then.
                    if let Some(mut st) = self.open_files.files.get_mut(&ino) {
                        st.size = st.mds_size;
                        st.dirty = false;
                        st.grown = false;
                    }
                    self.meta.forget_attr(ino);
                    self.wbuf.keep_error(ino, (e.errno(), e.to_string()));
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Opens `ino` (the MDS counts the open, so the file outlives an unlink
    /// until it is released): its attributes, whether it is in shared-write
    /// mode (another session writes it too), and whether the kernel may
    /// keep the pages it cached before (not when atime is due: see
    /// `note_open_atime`).
    /// `cred` is the opener's (uid, gid), for the MDS's permission check.
    pub async fn open(&self, ino: u64, flags: u32, cred: (u32, u32)) -> Result<(Attr, bool, bool)> {
        if let Some(a) = self.open_delegated(ino, flags) {
            let keep = self
                .page_versions
                .open(&a, flags as i32 & libc::O_APPEND == 0);
            if !keep {
                self.cache.invalidate_file(ino);
            }
            let keep = self.note_open_atime(&a, flags, keep);
            return Ok((a, false, keep));
        }
        // Counted before asking: a shared-write demand for the file may
        // come before the reply and must find it open.
        self.open_files.count_open(ino, flags);
        let epoch = self.meta.epoch();
        let commits = self.open_files.commits_before(ino);
        let lease = self.meta.lease_held();
        let req = pb::OpenRequest {
            header: self.session.header(),
            ino,
            flags,
            uid: cred.0,
            gid: cred.1,
            has_cred: true,
        };
        let r = match self
            .rpc(req, |mut c, r| async move { c.open(r).await })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.open_files.uncount_open(ino, flags);
                return Err(e.into());
            }
        };
        let a = match Self::ok_attr(r.attr) {
            Ok(a) => a,
            Err(e) => {
                self.open_files.uncount_open(ino, flags);
                return Err(e);
            }
        };
        self.meta.put_attr(epoch, &a);
        self.osd_io.caps.put(ino, r.chunk_cap);
        self.open_files.note_open_size(&a, commits);
        tracing::debug!(
            ino,
            mds_size = a.size,
            size = self.known_size(ino).map(|s| s.size),
            shared = r.shared_write,
            "opened"
        );
        self.open_files.note_quota(ino, r.quota_window);
        self.snaps.set_seq(ino, r.snap_seq);
        if r.shared_write {
            // What this client buffered before goes out first; a failure
            // of that is the file's, reported at its fsync or close.
            if let Err(e) = self.share_writes(ino).await {
                self.keep_write_error(ino, &e);
            }
        } else {
            self.note_sole(ino, lease);
        }
        let shared = self.is_shared(ino);
        // Close-to-open: what is cached of an older version is dropped.
        let direct = shared || flags as i32 & libc::O_APPEND != 0;
        let keep = self.page_versions.open(&a, !direct);
        if !keep {
            self.cache.invalidate_file(ino);
        }
        let keep = self.note_open_atime(&a, flags, keep);
        Ok((a, shared, keep))
    }

    /// Counts an open that happened through create (which may have found
    /// an existing file: drop its cached chunks as an open would).
    pub fn note_created_open(&self, ino: u64, flags: u32) {
        self.cache.invalidate_file(ino);
        self.page_versions.changed(ino);
        self.open_files.count_open(ino, flags);
    }

    /// True if `ino` is in shared-write mode here (also: for every file
    /// while the recall stream is not open, when a demand cannot reach us).
    pub fn is_shared(&self, ino: u64) -> bool {
        !self.session.stream_is_up() || self.open_files.is_shared(ino)
    }

    /// The recall stream opened: files opened for writing before it stay
    /// in shared-write mode (a demand sent meanwhile was lost), later ones
    /// buffer until a demand comes.
    /// Returns the stream's generation (see [`Session::stream_gone`]).
    pub fn stream_opened(&self) -> u64 {
        for ino in self.open_files.write_inos() {
            self.open_files.set_shared(ino);
        }
        self.session.stream_opened()
    }

    /// Puts `ino` in shared-write mode if this client has it open: from
    /// now on writes go through, and what was buffered is stored and its
    /// size committed before this returns. Called when the MDS says that
    /// another session opened the file for writing.
    pub async fn share_writes(&self, ino: u64) -> Result<()> {
        if !self.open_files.may_have_open(ino) {
            return Ok(());
        }
        self.open_files.set_shared(ino);
        tracing::debug!(ino, "shared-write mode");
        let gate = self.open_files.write_gate(ino);
        // Buffered writes that started before the mode changed finish
        // first (later ones see it and write through).
        let _g = gate.write().await;
        // Appends not confirmed since the lease broke are, before they go
        // out (`client/sole_writer.rs`); else data first, then the size
        // (a size committed first would leave zeros where a failed send
        // was to go).
        let confirmed = if self.appends_unconfirmed(ino) {
            self.confirm_sole_writes(ino).await
        } else {
            Ok(())
        };
        let flushed = self.flush_file(ino).await;
        let committed = self.commit_size(ino).await.map(|_| ());
        // Writes commit through from now on: the grant goes (another
        // session's read asked for this demand while it was held).
        let released = self.release_grant(ino).await;
        confirmed.and(flushed).and(committed).and(released)
    }

    /// Shared-write mode for every file open for writing (the recall
    /// stream broke: demands may be missed).
    pub async fn share_all_writes(&self) {
        for ino in self.open_files.write_inos() {
            if let Err(e) = self.share_writes(ino).await {
                self.keep_write_error(ino, &e);
            }
        }
    }

    /// Counts an open of directory `ino`. The MDS learns of it with the
    /// next heartbeat (no round trip per opendir), or at once when this
    /// client removes the directory (see [`Client::rmdir`]).
    pub fn open_dir(&self, ino: u64) {
        self.open_files.open_dir(ino);
    }

    /// Ends one open of directory `ino`; the last one tells the MDS if it
    /// counted an open of ours (an orphan directory then goes).
    pub async fn release_dir(&self, ino: u64) -> Result<()> {
        if self.open_files.release_dir(ino) {
            self.send_release(ino, libc::O_RDONLY as u32).await?;
        }
        Ok(())
    }

    /// Before removing `name` in `parent`: if it is a directory this client
    /// has open and the MDS may not know yet (heartbeats report opens
    /// later), registers the open so that the removal keeps it.
    async fn register_open_dir(&self, parent: u64, name: &[u8]) {
        if self.open_files.dirs.is_empty() {
            return;
        }
        let Ok(a) = self.lookup(parent, name).await else {
            return;
        };
        match self.open_files.dirs.get(&a.ino) {
            Some(e) if !e.1 => {}
            _ => return,
        }
        let req = pb::OpenRequest {
            header: self.session.header(),
            ino: a.ino,
            flags: libc::O_RDONLY as u32,
            ..Default::default()
        };
        let r = self
            .rpc(req, |mut c, r| async move { c.open(r).await })
            .await;
        if r.is_err() {
            return;
        }
        match self.open_files.dirs.get_mut(&a.ino) {
            Some(mut e) if !e.1 => e.1 = true,
            // Closed meanwhile (or registered twice): give it back.
            _ => {
                let _ = self.send_release(a.ino, libc::O_RDONLY as u32).await;
            }
        }
    }

    /// Keeps the failure of a flush nobody waited for, for the file's next
    /// fsync or close.
    pub fn keep_write_error(&self, ino: u64, e: &ClientError) {
        tracing::warn!(ino, error = %e, "could not store buffered writes; reported at the next fsync or close");
        self.wbuf.keep_error(ino, (e.errno(), e.to_string()));
    }

    /// A read that reached the client (the kernel's pages did not have
    /// it): the data, with the access time renewed alongside if an open
    /// made it due, so that a stat right after the read sees it.
    pub async fn read_accessed(
        self: &Arc<Self>,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>> {
        let (data, touched) =
            tokio::join!(self.read(ino, offset, size), self.touch_atime_if_due(ino));
        if let Err(e) = touched {
            tracing::debug!(ino, error = %e, "could not update atime");
        }
        data
    }

    /// Releases one open of `ino` (`flags`: its open flags): pending size
    /// first, then the MDS's count.
    pub async fn release(&self, ino: u64, flags: u32) -> Result<()> {
        // Buffered data reaches the OSDs before the size that covers it.
        let closed = self.close_file(ino).await;
        let mut released = Ok(());
        if self.open_files.uncount_open(ino, flags) {
            // A write error no fsync took goes with the last close (the
            // closes reported it).
            self.wbuf.take_error(ino);
            // Opened for reading but never read: nothing to renew.
            self.atime_due.remove(&ino);
            // The last close committed size and times: the grant goes.
            if closed.is_ok() {
                released = self.release_grant(ino).await;
            }
        }
        if !self.deleg.release_unregistered(ino, flags) {
            self.send_release(ino, flags).await?;
        }
        closed.and(released)
    }

    /// Tells the MDS one open of `ino` (with open flags `flags`) ended.
    async fn send_release(&self, ino: u64, flags: u32) -> Result<()> {
        let req = pb::ReleaseRequest {
            header: self.session.header(),
            ino,
            flags,
        };
        self.rpc(req, |mut c, r| async move { c.release(r).await })
            .await?;
        Ok(())
    }

    /// Makes everything written to `ino` durable on the OSDs, and its size
    /// on the MDS (fsync).
    /// A delegated change to it that the MDS will never apply is reported.
    pub async fn fsync(&self, ino: u64, datasync: bool) -> Result<()> {
        // Appends not confirmed since the lease broke are, before they go
        // out (`client/sole_writer.rs`).
        if self.appends_unconfirmed(ino) {
            self.confirm_sole_writes(ino).await?;
        }
        if self.granted(ino) {
            // Under a write grant: one round trip to the primaries (the
            // data and each chunk's length durable on the replicas); size
            // and times ride on the next commit, and the MDS recovers them
            // from the OSDs if this session is lost (`grants.rs` there).
            self.sync_data(ino).await?;
            if self.granted(ino) {
                let synced = self.sync_meta().await;
                return synced.and(self.lost_change(ino));
            }
        }
        if datasync {
            self.sync_data(ino).await?;
        } else {
            // Writes that left the size alone commit only mtime and ctime:
            // at the MDS while the data goes to the OSDs, not after it (an
            // mtime newer than the durable data is what write(2) leaves on
            // a local filesystem too). A grown size waits for its data
            // below, so it never covers bytes that are not stored.
            let (data, times) = tokio::join!(
                self.sync_data(ino),
                self.commit_pending_with(ino, true, true)
            );
            data?;
            times?;
        }
        // fdatasync leaves times to the next commit, not a grown size
        // (the data past the old size could not be read back without it).
        // Either commit asks for a write grant, so that the next fsyncs
        // need no MDS round trip.
        if !datasync || self.known_size(ino).is_some_and(|st| st.grown) {
            self.commit_pending_with(ino, false, true).await?;
        }
        let synced = self.sync_meta().await;
        synced.and(self.lost_change(ino))
    }

    /// fsyncdir of `ino`: [`Client::sync_meta`], and a delegated change to
    /// the directory that the MDS will never apply is reported.
    pub async fn sync_dir(&self, ino: u64) -> Result<()> {
        let synced = self.sync_meta().await;
        synced.and(self.lost_change(ino))
    }

    /// Returns once every namespace change acknowledged to this client is
    /// on disk on a majority of MDS nodes (fsync, fsyncdir). The MDS
    /// answers a change only once its raft entry is committed, durable on
    /// a majority; what remains is this client's queue of delegated
    /// changes, which it acknowledged itself: sent and applied here.
    pub async fn sync_meta(&self) -> Result<()> {
        self.barrier().await
    }

    /// Grows the file to at least `size` (never shrinks it).
    pub async fn grow_to(&self, ino: u64, size: u64) -> Result<()> {
        {
            let mut st = self.open_files.files.entry(ino).or_default();
            if size > st.size {
                st.size = size;
                st.dirty = true;
                st.grown = true;
            }
        }
        self.commit_size(ino).await.map(|_| ())
    }

    /// Commits the pending sizes of every file (at unmount).
    pub async fn commit_all(&self) {
        let _ = self.flush_all().await;
        let dirty: Vec<u64> = self
            .open_files
            .files
            .iter()
            .filter(|e| e.dirty)
            .map(|e| *e.key())
            .collect();
        for ino in dirty {
            if let Err(e) = self.commit_size(ino).await {
                tracing::warn!(ino, error = %e, "could not commit file size");
            }
        }
        let granted: Vec<u64> = self
            .open_files
            .files
            .iter()
            .filter(|e| e.grant > 0)
            .map(|e| *e.key())
            .collect();
        for ino in granted {
            if let Err(e) = self.release_grant(ino).await {
                tracing::debug!(ino, error = %e, "could not release a write grant");
            }
        }
        if let Err(e) = self.flush_delegated().await {
            tracing::warn!(error = %e, "could not send delegated changes");
        }
    }
}
