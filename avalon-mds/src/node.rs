//! One running MDS node: raft handle, state machine, leader-side liveness,
//! and the single place where errors become gRPC statuses.

use crate::command::{Layout, MetaCommand, Op, OsdState, Reply};
use crate::config::Config;
use crate::namespace::State;
use crate::raft_store::{NodeId, Raft, SharedSm};
use avalon_proto::pb::RequestHeader;
use openraft::error::{ForwardToLeader, RaftError};
use openraft::{BasicNode, ServerState, TryAsRef};
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// Errors of the MDS services; converted to a `tonic::Status` only in
/// `From<MdsError> for Status`.
#[derive(Debug, thiserror::Error)]
pub enum MdsError {
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Errno(i32),
    #[error("not the metadata leader")]
    NotLeader(Option<String>),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<i32> for MdsError {
    fn from(e: i32) -> Self {
        MdsError::Errno(e)
    }
}

impl From<MdsError> for Status {
    fn from(e: MdsError) -> Status {
        match e {
            MdsError::Errno(n) => avalon_proto::errno::status(n, e.to_string()),
            MdsError::NotLeader(addr) => avalon_proto::errno::not_leader(addr.as_deref()),
            MdsError::Unavailable(m) => Status::unavailable(m),
            MdsError::Invalid(m) => Status::invalid_argument(m),
            MdsError::NotFound(m) => Status::not_found(m),
            MdsError::Internal(m) => Status::internal(m),
        }
    }
}

/// Leader-side, in-memory heartbeat times.
#[derive(Default)]
pub struct Liveness {
    pub osd_seen: HashMap<u64, Instant>,
    pub client_seen: HashMap<u64, Instant>,
}

/// Shared context of the services and background tasks of one node.
pub struct MdsNode {
    pub id: NodeId,
    pub addr: String,
    pub cfg: Config,
    pub raft: Raft,
    pub sm: SharedSm,
    pub liveness: Mutex<Liveness>,
    pub shutdown: CancellationToken,
}

/// Wall clock in nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The role name used by `Status`.
pub fn role_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl MdsNode {
    /// Layout for new regular files.
    pub fn layout(&self) -> Layout {
        Layout {
            chunk_size: self.cfg.chunk_size,
            replicas: self.cfg.replicas,
            write_quorum: self.cfg.write_quorum,
        }
    }

    /// The leader's address as this node knows it.
    pub fn leader_addr(&self) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
    }

    /// True if this node currently believes it is the leader.
    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    /// Fails with a not-leader answer unless this node is the leader.
    pub fn check_leader(&self) -> Result<(), MdsError> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(MdsError::NotLeader(self.leader_addr()))
        }
    }

    /// Current voters.
    pub fn voter_ids(&self) -> BTreeSet<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Maps an openraft API error.
    pub fn raft_err<E>(&self, e: RaftError<NodeId, E>) -> MdsError
    where
        E: TryAsRef<ForwardToLeader<NodeId, BasicNode>> + std::fmt::Display + std::fmt::Debug,
    {
        if let Some(f) = e.forward_to_leader() {
            let addr = f.leader_node.as_ref().map(|n| n.addr.clone());
            return MdsError::NotLeader(addr.or_else(|| self.leader_addr()));
        }
        match e {
            RaftError::Fatal(f) => MdsError::Unavailable(format!("raft stopped: {f}")),
            RaftError::APIError(a) => MdsError::Unavailable(a.to_string()),
        }
    }

    /// Replicates `op` and returns the state machine's answer.
    pub async fn write(&self, hdr: Option<&RequestHeader>, op: Op) -> Result<Reply, MdsError> {
        let (session_id, request_id) = hdr.map(|h| (h.session_id, h.request_id)).unwrap_or((0, 0));
        let cmd = MetaCommand {
            now_ns: now_ns(),
            session_id,
            request_id,
            op,
        };
        match self.raft.client_write(cmd).await {
            Ok(r) => r.data.0.map_err(MdsError::Errno),
            Err(e) => Err(self.raft_err(e)),
        }
    }

    /// A linearizable read of the state (leader only).
    pub async fn read<T>(&self, f: impl FnOnce(&State) -> T) -> Result<T, MdsError> {
        self.raft
            .ensure_linearizable()
            .await
            .map_err(|e| self.raft_err(e))?;
        Ok(self.read_local(f))
    }

    /// Reads this node's state without any consistency check.
    pub fn read_local<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        let sm = self.sm.read().unwrap_or_else(|e| e.into_inner());
        f(&sm.state)
    }

    fn lock_liveness(&self) -> std::sync::MutexGuard<'_, Liveness> {
        self.liveness.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn osd_seen_now(&self, id: u64) {
        self.lock_liveness().osd_seen.insert(id, Instant::now());
    }

    pub fn client_seen_now(&self, id: u64) {
        self.lock_liveness().client_seen.insert(id, Instant::now());
    }

    pub fn osd_last_seen_ms(&self, id: u64) -> u64 {
        self.lock_liveness()
            .osd_seen
            .get(&id)
            .map(|t| t.elapsed().as_millis() as u64)
            .unwrap_or(0)
    }

    pub fn client_last_seen_ms(&self, id: u64) -> u64 {
        self.lock_liveness()
            .client_seen
            .get(&id)
            .map(|t| t.elapsed().as_millis() as u64)
            .unwrap_or(0)
    }

    /// Leader background task: marks OSDs down after missed heartbeats.
    pub async fn liveness_loop(&self) {
        let down_after = Duration::from_millis(self.cfg.osd_down_after_ms.max(1));
        let tick = (down_after / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut was_leader = false;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let leader = self.is_leader();
            if !leader {
                was_leader = false;
                continue;
            }
            let osds: Vec<(u64, OsdState)> =
                self.read_local(|s| s.osds.values().map(|o| (o.id, o.state)).collect());
            let now = Instant::now();
            let stale: Vec<u64> = {
                let mut l = self.lock_liveness();
                if !was_leader {
                    // New leader: give every OSD a full period to report.
                    for (id, _) in &osds {
                        l.osd_seen.insert(*id, now);
                    }
                }
                osds.iter()
                    .filter(|(id, st)| {
                        *st == OsdState::Up
                            && l.osd_seen.entry(*id).or_insert(now).elapsed() >= down_after
                    })
                    .map(|(id, _)| *id)
                    .collect()
            };
            was_leader = true;
            for id in stale {
                tracing::warn!(osd = id, "OSD missed heartbeats; marking down");
                if let Err(e) = self
                    .write(
                        None,
                        Op::SetOsdState {
                            osd_id: id,
                            state: OsdState::Down,
                        },
                    )
                    .await
                {
                    tracing::warn!(osd = id, error = %e, "could not mark OSD down");
                }
            }
        }
    }
}
