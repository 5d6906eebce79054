//! The session's recall stream: applies the MDS's recalls to this client's
//! caches and the kernel's, then acknowledges them, so that a change made
//! through another mount is seen here as soon as it is acknowledged there.

use crate::client::Client;
use avalon_proto::pb;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long an entry invalidation may wait for the kernel. The kernel
/// takes the directory's lock for it, which a request of ours may hold
/// while it waits for the MDS, which may wait for another mount's
/// acknowledgement, blocked the same way. Past this every name the kernel
/// holds for the mount is expired at once (which takes no lock), so that
/// no path walk, which reads names without that lock, sees the old one
/// after the acknowledgement.
const ENTRY_WAIT: Duration = Duration::from_millis(20);
/// The same bound on kernels that cannot expire all names at once (before
/// Linux 6.16): the recall is acknowledged anyway, and the name stays
/// visible until the directory's lock is free.
const KERNEL_WAIT: Duration = Duration::from_millis(50);
/// FUSE_NOTIFY_INC_EPOCH: every name cached before it is looked up again.
const FUSE_NOTIFY_INC_EPOCH: i32 = 8;
/// How long an inode invalidation (attributes, pages) may wait for the
/// kernel. It takes no lock a request of ours holds while it waits for
/// the MDS, and a reader sees another mount's write only if its pages are
/// gone before the recall is acknowledged: on a busy machine the entry
/// bound above was sometimes too short for that.
const INODE_WAIT: Duration = Duration::from_secs(2);

/// Invalidates the kernel's caches of this mount.
#[derive(Clone)]
pub struct KernelCache {
    notifier: fuser::Notifier,
    root_ino: u64,
    /// The mount's /dev/fuse descriptor, for the notification fuser has
    /// no call for; cleared once the kernel refused it.
    device: Option<Arc<OwnedFd>>,
    epochs_work: Arc<AtomicBool>,
}

