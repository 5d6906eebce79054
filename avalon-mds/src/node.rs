//! One running MDS node: raft handle, state machine, leader-side liveness,
//! and the single place where errors become gRPC statuses.

use crate::command::{Layout, MetaCommand, Op, OsdState, Reply};
use crate::config::Config;
use crate::leases::LeaseTable;
use crate::namespace::State;
use crate::raft_store::{NodeId, Raft, SharedSm};
use crate::read_lease::ReadLease;
use crate::settings::ClusterSettings;
use avalon_proto::pb::RequestHeader;
use openraft::error::{ForwardToLeader, RaftError};
use openraft::{BasicNode, ServerState, TryAsRef};
use std::collections::{BTreeSet, HashMap, HashSet};
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
    /// A new leader refuses a lock request until the session reclaimed.
    #[error("reclaim locks first")]
    ReclaimFirst,
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
            MdsError::ReclaimFirst => avalon_proto::locks::reclaim_first(),
        }
    }
}

/// Leader-side, in-memory heartbeat times.
#[derive(Default)]
pub struct Liveness {
    pub osd_seen: HashMap<u64, Instant>,
    /// Last recovery/scrub report of each OSD (from its heartbeats).
    pub osd_reports: HashMap<u64, avalon_proto::pb::OsdReport>,
    pub client_seen: HashMap<u64, Instant>,
    /// Each session's last reported operation totals (status page, top).
    pub client_totals: HashMap<u64, avalon_proto::pb::OpTotals>,
    /// Since when this node has been leader (None: not leader).
    pub leader_since: Option<Instant>,
    /// Sessions that reported their open files to this leader.
    pub reported: HashSet<u64>,
    /// Each peer's protocol version as last heard (for `avalonctl status`).
    pub versions: HashMap<(PeerKind, u64), avalon_proto::pb::NodeVersion>,
    /// OSDs that said they are stopping, with their process id: heartbeats
    /// of that process still in flight must not mark them up again.
    pub osd_stopping: HashMap<u64, u32>,
}

/// The kind of peer a remembered version belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKind {
    Mds,
    Osd,
    Client,
}

/// What the leader knows about one session's opens of one inode.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenEntry {
    /// Opens seen by this leader minus releases.
    pub opens: u32,
    /// Last Open (or create) by this session.
    pub last_open: Option<Instant>,
    /// Last heartbeat of this session that listed the inode (or the
    /// create of the inode), which keeps it open for the grace period.
    pub reported_at: Option<Instant>,
    /// Opens for writing seen by this leader minus their releases.
    pub writes: u32,
    /// The last heartbeat listed the inode as open for writing.
    pub reported_writer: bool,
    /// The session was told (or answered its open) that the file has
    /// other writers: it writes through uncached until its last close.
    pub shared: bool,
    /// Last AppendWrite of this session: it writes the file, whatever
    /// its counts say (see [`MdsNode::append_shares`]).
    pub appended_at: Option<Instant>,
}

impl OpenEntry {
    /// The session may have the file open for writing.
    fn is_writer(&self, grace: Duration, now: Instant) -> bool {
        let recent = |t: Option<Instant>| t.is_some_and(|t| now.duration_since(t) < grace);
        self.writes > 0
            || (self.reported_writer && recent(self.reported_at))
            || recent(self.appended_at)
    }
}

/// The leader's in-memory open-file table (not replicated: a new leader
/// rebuilds it from client heartbeats).
#[derive(Debug, Default)]
pub struct OpenTable {
    /// (session, ino) -> entry.
    pub entries: HashMap<(u64, u64), OpenEntry>,
    /// ino -> sessions with an entry.
    pub by_ino: HashMap<u64, BTreeSet<u64>>,
    /// Inodes a proposed removal may delete; Opens of them wait.
    pub pending: HashMap<u64, u32>,
    /// Shared-write demands under way per inode. Every open in shared-write
    /// mode waits for all of them, not only for those it sent: a second
    /// open of the same session would otherwise read the size before the
    /// told session committed what it buffered, and append over it.
    pub demanding: HashMap<u64, Vec<u64>>,
}

impl OpenTable {
    fn entry(&mut self, sid: u64, ino: u64) -> &mut OpenEntry {
        self.by_ino.entry(ino).or_default().insert(sid);
        self.entries.entry((sid, ino)).or_default()
    }

    fn remove(&mut self, sid: u64, ino: u64) {
        self.entries.remove(&(sid, ino));
        if let Some(set) = self.by_ino.get_mut(&ino) {
            set.remove(&sid);
            if set.is_empty() {
                self.by_ino.remove(&ino);
            }
        }
    }

