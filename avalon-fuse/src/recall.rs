//! The session's recall stream: applies the MDS's recalls to this client's
//! caches and the kernel's, then acknowledges them, so that a change made
//! through another mount is seen here as soon as it is acknowledged there.

use crate::client::Client;
use avalon_proto::pb;
use std::sync::Arc;
use std::time::Duration;

/// How long an inode invalidation (attributes, pages) may wait for the
/// kernel. It takes no lock a request of ours holds while it waits for
/// the MDS, and a reader sees another mount's write only if its pages are
/// gone before the recall is acknowledged: on a busy machine 50 ms was
/// sometimes too short for that.
const INODE_WAIT: Duration = Duration::from_secs(2);

/// Invalidates the kernel's caches of this mount.
#[derive(Clone)]
pub struct KernelCache {
    notifier: fuser::Notifier,
    root_ino: u64,
}

impl KernelCache {
    /// Invalidations through `notifier`; `root_ino` is the MDS inode the
    /// mount's root (kernel node 1) stands for.
    pub fn new(notifier: fuser::Notifier, root_ino: u64) -> Self {
        KernelCache { notifier, root_ino }
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

    /// Applies recalls to the kernel, waiting for it at most
    /// [`INODE_WAIT`]: attributes and cached pages. Names need nothing:
    /// the kernel keeps none (`fs::ENTRY_TTL`).
    async fn apply(&self, recalls: Vec<pb::Recall>) {
        let k = self.clone();
        let inodes =
            tokio::task::spawn_blocking(move || recalls.iter().for_each(|r| k.invalidate_inode(r)));
        let _ = tokio::time::timeout(INODE_WAIT, inodes).await;
    }
}

/// Keeps the recall stream open for the life of the mount.
pub async fn run(client: Arc<Client>, kernel: Option<KernelCache>) {
    loop {
        let req = pb::SessionRequest {
            header: client.header(),
        };
        match client
            .mds
            .request(req, |mut c, r| async move { c.session(r).await })
            .await
        {
            Ok(mut stream) => {
                client.stream_opened();
                loop {
                    match stream.message().await {
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
        client.stream_closed();
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
    let req = pb::AckRecallRequest {
        header: client.header(),
        seq: ev.seq,
        flush_seq: 0,
    };
    if let Err(e) = client
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
        header: client.header(),
        seq: 0,
        flush_seq: ev.flush_seq,
    };
    if let Err(e) = client
        .mds
        .request(req, |mut c, r| async move { c.ack_recall(r).await })
        .await
    {
        tracing::warn!(error = %e, flush_seq = ev.flush_seq, "could not acknowledge a demand");
    }
}