impl KernelCache {
    /// Invalidations through `notifier`; `root_ino` is the MDS inode the
    /// mount's root (kernel node 1) stands for.
    /// `device`: a duplicate of the mount's /dev/fuse descriptor.
    pub fn new(notifier: fuser::Notifier, root_ino: u64, device: Option<OwnedFd>) -> Self {
        KernelCache {
            notifier,
            root_ino,
            device: device.map(Arc::new),
            epochs_work: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Expires every name (positive or negative) the kernel caches for
    /// this mount, without taking any lock. False if this kernel cannot.
    fn expire_all_names(&self) -> bool {
        let Some(fd) = self.device.as_ref() else {
            return false;
        };
        if !self.epochs_work.load(Ordering::Relaxed) {
            return false;
        }
        // A notification is a bare fuse_out_header: length, the code in
        // the error field, unique 0.
        let mut msg = [0u8; 16];
        msg[..4].copy_from_slice(&16u32.to_ne_bytes());
        msg[4..8].copy_from_slice(&FUSE_NOTIFY_INC_EPOCH.to_ne_bytes());
        match nix::unistd::write(fd.as_ref(), &msg) {
            Ok(16) => true,
            r => {
                tracing::warn!(result = ?r, "this kernel cannot expire all names at once (Linux 6.16+): another mount's change of a name may show late here");
                self.epochs_work.store(false, Ordering::Relaxed);
                false
            }
        }
    }

    fn node(&self, ino: u64) -> fuser::INodeNo {
        fuser::INodeNo(if ino == self.root_ino { 1 } else { ino })
    }

    /// Drops the kernel's cached attributes of `ino` (changed by this
    /// client behind the kernel's back).
    pub fn invalidate_attr(&self, ino: u64) {
        let _ = self.notifier.inval_inode(self.node(ino), -1, 0);
    }

    /// Applies the inode part of a recall to the kernel: attributes, and
    /// the cached pages of a data recall (errors mean it had nothing
    /// cached).
    fn invalidate_inode(&self, r: &pb::Recall) {
        // Offset -1: attributes only; 0 with length 0: all cached pages too.
        let offset = if r.data { 0 } else { -1 };
        let _ = self.notifier.inval_inode(self.node(r.ino), offset, 0);
    }

    /// Applies the entry part of a recall to the kernel, if it has one.
    fn invalidate_entry(&self, r: &pb::Recall) {
        if r.entry {
            let _ = self
                .notifier
                .inval_entry(self.node(r.ino), OsStr::from_bytes(&r.name));
        }
    }

    /// Applies recalls to the kernel: inodes first, waiting for them at
    /// most [`INODE_WAIT`], then entries, at most [`KERNEL_WAIT`].
    async fn apply(&self, recalls: Vec<pb::Recall>) {
        let recalls = std::sync::Arc::new(recalls);
        let (k, rs) = (self.clone(), recalls.clone());
        let inodes =
            tokio::task::spawn_blocking(move || rs.iter().for_each(|r| k.invalidate_inode(r)));
        let _ = tokio::time::timeout(INODE_WAIT, inodes).await;
        if recalls.iter().any(|r| r.entry) {
            let k = self.clone();
            let entries = tokio::task::spawn_blocking(move || {
                recalls.iter().for_each(|r| k.invalidate_entry(r))
            });
            let mut entries = entries;
            let done = tokio::time::timeout(ENTRY_WAIT, &mut entries).await.is_ok();
            if !done && !self.expire_all_names() {
                let _ = tokio::time::timeout(KERNEL_WAIT - ENTRY_WAIT, entries).await;
            }
        }
    }
}

/// Keeps the recall stream open for the life of the mount.
pub async fn run(client: Arc<Client>, kernel: Option<KernelCache>) {
    loop {
        let req = pb::SessionRequest {
            header: client.session.header(),
        };
        match client
            .session
            .mds
            .request(req, |mut c, r| async move { c.session(r).await })
            .await
        {
            Ok(mut stream) => {
                let generation = client.stream_opened();
                loop {
                    let msg = tokio::select! {
                        m = stream.message() => m,
                        () = client.session.stream_gone(generation) => break,
                    };
                    match msg {
                        Ok(Some(ev)) => apply(&client, kernel.as_ref(), ev).await,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "recall stream ended");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot open the recall stream"),
        }
        // Recalls may have been missed: trust nothing cached until the
        // stream is back and a heartbeat renewed the lease. Shared-write
        // demands may have been missed too: write through every file open
        // for writing.
        client.session.stream_closed();
        client.meta.clear();
        client.deleg.drop_all();
        // Bounded: the flusher goes on sending what no leader took yet.
        let _ = client.barrier().await;
        client.share_all_writes().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn apply(client: &Arc<Client>, kernel: Option<&KernelCache>, ev: pb::SessionEvent) {
    tracing::debug!(seq = ev.seq, recalls = ev.recalls.len(), "recall");
    if ev.flush_seq != 0 {
        // A shared-write demand: storing the buffer may take a while, so
        // it runs beside later recalls and is acknowledged on its own.
        let client = client.clone();
        let kernel = kernel.cloned();
        tokio::spawn(async move { share(&client, kernel.as_ref(), ev).await });
        return;
    }
    if ev.recalls.is_empty() {
        // The stream's first event: the recalls sent before it.
        client.session.recalls_applied(ev.seq);
        return;
    }
    for r in &ev.recalls {
        client.meta.recall(r);
        if r.data {
            client.cache.invalidate_file(r.ino);
            client.page_versions.changed(r.ino);
        }
    }
    if let Some(k) = kernel {
        k.apply(ev.recalls).await;
    }
    client.session.recalls_applied(ev.seq);
    let req = pb::AckRecallRequest {
        header: client.session.header(),
        seq: ev.seq,
        flush_seq: 0,
    };
    if let Err(e) = client
        .session
        .mds
        .request(req, |mut c, r| async move { c.ack_recall(r).await })
        .await
    {
        tracing::warn!(error = %e, seq = ev.seq, "could not acknowledge a recall");
    }
}

/// Applies a shared-write demand: the file's buffered writes are stored and
/// its size committed, cached pages and attributes dropped, then acknowledged.
async fn share(client: &Arc<Client>, kernel: Option<&KernelCache>, ev: pb::SessionEvent) {
    for r in ev.recalls.iter().filter(|r| r.delegation) {
        if let Err(e) = client.revoke_delegation(r.ino).await {
            tracing::warn!(root = r.ino, error = %e, "revoking a delegation");
        }
    }
    for r in ev.recalls.iter().filter(|r| r.locks) {
        if let Err(e) = client.locks.return_cache(client, r.ino).await {
            tracing::warn!(ino = r.ino, error = %e, "returning a lock cache");
        }
    }
    for r in ev.recalls.iter().filter(|r| r.snap_seq != 0) {
        if let Err(e) = client.snapshot_demand(r.ino, r.snap_seq).await {
            client.keep_write_error(r.ino, &e);
        }
    }
    for r in ev.recalls.iter().filter(|r| r.shared_write) {
        if let Err(e) = client.share_writes(r.ino).await {
            client.keep_write_error(r.ino, &e);
        }
        client.meta.recall(r);
        client.cache.invalidate_file(r.ino);
        if let Some(k) = kernel {
            k.apply(vec![r.clone()]).await;
        }
    }
    let req = pb::AckRecallRequest {
        header: client.session.header(),
        seq: 0,
        flush_seq: ev.flush_seq,
    };
    if let Err(e) = client
        .session
        .mds
        .request(req, |mut c, r| async move { c.ack_recall(r).await })
        .await
    {
        tracing::warn!(error = %e, flush_seq = ev.flush_seq, "could not acknowledge a demand");
    }
}

/// How long a reply waits for the recalls its mark names. Applying one
/// takes at most the kernel's wait (`KERNEL_WAIT`) once it arrived.
const MARK_WAIT: Duration = Duration::from_millis(250);

/// Holds each MDS reply until the recalls sent to this session before it
/// was made are applied (see `recall_mark.rs`); if they do not come in
/// time, drops every cached name and attribute instead.
pub struct MarkGate {
    client: std::sync::Weak<Client>,
    kernel: Option<KernelCache>,
}

impl MarkGate {
    /// A gate for `client`'s replies, expiring `kernel`'s names if needed.
    pub fn new(client: &Arc<Client>, kernel: Option<KernelCache>) -> Self {
        MarkGate {
            client: Arc::downgrade(client),
            kernel,
        }
    }
}

impl avalon_proto::recall_mark::MarkGate for MarkGate {
    fn pass(&self, mark: u64) -> Option<avalon_proto::recall_mark::BoxFut<()>> {
        let client = self.client.upgrade()?;
        // Without a stream nothing cached is trusted anyway (see `run`).
        if !client.session.stream_is_up() || client.session.recalls_done(mark) {
            return None;
        }
        let kernel = self.kernel.clone();
        tracing::debug!(mark, "a reply waits for recalls");
        Some(Box::pin(async move {
            if !client.session.wait_recalls(mark, MARK_WAIT).await {
                tracing::debug!(
                    mark,
                    "recalls named by a reply did not come: dropping cached names"
                );
                client.meta.clear();
                if let Some(k) = kernel {
                    k.expire_all_names();
                }
            }
        }))
    }
}
