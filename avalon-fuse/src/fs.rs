//! The FUSE adapter: each kernel request is handed to a tokio task at once
//! (so a slow RPC never blocks other operations) and answered from the
//! client library. Errors become errnos here and only here.

use crate::attr::{ns_of, to_fuse};
use crate::client::{Client, SetAttr, TimeChange};
use crate::dir_stream::{fuse_ino, DirItem, DirStream, DirStreams, DOTDOT_COOKIE};
use crate::error::ClientError;
use crate::locks::Locks;
use crate::metrics::FuseOp;
use crate::recall::KernelCache;
use avalon_proto::pb::Attr;
use bytes::Bytes;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};
use tokio::runtime::Handle;

mod snap;

/// The errno an operation fails with. The failure is logged (inside the
/// operation: the line carries its request id): at warn when the cluster
/// could not serve it (EIO), at debug for other answers but a missing
/// name, which lookups meet all the time.
fn errno(e: &ClientError) -> Errno {
    let n = e.errno();
    match e {
        ClientError::Unavailable(_) | ClientError::Refused(_) => {
            tracing::warn!(errno = n, error = %e, "operation failed")
        }
        _ if n != libc::ENOENT => tracing::debug!(errno = n, error = %e, "operation failed"),
        _ => {}
    }
    Errno::from_i32(n)
}

/// The Avalon filesystem as the kernel sees it.
pub struct AvalonFs {
    client: Arc<Client>,
    rt: Handle,
    /// Last file handle given out: every open file gets its own, so that
    /// its release can drop the OFD locks set through it (crate::locks).
    last_fh: AtomicU64,
    /// The mount's fcntl, flock and OFD lock owners.
    locks: Arc<Locks>,
    /// Open directory streams.
    dirs: Arc<DirStreams>,
    /// The kernel's caches, once the session is mounted (see
    /// [`AvalonFs::kernel_slot`]).
    kernel: Arc<OnceLock<KernelCache>>,
}

impl AvalonFs {
    /// An adapter over a connected client, running its work on `rt`.
    pub fn new(client: Arc<Client>, rt: Handle) -> Self {
        AvalonFs {
            locks: client.locks.clone(),
            client,
            rt,
            last_fh: AtomicU64::new(0),
            dirs: Arc::default(),
            kernel: Arc::new(OnceLock::new()),
        }
    }

    /// Where the mount puts its kernel cache handle once the session exists
    /// (the notifier comes from the session, which takes the filesystem).
    pub fn kernel_slot(&self) -> Arc<OnceLock<KernelCache>> {
        self.kernel.clone()
    }

