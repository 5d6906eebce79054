//! The client's operations under write delegations: creates and changes
//! made locally and queued, the flush that sends the queue (see
//! `delegation.rs` for the state and the protocol).

use super::{Client, SetAttr, TimeChange};
use crate::delegation::{
    entry_dirs, now_ns, ns, Batch, NewNode, State, APPLY_MAX, FLUSH_EVERY, INOS_LOW, INOS_WANTED,
    REFUSED_FOR, RESEND_AFTER, STORES_AT_ONCE,
};
use crate::error::{ClientError, Result};
use crate::meta_cache::Cached;
use avalon_proto::pb::{self, delegated_op::Op as D, Attr};
use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Instant;

impl Client {
    /// Sends every queued delegated change before this returns (called
    /// before any other MDS request: nothing overtakes a change made
    /// earlier). Fails if changes it waited for were lost (the request
    /// would act on a state without them), or if no MDS leader took them
    /// within the connection's retry budget (they are still being sent).
    pub async fn barrier(&self) -> Result<()> {
        if !self.deleg.busy() {
            return Ok(());
        }
        match tokio::time::timeout(self.session.mds.retry_for, self.flush_delegated()).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Unavailable(format!(
                "delegated changes made before this request not applied within {:?} \
                 (no MDS leader); still sending them",
                self.session.mds.retry_for
            ))),
        }
    }

    /// Sends the queued delegated changes, in order, each batch until the
    /// MDS answered it. Fails with EIO if changes were lost meanwhile
    /// (refused, or the session expired; see `lost_changes.rs`).
    /// Cancel-safe: a batch on its way stays queued for the next flush.
    pub async fn flush_delegated(&self) -> Result<()> {
        // Read before waiting for a flush under way: its losses count.
        let losses = self.deleg.lost.events();
        let _g = self.deleg.flushing.lock().await;
        loop {
            let (req, stored) = {
                let mut s = self.deleg.lock();
                if s.batch.is_none() {
                    let n = s.pending.len().min(APPLY_MAX);
                    if n == 0 {
                        break;
                    }
                    let ops = s.pending.drain(..n).collect();
                    if s.pending.is_empty() {
                        s.pending_since = None;
                        s.pending_eager = false;
                    }
                    s.batch = Some(Batch {
                        req: Arc::new(pb::ApplyRequest {
                            header: self.session.header(),
                            ops,
                        }),
                        stored: false,
                    });
                }
                match &s.batch {
                    Some(b) => (b.req.clone(), b.stored),
                    None => break,
                }
            };
            let req = if stored {
                req
            } else {
                let failed = self.store_batch_data(&req).await;
                let req = self.without_unstored_sizes(req, &failed);
                if let Some(b) = self.deleg.lock().batch.as_mut() {
                    b.req = req.clone();
                    b.stored = true;
                }
                req
            };
            let answer = self.send_batch(req.clone()).await;
            self.settle_batch(&req, answer);
        }
        if self.deleg.lost.events() != losses {
            return Err(ClientError::posix(
                libc::EIO,
                "delegated changes made before this were lost (see the mount's log)",
            ));
        }
        Ok(())
    }

    /// Stores the buffered data of the files whose sizes batch `req`
    /// commits: a file's data reaches the OSDs before the size that covers
    /// it (a close under a delegation does not wait for that). A failure
    /// is kept for the file's fsync; returns the files that failed.
    async fn store_batch_data(&self, req: &pb::ApplyRequest) -> Vec<u64> {
        let mut stores: Vec<u64> = req
            .ops
            .iter()
            .filter_map(|o| match &o.op {
                Some(D::CommitWrite(w)) => Some(w.ino),
                _ => None,
            })
            .collect();
        stores.sort_unstable();
        stores.dedup();
        // A few at a time: a batch can name hundreds of files, and as
        // many chunk writes at once (each forwarded to two replicas)
        // overran the OSDs' HTTP/2 connections (streams reset, replicas
        // marked stale, reads stalled for seconds).
        let stored: Vec<(u64, Result<()>)> = futures::stream::iter(stores)
            .map(|ino| async move { (ino, self.flush_file(ino).await) })
            .buffer_unordered(STORES_AT_ONCE)
            .collect()
            .await;
        let mut failed = Vec::new();
        for (ino, r) in stored {
            if let Err(e) = r {
                self.keep_write_error(ino, &e);
                failed.push(ino);
            }
        }
        failed
    }

    /// Batch `req` (never sent yet) without the size commits of `failed`,
    /// files whose data could not be stored: such a size would cover bytes
    /// no OSD holds (read back as zeros). Those commits are lost changes,
    /// reported at the files' next fsync or close, and the cached view of
    /// the files (their sizes as committed) is dropped.
    fn without_unstored_sizes(
        &self,
        req: Arc<pb::ApplyRequest>,
        failed: &[u64],
    ) -> Arc<pb::ApplyRequest> {
        let unstored = |o: &pb::DelegatedOp| matches!(&o.op, Some(D::CommitWrite(w)) if failed.contains(&w.ino));
        if failed.is_empty() || !req.ops.iter().any(unstored) {
            return req;
        }
        let (lost, kept): (Vec<pb::DelegatedOp>, Vec<pb::DelegatedOp>) =
            req.ops.iter().cloned().partition(|o| unstored(o));
        let lost: Vec<(&pb::DelegatedOp, i32)> = lost.iter().map(|o| (o, 0)).collect();
        self.deleg.lost.record(
            &lost,
            libc::EIO,
            "the data the sizes cover could not be stored",
        );
        self.meta.clear();
        self.deleg.drop_all();
        // Their closes counted those sizes as committed: the next open
        // starts from the MDS's.
        for ino in failed {
            if !self.is_open(*ino) {
                self.open_files.files.remove(ino);
            }
        }
        Arc::new(pb::ApplyRequest {
            header: req.header.clone(),
            ops: kept,
        })
    }

    /// Sends batch `req` until the MDS answers it: across failovers, for
    /// as long as the session lives, under the same request id (so a
    /// batch that an old leader applied, its reply lost, is answered from
    /// the MDS's dedup table instead of being applied again). Returns the
    /// errno of each change, or the errno and reason of a refusal of the
    /// whole batch that a retry cannot fix.
    async fn send_batch(
        &self,
        req: Arc<pb::ApplyRequest>,
    ) -> std::result::Result<Vec<i32>, (i32, String)> {
        let mut warned = false;
        loop {
            if self.deleg.session_lost() {
                return Err((libc::EIO, "the MDS expired this session".into()));
            }
            let r = self
                .session
                .mds
                .request(req.clone(), |mut c, r| async move {
                    c.apply(pb::ApplyRequest::clone(&r)).await
                })
                .await;
            let e = match r {
                Ok(r) => {
                    if warned {
                        tracing::info!(changes = req.ops.len(), "delegated changes sent at last");
                    }
                    return Ok(r.errnos);
                }
                Err(e) => e,
            };
            if avalon_proto::errno::has_errno(&e) {
                let errno = avalon_proto::errno::errno_of(&e);
                if errno == libc::ESTALE {
                    // The MDS has no such session (expired).
                    self.deleg.lose_session();
                }
                // A full MDS is reported as such; anything else as EIO.
                let report = if matches!(errno, libc::ENOSPC | libc::EDQUOT) {
                    errno
                } else {
                    libc::EIO
                };
                return Err((report, format!("refused: {} (errno {errno})", e.message())));
            }
            if !matches!(
                e.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Aborted
            ) {
                return Err((
                    libc::EIO,
                    format!("refused: {:?}: {}", e.code(), e.message()),
                ));
            }
            if !warned {
                tracing::warn!(
                    changes = req.ops.len(),
                    error = %e,
                    "delegated changes not taken yet; sending them again for as long as the session lives"
                );
                warned = true;
            }
            tokio::time::sleep(RESEND_AFTER).await;
        }
    }

    /// Ends batch `req` with the MDS's `answer`: it leaves the queue, and
    /// the changes the MDS refused are recorded as lost.
    fn settle_batch(
        &self,
        req: &pb::ApplyRequest,
        answer: std::result::Result<Vec<i32>, (i32, String)>,
    ) {
        {
            let mut s = self.deleg.lock();
            s.batch = None;
            for d in req
                .ops
                .iter()
                .filter_map(|o| o.op.as_ref())
                .flat_map(entry_dirs)
                .flatten()
            {
                if let Some(n) = s.pending_dirs.get_mut(&d) {
                    *n -= 1;
                    if *n == 0 {
                        s.pending_dirs.remove(&d);
                    }
                }
            }
        }
        self.deleg.drained.notify_waiters();
        let lost: Vec<(&pb::DelegatedOp, i32)>;
        let (report, why) = match answer {
            Ok(errnos) => {
                // An answer without an errno for a change says nothing of
                // it: counted as refused.
                lost = req
                    .ops
                    .iter()
                    .enumerate()
                    .map(|(i, o)| (o, errnos.get(i).copied().unwrap_or(libc::EIO)))
                    .filter(|(_, e)| *e != 0)
                    .collect();
                (
                    libc::EIO,
                    "refused by the MDS (errno per change)".to_string(),
                )
            }
            Err((report, why)) => {
                lost = req.ops.iter().map(|o| (o, 0)).collect();
                (report, why)
            }
        };
        if lost.is_empty() {
            return;
        }
        tracing::warn!(
            of = req.ops.len(),
            lost = lost.len(),
            "delegated changes refused by the MDS"
        );
        self.deleg.lost.record(&lost, report, &why);
        // The cached view of those inodes was wrong: start over from the
        // MDS's.
        self.meta.clear();
        self.deleg.drop_all();
    }

    /// The error to report at the fsync or close of `ino`, once, if a
    /// delegated change touching it was lost.
    pub fn lost_change(&self, ino: u64) -> Result<()> {
        match self.deleg.lost.take(ino) {
            None => Ok(()),
            Some(errno) => Err(ClientError::posix(
                errno,
                format!("delegated changes to inode {ino} were lost (see the mount's log)"),
            )),
        }
    }

    /// Gives up on every queued change (`why`: the process ends without
    /// the MDS having taken them): each is logged as lost.
    pub fn abandon_delegated(&self, why: &str) {
        let (batch, pending) = {
            let mut s = self.deleg.lock();
            (
                s.batch.take().map(|b| b.req),
                std::mem::take(&mut s.pending),
            )
        };
        let lost: Vec<(&pb::DelegatedOp, i32)> = batch
            .iter()
            .flat_map(|b| b.ops.iter())
            .chain(pending.iter())
            .map(|o| (o, 0))
            .collect();
        self.deleg.lost.record(&lost, libc::EIO, why);
    }

    /// Background task: sends queued changes every [`FLUSH_EVERY`] (or at
    /// once when many are queued).
    pub async fn run_delegation_flusher(&self) {
        loop {
            tokio::select! {
                _ = self.deleg.wake.notified() => {}
                _ = tokio::time::sleep(FLUSH_EVERY) => {}
            }
            if self.deleg.due() {
                let _ = self.flush_delegated().await;
            }
        }
    }

    /// The MDS revokes the delegation rooted at `root`: queued changes go
    /// out, files created under it and open here are registered as open,
    /// then it is forgotten.
    pub async fn revoke_delegation(&self, root: u64) -> Result<()> {
        let opens = self.deleg.drop_group(root);
        let flushed = self.flush_delegated().await;
        for (ino, flags) in opens {
            for f in flags {
                self.register_open(ino, f).await;
            }
        }
        flushed
    }

    /// Registers with the MDS every open of a file created here that it
    /// does not count yet (before a synchronous removal, which must see
    /// them to keep the file as an orphan).
    pub async fn register_opens(&self) {
        let opens: Vec<(u64, Vec<u32>)> = {
            let mut s = self.deleg.lock();
            if s.unregistered.is_empty() {
                return;
            }
            s.unregistered.drain().collect()
        };
        let _ = self.barrier().await;
        for (ino, flags) in opens {
            for f in flags {
                self.register_open(ino, f).await;
            }
        }
    }

    /// Tells the MDS of an open of `ino` it did not count; the file may be
    /// in shared-write mode from then on.
    async fn register_open(&self, ino: u64, flags: u32) {
        let lease = self.meta.lease_held();
        let req = pb::OpenRequest {
            header: self.session.header(),
            ino,
            flags,
            ..Default::default()
        };
        match self
            .session
            .mds
            .request(req, |mut c, r| async move { c.open(r).await })
            .await
        {
            Ok(r) if r.shared_write => {
                if let Err(e) = self.share_writes(ino).await {
                    self.keep_write_error(ino, &e);
                }
            }
            Ok(_) => self.note_sole(ino, lease),
            Err(e) => tracing::warn!(ino, error = %e, "could not register an open"),
        }
    }

    /// Makes sure `parent` is delegated here and inode numbers are at hand;
    /// false if not (then the change goes the synchronous way).
    async fn delegated_dir(&self, parent: u64) -> bool {
        // Delegations are asked for and used only under a lease (see
        // `Delegations::lock_under`).
        let Some(gen) = self.meta.lease_held() else {
            return false;
        };
        let lease = Some(gen);
        {
            let s = self.deleg.lock_under(lease);
            if s.session_lost {
                return false;
            }
            let have = s.owned.contains_key(&parent);
            if have && s.inos_left() > INOS_LOW {
                return true;
            }
            if !have
                && s.refused
                    .get(&parent)
                    .is_some_and(|t| t.elapsed() < REFUSED_FOR)
            {
                return false;
            }
        }
        let _g = self.deleg.asking.lock().await;
        let (have, want, revokes) = {
            let s = self.deleg.lock_under(lease);
            (
                s.owned.contains_key(&parent),
                if s.inos_left() > INOS_LOW {
                    0
                } else {
                    INOS_WANTED
                },
                s.revokes,
            )
        };
        if have && want == 0 {
            return true;
        }
        // What is queued goes first: the MDS must know the directory (it
        // may be one created here) before delegating it. Inode numbers
        // alone need not wait for the queue (it can hold seconds of
        // changes whose data is still being stored).
        if !have && self.barrier().await.is_err() {
            return false;
        }
        let epoch = self.meta.epoch();
        let req = pb::DelegateRequest {
            header: self.session.header(),
            dir: if have { 0 } else { parent },
            want_inos: want,
        };
        let r = match self
            .session
            .mds
            .request(req, |mut c, r| async move { c.delegate(r).await })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "delegate failed");
                return false;
            }
        };
        let mut s = self.deleg.lock_under(lease);
        if r.ino_count > 0 {
            s.inos
                .push_back((r.ino_start, r.ino_start + u64::from(r.ino_count)));
        }
        s.layout = (r.chunk_size, r.replicas, r.write_quorum);
        if have {
            return s.inos_left() > 0;
        }
        // A lease broken while the request was out voids the grant.
        if !r.granted || s.revokes != revokes || self.meta.lease_held() != lease {
            s.refused.insert(parent, Instant::now());
            s.refused.retain(|_, t| t.elapsed() < REFUSED_FOR);
            return false;
        }
        s.lease = lease;
        s.owned.insert(parent, parent);
        drop(s);
        if let Some(a) = &r.dir {
            self.meta.put_attr(epoch, a);
            if r.dir_no_xattrs {
                self.meta.put_no_xattrs(epoch, a.ino);
            }
        }
        true
    }

    /// Creates `name` in `parent` under a delegation, if everything needed
    /// is at hand; None: do it the synchronous way. `mode` as in
    /// `MknodRequest` (umask in the high bits).
    pub async fn create_delegated(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        kind: NewNode<'_>,
    ) -> Option<Attr> {
        if name.is_empty() || name.len() > avalon_proto::limits::NAME_MAX || name.contains(&b'/') {
            return None;
        }
        if !matches!(self.meta.lookup(parent, name), Some(Cached::Absent)) {
            return None;
        }
        if !self.delegated_dir(parent).await {
            return None;
        }
        self.deleg.backpressure().await;
        let epoch = self.meta.epoch();
        // Decided from the cache: the name is absent, the parent's
        // attributes are known and it has no default ACL.
        if !matches!(self.meta.lookup(parent, name), Some(Cached::Absent)) {
            return None;
        }
        let p = self.meta.attr(parent)?;
        if !self.meta.bare(parent) {
            return None;
        }
        let now = now_ns();
        let umask = if mode & (1 << 31) != 0 {
            (mode >> 16) & 0o777
        } else {
            0
        };
        let (ftype, mut perm, nlink, size, target) = match kind {
            NewNode::File => (libc::S_IFREG, mode & 0o7777 & !umask, 1, 0, None),
            NewNode::Dir => (libc::S_IFDIR, mode & 0o7777 & !umask, 2, 0, None),
            NewNode::Symlink(t) => {
                if t.is_empty() || t.len() > avalon_proto::limits::PATH_MAX {
                    return None;
                }
                (libc::S_IFLNK, 0o777, 1, t.len() as u64, Some(t))
            }
        };
        if ftype == libc::S_IFDIR && p.nlink >= avalon_proto::limits::LINK_MAX {
            return None;
        }
        let mut gid = gid;
        if p.mode & libc::S_ISGID != 0 {
            gid = p.gid;
            if ftype == libc::S_IFDIR {
                perm |= libc::S_ISGID;
            }
        }
        let (chunk_size, replicas, write_quorum);
        let ino = {
            let mut s = self.deleg.lock_under(self.meta.lease_held());
            let &root = s.owned.get(&parent)?;
            (chunk_size, replicas, write_quorum) = if ftype == libc::S_IFREG {
                s.layout
            } else {
                (0, 0, 0)
            };
            let ino = s.take_ino()?;
            s.owned.insert(ino, root);
            self.deleg.queue(
                &mut s,
                now,
                D::Create(pb::CreateAs {
                    ino,
                    parent,
                    name: Bytes::copy_from_slice(name),
                    mode: ftype | perm,
                    uid,
                    gid,
                    target: target.map(Bytes::copy_from_slice).unwrap_or_default(),
                }),
            );
            ino
        };
        let a = Attr {
            ino,
            mode: ftype | perm,
            nlink,
            uid,
            gid,
            rdev: 0,
            size,
            atime_ns: now,
            mtime_ns: now,
            ctime_ns: now,
            crtime_ns: now,
            generation: 1,
            chunk_size,
            replicas,
            write_quorum,
        };
        // The change's own epoch first: other threads' changes made since
        // `epoch` was read do not void these stores.
        let epoch = self.meta.created(epoch, parent, name, ino);
        self.meta.put_attr(epoch, &a);
        self.meta.put_no_xattrs(epoch, ino);
        if ftype == libc::S_IFDIR {
            self.meta.put_complete(epoch, parent, name, ino);
        }
        self.meta.update_attr(parent, |p| {
            p.mtime_ns = now;
            p.ctime_ns = now;
            if ftype == libc::S_IFDIR {
                p.nlink += 1;
            }
        });
        if ftype == libc::S_IFREG {
            self.note_attr(&a);
        }
        Some(a)
    }

    /// Records an open of `ino` (just created under a delegation) that the
    /// MDS does not count.
    pub fn note_unregistered_open(&self, ino: u64, flags: u32) {
        self.deleg
            .lock()
            .unregistered
            .entry(ino)
            .or_default()
            .push(flags);
    }

    /// Changes attributes of an inode created under a delegation, if its
    /// attributes are cached and no size change is asked for; None: do it
    /// the synchronous way.
    pub fn setattr_delegated(&self, ino: u64, ch: &SetAttr) -> Option<Attr> {
        if ch.size.is_some() {
            return None;
        }
        // chmod rewrites an access ACL, which the MDS does: only for an
        // inode known to have none.
        if ch.mode.is_some() && !self.meta.bare(ino) {
            return None;
        }
        let s = self.deleg.lock_under(self.meta.lease_held());
        if !s.owned.contains_key(&ino) {
            return None;
        }
        let mut a = self.meta.attr(ino)?;
        let now = now_ns();
        let t = |c: TimeChange| match c {
            TimeChange::Now => now,
            TimeChange::At(n) => n,
        };
        let mut changed = false;
        if let Some(m) = ch.mode {
            a.mode = (a.mode & libc::S_IFMT) | (m & 0o7777);
            changed = true;
        }
        if let Some(u) = ch.uid {
            a.uid = u;
            changed = true;
        }
        if let Some(g) = ch.gid {
            a.gid = g;
            changed = true;
        }
        let atime = ch.atime.map(t);
        let mtime = ch.mtime.map(t);
        if let Some(x) = atime {
            a.atime_ns = x;
            changed = true;
        }
        if let Some(x) = mtime {
            a.mtime_ns = x;
            changed = true;
        }
        if changed {
            a.ctime_ns = now;
        }
        if let Some(c) = ch.ctime_ns {
            a.ctime_ns = c;
        }
        let op = D::SetAttr(pb::SetAttrRequest {
            header: None,
            ino,
            mode: ch.mode.map(|m| m & 0o7777),
            uid: ch.uid,
            gid: ch.gid,
            size: None,
            atime: atime.and_then(ns),
            mtime: mtime.and_then(ns),
            ctime_ns: ch.ctime_ns,
            access: false,
            by_handle: ch.by_handle,
        });
        self.queue_attr_change(s, now, op, &a, false);
        Some(a)
    }

    /// Queues `op` (made at `now`, under the state lock `s`) and caches
    /// `a`, the attributes it leaves, as the inode's from now on.
    fn queue_attr_change(
        &self,
        mut s: std::sync::MutexGuard<'_, State>,
        now: i64,
        op: D,
        a: &Attr,
        lazy: bool,
    ) {
        self.deleg.queue_as(&mut s, now, op, lazy);
        self.meta.put_attr(self.meta.epoch(), a);
    }

    /// Opens a file created under a delegation without asking the MDS
    /// (nobody else can have changed it); the open is counted here only.
    /// None: the synchronous way.
    pub fn open_delegated(&self, ino: u64, flags: u32) -> Option<Attr> {
        let mut s = self.deleg.lock_under(self.meta.lease_held());
        if !s.owned.contains_key(&ino) {
            return None;
        }
        let a = self.meta.attr(ino)?;
        if a.mode & libc::S_IFMT != libc::S_IFREG {
            return None;
        }
        s.unregistered.entry(ino).or_default().push(flags);
        let lease = s.lease;
        drop(s);
        self.open_files.count_open(ino, flags);
        self.open_files.note_sole(ino, lease);
        Some(a)
    }

    /// Renews the access time of a file created under a delegation (ctime
    /// stays); false: the synchronous way.
    pub fn touch_delegated(&self, ino: u64) -> bool {
        let s = self.deleg.lock_under(self.meta.lease_held());
        if !s.owned.contains_key(&ino) {
            return false;
        }
        let Some(mut a) = self.meta.attr(ino) else {
            return false;
        };
        let now = now_ns();
        a.atime_ns = now;
        let op = D::SetAttr(pb::SetAttrRequest {
            header: None,
            ino,
            atime: ns(now),
            ctime_ns: Some(a.ctime_ns),
            ..Default::default()
        });
        self.queue_attr_change(s, now, op, &a, true);
        true
    }

    /// Commits the size of a file created under a delegation (and stamps
    /// mtime/ctime), if its attributes are cached; None: the synchronous way.
    pub fn commit_delegated(&self, ino: u64, size: u64) -> Option<Attr> {
        let s = self.deleg.lock_under(self.meta.lease_held());
        if !s.owned.contains_key(&ino) {
            return None;
        }
        let mut a = self.meta.attr(ino)?;
        let now = now_ns();
        a.size = a.size.max(size);
        a.mtime_ns = now;
        a.ctime_ns = now;
        let op = D::CommitWrite(pb::CommitWriteRequest {
            header: None,
            ino,
            size,
            ..Default::default()
        });
        self.queue_attr_change(s, now, op, &a, false);
        Some(a)
    }

    /// Removes `name` from `parent` under a delegation: a file or symbolic
    /// link created here, with one link, not open here. False: the
    /// synchronous way.
    pub fn unlink_delegated(&self, parent: u64, name: &[u8]) -> bool {
        let Some(Cached::Found(a)) = self.meta.lookup(parent, name) else {
            return false;
        };
        if a.mode & libc::S_IFMT == libc::S_IFDIR || a.nlink != 1 || self.is_open(a.ino) {
            return false;
        }
        if !self.remove_delegated(parent, name, a.ino, false) {
            return false;
        }
        self.forget_file(a.ino);
        true
    }

    /// Removes directory `name` from `parent` under a delegation: one made
    /// under the same delegation, known to be empty, not open here. False:
    /// the synchronous way.
    pub fn rmdir_delegated(&self, parent: u64, name: &[u8]) -> bool {
        let Some(Cached::Found(a)) = self.meta.lookup(parent, name) else {
            return false;
        };
        if a.mode & libc::S_IFMT != libc::S_IFDIR
            || !self.meta.empty_dir(a.ino)
            || self.open_files.dirs.contains_key(&a.ino)
        {
            return false;
        }
        self.remove_delegated(parent, name, a.ino, true)
    }

    /// Queues the removal of `name` (inode `ino`, a directory if `dir`)
    /// from `parent` if both are in one delegation group and the parent's
    /// attributes are cached; false otherwise.
    fn remove_delegated(&self, parent: u64, name: &[u8], ino: u64, dir: bool) -> bool {
        let mut s = self.deleg.lock_under(self.meta.lease_held());
        let (Some(r1), Some(r2)) = (s.owned.get(&parent), s.owned.get(&ino)) else {
            return false;
        };
        if r1 != r2 || self.meta.attr(parent).is_none() {
            return false;
        }
        let now = now_ns();
        s.owned.remove(&ino);
        let req = pb::UnlinkRequest {
            header: None,
            parent,
            name: Bytes::copy_from_slice(name),
        };
        let op = if dir { D::Rmdir(req) } else { D::Unlink(req) };
        self.deleg.queue(&mut s, now, op);
        let epoch = self.meta.epoch();
        let _ = self.meta.removed(epoch, parent, name);
        self.meta.update_attr(parent, |p| {
            p.mtime_ns = now;
            p.ctime_ns = now;
            if dir {
                p.nlink = p.nlink.saturating_sub(1);
            }
        });
        true
    }

    /// Renames under a delegation: both directories and the moved inode in
    /// one group, no flags, a directory only inside its parent, and the
    /// target absent or a file created here with one link, not open.
    /// False: the synchronous way.
    pub fn rename_delegated(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> bool {
        if flags != 0 || new_name.is_empty() || new_name.len() > avalon_proto::limits::NAME_MAX {
            return false;
        }
        let Some(Cached::Found(src)) = self.meta.lookup(parent, name) else {
            return false;
        };
        let is_dir = src.mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir && parent != new_parent {
            return false;
        }
        let target = match self.meta.lookup(new_parent, new_name) {
            Some(Cached::Absent) => None,
            Some(Cached::Found(t)) => {
                if t.ino == src.ino
                    || t.mode & libc::S_IFMT == libc::S_IFDIR
                    || is_dir
                    || t.nlink != 1
                    || self.is_open(t.ino)
                {
                    return false;
                }
                Some(t)
            }
            None => return false,
        };
        let mut s = self.deleg.lock_under(self.meta.lease_held());
        let root = match s.owned.get(&parent) {
            Some(r) => *r,
            None => return false,
        };
        let same = |i: &u64| s.owned.get(i) == Some(&root);
        if !same(&new_parent)
            || !same(&src.ino)
            || target.as_ref().is_some_and(|t| !same(&t.ino))
            || self.meta.attr(new_parent).is_none()
        {
            return false;
        }
        let now = now_ns();
        if let Some(t) = &target {
            s.owned.remove(&t.ino);
        }
        self.deleg.queue(
            &mut s,
            now,
            D::Rename(pb::RenameRequest {
                header: None,
                parent,
                name: Bytes::copy_from_slice(name),
                new_parent,
                new_name: Bytes::copy_from_slice(new_name),
                flags: 0,
            }),
        );
        let epoch = self.meta.epoch();
        let epoch = self.meta.renamed(epoch, parent, name, new_parent, new_name);
        let mut moved = src;
        moved.ctime_ns = now;
        self.meta.put_attr(epoch, &moved);
        for d in [parent, new_parent] {
            self.meta.update_attr(d, |p| {
                p.mtime_ns = now;
                p.ctime_ns = now;
            });
        }
        drop(s);
        if let Some(t) = target {
            self.forget_file(t.ino);
        }
        true
    }

    /// A close of `ino` (flush, release): buffered data reaches the OSDs
    /// and the size the MDS, and an earlier background write's failure is
    /// reported. Under a delegation only the size is queued: the data goes
    /// out just before it (with the queue, within [`FLUSH_EVERY`], or at
    /// fsync or a revoke), and a later failure is kept for fsync.
    /// A change to it that the MDS will never apply is reported here too.
    pub async fn close_file(&self, ino: u64) -> Result<()> {
        let closed = self.close_data(ino).await;
        closed.and(self.lost_change(ino))
    }

    /// [`Client::close_file`] but for lost changes.
    async fn close_data(&self, ino: u64) -> Result<()> {
        if self.appends_unconfirmed(ino) {
            self.confirm_sole_writes(ino).await?;
        }
        if self.deleg.owns(ino) {
            if let Some(st) = self.known_size(ino).filter(|s| s.dirty) {
                if let Some(a) = self.commit_delegated(ino, st.size) {
                    if let Some(mut f) = self.open_files.files.get_mut(&ino) {
                        f.committed(st.size);
                    }
                    self.page_versions.written(&a);
                    return Ok(());
                }
            } else {
                return Ok(());
            }
        }
        let flushed = self.flush_file_for_close(ino).await;
        let committed = self.commit_size(ino).await;
        if let (Ok(()), Ok(Some(a))) = (&flushed, &committed) {
            if !self.is_shared(ino) {
                self.page_versions.written(a);
            }
        }
        flushed.and(committed.map(|_| ()))
    }

    /// Drops what this client keeps of the data of `ino`, removed here.
    fn forget_file(&self, ino: u64) {
        self.open_files.files.remove(&ino);
        self.cache.invalidate_file(ino);
    }

    /// True if this client has `ino` open.
    fn is_open(&self, ino: u64) -> bool {
        self.open_files.count(ino).all > 0
    }
}