    /// The sessions other than `sid` whose entry on `ino` `shares` the
    /// file: whether there is any, and those not told yet, marked told now
    /// and counted as demands under way (see [`MdsNode::told`]).
    fn mark_told(
        &mut self,
        sid: u64,
        ino: u64,
        shares: impl Fn(&OpenEntry) -> bool,
    ) -> (bool, Vec<u64>) {
        let others: Vec<u64> = self
            .by_ino
            .get(&ino)
            .map(|s| s.iter().copied().filter(|s| *s != sid).collect())
            .unwrap_or_default();
        let mut any = false;
        let mut tell = Vec::new();
        for other in others {
            if let Some(e) = self.entries.get_mut(&(other, ino)) {
                if shares(e) {
                    any = true;
                    if !e.shared {
                        e.shared = true;
                        tell.push(other);
                    }
                }
            }
        }
        if !tell.is_empty() {
            self.demanding.entry(ino).or_default().extend(&tell);
        }
        (any, tell)
    }

    /// True if any session may still have `ino` open.
    pub fn is_open(&self, ino: u64, grace: Duration, now: Instant) -> bool {
        self.by_ino.get(&ino).is_some_and(|sids| {
            sids.iter().any(|sid| {
                self.entries.get(&(*sid, ino)).is_some_and(|e| {
                    e.opens > 0 || e.reported_at.is_some_and(|t| now.duration_since(t) < grace)
                })
            })
        })
    }

    /// Number of (session, inode) entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets everything of one session.
    pub fn drop_session(&mut self, sid: u64) {
        let inos: Vec<u64> = self
            .entries
            .keys()
            .filter(|(s, _)| *s == sid)
            .map(|(_, i)| *i)
            .collect();
        for ino in inos {
            self.remove(sid, ino);
        }
    }
}

/// Keeps inodes marked as "a proposed removal may delete them" until drop.
pub struct PendingRemoval<'a> {
    node: &'a MdsNode,
    inos: Vec<u64>,
}

impl Drop for PendingRemoval<'_> {
    fn drop(&mut self) {
        if self.inos.is_empty() {
            return;
        }
        {
            let mut t = self.node.lock_opens();
            for ino in &self.inos {
                if let Some(n) = t.pending.get_mut(ino) {
                    *n -= 1;
                    if *n == 0 {
                        t.pending.remove(ino);
                    }
                }
            }
        }
        self.node.pending_changed.notify_waiters();
    }
}

/// A session that must be told that `ino` is now in shared-write mode:
/// the demand counts as under way until this is dropped (also when the
/// open that sends it is abandoned).
pub struct Told<'a> {
    node: &'a MdsNode,
    /// The session to tell.
    pub sid: u64,
    ino: u64,
}

impl Drop for Told<'_> {
    fn drop(&mut self) {
        self.node.demand_done(self.ino, self.sid);
    }
}

/// Shared context of the services and background tasks of one node.
pub struct MdsNode {
    pub id: NodeId,
    pub addr: String,
    pub cfg: Config,
    pub raft: Raft,
    pub sm: SharedSm,
    pub liveness: Mutex<Liveness>,
    pub opens: Mutex<OpenTable>,
    pub pending_changed: tokio::sync::Notify,
    /// Lets the leader answer reads without a quorum round each.
    pub read_lease: ReadLease,
    /// Which sessions may cache what (metadata leases).
    pub leases: LeaseTable,
    /// Directories delegated to sessions (`delegation.rs`).
    pub delegations: crate::delegation::Delegations,
    /// fcntl and flock locks, in the leader's memory (`locks.rs`).
    pub locks: crate::locks::LeaderLocks,
    /// What a new leader waits for before acknowledging changes.
    pub fresh: crate::fresh_leader::FreshLeader,
    /// The raft log, and making it durable on a majority (fsync).
    pub log_sync: crate::log_sync::LogSync,
    /// Batches concurrent writes into shared log entries (group commit).
    pub proposer: crate::proposer::Proposer,
    /// One proposal of the cluster-wide settings at a time.
    pub settings_init: tokio::sync::Mutex<()>,
    pub shutdown: CancellationToken,
    /// TLS for the connections this node opens (peers, OSDs).
    pub tls: avalon_proto::tls::ClientTls,
    /// Where this node serves metrics and the status page, once bound.
    pub metrics_addr: std::sync::OnceLock<String>,
    /// The MDS peers' feature bits, from their raft answers.
    pub peer_features: crate::raft_net::PeerFeatures,
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
    /// The cluster-wide settings as this node's state has them;
    /// unavailable until the first leader has written them.
    pub fn settings(&self) -> Result<ClusterSettings, MdsError> {
        self.read_local(|s| s.settings.clone())
            .ok_or_else(|| MdsError::Unavailable("cluster settings not written yet".into()))
    }