    fn new_fh(&self) -> FileHandle {
        FileHandle(self.last_fh.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Kernel node id → MDS inode (the mount root may be a subdirectory).
    fn mds_ino(&self, ino: INodeNo) -> u64 {
        if ino.0 == 1 {
            self.client.root_ino
        } else {
            ino.0
        }
    }

    /// Runs an operation: polled once here, on the FUSE thread, and
    /// handed to the runtime only if it has to wait. Most operations are
    /// answered from caches without waiting, and a hand-over to another
    /// thread costs more than such an operation.
    /// [`AvalonFs::spawn`] on behalf of the process that made `req`: the
    /// MDS checks that caller's permissions (avalon_proto::caller).
    fn spawn_as<F>(&self, req: &Request, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let caller = avalon_proto::caller::Caller {
            uid: req.uid(),
            gid: req.gid(),
            pid: req.pid(),
        };
        self.spawn(avalon_proto::caller::scope(caller, f))
    }

    fn spawn<F>(&self, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        use std::future::Future as _;
        let op = crate::metrics::take();
        // One request id per operation: every MDS and OSD call it makes
        // carries it (avalon_proto::request_id).
        let id = avalon_proto::request_id::fresh();
        let mut f = Box::pin(avalon_proto::request_id::scope(id, async move {
            f.await;
            op.done()
        }));
        let _rt = self.rt.enter();
        // The runtime polls a spawned task at once, with its own waker,
        // so what this first poll registered with the no-op one is
        // replaced before anything waits on it.
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        if f.as_mut().poll(&mut cx).is_pending() {
            self.rt.spawn(f);
        }
    }
}

fn file_attr(c: &Client, a: &Attr) -> FileAttr {
    let size = c.note_attr(a);
    to_fuse(a, fuse_ino(c, a.ino), size)
}

fn reply_entry(c: &Client, r: crate::error::Result<Attr>, reply: ReplyEntry) {
    reply_entry_for(c, r, c.meta.ttl(), reply)
}

/// As [`reply_entry`], for as long as `ttl`: zero for an answer the MDS
/// may not know this mount caches (see `MetaCache::kernel_may_cache`).
fn reply_entry_for(
    c: &Client,
    r: crate::error::Result<Attr>,
    ttl: std::time::Duration,
    reply: ReplyEntry,
) {
    match r {
        // The kernel may keep what we tell it as long as our lease holds:
        // the MDS recalls it through us (recall.rs) before it changes.
        Ok(a) => reply.entry(&ttl, &file_attr(c, &a), Generation(a.generation)),
        Err(e) if e.errno() == libc::ENOENT && !ttl.is_zero() => {
            // A negative entry (node 0) the kernel caches too.
            let none = crate::attr::to_fuse(&Attr::default(), 0, 0);
            reply.entry(&ttl, &none, Generation(0))
        }
        Err(e) => reply.error(errno(&e)),
    }
}

/// LOOKUP of "." in inode `ino`: how the kernel finds the inode of a file
/// handle (`open_by_handle_at`) that is no longer in its cache. Node ids
/// are MDS inode numbers, which are never reused, and the reply carries
/// the inode's generation, which the kernel compares with the handle's.
/// A removed inode is absent: the kernel turns that into ESTALE.
async fn export_self(c: &Client, ino: u64) -> crate::error::Result<Attr> {
    let a = c.getattr(ino).await?;
    if a.nlink == 0 && ino != c.root_ino {
        // Unlinked, still open through another mount (through this one
        // the kernel would still have it): stale, as a deleted inode that
        // a local filesystem reads back from disk.
        return Err(ClientError::posix(libc::ENOENT, "inode was removed"));
    }
    Ok(a)
}

/// LOOKUP of ".." in directory `dir`: how the kernel connects a directory
/// it got from a file handle to the tree (one step towards the root at a
/// time). The MDS keeps every directory's parent and reports it with each
/// readdir page; a page that starts past the last cookie carries no
/// entries, only that. The mount root is its own parent; a directory
/// whose parents lead out of a subdirectory mount (moved out by another
/// mount) has none here.
async fn export_parent(c: &Client, dir: u64) -> crate::error::Result<Attr> {
    if dir == c.root_ino {
        return c.getattr(dir).await;
    }
    let page = c.readdir(dir, u64::MAX, 1, false).await?;
    let outside = page.parent == avalon_proto::limits::ROOT_INO && c.root_ino != page.parent;
    if page.parent == 0 || page.parent == dir || outside {
        return Err(ClientError::posix(libc::ENOENT, "no parent in this mount"));
    }
    c.getattr(page.parent).await
}

/// Reply to an export lookup: the entry, never a negative one (the kernel
/// only wants an inode here). The mount root is node 1, generation 0, as
/// the kernel requires of it.
fn reply_export(c: &Client, r: crate::error::Result<Attr>, reply: ReplyEntry) {
    match r {
        Ok(a) => {
            let generation = if a.ino == c.root_ino { 0 } else { a.generation };
            reply.entry(&c.meta.ttl(), &file_attr(c, &a), Generation(generation))
        }
        Err(e) => reply.error(errno(&e)),
    }
}

/// Open flags for the kernel: direct I/O in shared-write mode, where it
/// must not keep pages that other writers change, and for O_APPEND,
/// whose writes must each reach us whole to be placed atomically at the
/// end of file (through the page cache the kernel cuts a write at page
/// boundaries it computes from its own idea of the size).
fn direct_if(shared: bool, flags: i32) -> FopenFlags {
    if shared || flags & libc::O_APPEND != 0 {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
    }
}

fn reply_empty(r: crate::error::Result<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn time_change(t: Option<TimeOrNow>) -> Option<TimeChange> {
    t.map(|t| match t {
        TimeOrNow::Now => TimeChange::Now,
        TimeOrNow::SpecificTime(s) => TimeChange::At(ns_of(s)),
    })
}

/// Attribute names as LISTXATTR returns them: each ends with a NUL.
fn xattr_names(names: &[bytes::Bytes]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(names.iter().map(|n| n.len() + 1).sum());
    for n in names {
        buf.extend_from_slice(n);
        buf.push(0);
    }
    buf
}

fn xattr_reply(data: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for AvalonFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_ASYNC_READ
            // Files opened for direct I/O (O_APPEND, shared-write mode)
            // can still be mapped.
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP
            // Pages of a file whose mtime moved are dropped when the kernel
            // next takes its attributes: what a reader whose lease lapsed
            // (no recalls reach it) has cached of a file another mount
            // overwrote in place.
            | InitFlags::FUSE_AUTO_INVAL_DATA;
        // No FUSE_ATOMIC_O_TRUNC: with it the kernel empties its page cache
        // and i_size at FUSE_OPEN, before its own ETXTBSY check, so an
        // open(O_RDONLY | O_TRUNC) of a running executable killed it with
        // SIGBUS. Without it the kernel checks first and then truncates
        // with a SETATTR.
        // No FUSE_WRITEBACK_CACHE: with it the kernel owns a regular file's
        // size and times for as long as it caches the inode and never takes
        // them from us again, so another mount's writes would stay
        // invisible. Writes are buffered by the client instead, where the
        // MDS can recall them.
        let have = config.capabilities();
        let _ = config.add_capabilities(wanted & have);
        // fcntl and flock locks live in the MDS (crate::locks).
        let locks = InitFlags::FUSE_POSIX_LOCKS | InitFlags::FUSE_FLOCK_LOCKS;
        let _ = config.add_capabilities(locks & have);
        // POSIX ACLs: stored as xattrs by the MDS, enforced by the kernel.
        // The MDS applies the umask (not under a default ACL).
        let acl = InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK;
        let _ = config.add_capabilities(acl & have);
        // File handles (name_to_handle_at / open_by_handle_at) that
        // outlive the kernel's cache of their inode: it looks them up as
        // "." and ".." by node id (export_self, export_parent).
        let _ = config.add_capabilities(InitFlags::FUSE_EXPORT_SUPPORT & have);
        Ok(())
    }

    fn destroy(&mut self) {
        let c = self.client.clone();
        // Pending sizes reach the MDS before the process goes away.
        let done = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), c.commit_all()).await
        });
        if done.is_err() {
            c.abandon_delegated("the mount ended before the MDS took them (10 s)");
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _m = crate::metrics::op(FuseOp::Lookup);
        let parent = self.mds_ino(parent);
        let name = name.as_bytes().to_vec();
        if crate::snapshots::is_snap(parent) || snap::is_snap_name(&name) {
            return self.snap_lookup(parent, name, reply);
        }
        let c = self.client.clone();
        self.spawn_as(req, async move {
            // The VFS resolves "." and ".." in paths itself: these come
            // only from the kernel's export operations (file handles).
            let r = match name.as_slice() {
                b"." => export_self(&c, parent).await,
                b".." => export_parent(&c, parent).await,
                _ => {
                    let epoch = c.meta.epoch();
                    let r = c.lookup(parent, &name).await;
                    if let Err(e) = &r {
                        if e.errno() == libc::ENOENT {
                            c.meta.moved.told(parent, &name, 0);
                        }
                    }
                    let r = r.and_then(|a| {
                        if c.meta.moved.stale_lookup(parent, &name, a.ino) {
                            // See moved_names.rs: the kernel looks again.
                            tracing::debug!(parent, ino = a.ino, "lookup: another name just moved");
                            Err(ClientError::posix(libc::ESTALE, "another name just moved"))
                        } else {
                            Ok(a)
                        }
                    });
                    // Read across a recall or before the renewal of a
                    // lapsed lease: the kernel asks again next time.
                    let ttl = match c.meta.kernel_may_cache(epoch, &[parent]) {
                        true => c.meta.ttl(),
                        false => std::time::Duration::ZERO,
                    };
                    return reply_entry_for(&c, r, ttl, reply);
                }
            };
            reply_export(&c, r, reply)
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _m = crate::metrics::op(FuseOp::GetAttr);
        if crate::snapshots::is_snap(ino.0) {
            return self.snap_getattr(ino.0, reply);
        }
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        self.spawn(async move {
            match c.getattr(ino).await {
                Ok(a) => reply.attr(&c.meta.ttl(), &file_attr(&c, &a)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _m = crate::metrics::op(FuseOp::SetAttr);
        if let Some(e) = snap::refuse_change(&[ino.0]) {
            return reply.error(e);
        }
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        let ch = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: time_change(atime),
            mtime: time_change(mtime),
            ctime_ns: ctime.map(ns_of),
            by_handle: fh.is_some(),
        };
        self.spawn_as(req, async move {
            match c.setattr(ino, ch).await {
                Ok(a) => reply.attr(&c.meta.ttl(), &file_attr(&c, &a)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _m = crate::metrics::op(FuseOp::Readlink);
        if crate::snapshots::is_snap(ino.0) {
            return self.snap_readlink(ino.0, reply);
        }
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        self.spawn(async move {
            match c.readlink(ino).await {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _m = crate::metrics::op(FuseOp::Mknod);
        if let Some(e) = snap::refuse_new(parent.0, name.as_bytes()) {
            return reply.error(e);
        }
        let c = self.client.clone();
        let parent = self.mds_ino(parent);
        let name = name.as_bytes().to_vec();
        let (uid, gid) = (req.uid(), req.gid());
        let mode = crate::acl::create_mode(mode, umask);
        self.spawn_as(req, async move {
            let r = c
                .mknod(parent, &name, mode, u64::from(rdev), uid, gid, true)
                .await;
            reply_entry(&c, r, reply)
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _m = crate::metrics::op(FuseOp::Mkdir);
        let c = self.client.clone();
        let parent = self.mds_ino(parent);
        let name = name.as_bytes().to_vec();
        let (uid, gid) = (req.uid(), req.gid());
        if crate::snapshots::is_snap(parent) {
            return self.snap_mkdir(parent, name, uid, reply);
        }
        if let Some(e) = snap::refuse_new(parent, &name) {
            return reply.error(e);
        }
        self.spawn_as(req, async move {
            let r = c
                .mkdir(
                    parent,
                    &name,
                    crate::acl::create_mode(mode & 0o7777, umask),
                    uid,
                    gid,
                )
                .await;
            reply_entry(&c, r, reply)
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _m = crate::metrics::op(FuseOp::Unlink);
        if let Some(e) = snap::refuse_change(&[parent.0]) {
            return reply.error(e);
        }
        let c = self.client.clone();
        let parent = self.mds_ino(parent);
        let name = name.as_bytes().to_vec();
        self.spawn_as(req, async move {
            reply_empty(c.unlink(parent, &name).await, reply)
        });
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _m = crate::metrics::op(FuseOp::Rmdir);
        let c = self.client.clone();
        let parent = self.mds_ino(parent);
        let name = name.as_bytes().to_vec();
        if crate::snapshots::is_snap(parent) {
            return self.snap_rmdir(parent, name, req.uid(), reply);
        }
        self.spawn_as(req, async move {
            reply_empty(c.rmdir(parent, &name).await, reply)
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _m = crate::metrics::op(FuseOp::Symlink);
        if let Some(e) = snap::refuse_new(parent.0, link_name.as_bytes()) {
            return reply.error(e);
        }
        let c = self.client.clone();
        let parent = self.mds_ino(parent);
        let name = link_name.as_bytes().to_vec();
        let target = target.as_os_str().as_bytes().to_vec();
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn_as(req, async move {
            let r = c.symlink(parent, &name, &target, uid, gid).await;
            reply_entry(&c, r, reply)
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _m = crate::metrics::op(FuseOp::Rename);
        if let Some(e) = snap::refuse_change(&[parent.0, newparent.0])
            .or_else(|| snap::refuse_new(newparent.0, newname.as_bytes()))
        {
            return reply.error(e);
        }
        let c = self.client.clone();
        let (parent, newparent) = (self.mds_ino(parent), self.mds_ino(newparent));
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        self.spawn_as(req, async move {
            reply_empty(
                c.rename(parent, &name, newparent, &newname, flags.bits())
                    .await,
                reply,
            )
        });
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _m = crate::metrics::op(FuseOp::Link);
        if let Some(e) = snap::refuse_change(&[ino.0])
            .or_else(|| snap::refuse_new(newparent.0, newname.as_bytes()))
        {
            return reply.error(e);
        }
        let c = self.client.clone();
        let (ino, newparent) = (self.mds_ino(ino), self.mds_ino(newparent));
        let newname = newname.as_bytes().to_vec();
        self.spawn_as(req, async move {
            let r = c.link(ino, newparent, &newname).await;
            reply_entry(&c, r, reply)
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _m = crate::metrics::op(FuseOp::Open);
        if crate::snapshots::is_snap(ino.0) {
            return self.snap_open(flags, reply);
        }
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        let fh = self.new_fh();
        let cred = (req.uid(), req.gid());
        self.spawn_as(req, async move {
            // Close-to-open: an open sees the size other clients committed.
            let flags = flags.0 as u32;
            match c.open(ino, flags, cred).await {
                Ok((a, shared, keep)) => {
                    c.note_attr(&a);
                    c.note_handle(fh.0, ino);
                    let mut how = direct_if(shared, flags as i32);
                    if keep {
                        how |= FopenFlags::FOPEN_KEEP_CACHE;
                    }
                    reply.opened(fh, how)
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _m = crate::metrics::op(FuseOp::Create);
        if let Some(e) = snap::refuse_new(parent.0, name.as_bytes()) {
            return reply.error(e);
        }
        let c = self.client.clone();
        let parent = self.mds_ino(parent);
        let name = name.as_bytes().to_vec();
        let (uid, gid) = (req.uid(), req.gid());
        let mode = crate::acl::create_mode(libc::S_IFREG | (mode & 0o7777), umask);
        let exclusive = flags & libc::O_EXCL != 0;
        let fh = self.new_fh();
        self.spawn_as(req, async move {
            // The MDS counts the file open from its creation on (and the
            // heartbeats keep it so), so no separate Open round trip.
            let r = c
                .create(parent, &name, mode, uid, gid, exclusive, flags as u32)
                .await;
            match r {
                Ok((a, shared)) => {
                    c.note_handle(fh.0, a.ino);
                    let attr = file_attr(&c, &a);
                    reply.created(
                        &c.meta.ttl(),
                        &attr,
                        Generation(a.generation),
                        fh,
                        direct_if(shared, flags),
                    )
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _m = crate::metrics::op(FuseOp::Read);
        if crate::snapshots::is_snap(ino.0) {
            return self.snap_read(ino.0, offset, size, reply);
        }
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        self.spawn(async move {
            match c.read_accessed(ino, offset, size).await {
                Ok(d) => reply.data(crate::metrics::read(&d)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _m = crate::metrics::op(FuseOp::Write);
        if let Some(e) = snap::refuse_change(&[ino.0]) {
            return reply.error(e);
        }
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        let sync = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        // O_DSYNC without O_SYNC's other bit: as fdatasync, times wait for
        // the next commit (O_SYNC includes the O_DSYNC bit).
        let datasync = flags.0 & libc::O_SYNC != libc::O_SYNC;
        let append = flags.0 & libc::O_APPEND != 0;
        // The kernel's buffer is only borrowed: one copy into an owned,
        // reference-counted buffer that all chunk RPCs slice without copying.
        let data = Bytes::copy_from_slice(data);
        crate::metrics::written(data.len());
        let kernel = self.kernel.clone();
        self.spawn(async move {
            match c.write(ino, offset, data, sync, append).await {
                Ok(n) => {
                    if sync {
                        if let Err(e) = c.commit_synced_write(ino, datasync).await {
                            return reply.error(errno(&e));
                        }
                    }
                    reply.written(n)
                }
                Err(e) => {
                    if e.errno() == libc::EDQUOT {
                        // The size went back to what the MDS accepted:
                        // the kernel's, grown by the earlier writes, is
                        // stale.
                        if let Some(k) = kernel.get() {
                            k.invalidate_attr(ino);
                        }
                    }
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _m = crate::metrics::op(FuseOp::Flush);
        if crate::snapshots::is_snap(ino.0) {
            return reply.ok();
        }
        let c = self.client.clone();
        let locks = self.locks.clone();
        let ino = self.mds_ino(ino);
        self.spawn(async move {
            // Any close drops the process's fcntl locks on the file.
            let unlocked = locks.release_owner(&c, ino, lock_owner.0).await;
            // Close: buffered writes reach the OSDs (errors of earlier
            // background writes are reported here), then the size.
            let closed = c.close_file(ino).await;
            let fenced = c.fence_error(fh.0);
            reply_empty(closed.and(fenced).and(unlocked), reply)
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _m = crate::metrics::op(FuseOp::Release);
        if crate::snapshots::is_snap(ino.0) {
            return reply.ok();
        }
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        // The open file's flock and OFD locks go with its last reference;
        // noted before the task starts so that lock requests read after
        // this wait for it.
        let locks = self.locks.clone();
        let held = locks.begin_release(fh.0, ino, lock_owner.map(|o| o.0));
        self.spawn(async move {
            if let Some(l) = held {
                if let Err(e) = locks.finish_release(&c, l).await {
                    tracing::warn!(ino, error = %e, "could not release locks");
                }
            }
            c.forget_handle(fh.0);
            reply_empty(c.release(ino, flags.0 as u32).await, reply)
        });
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let _m = crate::metrics::op(FuseOp::GetLk);
        let c = self.client.clone();
        let locks = self.locks.clone();
        let ino = self.mds_ino(ino);
        self.spawn(async move {
            match locks
                .getlk(&c, ino, lock_owner.0, start, end, typ, pid)
                .await
            {
                Ok((s, e, t, p)) => reply.locked(s, e, t, p),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let _m = crate::metrics::op(FuseOp::SetLk);
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        let tid = req.pid();
        let locks = self.locks.clone();
        if typ != libc::F_UNLCK {
            locks.note_lock(fh.0, ino, lock_owner.0);
        }
        self.spawn(async move {
            let r = locks.setlk(&c, ino, lock_owner.0, start, end, typ, pid, sleep, tid);
            reply_empty(r.await, reply)
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _m = crate::metrics::op(FuseOp::Fsync);
        if crate::snapshots::is_snap(ino.0) {
            return reply.ok();
        }
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        self.spawn(async move {
            let synced = c.fsync(ino, datasync).await;
            reply_empty(synced.and(c.fence_error(fh.0)), reply)
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _m = crate::metrics::op(FuseOp::OpenDir);
        if crate::snapshots::is_snap(ino.0) {
            return self.snap_opendir(reply);
        }
        let fh = self.new_fh();
        self.client.open_dir(self.mds_ino(ino));
        reply.opened(fh, FopenFlags::empty());
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _m = crate::metrics::op(FuseOp::ReleaseDir);
        self.dirs.release(fh.0);
        if crate::snapshots::is_snap(ino.0) {
            return reply.ok();
        }
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        self.spawn(async move { reply_empty(c.release_dir(ino).await, reply) });
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _m = crate::metrics::op(FuseOp::ReadDir);
        if crate::snapshots::is_snap(ino.0) {
            return self.snap_readdir(ino.0, offset, reply);
        }
        if self.dirs.ended(fh.0, offset) {
            return reply.ok();
        }
        let c = self.client.clone();
        let dirs = self.dirs.clone();
        let stream = DirStream {
            dir: self.mds_ino(ino),
            fh: fh.0,
            offset,
            plus: false,
        };
        self.spawn_as(req, async move {
            let filled = stream
                .fill(&c, &dirs, |item| {
                    Ok(match item {
                        DirItem::Dot => reply.add(ino, 1, fuser::FileType::Directory, "."),
                        DirItem::DotDot(up) => {
                            reply.add(up, DOTDOT_COOKIE, fuser::FileType::Directory, "..")
                        }
                        DirItem::Entry(e) => reply.add(
                            INodeNo(fuse_ino(&c, e.ino)),
                            e.cookie,
                            crate::attr::kind_of(e.mode),
                            OsStr::from_bytes(&e.name),
                        ),
                    })
                })
                .await;
            match filled {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _m = crate::metrics::op(FuseOp::ReadDirPlus);
        if crate::snapshots::is_snap(ino.0) {
            return self.snap_readdirplus(ino.0, offset, reply);
        }
        if self.dirs.ended(fh.0, offset) {
            return reply.ok();
        }
        let c = self.client.clone();
        let dir = self.mds_ino(ino);
        let dirs = self.dirs.clone();
        let stream = DirStream {
            dir,
            fh: fh.0,
            offset,
            plus: true,
        };
        self.spawn_as(req, async move {
            // "." and ".." carry attributes too; fetched once per listing.
            let me = if offset <= 1 {
                match c.getattr(dir).await {
                    Ok(a) => Some(a),
                    Err(e) => return reply.error(errno(&e)),
                }
            } else {
                None
            };
            let filled = stream
                .fill(&c, &dirs, |item| match item {
                    DirItem::Dot | DirItem::DotDot(_) => {
                        let Some(me) = me.as_ref() else {
                            return Err(Errno::EIO);
                        };
                        let attr = file_attr(&c, me);
                        Ok(match item {
                            DirItem::DotDot(up) => {
                                // The kernel takes d_ino from the attributes
                                // and links no dentry for "..": only the
                                // inode number matters.
                                let up = FileAttr { ino: up, ..attr };
                                reply.add(
                                    up.ino,
                                    DOTDOT_COOKIE,
                                    "..",
                                    &Duration::ZERO,
                                    &up,
                                    Generation(0),
                                )
                            }
                            _ => reply.add(
                                ino,
                                1,
                                ".",
                                &c.meta.ttl(),
                                &attr,
                                Generation(me.generation),
                            ),
                        })
                    }
                    DirItem::Entry(e) => {
                        let Some(a) = e.attr.as_ref() else {
                            return Err(Errno::EIO);
                        };
                        let attr = file_attr(&c, a);
                        Ok(reply.add(
                            attr.ino,
                            e.cookie,
                            OsStr::from_bytes(&e.name),
                            &c.meta.ttl(),
                            &attr,
                            Generation(a.generation),
                        ))
                    }
                })
                .await;
            match filled {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _m = crate::metrics::op(FuseOp::FsyncDir);
        if crate::snapshots::is_snap(ino.0) {
            return reply.ok();
        }
        // Changes are acknowledged once a majority of MDS nodes holds them;
        // fsyncdir waits until they are on disk there too.
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        self.spawn(async move { reply_empty(c.sync_dir(ino).await, reply) });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _m = crate::metrics::op(FuseOp::StatFs);
        let c = self.client.clone();
        self.spawn(async move {
            match c.statfs().await {
                Ok(s) => {
                    let bs = u64::from(s.block_size.max(512));
                    reply.statfs(
                        s.total_bytes / bs,
                        s.free_bytes / bs,
                        s.avail_bytes / bs,
                        s.total_inodes,
                        s.free_inodes,
                        bs as u32,
                        s.max_name_len,
                        bs as u32,
                    )
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        let _m = crate::metrics::op(FuseOp::SetXattr);
        if let Some(e) = snap::refuse_change(&[ino.0]) {
            return reply.error(e);
        }
        if position != 0 {
            return reply.error(Errno::EINVAL);
        }
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        let name = name.as_bytes().to_vec();
        let value = value.to_vec();
        let (uid, gid, pid) = (req.uid(), req.gid(), req.pid());
        self.spawn_as(req, async move {
            let r = match c
                .setxattr_as(ino, &name, &value, flags as u32, Some(uid))
                .await
            {
                Ok(()) => crate::acl::after_setxattr(&c, ino, &name, uid, gid, pid).await,
                Err(e) => Err(e),
            };
            reply_empty(r, reply)
        });
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _m = crate::metrics::op(FuseOp::GetXattr);
        let name = name.as_bytes().to_vec();
        if crate::snapshots::is_snap(ino.0) {
            return self.snap_getxattr(ino.0, name, size, reply);
        }
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        self.spawn_as(req, async move {
            match c.getxattr(ino, &name).await {
                Ok(v) => xattr_reply(&v, size, reply),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _m = crate::metrics::op(FuseOp::ListXattr);
        if crate::snapshots::is_snap(ino.0) {
            return self.snap_listxattr(ino.0, size, reply);
        }
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        self.spawn(async move {
            match c.listxattr(ino).await {
                Ok(names) => xattr_reply(&xattr_names(&names), size, reply),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _m = crate::metrics::op(FuseOp::RemoveXattr);
        if let Some(e) = snap::refuse_change(&[ino.0]) {
            return reply.error(e);
        }
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        let name = name.as_bytes().to_vec();
        let uid = req.uid();
        self.spawn_as(req, async move {
            reply_empty(c.removexattr(ino, &name, Some(uid)).await, reply)
        });
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _m = crate::metrics::op(FuseOp::Fallocate);
        if let Some(e) = snap::refuse_change(&[ino.0]) {
            return reply.error(e);
        }
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        let (uid, gid, pid) = (req.uid(), req.gid(), req.pid());
        let kernel = self.kernel.clone();
        self.spawn(async move {
            let mut r = fallocate(&c, ino, offset, length, mode).await;
            if r.is_ok() && uid != 0 {
                r = match kill_priv(&c, ino, gid, pid).await {
                    // The kernel keeps the mode it was told before the
                    // fallocate: it must ask again.
                    Ok(true) => {
                        if let Some(k) = kernel.get() {
                            k.invalidate_attr(ino);
                        }
                        Ok(())
                    }
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                };
            }
            reply_empty(r, reply)
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _m = crate::metrics::op(FuseOp::Lseek);
        if crate::snapshots::is_snap(ino.0) {
            return self.snap_lseek(ino.0, offset, whence, reply);
        }
        let c = self.client.clone();
        let ino = self.mds_ino(ino);
        self.spawn(async move {
            let size = match c.known_size(ino) {
                Some(st) => st.size,
                None => match c.getattr(ino).await {
                    Ok(a) => c.note_attr(&a),
                    Err(e) => return reply.error(errno(&e)),
                },
            };
            let data = match whence {
                libc::SEEK_DATA => true,
                libc::SEEK_HOLE => false,
                _ => return reply.error(Errno::EINVAL),
            };
            if offset < 0 {
                return reply.error(Errno::ENXIO);
            }
            match c.seek_data_hole(ino, offset as u64, data, size).await {
                Ok(off) => reply.offset(off as i64),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _m = crate::metrics::op(FuseOp::CopyFileRange);
        if let Some(e) = snap::refuse_change(&[ino_out.0]) {
            return reply.error(e);
        }
        if crate::snapshots::is_snap(ino_in.0) {
            // The caller copies through read and write instead.
            return reply.error(Errno::EXDEV);
        }
        let c = self.client.clone();
        let (src, dst) = (self.mds_ino(ino_in), self.mds_ino(ino_out));
        self.spawn(async move {
            // Data moves through the client, one chunk-sized piece at a time.
            const PIECE: u64 = 4 << 20;
            let len = len.min(u64::from(u32::MAX) & !(PIECE - 1));
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(PIECE) as u32;
                let data = match c.read(src, offset_in + done, n).await {
                    Ok(d) => d,
                    Err(e) => return reply.error(errno(&e)),
                };
                if data.is_empty() {
                    break;
                }
                let got = data.len() as u64;
                if let Err(e) = c
                    .write(dst, offset_out + done, Bytes::from(data), false, false)
                    .await
                {
                    return reply.error(errno(&e));
                }
                done += got;
                if got < u64::from(n) {
                    break;
                }
            }
            reply.written(done as u32)
        });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _m = crate::metrics::op(FuseOp::Access);
        // Mounted with default_permissions: the kernel checks mode bits.
        reply.ok();
    }
}

/// True if process `pid` (primary group `gid`) is a member of group `group`.
fn in_group(pid: u32, gid: u32, group: u32) -> bool {
    if gid == group {
        return true;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(group)))
}

/// A data change by an unprivileged caller drops S_ISUID, and S_ISGID when
/// group-executable or the caller is not in the file's group, as write
/// does. The kernel does this for write(2) through setattr, but for
/// fallocate only when S_IXGRP is set (no FUSE_HANDLE_KILLPRIV_V2), so the
/// client does it.
/// True if the mode changed.
async fn kill_priv(c: &Client, ino: u64, gid: u32, pid: u32) -> crate::error::Result<bool> {
    let a = c.getattr(ino).await?;
    let mut mode = a.mode & 0o7777;
    if mode & libc::S_ISUID != 0 {
        mode &= !libc::S_ISUID;
    }
    if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || !in_group(pid, gid, a.gid)) {
        mode &= !libc::S_ISGID;
    }
    if mode == a.mode & 0o7777 {
        return Ok(false);
    }
    let ch = SetAttr {
        mode: Some(mode),
        ..Default::default()
    };
    c.setattr(ino, ch).await.map(|_| true)
}

/// fallocate(2): allocation only extends the size (space is not reserved
/// ahead, but more than the cluster has free fails with ENOSPC), punching
/// and zeroing store no data.
async fn fallocate(
    c: &Client,
    ino: u64,
    offset: u64,
    length: u64,
    mode: i32,
) -> crate::error::Result<()> {
    const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
    const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE;
    const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
    let end = offset
        .checked_add(length)
        .filter(|e| *e <= avalon_proto::limits::MAX_FILE_SIZE)
        .ok_or_else(|| ClientError::posix(libc::EFBIG, "fallocate past the largest file size"))?;
    if length == 0 {
        return Err(ClientError::posix(libc::EINVAL, "fallocate of zero length"));
    }
    match mode {
        0 | KEEP_SIZE => {
            // Nothing is reserved, but a request the free space cannot
            // hold fails as on a local filesystem (counted whole: which
            // parts are already stored is not known here).
            let free = c.statfs().await?.avail_bytes;
            if length > free {
                return Err(ClientError::posix(
                    libc::ENOSPC,
                    "fallocate larger than the free space",
                ));
            }
        }
        m if m == PUNCH | KEEP_SIZE => c.zero_range(ino, offset, length).await?,
        ZERO | 0x11 => c.zero_range(ino, offset, length).await?,
        m if m & PUNCH != 0 => {
            return Err(ClientError::posix(
                libc::EOPNOTSUPP,
                "punch hole needs KEEP_SIZE",
            ))
        }
        _ => {
            return Err(ClientError::posix(
                libc::EOPNOTSUPP,
                "fallocate mode not supported",
            ))
        }
    }
    if mode & KEEP_SIZE == 0 {
        c.grow_to(ino, end).await?;
    }
    Ok(())
}
