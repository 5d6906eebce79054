//! The MDS's Prometheus metrics (issue 22): every metric it exports is
//! defined here; the op handlers call these with one line each. Handles are
//! registered once, after the recorder is installed ([`init`]); until then
//! (or with metrics off) every hook is a no-op.

use crate::node::MdsNode;
use avalon_proto::op_kinds;
use avalon_proto::op_metrics::{OpHistograms, OpTimer};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

op_kinds! {
    /// The `Meta` RPCs, as `op` label values.
    Rpc {
        Lookup = "lookup", GetAttr = "getattr", SetAttr = "setattr", Mknod = "mknod",
        Mkdir = "mkdir", Symlink = "symlink", Unlink = "unlink", Rmdir = "rmdir",
        Readlink = "readlink", Link = "link", Rename = "rename", ReadDir = "readdir",
        StatFs = "statfs", SetXattr = "setxattr", GetXattr = "getxattr",
        ListXattr = "listxattr", RemoveXattr = "removexattr", CommitWrite = "commit_write",
        AppendWrite = "append_write", Open = "open", Release = "release",
        SyncMeta = "sync_meta", Delegate = "delegate", Apply = "apply",
        CheckInodes = "check_inodes", SetOsdState = "set_osd_state",
        GetClusterMap = "get_cluster_map", RegisterOsd = "register_osd",
        OsdHeartbeat = "osd_heartbeat", RegisterClient = "register_client",
        ClientHeartbeat = "client_heartbeat", Session = "session", AckRecall = "ack_recall",
        GetLock = "getlk", SetLock = "setlk", ReleaseLocks = "release_locks", ReclaimLocks = "reclaim_locks",
        Status = "status", GetSettings = "get_settings", SetReplicas = "set_replicas",
    }
}

op_kinds! {
    /// Changes a client made under a delegation and sent in an `Apply`.
    Delegated {
        Create = "create", SetAttr = "setattr", Unlink = "unlink", Rmdir = "rmdir",
        Rename = "rename", CommitWrite = "commit_write",
    }
}

struct Metrics {
    ops: OpHistograms,
    delegated: Vec<Counter>,
    commit: Histogram,
    apply: Histogram,
    snapshot: Histogram,
    recalls: Counter,
    demands: Counter,
    revokes: Counter,
    leader_changes: Counter,
    term: Gauge,
    is_leader: Gauge,
    last_log_index: Gauge,
    applied_index: Gauge,
    log_entries: Gauge,
    sessions: Gauge,
    delegations: Gauge,
    leases: Gauge,
    inodes: Gauge,
    directories: Gauge,
    osds: Gauge,
}

static M: OnceLock<Metrics> = OnceLock::new();

/// Registers the MDS's metrics (after `metrics_http::install`).
pub fn init() {
    M.get_or_init(|| Metrics {
        ops: OpHistograms::register("avalon_mds_op_duration_seconds", "op", Rpc::NAMES),
        delegated: Delegated::NAMES
            .iter()
            .map(|n| counter!("avalon_mds_delegated_ops_total", "op" => *n))
            .collect(),
        commit: histogram!("avalon_mds_raft_commit_duration_seconds"),
        apply: histogram!("avalon_mds_raft_apply_duration_seconds"),
        snapshot: histogram!("avalon_mds_raft_snapshot_duration_seconds"),
        recalls: counter!("avalon_mds_recalls_total"),
        demands: counter!("avalon_mds_flush_demands_total"),
        revokes: counter!("avalon_mds_delegation_revokes_total"),
        leader_changes: counter!("avalon_mds_raft_leader_changes_total"),
        term: gauge!("avalon_mds_raft_term"),
        is_leader: gauge!("avalon_mds_raft_is_leader"),
        last_log_index: gauge!("avalon_mds_raft_last_log_index"),
        applied_index: gauge!("avalon_mds_raft_applied_index"),
        log_entries: gauge!("avalon_mds_raft_log_entries"),
        sessions: gauge!("avalon_mds_sessions"),
        delegations: gauge!("avalon_mds_delegated_inodes"),
        leases: gauge!("avalon_mds_leases"),
        inodes: gauge!("avalon_mds_inodes"),
        directories: gauge!("avalon_mds_directories"),
        osds: gauge!("avalon_mds_osds"),
    });
}

