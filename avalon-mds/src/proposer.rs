//! Group commit of client writes on the leader.
//!
//! Every log entry is on disk on a node before that node acknowledges it,
//! and openraft (0.9) appends one proposal at a time, waiting for the
//! fsync. Proposed one by one, concurrent writes would queue for one fsync
//! each. So writes go through one task that proposes everything queued
//! meanwhile as a single entry ([`Op::Multi`]: each command applied on its
//! own, with its own dedup and reply), with a few proposals in flight so
//! that the next batch is appended while the previous one replicates.

use crate::command::{MetaCommand, MetaResponse, Op, Reply};
use crate::raft_store::{NodeId, Raft};
use futures::stream::{FuturesUnordered, StreamExt};
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot};

/// Proposals in flight at once (each its own log entry).
const IN_FLIGHT: usize = 4;
/// Commands in one proposal at most.
const MAX_BATCH: usize = 1024;

/// What a proposal came back with.
pub type Outcome =
    Result<MetaResponse, RaftError<NodeId, ClientWriteError<NodeId, openraft::BasicNode>>>;

type Waiter = (MetaCommand, oneshot::Sender<Outcome>);

/// Handle to submit commands; the proposing task ends when it is dropped.
pub struct Proposer {
    tx: mpsc::UnboundedSender<Waiter>,
}

impl Proposer {
    /// Starts the proposing task on `raft`.
    pub fn start(raft: Raft) -> Proposer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, rx));
        Proposer { tx }
    }

    /// Proposes `cmd` (batched with whatever else is waiting) and returns
    /// the state machine's answer once the entry is committed and applied.
    pub async fn propose(&self, cmd: MetaCommand) -> Option<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((cmd, tx)).ok()?;
        rx.await.ok()
    }
}

async fn run(raft: Raft, mut rx: mpsc::UnboundedReceiver<Waiter>) {
    let mut flying = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            // Only while a slot is free: what arrives meanwhile waits in
            // the channel and goes in the next batch.
            w = rx.recv(), if open && flying.len() < IN_FLIGHT => {
                let Some(first) = w else {
                    open = false;
                    continue;
                };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(w) => batch.push(w),
                        Err(_) => break,
                    }
                }
                flying.push(propose(raft.clone(), batch));
            }
            Some(()) = flying.next(), if !flying.is_empty() => {}
            else => break,
        }
    }
}

/// One log entry for `batch`: the command itself if alone, else a
/// [`Op::Multi`] whose replies are handed back one by one.
async fn propose(raft: Raft, mut batch: Vec<Waiter>) {
    if batch.len() == 1 {
        let (cmd, tx) = batch.pop().expect("one command");
        let r = raft.client_write(cmd).await.map(|r| r.data);
        let _ = tx.send(r);
        return;
    }
    let (cmds, txs): (Vec<MetaCommand>, Vec<oneshot::Sender<Outcome>>) = batch.into_iter().unzip();
    let multi = MetaCommand {
        now_ns: cmds.iter().map(|c| c.now_ns).max().unwrap_or_default(),
        session_id: 0,
        request_id: 0,
        op: Op::Multi(cmds),
    };
    match raft.client_write(multi).await {
        Ok(r) => match r.data.0 {
            Ok(Reply::Multi(resps)) if resps.len() == txs.len() => {
                for (tx, resp) in txs.into_iter().zip(resps) {
                    let _ = tx.send(Ok(resp));
                }
            }
            other => {
                // Cannot happen: the state machine answers a Multi with one
                // reply per command. Fail them all rather than guess.
                tracing::error!(reply = ?other, "a batch of writes came back without its replies");
                for tx in txs {
                    let _ = tx.send(Ok(MetaResponse(Err(libc::EIO))));
                }
            }
        },
        Err(e) => {
            for tx in txs {
                let _ = tx.send(Err(e.clone()));
            }
        }
    }
}
