//! fsync/fsyncdir for metadata. An operation is acknowledged once a
//! majority of MDS nodes holds it in memory; this waits until everything
//! acknowledged so far is on disk on a majority too.

use crate::node::MdsError;
use crate::raft_store::{LogDurability, NodeId};
use avalon_proto::pb::raft_client::RaftClient;
use avalon_proto::pb::FlushLogRequest;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::Channel;

/// How long a sync waits for a majority before it fails (EIO at fsync).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// This node's log durability plus clients to the peers' `FlushLog`.
pub struct LogSync {
    log: LogDurability,
    peers: Mutex<HashMap<String, RaftClient<Channel>>>,
}

impl LogSync {
    /// Syncs `log` here and asks peers to sync theirs.
    pub fn new(log: LogDurability) -> Self {
        LogSync {
            log,
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// This node's raft log's durability.
    pub fn log(&self) -> &LogDurability {
        &self.log
    }

    fn peer(&self, addr: &str) -> Result<RaftClient<Channel>, String> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = peers.get(addr) {
            return Ok(c.clone());
        }
        let ch = avalon_proto::mds_conn::channel(addr, Duration::from_secs(1))
            .map_err(|e| e.message().to_string())?;
        let c = RaftClient::new(ch);
        peers.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Returns once entries up to `upto` are on disk on a majority of
    /// `voters` (id, address), `me` included when it is one of them.
    pub async fn sync_majority(
        &self,
        me: NodeId,
        upto: u64,
        voters: &[(NodeId, String)],
    ) -> Result<(), MdsError> {
        let need = voters.len() / 2 + 1;
        let mut waits: FuturesUnordered<BoxFuture<'_, Result<(), String>>> =
            FuturesUnordered::new();
        for (id, addr) in voters {
            if *id == me {
                waits.push(Box::pin(async move {
                    if self.log.flush_upto(upto, SYNC_TIMEOUT).await {
                        Ok(())
                    } else {
                        Err(format!("mds{me}: log not on disk within {SYNC_TIMEOUT:?}"))
                    }
                }));
                continue;
            }
            let (id, addr) = (*id, addr.clone());
            waits.push(Box::pin(async move {
                let mut c = self.peer(&addr)?;
                match tokio::time::timeout(SYNC_TIMEOUT, c.flush_log(FlushLogRequest { upto }))
                    .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(s)) => Err(format!("mds{id}: {}", s.message())),
                    Err(_) => Err(format!("mds{id}: no answer within {SYNC_TIMEOUT:?}")),
                }
            }));
        }
        let (mut ok, mut failed) = (0, Vec::new());
        while let Some(r) = waits.next().await {
            match r {
                Ok(()) => {
                    ok += 1;
                    if ok >= need {
                        return Ok(());
                    }
                }
                Err(e) => failed.push(e),
            }
        }
        Err(MdsError::Unavailable(format!(
            "metadata on disk on {ok} of {} MDS nodes, {need} needed ({})",
            voters.len(),
            failed.join("; ")
        )))
    }
}