/// Times one `Meta` RPC until the returned timer drops.
pub fn op(rpc: Rpc) -> OpTimer<'static> {
    match M.get() {
        Some(m) => m.ops.start(rpc.index()),
        None => OpTimer::off(),
    }
}

/// This node's metadata operation totals (none with metrics off).
pub fn totals() -> Option<avalon_proto::pb::OpTotals> {
    M.get().map(|m| m.ops.totals.get())
}

/// Counts one change received under a delegation.
pub fn delegated(d: Delegated) {
    if let Some(m) = M.get() {
        m.delegated[d.index()].increment(1);
    }
}

/// Times a histogram until dropped.
pub struct Timer(Option<(&'static Histogram, Instant)>);

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some((h, t)) = self.0.take() {
            h.record(t.elapsed().as_secs_f64());
        }
    }
}

fn timer(f: fn(&'static Metrics) -> &'static Histogram) -> Timer {
    Timer(M.get().map(|m| (f(m), Instant::now())))
}

/// Times a proposal from submission to its applied result (commit).
pub fn commit_timer() -> Timer {
    timer(|m| &m.commit)
}

/// Times the state machine applying one batch of entries.
pub fn apply_timer() -> Timer {
    timer(|m| &m.apply)
}

/// Times building a snapshot.
pub fn snapshot_timer() -> Timer {
    timer(|m| &m.snapshot)
}

fn count(f: fn(&Metrics) -> &Counter) {
    if let Some(m) = M.get() {
        f(m).increment(1);
    }
}

/// Counts one recall event sent to a session.
pub fn recall_sent() {
    count(|m| &m.recalls);
}

/// Counts one flush demand sent to a session (shared-write, revoke).
pub fn demand_sent() {
    count(|m| &m.demands);
}

/// Counts one delegation revoked.
pub fn revoked() {
    count(|m| &m.revokes);
}

/// Counts leader changes and keeps the raft gauges current, from raft's
/// metrics channel; runs until the channel closes.
pub async fn watch_raft(
    mut rx: tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, openraft::BasicNode>>,
) {
    let mut leader = None;
    loop {
        if let Some(m) = M.get() {
            let r = rx.borrow_and_update();
            if r.current_leader != leader {
                if r.current_leader.is_some() {
                    m.leader_changes.increment(1);
                }
                leader = r.current_leader;
            }
            m.term.set(r.current_term as f64);
            m.is_leader
                .set(f64::from(u8::from(r.current_leader == Some(r.id))));
            let last = r.last_log_index.unwrap_or(0);
            m.last_log_index.set(last as f64);
            m.applied_index
                .set(r.last_applied.map_or(0, |l| l.index) as f64);
            let snap = r.snapshot.map_or(0, |l| l.index);
            m.log_entries.set(last.saturating_sub(snap) as f64);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The scrape-time refresh: counts read from the node's state.
pub fn refresh(node: Arc<MdsNode>) -> avalon_proto::metrics_http::Refresh {
    Arc::new(move || {
        let Some(m) = M.get() else { return };
        let (inodes, dirs, sessions, osds) = node.read_local(|s| {
            // The root's recursive statistics count every directory below
            // it: O(1), where filtering every inode cost O(namespace) per
            // scrape (and held the state that long).
            let root = avalon_proto::limits::ROOT_INO;
            let dirs = crate::rstats::stats(s, root).rsubdirs + 1;
            (s.inodes.len(), dirs, s.sessions.len(), s.osds.len())
        });
        m.inodes.set(inodes as f64);
        m.directories.set(dirs as f64);
        m.sessions.set(sessions as f64);
        m.osds.set(osds as f64);
        m.delegations.set(node.delegations.len() as f64);
        m.leases.set(node.leases.len() as f64);
    })
}