    /// Layout for new regular files (from the cluster-wide settings;
    /// the leader writes them first if there are none yet).
    pub async fn layout(&self) -> Result<Layout, MdsError> {
        self.ensure_settings().await?;
        let s = self.settings()?;
        Ok(Layout {
            chunk_size: s.chunk_size,
            replicas: s.replicas,
            write_quorum: s.write_quorum,
        })
    }

    /// Leader: writes the cluster-wide settings if the state has none yet
    /// (a new cluster, or one created before they were stored, which
    /// adopts this node's configuration once).
    pub async fn ensure_settings(&self) -> Result<(), MdsError> {
        if self.read_local(|s| s.settings.is_some()) {
            return Ok(());
        }
        let _one = self.settings_init.lock().await;
        if self.read_local(|s| s.settings.is_some()) {
            return Ok(());
        }
        self.check_leader()?;
        let settings = ClusterSettings::bootstrap(&self.cfg);
        let cmd = MetaCommand {
            now_ns: now_ns(),
            session_id: 0,
            request_id: 0,
            op: Op::InitSettings {
                settings: settings.clone(),
            },
        };
        match self.raft.client_write(cmd).await {
            Ok(r) => match r.data.0 {
                Ok(Reply::Settings(s)) => {
                    tracing::info!(settings = ?s, "cluster-wide settings stored");
                    Ok(())
                }
                Ok(other) => Err(MdsError::Internal(format!("settings replied {other:?}"))),
                Err(e) => Err(MdsError::Errno(e)),
            },
            Err(e) => Err(self.raft_err(e)),
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

    /// Leader: returns once every operation applied so far is on disk on
    /// a majority of voters (client fsync/fsyncdir). Applied means
    /// committed, and a node acknowledges an entry only once it is on its
    /// disk: that holds already, so this only checks leadership (a former
    /// leader cannot vouch for what the new one committed).
    pub async fn sync_log(&self) -> Result<(), MdsError> {
        self.check_leader()
    }

    /// Current voters.
    /// True when every other voter answered with `feature` (a new log
    /// entry kind is proposed only once every member can apply it).
    pub fn voters_have(&self, feature: u64) -> bool {
        let f = self.peer_features.lock().unwrap_or_else(|e| e.into_inner());
        self.voter_ids()
            .into_iter()
            .filter(|&id| id != self.id)
            .all(|id| f.get(&id).is_some_and(|b| b & feature != 0))
    }

    /// Whether write grants may be recorded: this node and every voter
    /// have `FEATURE_WRITE_GRANTS` (an older voter could not apply them).
    pub fn grants_on(&self) -> bool {
        let f = avalon_proto::version::FEATURE_WRITE_GRANTS;
        avalon_proto::version::features() & f != 0 && self.voters_have(f)
    }

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
        // A follower answers "not leader" at once, not after a wait.
        self.check_leader()?;
        let (session_id, request_id) = hdr.map(|h| (h.session_id, h.request_id)).unwrap_or((0, 0));
        self.wait_fresh_leader(session_id).await;
        // Nothing is written under settings that are not the cluster's.
        self.ensure_settings().await?;
        let cmd = MetaCommand {
            now_ns: now_ns(),
            session_id,
            request_id,
            op,
        };
        let _commit = crate::metrics::commit_timer();
        match self.proposer.propose(cmd).await {
            Some(Ok(r)) => r.0.map_err(MdsError::Errno),
            Some(Err(e)) => Err(self.raft_err(e)),
            None => Err(MdsError::Unavailable("MDS shutting down".into())),
        }
    }

    /// A new leader does not know which clients cache what nor what its
    /// predecessor delegated: a change by session `from` (0: none) waits
    /// until every lease a predecessor may have granted to another
    /// session has lapsed (`fresh_leader.rs`). Returns at once on a
    /// follower (the write that follows fails there).
    pub async fn wait_fresh_leader(&self, from: u64) {
        if !self.is_leader() {
            return;
        }
        let term = self.raft.metrics().borrow().current_term;
        let until = self.fresh.until(term);
        if Instant::now() >= until {
            return;
        }
        if let Some(sessions) = self.sessions_at_term_start(term).await {
            if crate::fresh_leader::FreshLeader::alone(&sessions, from) {
                return;
            }
        }
        let now = Instant::now();
        if now < until {
            tokio::time::sleep(until - now).await;
        }
    }

    /// The sessions in the state once this term's first entry is applied
    /// (so every session a predecessor registered is among them); None if
    /// this node is no longer the leader of `term`.
    async fn sessions_at_term_start(&self, term: u64) -> Option<std::sync::Arc<Vec<u64>>> {
        if let Some(s) = self.fresh.sessions(term) {
            return Some(s);
        }
        self.raft.ensure_linearizable().await.ok()?;
        let m = self.raft.metrics().borrow().clone();
        if m.current_term != term || m.current_leader != Some(self.id) {
            return None;
        }
        let sessions = self.read_local(|s| s.sessions.keys().copied().collect());
        Some(self.fresh.set_sessions(term, sessions))
    }

    /// True if this node must refuse to vote for another candidate: as
    /// leader, its last confirmed quorum round let it grant client leases,
    /// and its followers refuse the same for openraft's leader lease after
    /// that round (see `fresh_leader.rs`). Also after it stepped down (a
    /// higher term in a reply deposes a leader without any vote).
    pub fn holds_leader_lease(&self) -> bool {
        self.read_lease
            .last_confirmed()
            .is_some_and(|t| t.elapsed() <= Duration::from_millis(self.cfg.election_max_ms))
    }

    /// A linearizable read of the state (leader only): local while the
    /// read lease holds, one quorum round to renew it otherwise.
    pub async fn read<T>(&self, f: impl FnOnce(&State) -> T) -> Result<T, MdsError> {
        if !self.is_leader() {
            self.read_lease.revoke();
            return Err(MdsError::NotLeader(self.leader_addr()));
        }
        self.read_lease
            .ensure(|| async {
                self.raft
                    .ensure_linearizable()
                    .await
                    .map(|_| ())
                    .map_err(|e| self.raft_err(e))
            })
            .await?;
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

    pub fn lock_opens(&self) -> std::sync::MutexGuard<'_, OpenTable> {
        self.opens.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn grace(&self) -> Duration {
        Duration::from_millis(self.cfg.orphan_grace_ms)
    }

    /// True once this node has led long enough for every live client to
    /// have reported its open files.
    fn open_table_complete(&self) -> bool {
        self.lock_liveness()
            .leader_since
            .is_some_and(|t| t.elapsed() >= self.grace())
    }

    /// True once every session has reported its open files to this leader
    /// (or it has led for the grace period, after which a session that
    /// did not report is taken as gone).
    fn opens_reported(&self) -> bool {
        if self.open_table_complete() {
            return true;
        }
        let sessions: Vec<u64> = self.read_local(|s| s.sessions.keys().copied().collect());
        let l = self.lock_liveness();
        l.leader_since.is_some() && sessions.iter().all(|s| l.reported.contains(s))
    }

    /// Waits (at most the grace period) until [`Self::opens_reported`].
    pub async fn wait_opens_reported(&self) {
        let give_up = Instant::now() + self.grace();
        while !self.opens_reported() && self.is_leader() && Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Records an open of `ino` by session `sid`, then waits until no
    /// proposed removal may delete it (so the read that follows sees it
    /// either deleted or protected).
    pub async fn open_begin(&self, sid: u64, ino: u64) {
        {
            let mut t = self.lock_opens();
            let e = t.entry(sid, ino);
            e.opens += 1;
            e.last_open = Some(Instant::now());
        }
        self.wait_opens(|t| !t.pending.contains_key(&ino)).await;
    }

    /// Waits until `done` holds of the open-file table (re-checked each
    /// time removals or demands under way change).
    async fn wait_opens(&self, done: impl Fn(&OpenTable) -> bool) {
        loop {
            let notified = self.pending_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(&self.lock_opens()) {
                return;
            }
            notified.await;
        }
    }

    /// Counts an open of `ino` by `sid` (after [`MdsNode::open_begin`]),
    /// for writing if `write`. Returns whether the file is now in
    /// shared-write mode, and which other sessions in it have not been
    /// told so yet (they are marked told). The mode starts when one
    /// session writes the file while another has it open at all: two
    /// writers, or a writer and a reader (who must see each write, not
    /// what the writer buffered). Readers count by the opens this leader
    /// saw (a new leader learns writers only, from heartbeats).
    pub fn open_shared(&self, sid: u64, ino: u64, write: bool) -> (bool, Vec<Told<'_>>) {
        let now = Instant::now();
        let grace = self.grace();
        let mut t = self.lock_opens();
        if write {
            t.entry(sid, ino).writes += 1;
        }
        let (shared, tell) = t.mark_told(sid, ino, |e| {
            e.is_writer(grace, now) || (write && e.opens > 0)
        });
        // The reply tells `sid` its mode. Not shared: the session may have
        // left shared-write mode at its own last close while this table
        // still marks it told (its release is not here yet), so the next
        // session to share the file must tell it again.
        t.entry(sid, ino).shared = shared;
        (shared, self.told(ino, tell))
    }

    /// The demands to send for `tell`, counted by [`OpenTable::mark_told`].
    fn told(&self, ino: u64, tell: Vec<u64>) -> Vec<Told<'_>> {
        tell.into_iter()
            .map(|sid| Told {
                node: self,
                sid,
                ino,
            })
            .collect()
    }

    /// Before an AppendWrite of `sid` reserves a range of `ino`: the other
    /// sessions that may write the file and were not told it is shared
    /// (they append at the end as they know it, and commit later), marked
    /// told now; the reservation waits for their answers. The appender
    /// counts as a writer for the grace period from now on, so that an
    /// open decided while its reservation is on its way finds the file
    /// shared, whatever the appender's open counts say.
    pub fn append_shares(&self, sid: u64, ino: u64) -> Vec<Told<'_>> {
        let now = Instant::now();
        let grace = self.grace();
        let mut t = self.lock_opens();
        t.entry(sid, ino).appended_at = Some(now);
        let (_, tell) = t.mark_told(sid, ino, |e| e.is_writer(grace, now));
        self.told(ino, tell)
    }

    /// One shared-write demand for `ino` to `sid` (counted by
    /// [`MdsNode::open_shared`]) is answered or given up.
    fn demand_done(&self, ino: u64, sid: u64) {
        {
            let mut t = self.lock_opens();
            if let Some(told) = t.demanding.get_mut(&ino) {
                if let Some(i) = told.iter().position(|s| *s == sid) {
                    told.swap_remove(i);
                }
                if told.is_empty() {
                    t.demanding.remove(&ino);
                }
            }
        }
        self.pending_changed.notify_waiters();
    }

    /// Waits until no shared-write demand for `ino` is under way.
    pub async fn wait_demands(&self, ino: u64) {
        self.wait_opens(|t| !t.demanding.contains_key(&ino)).await;
    }

    /// Waits until no shared-write demand for `ino` to a session other
    /// than `sid` is under way (one to `sid` may wait for this very
    /// request of it).
    pub async fn wait_demands_to_others(&self, ino: u64, sid: u64) {
        self.wait_opens(|t| {
            t.demanding
                .get(&ino)
                .is_none_or(|told| told.iter().all(|s| *s == sid))
        })
        .await;
    }

    /// Drops one open of `ino` by `sid` (`write`: an open for writing);
    /// true if that was the last open of the file by anyone.
    pub fn open_end(&self, sid: u64, ino: u64, write: bool) -> bool {
        let mut t = self.lock_opens();
        let now = Instant::now();
        let grace = self.grace();
        let Some(e) = t.entries.get_mut(&(sid, ino)) else {
            return !t.is_open(ino, grace, now);
        };
        if write {
            e.writes = e.writes.saturating_sub(1);
            if e.writes == 0 {
                // Its next write open is told afresh.
                e.shared = false;
                e.reported_writer = false;
            }
        }
        e.opens = e.opens.saturating_sub(1);
        if e.opens == 0 {
            // A reader's next open is told afresh too.
            e.shared = false;
        }
        if e.opens == 0 && e.reported_at.is_none_or(|r| now.duration_since(r) >= grace) {
            t.remove(sid, ino);
        }
        !t.is_open(ino, grace, now)
    }

    /// A file this session just created counts as open for the grace
    /// period (the client's heartbeats keep it open after that).
    pub fn note_created(&self, sid: u64, ino: u64) {
        if sid == 0 {
            return;
        }
        let now = Instant::now();
        let mut t = self.lock_opens();
        let e = t.entry(sid, ino);
        e.last_open = Some(now);
        e.reported_at = Some(now);
    }

    /// Applies a client heartbeat's list of open inodes (`write_inos`:
    /// those open for writing).
    pub fn heartbeat_opens(&self, sid: u64, open_inos: &[u64], write_inos: &[u64]) {
        let now = Instant::now();
        let grace = self.grace();
        let reported: BTreeSet<u64> = open_inos.iter().copied().collect();
        let writing: BTreeSet<u64> = write_inos.iter().copied().collect();
        let mut t = self.lock_opens();
        for ino in &reported {
            let e = t.entry(sid, *ino);
            e.reported_at = Some(now);
            e.reported_writer = writing.contains(ino);
        }
        let stale: Vec<u64> = t
            .entries
            .iter()
            .filter(|((s, ino), e)| {
                *s == sid
                    && !reported.contains(ino)
                    && (e.opens == 0 || e.last_open.is_none_or(|o| now.duration_since(o) >= grace))
                    && e.reported_at.is_none_or(|r| now.duration_since(r) >= grace)
            })
            .map(|((_, ino), _)| *ino)
            .collect();
        for ino in stale {
            t.remove(sid, ino);
        }
        drop(t);
        // Only now: an open that sees the session reported sees its opens.
        self.lock_liveness().reported.insert(sid);
    }

    /// The guard for a removal of `target` (see [`Op::Unlink`]): allows
    /// deleting it only if nobody has it open, and marks it pending so
    /// that concurrent Opens wait for the removal.
    pub fn removal_guard(&self, target: Option<u64>) -> (Option<u64>, PendingRemoval<'_>) {
        let mut inos = Vec::new();
        let mut guard = Some(0);
        if let Some(ino) = target {
            if self.open_table_complete() {
                let mut t = self.lock_opens();
                if !t.is_open(ino, self.grace(), Instant::now()) {
                    *t.pending.entry(ino).or_insert(0) += 1;
                    inos.push(ino);
                    guard = Some(ino);
                }
            }
        }
        (guard, PendingRemoval { node: self, inos })
    }

    /// Proposes deleting those of `inos` (orphans) that nobody has open.
    pub async fn reclaim_orphans(&self, inos: Vec<u64>) -> Result<usize, MdsError> {
        if !self.open_table_complete() {
            return Ok(0);
        }
        let now = Instant::now();
        let grace = self.grace();
        let free: Vec<u64> = {
            let mut t = self.lock_opens();
            let free: Vec<u64> = inos
                .into_iter()
                .filter(|i| !t.is_open(*i, grace, now))
                .collect();
            for i in &free {
                *t.pending.entry(*i).or_insert(0) += 1;
            }
            free
        };
        let _pending = PendingRemoval {
            node: self,
            inos: free.clone(),
        };
        if free.is_empty() {
            return Ok(0);
        }
        let n = free.len();
        self.write(None, Op::ReclaimOrphans { inos: free }).await?;
        tracing::debug!(inodes = n, "reclaimed orphans");
        Ok(n)
    }

    /// Releases one open; reclaims the inode if it was the last open of an
    /// orphan.
    pub async fn release(&self, sid: u64, ino: u64, write: bool) -> Result<(), MdsError> {
        if self.open_end(sid, ino, write) && self.read_local(|s| s.orphans.contains(&ino)) {
            self.reclaim_orphans(vec![ino]).await?;
        }
        Ok(())
    }

    pub fn osd_seen_now(&self, id: u64) {
        self.lock_liveness().osd_seen.insert(id, Instant::now());
    }

    /// Records that OSD `id` (process `pid`) announced its shutdown.
    pub fn osd_stopping(&self, id: u64, pid: u32) {
        let mut l = self.lock_liveness();
        l.osd_seen.insert(id, Instant::now());
        l.osd_stopping.insert(id, pid);
    }

    /// Whether this process of OSD `id` announced its shutdown.
    pub fn osd_is_stopping(&self, id: u64, pid: u32) -> bool {
        self.lock_liveness().osd_stopping.get(&id) == Some(&pid)
    }

    /// Forgets a shutdown announcement: the OSD registered again.
    pub fn osd_started(&self, id: u64) {
        let mut l = self.lock_liveness();
        l.osd_seen.insert(id, Instant::now());
        l.osd_stopping.remove(&id);
    }

    /// Records an OSD's recovery/scrub report (leader, in memory).
    pub fn osd_report(&self, id: u64, report: Option<avalon_proto::pb::OsdReport>) {
        if let Some(r) = report {
            self.lock_liveness().osd_reports.insert(id, r);
        }
    }

    /// OSDs whose last report to this leader says their disk is full.
    pub fn osds_reporting_full(&self) -> Vec<u64> {
        let full = avalon_proto::pb::DiskFill::Full as i32;
        self.lock_liveness()
            .osd_reports
            .iter()
            .filter(|(_, r)| r.disk_fill == full)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The last report of an OSD, if this leader got one.
    pub fn osd_last_report(&self, id: u64) -> Option<avalon_proto::pb::OsdReport> {
        self.lock_liveness().osd_reports.get(&id).cloned()
    }

    /// Remembers the version a peer sent (in memory, for status).
    pub fn version_seen(&self, kind: PeerKind, id: u64, v: avalon_proto::pb::NodeVersion) {
        self.lock_liveness().versions.insert((kind, id), v);
    }

    /// A peer's last heard version, if this node heard one.
    pub fn peer_version(&self, kind: PeerKind, id: u64) -> Option<avalon_proto::pb::NodeVersion> {
        self.lock_liveness().versions.get(&(kind, id)).cloned()
    }

    pub fn client_seen_now(&self, id: u64) {
        self.lock_liveness().client_seen.insert(id, Instant::now());
    }

    /// Keeps a session's reported operation totals.
    pub fn client_totals_report(&self, id: u64, totals: Option<avalon_proto::pb::OpTotals>) {
        if let Some(t) = totals {
            self.lock_liveness().client_totals.insert(id, t);
        }
    }

    /// Each OSD's operation totals from its last report to this leader.
    pub fn osd_totals(&self) -> Vec<(u64, avalon_proto::pb::OpTotals)> {
        self.lock_liveness()
            .osd_reports
            .iter()
            .filter_map(|(id, r)| r.totals.map(|t| (*id, t)))
            .collect()
    }

    /// A session's last reported operation totals.
    pub fn client_totals(&self, id: u64) -> Option<avalon_proto::pb::OpTotals> {
        self.lock_liveness().client_totals.get(&id).copied()
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

    /// Expires sessions that stopped heartbeating (leader only).
    async fn expire_sessions(&self) {
        let timeout = Duration::from_millis(self.cfg.session_timeout_ms.max(1));
        let sessions: Vec<u64> = self.read_local(|s| s.sessions.keys().copied().collect());
        let now = Instant::now();
        // A session holding write grants is recovered only once its lease
        // ran out whatever the timeout (`grants.rs`, fencing).
        let fenced = self.grant_fence();
        let expired: Vec<(u64, Duration)> = {
            let mut l = self.lock_liveness();
            sessions
                .iter()
                .map(|id| (*id, l.client_seen.entry(*id).or_insert(now).elapsed()))
                .filter(|(_, silent)| *silent >= timeout)
                .collect()
        };
        for (id, silent) in expired {
            tracing::info!(session = id, "client session timed out; expiring");
            let done = if crate::grants::holds(self, id) {
                if silent < fenced || !crate::grants::recover_session(self, id).await {
                    continue;
                }
                Ok(crate::command::Reply::None)
            } else {
                self.write(None, Op::ExpireSession { session_id: id }).await
            };
            match done {
                Ok(_) | Err(MdsError::Errno(_)) => {
                    self.leases.remove_session(id);
                    self.delegations.remove_session(id);
                    let mut l = self.lock_liveness();
                    l.client_seen.remove(&id);
                    l.client_totals.remove(&id);
                    self.lock_opens().drop_session(id);
                }
                Err(e) => tracing::warn!(session = id, error = %e, "could not expire session"),
            }
        }
        // Entries of sessions that no longer exist.
        let gone: Vec<u64> = {
            let t = self.lock_opens();
            let mut sids: Vec<u64> = t.entries.keys().map(|(s, _)| *s).collect();
            sids.sort_unstable();
            sids.dedup();
            sids
        };
        let gone: Vec<u64> = self.read_local(|s| {
            gone.into_iter()
                .filter(|id| !s.sessions.contains_key(id))
                .collect()
        });
        if !gone.is_empty() {
            let mut t = self.lock_opens();
            for id in gone {
                t.drop_session(id);
            }
        }
        // Locks of sessions that expired or were revoked: only the few
        // sessions the lock table knows are looked up, not every session.
        let known = self.locks.sessions();
        if !known.is_empty() {
            let gone: HashSet<u64> = self.read_local(|s| {
                known
                    .into_iter()
                    .filter(|id| !s.sessions.contains_key(id))
                    .collect()
            });
            if !gone.is_empty() {
                self.locks.drop_sessions(&gone);
            }
        }
    }

    /// How long a session must have been silent (or its grant orphaned)
    /// before the leader reads the OSDs for its grants: any lease it was
    /// granted has run out by then.
    pub fn grant_fence(&self) -> Duration {
        Duration::from_millis(self.cfg.lease_ms) + crate::fresh_leader::CLOCK_MARGIN
    }

    /// Reclaims orphans that nobody has open (leader only).
    async fn sweep_orphans(&self) {
        let orphans: Vec<u64> = self.read_local(|s| s.orphans.iter().take(4096).copied().collect());
        if orphans.is_empty() {
            return;
        }
        if let Err(e) = self.reclaim_orphans(orphans).await {
            tracing::debug!(error = %e, "orphan sweep incomplete");
        }
    }

    /// Leader background task: marks OSDs down after missed heartbeats,
    /// expires client sessions and reclaims orphans nobody has open.
    pub async fn liveness_loop(&self) {
        let down_after = Duration::from_millis(self.cfg.osd_down_after_ms.max(1));
        // Often enough that a probe (`osd_probe::PROBE_AFTER`) follows a
        // missed heartbeat closely.
        let tick = (down_after / 4)
            .min(Duration::from_millis(self.cfg.orphan_grace_ms.max(1)) / 4)
            .clamp(Duration::from_millis(50), Duration::from_millis(250));
        let mut was_leader = false;
        // Grants of sessions that are gone, and since when this leader
        // knows it (`grants::recover_orphans`).
        let mut orphan_grants = HashMap::new();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let leader = self.is_leader();
            if !leader {
                orphan_grants.clear();
                if was_leader {
                    let mut l = self.lock_liveness();
                    l.leader_since = None;
                    l.reported.clear();
                    drop(l);
                    self.leases.clear();
                    self.delegations.clear();
                    self.locks.clear();
                    let mut t = self.lock_opens();
                    t.entries.clear();
                    t.by_ino.clear();
                }
                was_leader = false;
                continue;
            }
            if !was_leader {
                let sessions: Vec<u64> = self.read_local(|s| s.sessions.keys().copied().collect());
                let now = Instant::now();
                let mut l = self.lock_liveness();
                l.leader_since = Some(now);
                for id in sessions {
                    l.client_seen.insert(id, now);
                }
            }
            self.expire_sessions().await;
            crate::grants::recover_orphans(self, &mut orphan_grants, self.grant_fence()).await;
            self.sweep_orphans().await;
            let osds: Vec<(u64, OsdState)> =
                self.read_local(|s| s.osds.values().map(|o| (o.id, o.state)).collect());
            let now = Instant::now();
            // Down by the heartbeat rule (with why), and silent for a probe.
            let mut stale: Vec<(u64, &str)> = Vec::new();
            let mut silent = Vec::new();
            {
                let mut l = self.lock_liveness();
                if !was_leader {
                    // New leader: give every OSD a full period to report.
                    for (id, _) in &osds {
                        l.osd_seen.insert(*id, now);
                    }
                }
                for (id, st) in &osds {
                    if *st != OsdState::Up {
                        continue;
                    }
                    let quiet = l.osd_seen.entry(*id).or_insert(now).elapsed();
                    if quiet >= down_after {
                        stale.push((*id, "OSD missed heartbeats; marking down"));
                    } else if quiet >= crate::osd_probe::PROBE_AFTER {
                        silent.push(*id);
                    }
                }
            }
            if !silent.is_empty() {
                let addrs: Vec<(u64, String)> = self.read_local(|s| {
                    silent
                        .iter()
                        .filter_map(|id| s.osds.get(id).map(|o| (*id, o.addr.clone())))
                        .collect()
                });
                for id in crate::osd_probe::refusing(addrs, self.tls.source()).await {
                    stale.push((
                        id,
                        "OSD is silent and its port refuses connections; marking down",
                    ));
                }
            }
            let out_after = Duration::from_millis(self.cfg.osd_out_after_ms);
            let gone: Vec<u64> = if self.cfg.osd_out_after_ms == 0 {
                Vec::new()
            } else {
                let mut l = self.lock_liveness();
                osds.iter()
                    .filter(|(id, st)| {
                        *st == OsdState::Down
                            && l.osd_seen.entry(*id).or_insert(now).elapsed() >= out_after
                    })
                    .map(|(id, _)| *id)
                    .collect()
            };
            for id in gone {
                tracing::warn!(osd = id, "OSD down for too long; marking out");
                if let Err(e) = self
                    .write(
                        None,
                        Op::SetOsdState {
                            osd_id: id,
                            state: OsdState::Out,
                        },
                    )
                    .await
                {
                    tracing::warn!(osd = id, error = %e, "could not mark OSD out");
                }
            }
            was_leader = true;
            for (id, why) in stale {
                tracing::warn!(osd = id, "{why}");
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
