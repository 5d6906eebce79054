//! The `Meta` gRPC service: validates requests, replicates mutations through
//! raft and serves linearizable reads from the state machine.

use crate::caps::{self, ClientCaps};
use crate::command::{Attr, Op, OsdState, Reply, TimeSpec};
use crate::disk_reserve::DiskReserve;
use crate::leases::Change;
use crate::locks::{LockKind, LockOp};
use crate::metrics::{Delegated, Rpc};
use crate::namespace::State;
use crate::node::{role_name, MdsError, MdsNode, PeerKind};
use crate::permission::{self, AttrChange, Cred, Denied, Verdict};
use crate::settings::ClusterSettings;
use avalon_proto::limits::check_name;
use avalon_proto::pb::{self, meta_server::Meta, time_set};
use avalon_proto::tls::{Peer, ADMIN_NAME};
use std::sync::Arc;
use tonic::{Request, Response, Status};

type Res<T> = Result<Response<T>, Status>;

/// Recall events queued per session before it counts as unreachable.
const RECALL_QUEUE: usize = 4096;

/// How long an open for writing waits for the file's other writers to
/// store what they buffered (their own data path retries as long), and a
/// delegation's revocation for its holder to apply what it queued; both
/// give up sooner on a holder that stops heartbeating.
const SHARED_WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Most inode numbers one Delegate reserves.
const MAX_INOS_PER_DELEGATE: u64 = 4096;

/// Most changes in one Apply.
const MAX_APPLY_OPS: usize = 4096;

/// Most entries one TrashList reply holds.
const TRASH_LIST_MAX: usize = 10_000;

/// True if open(2) flags open for writing.
fn writes(flags: u32) -> bool {
    flags as i32 & libc::O_ACCMODE != libc::O_RDONLY
}

/// `op` (a client registration) under a random, nonzero session id.
fn with_random_id(op: Op) -> Op {
    let session_id = loop {
        let id = rand::random::<u64>();
        if id != 0 {
            break id;
        }
    };
    match op {
        Op::RegisterClientAs {
            hostname,
            mountpoint,
            pid,
            subdir,
            identity,
        } => Op::RegisterClientWithId {
            hostname,
            mountpoint,
            pid,
            subdir,
            identity: Some(identity),
            session_id,
        },
        Op::RegisterClient {
            hostname,
            mountpoint,
            pid,
            subdir,
        } => Op::RegisterClientWithId {
            hostname,
            mountpoint,
            pid,
            subdir,
            identity: None,
            session_id,
        },
        other => other,
    }
}

/// The `Meta` service of one node.
pub struct MetaService {
    pub node: Arc<MdsNode>,
    /// Free space of this node's data dir (the metadata reserve).
    pub reserve: DiskReserve,
    /// Signs the chunk capabilities of opens, creates and GetChunkCap.
    pub chunk_caps: crate::chunk_caps::CapIssuer,
}

/// A restore that cannot be done, as a status that says why (EEXIST for
/// a name that is taken: nothing is overwritten).
fn restore_status(e: crate::trash::RestoreError) -> Status {
    avalon_proto::errno::status(e.errno(), e.to_string())
}

/// Converts a stored attribute to its wire form.
pub fn attr_pb(a: &Attr) -> pb::Attr {
    pb::Attr {
        ino: a.ino,
        mode: a.mode,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        size: a.size,
        atime_ns: a.atime_ns,
        mtime_ns: a.mtime_ns,
        ctime_ns: a.ctime_ns,
        crtime_ns: a.crtime_ns,
        generation: a.generation,
        chunk_size: a.chunk_size,
        replicas: a.replicas,
        write_quorum: a.write_quorum,
    }
}

/// Converts the cluster-wide settings to their wire form.
pub fn settings_pb(s: &ClusterSettings) -> pb::ClusterSettings {
    pb::ClusterSettings {
        cluster_id: s.cluster_id.clone(),
        pg_count: s.pg_count,
        replicas: s.replicas,
        write_quorum: s.write_quorum,
        chunk_size: s.chunk_size,
        failure_domain_rule: s.failure_domain_rule.name().to_string(),
    }
}

fn osd_state_pb(s: OsdState) -> pb::OsdState {
    match s {
        OsdState::Up => pb::OsdState::Up,
        OsdState::Down => pb::OsdState::Down,
        OsdState::Out | OsdState::OutByAdmin => pb::OsdState::Out,
    }
}

fn time_spec(t: Option<pb::TimeSet>) -> Option<TimeSpec> {
    match t?.how? {
        time_set::How::Now(_) => Some(TimeSpec::Now),
        time_set::How::Ns(n) => Some(TimeSpec::Ns(n)),
    }
}

fn name_ok(name: &[u8]) -> Result<(), MdsError> {
    check_name(name).map_err(MdsError::Errno)
}

fn ino_ok(ino: u64) -> Result<(), MdsError> {
    if ino == 0 {
        Err(MdsError::Errno(libc::EINVAL))
    } else {
        Ok(())
    }
}

/// Checks the protocol version a client or OSD sent (`id`: its OSD id or
/// session, 0 when it has none yet); a refusal is logged here too.
fn check_version(
    who: &str,
    id: u64,
    v: Option<&pb::NodeVersion>,
) -> Result<pb::NodeVersion, Status> {
    let peer = if id == 0 {
        who.to_string()
    } else {
        format!("{who} ({id})")
    };
    avalon_proto::version::check("this MDS", &peer, v).inspect_err(|s| {
        tracing::warn!(error = %s.message(), "refusing a peer");
    })
}

/// `uid` after the caller's root_squash and mapping.
fn squash_uid(lim: Option<&(String, ClientCaps)>, uid: u32) -> u32 {
    lim.map_or(uid, |(_, c)| c.uid(uid))
}

/// `gid` after the caller's root_squash and mapping.
fn squash_gid(lim: Option<&(String, ClientCaps)>, gid: u32) -> u32 {
    lim.map_or(gid, |(_, c)| c.gid(gid))
}

/// A reply with uids and gids that a mapped key's client sees translated
/// back to its own ids (`caps.rs`).
trait IdsOut {
    /// Translates the cluster ids in `self` to `c`'s client ids.
    fn ids_out(&mut self, c: &ClientCaps);
}

impl IdsOut for pb::Attr {
    fn ids_out(&mut self, c: &ClientCaps) {
        self.uid = c.uid_out(self.uid);
        self.gid = c.gid_out(self.gid);
    }
}

impl<T: IdsOut> IdsOut for Option<T> {
    fn ids_out(&mut self, c: &ClientCaps) {
        if let Some(t) = self {
            t.ids_out(c);
        }
    }
}

impl IdsOut for pb::EntryReply {
    fn ids_out(&mut self, c: &ClientCaps) {
        self.attr.ids_out(c);
        self.parent.ids_out(c);
    }
}

impl IdsOut for pb::AttrReply {
    fn ids_out(&mut self, c: &ClientCaps) {
        self.attr.ids_out(c);
    }
}

impl IdsOut for pb::DirChangeReply {
    fn ids_out(&mut self, c: &ClientCaps) {
        self.parent.ids_out(c);
        self.new_parent.ids_out(c);
    }
}

impl IdsOut for pb::ReadDirReply {
    fn ids_out(&mut self, c: &ClientCaps) {
        for e in &mut self.entries {
            e.attr.ids_out(c);
        }
    }
}

/// `r` as the caller of a request limited by `lim` sees it: with the ids
/// of a mapped key translated back (nothing to do for the others).
fn mapped<T: IdsOut>(lim: Option<&(String, ClientCaps)>, mut r: T) -> Response<T> {
    if let Some((_, c)) = lim.filter(|(_, c)| c.maps()) {
        r.ids_out(c);
    }
    Response::new(r)
}

/// What a request says of its caller beyond its header, read before the
/// request is consumed (see [`permission::Cred::of`]).
struct Who {
    /// Supplementary groups, when the client sent them.
    groups: Option<Vec<u32>>,
    /// The administrator's identity: not checked.
    admin: bool,
}

impl Who {
    /// The caller the request is checked as, if any.
    fn cred(
        self,
        hdr: Option<&pb::RequestHeader>,
        lim: Option<&(String, ClientCaps)>,
    ) -> Option<Cred> {
        Cred::of(hdr, self.groups, lim.map(|l| &l.1), self.admin)
    }
}

/// A refused permission check as a status: the errno, or the request for
/// the caller's groups (`avalon_proto::caller`).
fn refused(d: Denied) -> Status {
    match d {
        Denied::Errno(e) => MdsError::Errno(e).into(),
        Denied::NeedGroups => avalon_proto::caller::need_groups(),
    }
}

/// The requesting session (0: a daemon or tool).
/// The request's session, whose reply carries its recall mark.
fn session_of(h: Option<&pb::RequestHeader>) -> u64 {
    let sid = h.map(|h| h.session_id).unwrap_or(0);
    avalon_proto::recall_mark::reply_to(sid);
    sid
}

/// The session a lock request is made for (locks need one).
fn lock_session(h: Option<&pb::RequestHeader>) -> Result<u64, MdsError> {
    match h.map(|h| h.session_id) {
        Some(sid) if sid != 0 => Ok(sid),
        _ => Err(MdsError::Invalid("locks need a client session".into())),
    }
}

fn lock_kind(t: u32) -> Result<LockKind, MdsError> {
    LockKind::from_type(t).ok_or(MdsError::Errno(libc::EINVAL))
}

/// A lock request as the leader's lock table takes it.
fn lock_op(r: &pb::LockRequest) -> Result<LockOp<'_>, MdsError> {
    Ok(LockOp {
        hdr: r.header.as_ref(),
        session: lock_session(r.header.as_ref())?,
        ino: r.ino,
        owner: r.owner,
        pid: r.pid,
        start: r.start,
        end: r.end,
        kind: lock_kind(r.r#type)?,
        reclaims: r.reclaims,
        caches: r.caches,
    })
}

fn entry(r: Reply) -> Result<pb::EntryReply, MdsError> {
    match r {
        Reply::Attr(a) => Ok(pb::EntryReply {
            attr: Some(attr_pb(&a)),
            parent: None,
            shared_write: false,
            no_xattrs: false,
            quota_window: 0,
            chunk_cap: Default::default(),
        }),
        other => Err(MdsError::Internal(format!("unexpected reply {other:?}"))),
    }
}

fn attr_reply(r: Reply) -> Result<pb::AttrReply, MdsError> {
    entry(r).map(|e| pb::AttrReply {
        attr: e.attr,
        shared_write: false,
        quota_window: 0,
        chunk_cap: Default::default(),
        snap_seq: 0,
        grant_max_size: 0,
    })
}

impl MetaService {
    /// The service of `node`, its reserve from the node's config.
    pub fn new(node: Arc<MdsNode>) -> MetaService {
        let reserve = DiskReserve::new(
            node.cfg.data_dir.clone(),
            node.cfg.disk_reserve_mb.saturating_mul(1 << 20),
        );
        let chunk_caps = crate::chunk_caps::CapIssuer::new(None, node.cfg.chunk_cap_secs);
        MetaService {
            node,
            reserve,
            chunk_caps,
        }
    }

    /// ENOSPC for a request that grows the namespace while this leader's
    /// disk is under the metadata reserve (a follower forwards to the
    /// leader, which judges by its own disk).
    fn check_growth(&self) -> Result<(), MdsError> {
        if self.node.is_leader() {
            self.reserve.check_growth()?;
        }
        Ok(())
    }

    /// The cluster map as this node's state has it. Placement comes from
    /// the cluster-wide settings; before they are written (status only:
    /// the map RPCs wait for them) from what this node would propose.
    pub fn cluster_map(&self, s: &State) -> pb::ClusterMap {
        let leader = self.node.is_leader();
        let (pg_count, replicas, write_quorum) = match &s.settings {
            Some(c) => (c.pg_count, c.replicas, c.write_quorum),
            None => {
                let d = ClusterSettings::bootstrap(&self.node.cfg);
                (d.pg_count, d.replicas, d.write_quorum)
            }
        };
        pb::ClusterMap {
            epoch: s.map_epoch,
            pg_count,
            replicas,
            write_quorum,
            osds: s
                .osds
                .values()
                .map(|o| pb::OsdInfo {
                    id: o.id,
                    addr: o.addr.clone(),
                    state: osd_state_pb(o.state) as i32,
                    capacity_bytes: o.capacity_bytes,
                    used_bytes: o.used_bytes,
                    failure_domain: o.failure_domain.clone(),
                    pid: o.pid,
                    last_seen_ms: if leader {
                        self.node.osd_last_seen_ms(o.id)
                    } else {
                        0
                    },
                    admin_out: o.state == OsdState::OutByAdmin,
                    report: if leader {
                        self.node.osd_last_report(o.id)
                    } else {
                        None
                    },
                    version: self.node.peer_version(PeerKind::Osd, o.id),
                })
                .collect(),
        }
    }

    /// The capabilities limiting the caller of `req` (`caps.rs`; `None`:
    /// full access) with its identity name.
    fn limits<T>(&self, req: &Request<T>) -> Option<(String, ClientCaps)> {
        let peer = Peer::of(req);
        let name = caps::client_name(&peer)?.to_string();
        caps::of_peer(&self.node, &peer).map(|c| (name, c))
    }

    /// [`MetaService::limits`] and what the permission checks need of the
    /// request besides its body.
    fn caller_of<T>(&self, req: &Request<T>) -> (Option<(String, ClientCaps)>, Who) {
        let peer = Peer::of(req);
        let who = Who {
            groups: avalon_proto::caller::groups_of(req.metadata()),
            admin: peer.secured && peer.identity.as_ref().is_some_and(|i| i.name == ADMIN_NAME),
        };
        let lim = caps::client_name(&peer)
            .and_then(|name| caps::of_peer(&self.node, &peer).map(|c| (name.to_string(), c)));
        (lim, who)
    }

    /// Runs permission check `f` for `cred` on this node's state (no
    /// caller: nothing to check).
    fn check(
        &self,
        cred: Option<&Cred>,
        f: impl FnOnce(&State, &Cred) -> Verdict,
    ) -> Result<(), Status> {
        match cred {
            Some(c) => self.node.read_local(|s| f(s, c)).map_err(refused),
            None => Ok(()),
        }
    }

    /// For a confined caller: EACCES unless the session is its own and
    /// each of `inos` is within that session's root (which registration
    /// put within the identity's subtree). By inode number too, so a
    /// guessed number or a file handle does not escape the subtree.
    fn reach(
        &self,
        lim: Option<&(String, ClientCaps)>,
        hdr: Option<&pb::RequestHeader>,
        inos: &[u64],
    ) -> Result<(), MdsError> {
        let Some((name, c)) = lim else { return Ok(()) };
        if !c.confined() {
            return Ok(());
        }
        let sid = session_of(hdr);
        let ok = self.node.read_local(|s| {
            let Some(root) = s.sessions.get(&sid).map(|x| x.root_ino) else {
                return false;
            };
            s.clients.owners.get(&sid) == Some(name) && inos.iter().all(|&i| s.within(i, root))
        });
        if ok {
            Ok(())
        } else {
            Err(MdsError::Errno(libc::EACCES))
        }
    }

    /// Whether session `sid` has `ino` open (for writing if `write`) in
    /// this leader's open table: then the open was checked, and the open
    /// file keeps the rights it was opened with (as POSIX has it, even
    /// if the file's mode changed since).
    fn opened_by(&self, sid: u64, ino: u64, write: bool) -> bool {
        let t = self.node.lock_opens();
        t.entries
            .get(&(sid, ino))
            .is_some_and(|e| !write || e.writes > 0 || e.reported_writer)
    }

    /// May `cred` (of session `sid`) get a chunk capability on `ino`
    /// (read-write if `write`)? Yes for a file the session has open so
    /// (checked at open; opens and creates carry their capability, so the
    /// common case never asks), else with read (write) permission now.
    /// Refused, the open table is looked at again once a new leader has
    /// heard every session's opens.
    async fn check_chunk_cap(
        &self,
        sid: u64,
        cred: &Cred,
        ino: u64,
        write: bool,
    ) -> Result<(), Status> {
        if self.opened_by(sid, ino, write) {
            return Ok(());
        }
        let want = if write {
            permission::MAY_WRITE
        } else {
            permission::MAY_READ
        };
        let refused = match self.check(Some(cred), |s, c| permission::may(s, c, ino, want)) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        // At once unless this leader is new.
        self.node.wait_opens_reported().await;
        if self.opened_by(sid, ino, write) {
            return Ok(());
        }
        Err(refused)
    }

    /// Whether session `sid` exists: "no" only after a linearizable read
    /// (a new leader may not have applied a registration its predecessor
    /// committed yet).
    async fn session_known(&self, sid: u64) -> Result<bool, MdsError> {
        if self.node.read_local(|s| s.sessions.contains_key(&sid)) {
            return Ok(true);
        }
        self.node.read(|s| s.sessions.contains_key(&sid)).await
    }

    /// PERMISSION_DENIED when a TLS caller names a session another
    /// identity opened (sessions opened over plaintext have no owner and
    /// stay usable by any caller).
    fn own_session(&self, peer: &Peer, sid: u64) -> Result<(), Status> {
        let Some(id) = peer.identity.as_ref().filter(|_| peer.secured) else {
            return Ok(());
        };
        let owner = self
            .node
            .read_local(|s| s.clients.owners.get(&sid).cloned());
        match owner {
            Some(o) if o != id.name => Err(Status::permission_denied(format!(
                "session {sid} belongs to another identity"
            ))),
            _ => Ok(()),
        }
    }

    /// Replicates `op`, then recalls `changes` from the other sessions
    /// that may cache them before the requester hears back.
    async fn mutate(
        &self,
        hdr: Option<&pb::RequestHeader>,
        op: Op,
        changes: &[Change],
    ) -> Result<Reply, Status> {
        let sid = session_of(hdr);
        let inos: Vec<u64> = changes.iter().map(|c| c.ino).collect();
        let mut tries = 0;
        let _pin = loop {
            match self.node.delegations.pin(sid, &inos) {
                Ok(p) => break p,
                Err(groups) if tries < 3 => {
                    tries += 1;
                    self.revoke(groups).await;
                }
                Err(_) => {
                    return Err(MdsError::Unavailable(
                        "a delegation kept coming back; try again".into(),
                    )
                    .into())
                }
            }
        };
        // The requester caches the reply: register it before the change,
        // so that a later change by someone else recalls it too.
        let announced = self.node.leases.announce(sid, inos.clone());
        self.node.leases.grant(sid, inos);
        let r = self.node.write(hdr, op).await?;
        self.node.leases.recall(sid, changes, Some(announced)).await;
        Ok(r)
    }

    /// Counts an open of `ino` by `sid` (for writing if `write`). A
    /// second writer, or a reader of a file another session writes, puts
    /// the file in shared-write mode: the others store what they buffered
    /// and commit its size before this returns (so the opener reads
    /// attributes that cover it), then everyone writes through and reads
    /// uncached. Returns whether the file is in that mode.
    async fn open_shared(&self, sid: u64, ino: u64, write: bool) -> bool {
        let node = &self.node;
        // A new leader learns other sessions' opens from their heartbeats:
        // deciding before they came could answer "not shared" to a second
        // writer while the first still buffers.
        node.wait_opens_reported().await;
        let (shared, tell) = node.open_shared(sid, ino, write);
        self.tell_shared(ino, tell).await;
        if shared {
            node.wait_demands(ino).await;
        }
        shared
    }

    /// Before session `sid` reserves a range at the end of `ino`: every
    /// other session that may still append there as the file's only
    /// writer (its own view of the end, committed later) stores and
    /// commits what it wrote and writes through from then on, and grants
    /// of others are committed or recovered, so that the end of file the
    /// reservation starts at covers every acknowledged write. Normally
    /// nobody is left to tell (the opens did it); this catches a session
    /// whose open the table missed.
    async fn before_reserving(&self, sid: u64, ino: u64) -> Result<(), MdsError> {
        self.before_reserving_as(sid, ino, false).await
    }

    /// [`Self::before_reserving`]; `fenced`: for a conditional commit of
    /// `sid`, which may itself be the answer to a demand to `sid` (so only
    /// demands to others are waited for).
    async fn before_reserving_as(&self, sid: u64, ino: u64, fenced: bool) -> Result<(), MdsError> {
        let node = &self.node;
        node.wait_opens_reported().await;
        let tell = node.append_shares(sid, ino);
        self.tell_shared(ino, tell).await;
        if fenced {
            node.wait_demands_to_others(ino, sid).await;
        } else {
            node.wait_demands(ino).await;
        }
        let held = node.read_local(|s| crate::grants::held_by_others(s, sid, &[ino]));
        if !held.is_empty() {
            self.settle_grants(&held).await?;
        }
        Ok(())
    }

    /// The op of a conditional commit (`CommitWriteRequest.expect_size`):
    /// first every other writer commits and writes through, as before a
    /// reservation, so that the size then read covers their appends.
    async fn fenced_commit(
        &self,
        sid: u64,
        ino: u64,
        size: u64,
        expect: u64,
    ) -> Result<Op, MdsError> {
        if sid == 0 {
            return Err(MdsError::Invalid(
                "a conditional commit needs a session".into(),
            ));
        }
        self.before_reserving_as(sid, ino, true).await?;
        if !self
            .node
            .voters_have(avalon_proto::version::FEATURE_FENCED_APPENDS)
        {
            // An older voter could not apply the entry: committed as
            // before the feature (unfenced), rather than failing every
            // such commit while a cluster is being upgraded.
            return Ok(Op::CommitWrite { ino, size });
        }
        Ok(Op::CommitWriteIf { ino, size, expect })
    }

    /// Sends the shared-write demands of `tell` (sessions told that `ino`
    /// has other writers now) and waits for their answers.
    async fn tell_shared(&self, ino: u64, tell: Vec<crate::node::Told<'_>>) {
        let demands = tell.into_iter().map(|told| async move {
            self.node
                .leases
                .demand_flush(told.sid, ino, SHARED_WRITE_WAIT)
                .await;
            drop(told);
        });
        futures::future::join_all(demands).await;
    }

    /// Write grants of other sessions (holder, inode): each holder commits
    /// and writes through from then on, dropping its grant; grants left
    /// are recovered from the OSDs ([`Self::recover_left_grants`]).
    async fn settle_grants(&self, held: &[(u64, u64)]) -> Result<(), MdsError> {
        let asked = std::time::Instant::now();
        let demands = held.iter().map(|(holder, ino)| {
            self.node
                .leases
                .demand_flush(*holder, *ino, SHARED_WRITE_WAIT)
        });
        let answered = futures::future::join_all(demands).await;
        self.recover_left_grants(held, &answered, asked).await
    }

    /// A directory's attributes now, for a reply that changed it.
    fn dir_attr(&self, ino: u64) -> Option<pb::Attr> {
        self.node
            .read_local(|s| s.getattr(ino).ok())
            .map(|a| attr_pb(&a))
    }

    /// Completes a create's reply: the parent's attributes, and the new
    /// inode registered as cached by its creator (who caches the reply).
    /// Registered only now that its number exists; nobody else can change
    /// it before looking it up, which takes longer than this step.
    fn created(&self, hdr: Option<&pb::RequestHeader>, parent: u64, e: &mut pb::EntryReply) {
        e.parent = self.dir_attr(parent);
        if let Some(a) = &e.attr {
            self.node.leases.grant(session_of(hdr), [a.ino]);
            e.no_xattrs = self
                .node
                .read_local(|s| s.inodes.get(&a.ino).is_some_and(|i| i.xattrs.is_empty()));
        }
    }

    /// The size-commit window a writer of `ino` keeps to (`quota.rs`): 0
    /// when no byte quota applies to it.
    fn quota_window(&self, ino: u64) -> u64 {
        self.node.read_local(|s| {
            if crate::quota::bytes_governed(s, ino) {
                crate::quota::WINDOW
            } else {
                0
            }
        })
    }

    /// Revokes the delegations of sessions other than `sid` within
    /// directory `dir`'s subtree: their queued creates and size commits
    /// reach the state before a recursive statistic is read, or before a
    /// quota starts to apply there.
    async fn settle_subtree(&self, sid: u64, dir: u64) {
        let groups = self.node.delegations.others(sid);
        if groups.is_empty() {
            return;
        }
        let inside: Vec<(u64, u64)> = self.node.read_local(|s| {
            groups
                .into_iter()
                .filter(|(_, root)| s.within(*root, dir))
                .collect()
        });
        if !inside.is_empty() {
            self.revoke(inside).await;
        }
    }

    /// Refuses (EOPNOTSUPP) what needs `feature` of every voter: in a
    /// cluster still being upgraded an older member would apply it
    /// differently.
    fn require_voters(&self, feature: u64, what: &str) -> Result<(), MdsError> {
        if self.node.voters_have(feature) {
            return Ok(());
        }
        tracing::warn!("{what} are refused until every MDS runs a version that has them");
        Err(MdsError::Errno(libc::EOPNOTSUPP))
    }

    /// EPERM unless the caller may set quotas: root (after squashing) on
    /// a mount, or an unlimited identity (client.admin) without a uid.
    fn check_quota_admin(
        lim: Option<&(String, ClientCaps)>,
        has_cred: bool,
        uid: u32,
    ) -> Result<(), MdsError> {
        let ok = if has_cred {
            squash_uid(lim, uid) == 0
        } else {
            lim.is_none()
        };
        if ok {
            Ok(())
        } else {
            Err(MdsError::Errno(libc::EPERM))
        }
    }

    /// A linearizable read whose result session `sid` may cache: `f`
    /// returns it with the inodes it covers, registered under the state
    /// lock (see leases.rs). If another session holds a delegation of one
    /// of them, that is revoked first and the read done again.
    async fn read_leased<T, I: IntoIterator<Item = u64>>(
        &self,
        sid: u64,
        f: impl Fn(&State) -> (T, I),
    ) -> Result<T, MdsError> {
        let leases = &self.node.leases;
        let delegations = &self.node.delegations;
        for attempt in 0..3 {
            let (v, conflicts, held) = self
                .node
                .read(|s| {
                    let (v, inos) = f(s);
                    let inos: Vec<u64> = inos.into_iter().collect();
                    let conflicts = delegations.conflicts(sid, inos.iter().copied());
                    // Another session's write grant: its fsynced size may
                    // not be committed yet (asked for once; a holder that
                    // does not answer leaves the committed size).
                    let held = if attempt == 0 {
                        crate::grants::held_by_others(s, sid, &inos)
                    } else {
                        Vec::new()
                    };
                    if conflicts.is_empty() && held.is_empty() {
                        leases.grant(sid, inos);
                    }
                    (v, conflicts, held)
                })
                .await?;
            if conflicts.is_empty() && held.is_empty() {
                return Ok(v);
            }
            if !held.is_empty() {
                self.settle_grants(&held).await?;
            }
            if !conflicts.is_empty() {
                self.revoke(conflicts).await;
            }
        }
        Err(MdsError::Unavailable(
            "a delegation kept coming back; try again".into(),
        ))
    }

    /// After demands to grant holders (sent at `asked`; `answered` says
    /// which were acknowledged): grants still held are recovered from the
    /// OSDs before the read. A holder that answered committed what it had
    /// and writes through from then on: a grant left (its release was
    /// lost, e.g. to a change of leader) is recovered at once. One that
    /// did not answer is recovered once it can no longer act on its lease:
    /// a lease it got before the demands (from this leader or a former
    /// one) ran out a lease after `asked`, and this leader gave it none
    /// since (not heard from for a lease, plus the clock margin). One
    /// still heard from makes the request unavailable (retried): its
    /// fsynced size is not known.
    async fn recover_left_grants(
        &self,
        held: &[(u64, u64)],
        answered: &[bool],
        asked: std::time::Instant,
    ) -> Result<(), MdsError> {
        let left: Vec<(u64, u64, bool)> = self.node.read_local(|s| {
            held.iter()
                .zip(answered)
                .filter(|((holder, ino), _)| s.grants.contains_key(&(*ino, *holder)))
                .map(|(&(holder, ino), &a)| (holder, ino, a))
                .collect()
        });
        let unknown = |ino: u64| {
            MdsError::Unavailable(format!(
                "the writer of inode {ino} has not committed its size yet"
            ))
        };
        for &(holder, ino, _) in left.iter().filter(|g| g.2) {
            if !crate::grants::recover_one(&self.node, holder, ino).await {
                return Err(unknown(ino));
            }
        }
        let silent: Vec<(u64, u64)> = left
            .iter()
            .filter(|g| !g.2)
            .map(|&(holder, ino, _)| (holder, ino))
            .collect();
        if silent.is_empty() {
            return Ok(());
        }
        let lease = std::time::Duration::from_millis(self.node.cfg.lease_ms);
        let margin = crate::fresh_leader::CLOCK_MARGIN;
        if let Some((_, ino)) = silent
            .iter()
            .find(|(holder, _)| self.node.leases.heard_within_lease(*holder))
        {
            return Err(unknown(*ino));
        }
        tokio::time::sleep_until((asked + lease + margin).into()).await;
        tokio::time::sleep(margin).await;
        for (holder, ino) in silent {
            if self.node.leases.heard_within_lease(holder)
                || !crate::grants::recover_one(&self.node, holder, ino).await
            {
                return Err(unknown(ino));
            }
        }
        Ok(())
    }

    /// Revokes the delegations of sessions other than `sid` that cover any
    /// of `inos`, so that their holders' pending changes are in the state
    /// before `sid`'s request reads or changes it.
    async fn settle(&self, sid: u64, inos: impl IntoIterator<Item = u64>) {
        let conflicts = self.node.delegations.conflicts(sid, inos);
        if !conflicts.is_empty() {
            self.revoke(conflicts).await;
        }
    }

    /// Revokes delegation groups `(holder, root)`: each holder sends what
    /// it has pending and acknowledges, or its lease runs out.
    async fn revoke(&self, groups: Vec<(u64, u64)>) {
        let leases = &self.node.leases;
        futures::future::join_all(groups.into_iter().map(|(holder, root)| async move {
            let r = pb::Recall {
                ino: root,
                delegation: true,
                ..Default::default()
            };
            // Without a lease the holder acts on nothing unheard. With one,
            // what it did under the delegation (answered already) must be
            // applied before the change that revokes it: it is waited for
            // while the holder is alive, however long its queue takes.
            if !leases.lease_left(holder).is_zero()
                && !leases.demand(holder, r, SHARED_WRITE_WAIT).await
            {
                tracing::warn!(session = holder, root, "delegation revoke unanswered");
            }
            self.node.delegations.revoke(root);
        }))
        .await;
    }
}

#[tonic::async_trait]
impl Meta for MetaService {
    async fn lookup(&self, req: Request<pb::LookupRequest>) -> Res<pb::EntryReply> {
        let _m = crate::metrics::op(Rpc::Lookup);
        let (lim, who) = self.caller_of(&req);
        let r = req.into_inner();
        let cred = who.cred(r.header.as_ref(), lim.as_ref());
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.parent])?;
        ino_ok(r.parent)?;
        name_ok(&r.name)?;
        let sid = session_of(r.header.as_ref());
        let a = self
            .read_leased(sid, |s| {
                // Search permission, under the same state lock.
                let a = match &cred {
                    Some(c) => permission::may_lookup(s, c, r.parent),
                    None => Ok(()),
                }
                .and_then(|()| s.lookup(r.parent, &r.name).map_err(Denied::Errno));
                let child = a.as_ref().map(|a| a.ino).unwrap_or(0);
                (a, [r.parent, child])
            })
            .await?
            .map_err(refused)?;
        Ok(mapped(
            lim.as_ref(),
            pb::EntryReply {
                attr: Some(attr_pb(&a)),
                parent: None,
                shared_write: false,
                no_xattrs: false,
                quota_window: 0,
                chunk_cap: Default::default(),
            },
        ))
    }

    async fn get_attr(&self, req: Request<pb::GetAttrRequest>) -> Res<pb::AttrReply> {
        let _m = crate::metrics::op(Rpc::GetAttr);
        let lim = self.limits(&req);
        let r = req.into_inner();
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.ino])?;
        ino_ok(r.ino)?;
        let sid = session_of(r.header.as_ref());
        let a = self
            .read_leased(sid, |s| (s.getattr(r.ino), [r.ino]))
            .await?
            .map_err(MdsError::Errno)?;
        Ok(mapped(
            lim.as_ref(),
            pb::AttrReply {
                attr: Some(attr_pb(&a)),
                ..Default::default()
            },
        ))
    }

    async fn set_attr(&self, req: Request<pb::SetAttrRequest>) -> Res<pb::AttrReply> {
        let _m = crate::metrics::op(Rpc::SetAttr);
        let (lim, who) = self.caller_of(&req);
        let r = req.into_inner();
        let cred = who.cred(r.header.as_ref(), lim.as_ref());
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.ino])?;
        ino_ok(r.ino)?;
        // A read-only key's reads still update atime; other changes fail.
        if !r.access && lim.as_ref().is_some_and(|(_, c)| c.read_only) {
            return Err(MdsError::Errno(libc::EROFS).into());
        }
        if r.access {
            if r.mode.is_some()
                || r.uid.is_some()
                || r.gid.is_some()
                || r.size.is_some()
                || r.mtime.is_some()
                || r.ctime_ns.is_some()
            {
                return Err(
                    MdsError::Invalid("an access-time update changes only atime".into()).into(),
                );
            }
            let op = Op::Touch {
                ino: r.ino,
                atime: time_spec(r.atime).unwrap_or(TimeSpec::Now),
            };
            return Ok(mapped(
                lim.as_ref(),
                attr_reply(
                    self.mutate(r.header.as_ref(), op, &[Change::attr(r.ino)])
                        .await?,
                )?,
            ));
        }
        let uid = r.uid.map(|u| squash_uid(lim.as_ref(), u));
        let gid = r.gid.map(|g| squash_gid(lim.as_ref(), g));
        let (atime, mtime) = (time_spec(r.atime), time_spec(r.mtime));
        let mut mode = r.mode;
        if let Some(c) = &cred {
            let times = [atime, mtime];
            let ch = AttrChange {
                mode: r.mode,
                uid,
                gid,
                size: r.size.is_some(),
                times_set: times.iter().any(|t| matches!(t, Some(TimeSpec::Ns(_)))),
                times_now: times.iter().any(|t| matches!(t, Some(TimeSpec::Now))),
                by_handle: r.by_handle,
            };
            let stored = self
                .node
                .read_local(|s| permission::may_setattr(s, c, r.ino, &ch))
                .map_err(refused)?;
            mode = stored.or(mode);
        }
        let op = Op::SetAttr {
            ino: r.ino,
            mode,
            uid,
            gid,
            size: r.size,
            atime,
            mtime,
            ctime_ns: r.ctime_ns,
        };
        let change = if r.size.is_some() {
            Change::data(r.ino)
        } else {
            Change::attr(r.ino)
        };
        Ok(mapped(
            lim.as_ref(),
            attr_reply(self.mutate(r.header.as_ref(), op, &[change]).await?)?,
        ))
    }

    async fn mknod(&self, req: Request<pb::MknodRequest>) -> Res<pb::EntryReply> {
        let _m = crate::metrics::op(Rpc::Mknod);
        let (lim, who) = self.caller_of(&req);
        let peer = Peer::of(&req);
        let r = req.into_inner();
        let cred = who.cred(r.header.as_ref(), lim.as_ref());
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.parent])?;
        // A create that finds the file (not O_EXCL) opens it.
        self.check(cred.as_ref(), |s, c| match s.child_ino(r.parent, &r.name) {
            Some(ino) if !r.exclusive => {
                permission::may_lookup(s, c, r.parent)?;
                permission::may_open(s, c, ino, r.open_flags)
            }
            _ => permission::may_create(s, c, r.parent, &r.name),
        })?;
        self.check_growth()?;
        ino_ok(r.parent)?;
        name_ok(&r.name)?;
        let changes = [Change::entry(r.parent, &r.name)];
        let op = Op::Mknod {
            parent: r.parent,
            name: r.name.into(),
            mode: r.mode,
            rdev: r.rdev,
            uid: squash_uid(lim.as_ref(), r.uid),
            gid: squash_gid(lim.as_ref(), r.gid),
            exclusive: r.exclusive,
            layout: self.node.layout().await?,
        };
        let mut e = entry(self.mutate(r.header.as_ref(), op, &changes).await?)?;
        self.created(r.header.as_ref(), r.parent, &mut e);
        let sid = session_of(r.header.as_ref());
        let created = e.attr.as_ref().map(|a| (a.ino, a.mode & libc::S_IFMT));
        if let Some((ino, libc::S_IFREG)) = created {
            e.quota_window = self.quota_window(ino);
            e.chunk_cap = self.chunk_caps.issue(&peer, sid, ino, true);
            if sid != 0 {
                self.node.note_created(sid, ino);
                if writes(r.open_flags) {
                    // O_CREAT may find the file open for writing elsewhere.
                    e.shared_write = self.open_shared(sid, ino, true).await;
                    if e.shared_write {
                        // The other writers' commits moved the size on.
                        e.attr = self.dir_attr(ino);
                    }
                }
            }
        }
        Ok(mapped(lim.as_ref(), e))
    }

    async fn mkdir(&self, req: Request<pb::MkdirRequest>) -> Res<pb::EntryReply> {
        let _m = crate::metrics::op(Rpc::Mkdir);
        let (lim, who) = self.caller_of(&req);
        let r = req.into_inner();
        let cred = who.cred(r.header.as_ref(), lim.as_ref());
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.parent])?;
        self.check(cred.as_ref(), |s, c| {
            permission::may_create(s, c, r.parent, &r.name)
        })?;
        self.check_growth()?;
        ino_ok(r.parent)?;
        name_ok(&r.name)?;
        let changes = [Change::entry(r.parent, &r.name)];
        let op = Op::Mkdir {
            parent: r.parent,
            name: r.name.into(),
            mode: r.mode,
            uid: squash_uid(lim.as_ref(), r.uid),
            gid: squash_gid(lim.as_ref(), r.gid),
        };
        let mut e = entry(self.mutate(r.header.as_ref(), op, &changes).await?)?;
        self.created(r.header.as_ref(), r.parent, &mut e);
        Ok(mapped(lim.as_ref(), e))
    }

    async fn symlink(&self, req: Request<pb::SymlinkRequest>) -> Res<pb::EntryReply> {
        let _m = crate::metrics::op(Rpc::Symlink);
        let (lim, who) = self.caller_of(&req);
        let r = req.into_inner();
        let cred = who.cred(r.header.as_ref(), lim.as_ref());
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.parent])?;
        self.check(cred.as_ref(), |s, c| {
            permission::may_create(s, c, r.parent, &r.name)
        })?;
        self.check_growth()?;
        ino_ok(r.parent)?;
        name_ok(&r.name)?;
        if r.target.is_empty() {
            return Err(MdsError::Errno(libc::ENOENT).into());
        }
        if r.target.len() > avalon_proto::limits::PATH_MAX {
            return Err(MdsError::Errno(libc::ENAMETOOLONG).into());
        }
        let changes = [Change::entry(r.parent, &r.name)];
        let op = Op::Symlink {
            parent: r.parent,
            name: r.name.into(),
            target: r.target.into(),
            uid: squash_uid(lim.as_ref(), r.uid),
            gid: squash_gid(lim.as_ref(), r.gid),
        };
        let mut e = entry(self.mutate(r.header.as_ref(), op, &changes).await?)?;
        self.created(r.header.as_ref(), r.parent, &mut e);
        Ok(mapped(lim.as_ref(), e))
    }

    async fn unlink(&self, req: Request<pb::UnlinkRequest>) -> Res<pb::DirChangeReply> {
        let _m = crate::metrics::op(Rpc::Unlink);
        let (lim, who) = self.caller_of(&req);
        let r = req.into_inner();
        let cred = who.cred(r.header.as_ref(), lim.as_ref());
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.parent])?;
        self.check(cred.as_ref(), |s, c| {
            permission::may_delete(s, c, r.parent, &r.name)
        })?;
        ino_ok(r.parent)?;
        name_ok(&r.name)?;
        let name: Vec<u8> = r.name.into();
        let target = self.node.read_local(|s| s.child_ino(r.parent, &name));
        let (guard, _pending) = self.node.removal_guard(target);
        let mut changes = vec![Change::entry(r.parent, &name)];
        changes.extend(target.map(Change::attr));
        let op = Op::Unlink {
            parent: r.parent,
            name,
            guard,
        };
        self.mutate(r.header.as_ref(), op, &changes).await?;
        Ok(mapped(
            lim.as_ref(),
            pb::DirChangeReply {
                parent: self.dir_attr(r.parent),
                new_parent: None,
            },
        ))
    }

    async fn rmdir(&self, req: Request<pb::UnlinkRequest>) -> Res<pb::DirChangeReply> {
        let _m = crate::metrics::op(Rpc::Rmdir);
        let (lim, who) = self.caller_of(&req);
        let r = req.into_inner();
        let cred = who.cred(r.header.as_ref(), lim.as_ref());
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.parent])?;
        self.check(cred.as_ref(), |s, c| {
            permission::may_delete(s, c, r.parent, &r.name)
        })?;
        ino_ok(r.parent)?;
        name_ok(&r.name)?;
        let target = self.node.read_local(|s| s.child_ino(r.parent, &r.name));
        let (guard, _pending) = self.node.removal_guard(target);
        let mut changes = vec![Change::entry(r.parent, &r.name)];
        changes.extend(target.map(Change::attr));
        let op = Op::RmdirGuarded {
            parent: r.parent,
            name: r.name.into(),
            guard,
        };
        self.mutate(r.header.as_ref(), op, &changes).await?;
        Ok(mapped(
            lim.as_ref(),
            pb::DirChangeReply {
                parent: self.dir_attr(r.parent),
                new_parent: None,
            },
        ))
    }

    async fn readlink(&self, req: Request<pb::GetAttrRequest>) -> Res<pb::ReadlinkReply> {
        let _m = crate::metrics::op(Rpc::Readlink);
        let lim = self.limits(&req);
        let r = req.into_inner();
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.ino])?;
        ino_ok(r.ino)?;
        self.settle(session_of(r.header.as_ref()), [r.ino]).await;
        let target = self
            .node
            .read(|s| s.readlink(r.ino))
            .await?
            .map_err(MdsError::Errno)?;
        Ok(Response::new(pb::ReadlinkReply {
            target: target.into(),
        }))
    }

    async fn link(&self, req: Request<pb::LinkRequest>) -> Res<pb::EntryReply> {
        let _m = crate::metrics::op(Rpc::Link);
        let (lim, who) = self.caller_of(&req);
        let r = req.into_inner();
        let cred = who.cred(r.header.as_ref(), lim.as_ref());
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.ino, r.new_parent])?;
        self.check(cred.as_ref(), |s, c| {
            permission::may_create(s, c, r.new_parent, &r.new_name)
        })?;
        self.check_growth()?;
        ino_ok(r.ino)?;
        ino_ok(r.new_parent)?;
        name_ok(&r.new_name)?;
        let changes = [
            Change::attr(r.ino),
            Change::entry(r.new_parent, &r.new_name),
        ];
        let op = Op::Link {
            ino: r.ino,
            new_parent: r.new_parent,
            new_name: r.new_name.into(),
        };
        let mut e = entry(self.mutate(r.header.as_ref(), op, &changes).await?)?;
        e.parent = self.dir_attr(r.new_parent);
        Ok(mapped(lim.as_ref(), e))
    }

    async fn rename(&self, req: Request<pb::RenameRequest>) -> Res<pb::DirChangeReply> {
        let _m = crate::metrics::op(Rpc::Rename);
        let (lim, who) = self.caller_of(&req);
        let r = req.into_inner();
        let cred = who.cred(r.header.as_ref(), lim.as_ref());
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.parent, r.new_parent])?;
        self.check(cred.as_ref(), |s, c| {
            permission::may_rename(s, c, r.parent, &r.name, r.new_parent, &r.new_name, r.flags)
        })?;
        ino_ok(r.parent)?;
        ino_ok(r.new_parent)?;
        name_ok(&r.name)?;
        name_ok(&r.new_name)?;
        let new_name: Vec<u8> = r.new_name.into();
        let (source, target) = self.node.read_local(|s| {
            (
                s.child_ino(r.parent, &r.name),
                s.child_ino(r.new_parent, &new_name),
            )
        });
        let (guard, _pending) = self.node.removal_guard(target);
        let mut changes = vec![
            Change::entry_of(r.parent, &r.name, source),
            Change::entry_of(r.new_parent, &new_name, target),
        ];
        changes.extend(source.into_iter().chain(target).map(Change::attr));
        let op = Op::Rename {
            parent: r.parent,
            name: r.name.into(),
            new_parent: r.new_parent,
            new_name,
            flags: r.flags,
            guard,
        };
        self.mutate(r.header.as_ref(), op, &changes).await?;
        Ok(mapped(
            lim.as_ref(),
            pb::DirChangeReply {
                parent: self.dir_attr(r.parent),
                new_parent: if r.new_parent != r.parent {
                    self.dir_attr(r.new_parent)
                } else {
                    None
                },
            },
        ))
    }

    async fn read_dir(&self, req: Request<pb::ReadDirRequest>) -> Res<pb::ReadDirReply> {
        let _m = crate::metrics::op(Rpc::ReadDir);
        let (lim, who) = self.caller_of(&req);
        let r = req.into_inner();
        let cred = who.cred(r.header.as_ref(), lim.as_ref());
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.ino])?;
        self.check(cred.as_ref(), |s, c| permission::may_readdir(s, c, r.ino))?;
        ino_ok(r.ino)?;
        let max = if r.max_entries == 0 {
            1024
        } else {
            r.max_entries.min(8192) as usize
        };
        let sid = session_of(r.header.as_ref());
        let (entries, eof, (parent, next_cookie)) = self
            .read_leased(sid, |s| {
                let res = s
                    .readdir(r.ino, r.cookie, max, r.plus)
                    .and_then(|(e, eof)| Ok((e, eof, s.dir_info(r.ino)?)));
                let mut inos = vec![r.ino];
                let res = res.map(|(entries, eof, info)| {
                    let entries: Vec<_> = entries
                        .into_iter()
                        .map(|e| {
                            let bare = e.attr.is_some()
                                && s.inodes.get(&e.ino).is_some_and(|i| i.xattrs.is_empty());
                            (e, bare)
                        })
                        .collect();
                    inos.extend(
                        entries
                            .iter()
                            .filter(|e| e.0.attr.is_some())
                            .map(|e| e.0.ino),
                    );
                    (entries, eof, info)
                });
                (res, inos)
            })
            .await?
            .map_err(MdsError::Errno)?;
        Ok(mapped(
            lim.as_ref(),
            pb::ReadDirReply {
                entries: entries
                    .into_iter()
                    .map(|(e, no_xattrs)| pb::DirEntry {
                        name: e.name.into(),
                        ino: e.ino,
                        mode: e.mode,
                        cookie: e.cookie,
                        attr: e.attr.as_ref().map(attr_pb),
                        no_xattrs,
                    })
                    .collect(),
                eof,
                parent,
                next_cookie,
            },
        ))
    }

    async fn stat_fs(&self, req: Request<pb::GetAttrRequest>) -> Res<pb::StatFsReply> {
        let _m = crate::metrics::op(Rpc::StatFs);
        let dir = req.into_inner().ino;
        // A mount of (or under) a quota directory sees the quota.
        let s = self
            .node
            .read(|s| {
                let base = s.statfs(s.settings.as_ref().map_or(1, |c| c.replicas));
                crate::quota::statfs(s, dir, base)
            })
            .await?;
        Ok(Response::new(pb::StatFsReply {
            total_bytes: s.total_bytes,
            free_bytes: s.free_bytes,
            avail_bytes: s.avail_bytes,
            total_inodes: s.total_inodes,
            free_inodes: s.free_inodes,
            block_size: s.block_size,
            max_name_len: s.max_name_len,
        }))
    }

    async fn set_xattr(&self, req: Request<pb::SetXattrRequest>) -> Res<pb::Empty> {
        let _m = crate::metrics::op(Rpc::SetXattr);
        let (lim, who) = self.caller_of(&req);
        let r = req.into_inner();
        let cred = who.cred(r.header.as_ref(), lim.as_ref());
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.ino])?;
        self.check(cred.as_ref(), |s, c| {
            permission::may_xattr(s, c, r.ino, &r.name, true)
        })?;
        self.check_growth()?;
        ino_ok(r.ino)?;
        if crate::quota::is_quota_name(&r.name) || r.name == crate::trash::TRASH_SECONDS {
            Self::check_quota_admin(lim.as_ref(), r.has_cred, r.uid)?;
            self.require_voters(
                avalon_proto::version::FEATURE_DIR_POLICIES,
                "quotas and the trash",
            )?;
            self.settle_subtree(session_of(r.header.as_ref()), r.ino)
                .await;
        }
        // A mapped key's ACL names its client ids: stored as cluster ids.
        let value = match lim.as_ref() {
            Some((_, c)) => caps::map_acl(c, &r.name, &r.value, true),
            None => None,
        };
        let op = Op::SetXattr {
            ino: r.ino,
            name: r.name.into(),
            value: value.unwrap_or_else(|| r.value.into()),
            flags: r.flags,
        };
        self.mutate(r.header.as_ref(), op, &[Change::attr(r.ino)])
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_xattr(&self, req: Request<pb::XattrRequest>) -> Res<pb::XattrReply> {
        let _m = crate::metrics::op(Rpc::GetXattr);
        let (lim, who) = self.caller_of(&req);
        let r = req.into_inner();
        let cred = who.cred(r.header.as_ref(), lim.as_ref());
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.ino])?;
        self.check(cred.as_ref(), |s, c| {
            permission::may_xattr(s, c, r.ino, &r.name, false)
        })?;
        ino_ok(r.ino)?;
        let sid = session_of(r.header.as_ref());
        if r.name.starts_with(crate::rstats::PREFIX) || r.name == crate::quota::LIST {
            self.settle_subtree(sid, r.ino).await;
        }
        let value = self
            .read_leased(sid, |s| (s.getxattr(r.ino, &r.name), [r.ino]))
            .await?
            .map_err(MdsError::Errno)?;
        let value = match lim.as_ref() {
            Some((_, c)) => caps::map_acl(c, &r.name, &value, false).unwrap_or(value),
            None => value,
        };
        Ok(Response::new(pb::XattrReply {
            value: value.into(),
        }))
    }

    async fn list_xattr(&self, req: Request<pb::GetAttrRequest>) -> Res<pb::ListXattrReply> {
        let _m = crate::metrics::op(Rpc::ListXattr);
        let lim = self.limits(&req);
        let r = req.into_inner();
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.ino])?;
        ino_ok(r.ino)?;
        self.settle(session_of(r.header.as_ref()), [r.ino]).await;
        let names = self
            .node
            .read(|s| s.listxattr(r.ino))
            .await?
            .map_err(MdsError::Errno)?;
        Ok(Response::new(pb::ListXattrReply {
            names: names.into_iter().map(Into::into).collect(),
        }))
    }

    async fn remove_xattr(&self, req: Request<pb::XattrRequest>) -> Res<pb::Empty> {
        let _m = crate::metrics::op(Rpc::RemoveXattr);
        let (lim, who) = self.caller_of(&req);
        let r = req.into_inner();
        let cred = who.cred(r.header.as_ref(), lim.as_ref());
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.ino])?;
        self.check(cred.as_ref(), |s, c| {
            permission::may_xattr(s, c, r.ino, &r.name, true)
        })?;
        ino_ok(r.ino)?;
        if crate::quota::is_quota_name(&r.name) || r.name == crate::trash::TRASH_SECONDS {
            Self::check_quota_admin(lim.as_ref(), r.has_cred, r.uid)?;
        }
        let op = Op::RemoveXattr {
            ino: r.ino,
            name: r.name.into(),
        };
        self.mutate(r.header.as_ref(), op, &[Change::attr(r.ino)])
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn commit_write(&self, req: Request<pb::CommitWriteRequest>) -> Res<pb::AttrReply> {
        let _m = crate::metrics::op(Rpc::CommitWrite);
        let lim = self.limits(&req);
        let r = req.into_inner();
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.ino])?;
        ino_ok(r.ino)?;
        let session = r.header.as_ref().map_or(0, |h| h.session_id);
        let grants =
            session != 0 && (r.want_grant != 0 || r.release_grant) && self.node.grants_on();
        let op = if let Some(expect) = r.expect_size {
            self.fenced_commit(session, r.ino, r.size, expect).await?
        } else if grants {
            Op::CommitWriteGrant {
                ino: r.ino,
                size: r.size,
                commit: !r.grant_only,
                session,
                max_size: if r.release_grant {
                    0
                } else {
                    crate::grants::max_size_for(r.size.max(r.want_grant))
                },
            }
        } else {
            Op::CommitWrite {
                ino: r.ino,
                size: r.size,
            }
        };
        let reply = self
            .mutate(r.header.as_ref(), op, &[Change::data(r.ino)])
            .await?;
        let (reply, granted) = match reply {
            Reply::Granted(a, g) => (Reply::Attr(a), g),
            other => (other, 0),
        };
        let mut reply = attr_reply(reply)?;
        reply.grant_max_size = granted;
        Ok(mapped(lim.as_ref(), reply))
    }

    async fn append_write(&self, req: Request<pb::AppendWriteRequest>) -> Res<pb::AttrReply> {
        let _m = crate::metrics::op(Rpc::AppendWrite);
        let lim = self.limits(&req);
        let r = req.into_inner();
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.ino])?;
        ino_ok(r.ino)?;
        if r.len == 0 {
            return Err(MdsError::Errno(libc::EINVAL).into());
        }
        let sid = session_of(r.header.as_ref());
        if sid != 0 {
            self.before_reserving(sid, r.ino).await?;
        }
        let op = Op::AppendWrite {
            ino: r.ino,
            len: r.len,
        };
        Ok(mapped(
            lim.as_ref(),
            attr_reply(
                self.mutate(r.header.as_ref(), op, &[Change::data(r.ino)])
                    .await?,
            )?,
        ))
    }

    async fn open(&self, req: Request<pb::OpenRequest>) -> Res<pb::AttrReply> {
        let _m = crate::metrics::op(Rpc::Open);
        let (lim, who) = self.caller_of(&req);
        let peer = Peer::of(&req);
        let r = req.into_inner();
        let cred = who.cred(r.header.as_ref(), lim.as_ref());
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.ino])?;
        ino_ok(r.ino)?;
        if let Some((_, c)) = &lim {
            let truncates = r.flags as i32 & libc::O_TRUNC != 0;
            if c.read_only && (writes(r.flags) || truncates) {
                return Err(MdsError::Errno(libc::EROFS).into());
            }
        }
        self.node.check_leader()?;
        let sid = r.header.as_ref().map(|h| h.session_id).unwrap_or(0);
        let write = sid != 0 && writes(r.flags);
        self.settle(sid, [r.ino]).await;
        // Checked once another session's delegated changes to the file (a
        // chmod or chown it made) are in the state.
        self.check(cred.as_ref(), |s, c| {
            permission::may_open(s, c, r.ino, r.flags)
        })?;
        if sid != 0 {
            self.node.open_begin(sid, r.ino).await;
        }
        let shared_write = sid != 0 && self.open_shared(sid, r.ino, write).await;
        let res = match self.read_leased(sid, |s| (s.getattr(r.ino), [r.ino])).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(MdsError::Errno(e)),
            Err(e) => Err(e),
        };
        match res {
            Ok(a) => Ok(mapped(
                lim.as_ref(),
                pb::AttrReply {
                    attr: Some(attr_pb(&a)),
                    shared_write,
                    quota_window: self.quota_window(r.ino),
                    snap_seq: self.node.read_local(|s| crate::snapshots::seq_of(s, r.ino)),
                    grant_max_size: 0,
                    // Read-write for opens that change data (O_TRUNC too).
                    chunk_cap: self.chunk_caps.issue(
                        &peer,
                        sid,
                        r.ino,
                        writes(r.flags) || r.flags as i32 & libc::O_TRUNC != 0,
                    ),
                },
            )),
            Err(e) => {
                if sid != 0 {
                    self.node.open_end(sid, r.ino, write);
                }
                Err(e.into())
            }
        }
    }

    async fn get_chunk_cap(&self, req: Request<pb::ChunkCapRequest>) -> Res<pb::ChunkCapReply> {
        let peer = Peer::of(&req);
        let (lim, who) = self.caller_of(&req);
        let r = req.into_inner();
        let cred = who.cred(r.header.as_ref(), lim.as_ref());
        ino_ok(r.ino)?;
        let sid = r.header.as_ref().map_or(0, |h| h.session_id);
        self.own_session(&peer, sid)?;
        self.reach(lim.as_ref(), r.header.as_ref(), &[r.ino])?;
        if r.write && lim.as_ref().is_some_and(|(_, c)| c.read_only) {
            return Err(MdsError::Errno(libc::EROFS).into());
        }
        // A client's capabilities come with a live session of its own (a
        // removed key's sessions are gone: its caps run out at expiry).
        // Asked of the leader, linearizably: a follower (or a new leader
        // still applying its log) may not know a session yet, and the
        // refusal would fail the client's writes for good.
        let known = self.node.read(|s| s.sessions.contains_key(&sid)).await?;
        if peer.secured && caps::client_name(&peer).is_some() && !known {
            return Err(Status::permission_denied(format!(
                "no session {sid}: no chunk capabilities"
            )));
        }
        if let Some(c) = &cred {
            // On the file as its delegated changes left it (see open).
            self.settle(sid, [r.ino]).await;
            self.check_chunk_cap(sid, c, r.ino, r.write).await?;
        }
        Ok(Response::new(pb::ChunkCapReply {
            cap: self.chunk_caps.issue(&peer, sid, r.ino, r.write),
        }))
    }

    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Res<pb::Empty> {
        let _m = crate::metrics::op(Rpc::Release);
        let r = req.into_inner();
        ino_ok(r.ino)?;
        self.node.check_leader()?;
        let sid = r.header.as_ref().map(|h| h.session_id).unwrap_or(0);
        if sid != 0 {
            self.node.release(sid, r.ino, writes(r.flags)).await?;
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn sync_meta(&self, _req: Request<pb::SyncMetaRequest>) -> Res<pb::Empty> {
        let _m = crate::metrics::op(Rpc::SyncMeta);
        self.node.sync_log().await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn delegate(&self, req: Request<pb::DelegateRequest>) -> Res<pb::DelegateReply> {
        let _m = crate::metrics::op(Rpc::Delegate);
        let r = req.into_inner();
        let sid = session_of(r.header.as_ref());
        if sid == 0 {
            return Err(MdsError::Invalid("delegations are for client sessions".into()).into());
        }
        // No new delegated creates while the metadata disk is low (the
        // client creates synchronously and gets ENOSPC); queued ones that
        // the client acknowledged already are applied.
        self.check_growth()?;
        let layout = self.node.layout().await?;
        let mut reply = pb::DelegateReply {
            chunk_size: layout.chunk_size,
            replicas: layout.replicas,
            write_quorum: layout.write_quorum,
            ..Default::default()
        };
        if r.want_inos > 0 {
            let count = u64::from(r.want_inos).min(MAX_INOS_PER_DELEGATE);
            match self
                .node
                .write(r.header.as_ref(), Op::ReserveInos { count })
                .await?
            {
                Reply::Inos(start) => {
                    self.node.delegations.reserve(sid, start, count);
                    reply.ino_start = start;
                    reply.ino_count = count as u32;
                }
                other => {
                    return Err(MdsError::Internal(format!("reserve replied {other:?}")).into())
                }
            }
        }
        if r.dir != 0 {
            ino_ok(r.dir)?;
            // A new leader does not know what its predecessor let others
            // cache: no delegation before those leases lapsed.
            self.node.wait_fresh_leader(sid).await;
            let leases = &self.node.leases;
            let delegations = &self.node.delegations;
            let granted = self
                .node
                .read(|s| {
                    let dir = s
                        .getattr(r.dir)
                        .ok()
                        .filter(|a| a.mode & libc::S_IFMT == libc::S_IFDIR);
                    let bare = s.inodes.get(&r.dir).is_some_and(|i| i.xattrs.is_empty());
                    // Creates under a quota are checked as they happen,
                    // and removals in a directory with a trash go to it
                    // when they happen: no delegation there.
                    let dir = dir.filter(|_| {
                        !crate::quota::governed(s, r.dir) && crate::trash::seconds_of(s, r.dir) == 0
                    });
                    match dir {
                        // Under the state lock: no other session's read of
                        // the directory can slip between check and grant.
                        Some(a)
                            if delegations.grant(sid, r.dir, leases.held_by_others(sid, r.dir)) =>
                        {
                            leases.grant(sid, [r.dir]);
                            Some((a, bare))
                        }
                        _ => None,
                    }
                })
                .await?;
            if let Some((a, bare)) = granted {
                reply.granted = true;
                reply.dir = Some(attr_pb(&a));
                reply.dir_no_xattrs = bare;
            }
        }
        Ok(Response::new(reply))
    }

    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Res<pb::ApplyReply> {
        let _m = crate::metrics::op(Rpc::Apply);
        let r = req.into_inner();
        let hdr = r.header.as_ref();
        let sid = session_of(hdr);
        if sid == 0 {
            return Err(MdsError::Invalid("delegations are for client sessions".into()).into());
        }
        if r.ops.len() > MAX_APPLY_OPS {
            return Err(
                MdsError::Invalid(format!("at most {MAX_APPLY_OPS} changes per apply")).into(),
            );
        }
        let layout = self.node.layout().await?;
        let mut ops = Vec::with_capacity(r.ops.len());
        let mut changes = Vec::with_capacity(r.ops.len());
        let mut named = Vec::with_capacity(r.ops.len());
        let mut creates = Vec::new();
        for d in r.ops {
            use pb::delegated_op::Op as D;
            let op = match d.op {
                Some(D::Create(c)) => {
                    crate::metrics::delegated(Delegated::Create);
                    ino_ok(c.parent)?;
                    name_ok(&c.name)?;
                    if self
                        .node
                        .delegations
                        .reserved_for(c.ino)
                        .is_some_and(|s| s != sid)
                    {
                        return Err(MdsError::Invalid(format!(
                            "inode {} is reserved for another session",
                            c.ino
                        ))
                        .into());
                    }
                    named.push(c.parent);
                    changes.push(Change::entry(c.parent, &c.name));
                    creates.push((ops.len(), c.parent, c.ino));
                    let target =
                        (c.mode & libc::S_IFMT == libc::S_IFLNK).then(|| c.target.to_vec());
                    Op::CreateAs {
                        ino: c.ino,
                        parent: c.parent,
                        name: c.name.into(),
                        mode: c.mode,
                        uid: c.uid,
                        gid: c.gid,
                        target,
                        layout,
                    }
                }
                Some(D::SetAttr(a)) => {
                    crate::metrics::delegated(Delegated::SetAttr);
                    ino_ok(a.ino)?;
                    if a.access {
                        return Err(
                            MdsError::Invalid("no access-time updates in an apply".into()).into(),
                        );
                    }
                    named.push(a.ino);
                    changes.push(if a.size.is_some() {
                        Change::data(a.ino)
                    } else {
                        Change::attr(a.ino)
                    });
                    Op::SetAttr {
                        ino: a.ino,
                        mode: a.mode,
                        uid: a.uid,
                        gid: a.gid,
                        size: a.size,
                        atime: time_spec(a.atime),
                        mtime: time_spec(a.mtime),
                        ctime_ns: a.ctime_ns,
                    }
                }
                Some(D::Unlink(u)) => {
                    crate::metrics::delegated(Delegated::Unlink);
                    ino_ok(u.parent)?;
                    name_ok(&u.name)?;
                    named.push(u.parent);
                    changes.push(Change::entry(u.parent, &u.name));
                    // Only files nobody has open are removed under a
                    // delegation (nobody else can reach them, and the
                    // holder does not): no open-file guard.
                    Op::Unlink {
                        parent: u.parent,
                        name: u.name.into(),
                        guard: None,
                    }
                }
                Some(D::Rmdir(u)) => {
                    crate::metrics::delegated(Delegated::Rmdir);
                    ino_ok(u.parent)?;
                    name_ok(&u.name)?;
                    named.push(u.parent);
                    changes.push(Change::entry(u.parent, &u.name));
                    // As for unlink: a directory made under the
                    // delegation, empty, and open nowhere (the holder
                    // removes only those it does not have open).
                    Op::Rmdir {
                        parent: u.parent,
                        name: u.name.into(),
                    }
                }
                Some(D::Rename(m)) => {
                    crate::metrics::delegated(Delegated::Rename);
                    ino_ok(m.parent)?;
                    ino_ok(m.new_parent)?;
                    name_ok(&m.name)?;
                    name_ok(&m.new_name)?;
                    if m.flags != 0 {
                        return Err(MdsError::Invalid("no rename flags in an apply".into()).into());
                    }
                    named.extend([m.parent, m.new_parent]);
                    changes.push(Change::entry(m.parent, &m.name));
                    changes.push(Change::entry(m.new_parent, &m.new_name));
                    Op::Rename {
                        parent: m.parent,
                        name: m.name.into(),
                        new_parent: m.new_parent,
                        new_name: m.new_name.into(),
                        flags: 0,
                        guard: None,
                    }
                }
                Some(D::CommitWrite(w)) => {
                    crate::metrics::delegated(Delegated::CommitWrite);
                    ino_ok(w.ino)?;
                    named.push(w.ino);
                    changes.push(Change::data(w.ino));
                    Op::CommitWrite {
                        ino: w.ino,
                        size: w.size,
                    }
                }
                None => return Err(MdsError::Invalid("empty delegated change".into()).into()),
            };
            ops.push((d.now_ns, op));
        }
        // Everything named must be this session's or nobody's: another
        // session's delegation means this one's was revoked meanwhile
        // (its lease lapsed) and the changes came too late.
        if !self.node.delegations.conflicts(sid, named).is_empty() {
            return Err(Status::failed_precondition(
                "these changes name inodes delegated to another session",
            ));
        }
        let announced = self
            .node
            .leases
            .announce(sid, changes.iter().map(|c| c.ino).collect());
        let errnos = match self.node.write(hdr, Op::Batch { ops }).await? {
            Reply::Batch(e) => e,
            other => return Err(MdsError::Internal(format!("apply replied {other:?}")).into()),
        };
        for (i, parent, ino) in creates {
            self.node.delegations.consumed(ino);
            if errnos.get(i) == Some(&0) {
                self.node.delegations.created(sid, parent, ino);
                self.node.leases.grant(sid, [ino]);
            }
        }
        self.node
            .leases
            .recall(sid, &changes, Some(announced))
            .await;
        // Tests: the batch is applied but its reply lost, as when a leader
        // dies right after applying; the client's resend must be answered
        // from the dedup table.
        fail::fail_point!("mds-apply-reply-lost", |_| {
            tracing::warn!(
                session = sid,
                "fail point mds-apply-reply-lost: reply dropped"
            );
            Err(Status::unavailable("fail point mds-apply-reply-lost"))
        });
        Ok(Response::new(pb::ApplyReply { errnos }))
    }

    async fn check_inodes(
        &self,
        req: Request<pb::CheckInodesRequest>,
    ) -> Res<pb::CheckInodesReply> {
        let _m = crate::metrics::op(Rpc::CheckInodes);
        let r = req.into_inner();
        if r.inos.len() > 100_000 {
            return Err(MdsError::Invalid("at most 100000 inodes per check".into()).into());
        }
        let dead = self
            .node
            .read(|s| {
                r.inos
                    .iter()
                    .copied()
                    .filter(|&i| {
                        i != 0
                            && i < s.next_ino
                            && !s.inodes.contains_key(&i)
                            && !crate::trash::holds(s, i)
                            && !crate::snapshots::holds(s, i)
                    })
                    .collect::<Vec<u64>>()
            })
            .await?;
        // Reserved numbers whose create may still be on its way (the data
        // of a file created under a delegation can reach the OSDs first).
        let delegations = &self.node.delegations;
        let dead = dead
            .into_iter()
            .filter(|i| delegations.reserved_for(*i).is_none())
            .collect();
        Ok(Response::new(pb::CheckInodesReply { dead }))
    }

    async fn set_osd_state(&self, req: Request<pb::SetOsdStateRequest>) -> Res<pb::Empty> {
        let _m = crate::metrics::op(Rpc::SetOsdState);
        let r = req.into_inner();
        let state = match r.state.as_str() {
            "out" | "drain" => OsdState::OutByAdmin,
            "in" => OsdState::Up,
            other => {
                return Err(MdsError::Invalid(format!(
                    "unknown OSD state {other:?} (out, drain or in)"
                ))
                .into())
            }
        };
        self.node.check_leader()?;
        if self.node.read_local(|s| !s.osds.contains_key(&r.osd_id)) {
            return Err(MdsError::NotFound(format!("no OSD {}", r.osd_id)).into());
        }
        if state == OsdState::Up {
            // Give it a full period to heartbeat before it counts as down.
            self.node.osd_seen_now(r.osd_id);
        }
        tracing::info!(osd = r.osd_id, state = %r.state, "OSD state set by hand");
        self.mutate(
            r.header.as_ref(),
            Op::SetOsdState {
                osd_id: r.osd_id,
                state,
            },
            &[],
        )
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_cluster_map(&self, _req: Request<pb::Empty>) -> Res<pb::ClusterMap> {
        let _m = crate::metrics::op(Rpc::GetClusterMap);
        self.node.ensure_settings().await?;
        let map = self.node.read(|s| self.cluster_map(s)).await?;
        Ok(Response::new(map))
    }

    async fn register_osd(
        &self,
        req: Request<pb::RegisterOsdRequest>,
    ) -> Res<pb::RegisterOsdReply> {
        let _m = crate::metrics::op(Rpc::RegisterOsd);
        crate::authz::osd_claim(&req, req.get_ref().osd_id)?;
        let r = req.into_inner();
        let version = check_version("an OSD", r.osd_id, r.version.as_ref())?;
        if r.addr.is_empty() || r.addr.len() > 1024 || r.failure_domain.len() > 1024 {
            return Err(MdsError::Invalid("bad OSD address or failure domain".into()).into());
        }
        let op = Op::RegisterOsd {
            osd_id: r.osd_id,
            addr: r.addr,
            capacity_bytes: r.capacity_bytes,
            used_bytes: r.used_bytes,
            failure_domain: r.failure_domain,
            pid: r.pid,
        };
        match self.mutate(r.header.as_ref(), op, &[]).await? {
            Reply::OsdRegistered { osd_id, .. } => {
                self.node.osd_started(osd_id);
                self.node.version_seen(PeerKind::Osd, osd_id, version);
                let map = self.node.read_local(|s| self.cluster_map(s));
                tracing::info!(osd = osd_id, epoch = map.epoch, "OSD registered");
                Ok(Response::new(pb::RegisterOsdReply {
                    osd_id,
                    map: Some(map),
                    version: Some(avalon_proto::version::local()),
                }))
            }
            other => Err(MdsError::Internal(format!("unexpected reply {other:?}")).into()),
        }
    }

    async fn osd_heartbeat(
        &self,
        req: Request<pb::OsdHeartbeatRequest>,
    ) -> Res<pb::OsdHeartbeatReply> {
        let _m = crate::metrics::op(Rpc::OsdHeartbeat);
        crate::authz::osd_claim(&req, req.get_ref().osd_id)?;
        let r = req.into_inner();
        let version = check_version("an OSD", r.osd_id, r.version.as_ref())?;
        self.node.check_leader()?;
        self.node.version_seen(PeerKind::Osd, r.osd_id, version);
        let known = self.node.read_local(|s| s.osds.get(&r.osd_id).cloned());
        let Some(osd) = known else {
            return Err(MdsError::NotFound(format!("OSD {} is not registered", r.osd_id)).into());
        };
        if r.stopping {
            self.node.osd_stopping(r.osd_id, r.pid);
            if osd.state == OsdState::Up {
                tracing::info!(osd = r.osd_id, "OSD is stopping; marking down");
                self.mutate(
                    None,
                    Op::SetOsdState {
                        osd_id: r.osd_id,
                        state: OsdState::Down,
                    },
                    &[],
                )
                .await?;
            }
            let map_epoch = self.node.read_local(|s| s.map_epoch);
            return Ok(Response::new(pb::OsdHeartbeatReply {
                map_epoch,
                full_osds: Vec::new(),
            }));
        }
        self.node.osd_seen_now(r.osd_id);
        self.node.osd_report(r.osd_id, r.report);
        if matches!(osd.state, OsdState::Down | OsdState::Out)
            && !self.node.osd_is_stopping(r.osd_id, r.pid)
        {
            tracing::info!(osd = r.osd_id, "OSD heartbeats again; marking up");
            self.mutate(
                None,
                Op::SetOsdState {
                    osd_id: r.osd_id,
                    state: OsdState::Up,
                },
                &[],
            )
            .await?;
        }
        let addr_changed = !r.addr.is_empty() && r.addr != osd.addr;
        let drift = |a: u64, b: u64| a.abs_diff(b) > (b / 100).max(1 << 20);
        if addr_changed
            || r.pid != osd.pid
            || drift(r.capacity_bytes, osd.capacity_bytes)
            || drift(r.used_bytes, osd.used_bytes)
        {
            self.mutate(
                None,
                Op::OsdReport {
                    osd_id: r.osd_id,
                    addr: r.addr,
                    capacity_bytes: r.capacity_bytes,
                    used_bytes: r.used_bytes,
                    pid: r.pid,
                },
                &[],
            )
            .await?;
        }
        let full = self.node.osds_reporting_full();
        let (map_epoch, full_osds) = self.node.read_local(|s| {
            let up = |id: &u64| s.osds.get(id).is_some_and(|o| o.state == OsdState::Up);
            (s.map_epoch, full.into_iter().filter(up).collect())
        });
        Ok(Response::new(pb::OsdHeartbeatReply {
            map_epoch,
            full_osds,
        }))
    }

    async fn register_client(
        &self,
        req: Request<pb::RegisterClientRequest>,
    ) -> Res<pb::RegisterClientReply> {
        let _m = crate::metrics::op(Rpc::RegisterClient);
        let peer = Peer::of(&req);
        let lim = self.limits(&req);
        let r = req.into_inner();
        let version = check_version("the client", 0, r.version.as_ref())?;
        if r.hostname.len() > 1024 || r.mountpoint.len() > 4096 || r.subdir.len() > 4096 {
            return Err(MdsError::Invalid("hostname, mountpoint or subdir too long".into()).into());
        }
        let op = match peer.identity.as_ref().filter(|_| peer.secured) {
            // The session belongs to the identity that opened it; a
            // confined one's mount root is SOURCE's path under its subtree.
            Some(id) => {
                let mut subdir: Vec<u8> = r.subdir.into();
                if let Some((_, c)) = lim.as_ref().filter(|(_, c)| c.confined()) {
                    if subdir.split(|&b| b == b'/').any(|p| p == b"..") {
                        return Err(MdsError::Errno(libc::EACCES).into());
                    }
                    let mut p = c.path.clone().into_bytes();
                    p.push(b'/');
                    p.extend_from_slice(&subdir);
                    subdir = p;
                }
                Op::RegisterClientAs {
                    hostname: r.hostname,
                    mountpoint: r.mountpoint.into(),
                    pid: r.pid,
                    subdir,
                    identity: id.name.clone(),
                }
            }
            None => Op::RegisterClient {
                hostname: r.hostname,
                mountpoint: r.mountpoint.into(),
                pid: r.pid,
                subdir: r.subdir.into(),
            },
        };
        // Session ids are drawn at random (not guessable) once every member
        // applies such registrations; a taken id is drawn again.
        let random = self
            .node
            .voters_have(avalon_proto::version::FEATURE_RANDOM_SESSIONS);
        let mut tries = 0;
        let reply = loop {
            let op = if random {
                with_random_id(op.clone())
            } else {
                op.clone()
            };
            // A registration is not deduplicated: it has no session yet.
            match self.mutate(None, op, &[]).await {
                Err(s)
                    if random && tries < 4 && avalon_proto::errno::errno_of(&s) == libc::EEXIST =>
                {
                    tries += 1;
                }
                r => break r?,
            }
        };
        match reply {
            Reply::ClientRegistered {
                session_id,
                root_ino,
            } => {
                self.node.client_seen_now(session_id);
                self.node
                    .version_seen(PeerKind::Client, session_id, version);
                Ok(Response::new(pb::RegisterClientReply {
                    session_id,
                    root_ino,
                    version: Some(avalon_proto::version::local()),
                }))
            }
            other => Err(MdsError::Internal(format!("unexpected reply {other:?}")).into()),
        }
    }

    async fn client_heartbeat(
        &self,
        req: Request<pb::ClientHeartbeatRequest>,
    ) -> Res<pb::ClientHeartbeatReply> {
        let _m = crate::metrics::op(Rpc::ClientHeartbeat);
        let peer = Peer::of(&req);
        let r = req.into_inner();
        self.node.check_leader()?;
        let sid = r.header.map(|h| h.session_id).unwrap_or(0);
        self.own_session(&peer, sid)?;
        // "No session" tells the client that its queued changes are lost.
        if !self.session_known(sid).await? {
            return Err(MdsError::NotFound(format!("no session {sid}")).into());
        }
        self.node.client_seen_now(sid);
        let version = check_version("the client", sid, r.version.as_ref())?;
        let reclaims = version.features & avalon_proto::version::FEATURE_LOCK_RECLAIM != 0;
        self.node.version_seen(PeerKind::Client, sid, version);
        self.node.client_totals_report(sid, r.totals);
        if r.open_inos.len() > 1_000_000 || r.write_inos.len() > 1_000_000 {
            return Err(MdsError::Invalid("too many open inodes".into()).into());
        }
        self.node.heartbeat_opens(sid, &r.open_inos, &r.write_inos);
        // A lease only from a leader no other can have replaced yet (a
        // deposed one fails this quorum check).
        let lease_ms = match self.node.read(|_| ()).await {
            Ok(()) => self.node.leases.heartbeat(sid, r.dropped_cache).as_millis() as u32,
            Err(_) => 0,
        };
        let reclaim_locks = self.node.locks.heartbeat(&self.node, sid, reclaims).await;
        Ok(Response::new(pb::ClientHeartbeatReply {
            lease_ms,
            no_stream: !self.node.leases.has_stream(sid),
            reclaim_locks,
        }))
    }

    type SessionStream = tokio_stream::wrappers::ReceiverStream<Result<pb::SessionEvent, Status>>;

    async fn session(&self, req: Request<pb::SessionRequest>) -> Res<Self::SessionStream> {
        let _m = crate::metrics::op(Rpc::Session);
        let peer = Peer::of(&req);
        let r = req.into_inner();
        self.node.check_leader()?;
        let sid = session_of(r.header.as_ref());
        // The stream's first event counts the recalls; its opener must not
        // wait for them.
        avalon_proto::recall_mark::reply_to(0);
        self.own_session(&peer, sid)?;
        if sid == 0 || !self.session_known(sid).await? {
            return Err(MdsError::NotFound(format!("no session {sid}")).into());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(RECALL_QUEUE);
        self.node.leases.attach(sid, tx);
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn ack_recall(&self, req: Request<pb::AckRecallRequest>) -> Res<pb::Empty> {
        let _m = crate::metrics::op(Rpc::AckRecall);
        let peer = Peer::of(&req);
        let r = req.into_inner();
        // Sent by the recall loop itself: waiting for a mark there would
        // wait for the loop.
        let sid = r.header.as_ref().map_or(0, |h| h.session_id);
        self.own_session(&peer, sid)?;
        self.node.leases.ack(sid, r.seq, r.flush_seq);
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_lock(&self, req: Request<pb::LockRequest>) -> Res<pb::LockReply> {
        let _m = crate::metrics::op(Rpc::GetLock);
        let r = req.into_inner();
        ino_ok(r.ino)?;
        let op = lock_op(&r)?;
        let found = self.node.locks.get(&self.node, op).await?;
        Ok(Response::new(match found {
            Some(l) => pb::LockReply {
                r#type: l.kind.to_type(),
                start: l.start,
                end: l.end,
                pid: l.pid,
                session_id: l.session,
            },
            None => pb::LockReply {
                r#type: LockKind::Unlock.to_type(),
                ..Default::default()
            },
        }))
    }

    async fn set_lock(&self, req: Request<pb::LockRequest>) -> Res<pb::SetLockReply> {
        let _m = crate::metrics::op(Rpc::SetLock);
        let r = req.into_inner();
        ino_ok(r.ino)?;
        let op = lock_op(&r)?;
        let cached = self.node.locks.set(&self.node, op).await?;
        Ok(Response::new(pb::SetLockReply { cached }))
    }

    async fn release_locks(&self, req: Request<pb::ReleaseLocksRequest>) -> Res<pb::Empty> {
        let _m = crate::metrics::op(Rpc::ReleaseLocks);
        let r = req.into_inner();
        ino_ok(r.ino)?;
        let op = LockOp {
            hdr: r.header.as_ref(),
            session: lock_session(r.header.as_ref())?,
            ino: r.ino,
            owner: r.owner,
            pid: 0,
            start: 0,
            end: u64::MAX,
            kind: LockKind::Unlock,
            reclaims: r.reclaims,
            caches: false,
        };
        self.node.locks.release(&self.node, op).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn reclaim_locks(
        &self,
        req: Request<pb::ReclaimLocksRequest>,
    ) -> Res<pb::ReclaimLocksReply> {
        let _m = crate::metrics::op(Rpc::ReclaimLocks);
        let peer = Peer::of(&req);
        let r = req.into_inner();
        let sid = lock_session(r.header.as_ref())?;
        self.own_session(&peer, sid)?;
        if r.locks.len() > 1_000_000 {
            return Err(MdsError::Invalid("too many locks".into()).into());
        }
        let lost = self
            .node
            .locks
            .reclaim(&self.node, sid, &r.locks, r.returned_ino)
            .await?;
        Ok(Response::new(pb::ReclaimLocksReply { lost }))
    }

    async fn status(&self, _req: Request<pb::Empty>) -> Res<pb::StatusReply> {
        let _m = crate::metrics::op(Rpc::Status);
        let m = self.node.raft.metrics().borrow().clone();
        let leader = self.node.is_leader();
        // Index and digest read together, under the state machine lock.
        let (applied, digest) = {
            let sm = self.node.sm.read().unwrap_or_else(|e| e.into_inner());
            (sm.last_applied.map(|l| l.index).unwrap_or(0), sm.digest())
        };
        let disk = self.reserve.usage();
        let me = pb::MdsInfo {
            state_digest: digest,
            id: self.node.id,
            addr: self.node.addr.clone(),
            role: role_name(m.state).to_string(),
            pid: std::process::id(),
            term: m.current_term,
            last_applied: applied,
            leader_id: m.current_leader.unwrap_or(0),
            disk_total_bytes: disk.map_or(0, |u| u.total),
            disk_free_bytes: disk.map_or(0, |u| u.free),
            disk_low: self.reserve.low(),
            version: Some(avalon_proto::version::local()),
            metrics_addr: self.node.metrics_addr.get().cloned().unwrap_or_default(),
            totals: crate::metrics::totals(),
        };
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| pb::MdsInfo {
                id: *id,
                addr: n.addr.clone(),
                role: if *id == self.node.id {
                    me.role.clone()
                } else if m.current_leader == Some(*id) {
                    "leader".into()
                } else if voters.contains(id) {
                    "follower".into()
                } else {
                    "learner".into()
                },
                pid: if *id == self.node.id { me.pid } else { 0 },
                term: if *id == self.node.id { me.term } else { 0 },
                last_applied: if *id == self.node.id {
                    me.last_applied
                } else {
                    0
                },
                leader_id: m.current_leader.unwrap_or(0),
                state_digest: if *id == self.node.id {
                    me.state_digest
                } else {
                    0
                },
                version: if *id == self.node.id {
                    me.version.clone()
                } else {
                    self.node.peer_version(PeerKind::Mds, *id)
                },
                ..Default::default()
            })
            .collect();
        let (map, clients, inodes, trash) = self.node.read_local(|s| {
            let clients = s
                .sessions
                .values()
                .map(|c| pb::ClientInfo {
                    session_id: c.id,
                    hostname: c.hostname.clone(),
                    mountpoint: c.mountpoint.clone().into(),
                    pid: c.pid,
                    last_seen_ms: if leader {
                        self.node.client_last_seen_ms(c.id)
                    } else {
                        0
                    },
                    version: self.node.peer_version(PeerKind::Client, c.id),
                    totals: self.node.client_totals(c.id),
                })
                .collect();
            let trash = (
                s.trash.entries.len() as u64,
                s.trash.bytes,
                s.snapshots.by_id.len() as u64,
            );
            (self.cluster_map(s), clients, s.inodes.len() as u64, trash)
        });
        Ok(Response::new(pb::StatusReply {
            self_: Some(me),
            members,
            map: Some(map),
            clients,
            inodes,
            trash_entries: trash.0,
            trash_bytes: trash.1,
            snapshots: trash.2,
        }))
    }

    async fn get_settings(&self, _req: Request<pb::Empty>) -> Res<pb::ClusterSettings> {
        let _m = crate::metrics::op(Rpc::GetSettings);
        self.node.ensure_settings().await?;
        let s = self.node.read(|s| s.settings.clone()).await?;
        let s =
            s.ok_or_else(|| MdsError::Unavailable("cluster settings not written yet".into()))?;
        Ok(Response::new(settings_pb(&s)))
    }

    async fn set_replicas(&self, req: Request<pb::SetReplicasRequest>) -> Res<pb::ClusterSettings> {
        let _m = crate::metrics::op(Rpc::SetReplicas);
        let r = req.into_inner();
        self.node.ensure_settings().await?;
        let cur = self.node.settings()?;
        // Unset: keep the quorum, at most the new number of copies.
        let write_quorum = match r.write_quorum {
            0 => cur.write_quorum.min(r.replicas),
            m => m,
        };
        crate::settings::check_quorum(r.replicas, write_quorum)
            .map_err(|e| MdsError::Invalid(e.to_string()))?;
        tracing::info!(
            from = cur.replicas,
            to = r.replicas,
            write_quorum,
            "replicas set by hand"
        );
        let op = Op::SetReplicas {
            replicas: r.replicas,
            write_quorum,
        };
        match self.node.write(r.header.as_ref(), op).await? {
            Reply::Settings(s) => Ok(Response::new(settings_pb(&s))),
            other => Err(MdsError::Internal(format!("unexpected reply {other:?}")).into()),
        }
    }

    async fn set_client_caps(&self, req: Request<pb::SetClientCapsRequest>) -> Res<pb::Empty> {
        let r = req.into_inner();
        let c = r
            .caps
            .ok_or_else(|| MdsError::Invalid("no capabilities".into()))?;
        if !c.name.starts_with("client.") || c.name == avalon_proto::tls::ADMIN_NAME {
            return Err(MdsError::Invalid(format!(
                "capabilities are for client.NAME identities other than the admin, not {:?}",
                c.name
            ))
            .into());
        }
        if c.path.split('/').any(|p| p == "..") || c.path.len() > 4096 {
            return Err(MdsError::Invalid(format!("bad subtree path {:?}", c.path)).into());
        }
        let mut caps = (!r.clear).then(|| ClientCaps::from_pb(&c));
        let ids = caps.as_mut().map(|c| std::mem::take(&mut c.ids));
        let ids = ids.unwrap_or_default();
        ids.check().map_err(MdsError::Invalid)?;
        // A mapping needs every voter to know the entry that stores it;
        // without one the older entry does (no mapping can exist then).
        let feature = avalon_proto::version::FEATURE_ID_MAP;
        let op = if ids.is_empty() && !self.node.voters_have(feature) {
            Op::SetClientCaps {
                name: c.name.clone(),
                caps,
            }
        } else {
            self.require_voters(feature, "uid/gid mappings")?;
            Op::SetClientCapsMapped {
                name: c.name.clone(),
                caps,
                ids,
            }
        };
        self.node.write(r.header.as_ref(), op).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_client_caps(&self, _req: Request<pb::Empty>) -> Res<pb::ClientCapsList> {
        let caps = self
            .node
            .read(|s| {
                s.clients
                    .caps
                    .keys()
                    .filter_map(|n| caps::joined(s, n).map(|c| c.to_pb(n)))
                    .collect::<Vec<_>>()
            })
            .await?;
        Ok(Response::new(pb::ClientCapsList { caps }))
    }

    async fn trash_list(&self, req: Request<pb::TrashListRequest>) -> Res<pb::TrashListReply> {
        let r = req.into_inner();
        let mut entries = self
            .node
            .read(|s| crate::trash::list(s, &r.path, TRASH_LIST_MAX + 1))
            .await?;
        let more = entries.len() > TRASH_LIST_MAX;
        entries.truncate(TRASH_LIST_MAX);
        Ok(Response::new(pb::TrashListReply {
            more,
            entries: entries
                .into_iter()
                .map(|e| pb::TrashEntry {
                    id: e.id,
                    path: e.path,
                    attr: Some(attr_pb(&e.attr)),
                    deleted_ns: e.deleted_ns,
                    expires_ns: e.expires_ns,
                })
                .collect(),
        }))
    }

    async fn trash_restore(
        &self,
        req: Request<pb::TrashRestoreRequest>,
    ) -> Res<pb::TrashRestoreReply> {
        let r = req.into_inner();
        self.check_growth()?;
        let to = (!r.to.is_empty()).then(|| r.to.clone().into_bytes());
        // A restore is a namespace change like a create: mounts that cached
        // the names (negative entries) or the directories hear of it.
        let steps = self
            .node
            .read(|s| crate::trash::plan(s, r.id, to.as_deref()))
            .await?
            .map_err(restore_status)?;
        let mut changes = Vec::new();
        for st in &steps {
            changes.push(Change::entry(st.parent, &st.name));
            changes.push(Change::attr(st.parent));
            changes.push(Change::attr(st.ino));
        }
        let op = Op::TrashRestore {
            id: r.id,
            to: to.clone(),
        };
        let attr = match self.mutate(r.header.as_ref(), op, &changes).await {
            Ok(Reply::Attr(a)) => a,
            Ok(other) => {
                return Err(MdsError::Internal(format!("unexpected reply {other:?}")).into())
            }
            // Something changed since the plan: say what, from the state now.
            Err(e) => {
                let again = self
                    .node
                    .read_local(|s| crate::trash::plan(s, r.id, to.as_deref()).err());
                return Err(again.map_or(e, restore_status));
            }
        };
        let path = self.node.read_local(|s| {
            let parent = steps
                .iter()
                .find(|st| st.id == r.id)
                .map_or(0, |st| st.parent);
            let name = steps
                .iter()
                .find(|st| st.id == r.id)
                .map(|st| String::from_utf8_lossy(&st.name).into_owned())
                .unwrap_or_default();
            let dir = crate::trash::dir_path(s, parent);
            format!("{}/{name}", dir.trim_end_matches('/'))
        });
        tracing::info!(id = r.id, %path, inodes = steps.len(), "trash entry restored");
        Ok(Response::new(pb::TrashRestoreReply {
            path,
            attr: Some(attr_pb(&attr)),
            restored: steps.len() as u64,
        }))
    }

    async fn trash_purge(&self, req: Request<pb::TrashPurgeRequest>) -> Res<pb::TrashPurgeReply> {
        let r = req.into_inner();
        if r.ids.is_empty() && !r.all {
            return Err(MdsError::Invalid("give entry ids or all".into()).into());
        }
        let op = Op::TrashPurge {
            ids: r.ids,
            all: r.all,
        };
        match self.node.write(r.header.as_ref(), op).await? {
            Reply::Count(purged) => Ok(Response::new(pb::TrashPurgeReply { purged })),
            other => Err(MdsError::Internal(format!("unexpected reply {other:?}")).into()),
        }
    }

    async fn snapshot_create(
        &self,
        req: Request<pb::SnapshotCreateRequest>,
    ) -> Res<pb::SnapshotInfo> {
        let lim = self.limits(&req);
        let r = req.into_inner();
        Self::check_quota_admin(lim.as_ref(), r.has_cred, r.uid)?;
        self.require_voters(avalon_proto::version::FEATURE_SNAPSHOTS, "snapshots")?;
        crate::snapshots::check_snap_name(&r.name).map_err(MdsError::Errno)?;
        self.node.check_leader()?;
        self.check_growth()?;
        let dir = self.snapshot_dir(r.ino, &r.path).await?;
        self.reach(lim.as_ref(), r.header.as_ref(), &[dir])?;
        // One create at a time on this leader: each proposes the next id,
        // which the writers below learned before it is recorded.
        let _one = SNAPSHOT_CREATES.lock().await;
        // Delegated creates and size commits below reach the state first.
        self.settle_subtree(0, dir).await;
        let (session, request) = r
            .header
            .as_ref()
            .map_or((0, 0), |h| (h.session_id, h.request_id));
        let (id, exists, done) = self
            .node
            .read(|s| {
                let done = match s.answered(session, request) {
                    Some(crate::command::MetaResponse(Ok(Reply::Count(id)))) => Some(*id),
                    _ => None,
                };
                (
                    s.snapshots.last_id + 1,
                    s.snapshots.by_name.contains_key(&(dir, r.name.to_vec())),
                    done,
                )
            })
            .await?;
        // A retry of a create that was applied (the reply was lost in a
        // failover) answers with that snapshot, not EEXIST.
        let id = match (exists, done) {
            (true, Some(id)) => return self.snapshot_reply(id),
            (true, None) => return Err(MdsError::Errno(libc::EEXIST).into()),
            (false, _) => id,
        };
        self.snapshot_writers(dir, id).await;
        let op = Op::SnapCreate {
            id,
            dir,
            name: r.name.to_vec(),
        };
        // A retry the state machine already applied answers with its id.
        let id = match self.node.write(r.header.as_ref(), op).await? {
            Reply::Count(id) => id,
            other => return Err(MdsError::Internal(format!("unexpected reply {other:?}")).into()),
        };
        self.snapshot_reply(id)
    }

    async fn snapshot_remove(&self, req: Request<pb::SnapshotCreateRequest>) -> Res<pb::Empty> {
        let lim = self.limits(&req);
        let r = req.into_inner();
        Self::check_quota_admin(lim.as_ref(), r.has_cred, r.uid)?;
        self.require_voters(avalon_proto::version::FEATURE_SNAPSHOTS, "snapshots")?;
        let dir = self.snapshot_dir(r.ino, &r.path).await?;
        self.reach(lim.as_ref(), r.header.as_ref(), &[dir])?;
        let op = Op::SnapRemove {
            dir,
            name: r.name.to_vec(),
        };
        let id = self.node.write(r.header.as_ref(), op).await?;
        tracing::info!(?id, dir, "snapshot removed");
        Ok(Response::new(pb::Empty {}))
    }

    async fn snapshot_list(
        &self,
        req: Request<pb::SnapshotListRequest>,
    ) -> Res<pb::SnapshotListReply> {
        let lim = self.limits(&req);
        let r = req.into_inner();
        let dir = if r.ino == 0 && r.path.is_empty() {
            None
        } else {
            let d = self.snapshot_dir(r.ino, &r.path).await?;
            self.reach(lim.as_ref(), r.header.as_ref(), &[d])?;
            Some(d)
        };
        let snapshots = self
            .node
            .read(|s| {
                crate::snapshots::list(s, dir)
                    .into_iter()
                    .map(|sn| snapshot_info(s, sn))
                    .collect::<Vec<_>>()
            })
            .await?;
        Ok(Response::new(pb::SnapshotListReply { snapshots }))
    }

    async fn snapshot_lookup(&self, req: Request<pb::SnapshotLookupRequest>) -> Res<pb::AttrReply> {
        let lim = self.limits(&req);
        let r = req.into_inner();
        if r.snap_id == 0 {
            // The live inode and the snap_seq its data changes carry (a
            // truncate by path, without an open).
            self.reach(lim.as_ref(), r.header.as_ref(), &[r.ino])?;
            let (a, snap_seq) = self
                .node
                .read(|s| (s.getattr(r.ino), crate::snapshots::seq_of(s, r.ino)))
                .await?;
            return Ok(mapped(
                lim.as_ref(),
                pb::AttrReply {
                    attr: Some(attr_pb(&a.map_err(MdsError::Errno)?)),
                    snap_seq,
                    ..Default::default()
                },
            ));
        }
        let (dir, a) = self
            .node
            .read(|s| {
                crate::snapshots::get(s, r.snap_id).and_then(|sn| {
                    let a = if r.name.is_empty() {
                        sn.getattr(r.ino)
                    } else {
                        sn.lookup(r.ino, &r.name)
                    };
                    a.map(|a| (sn.dir, a))
                })
            })
            .await?
            .map_err(MdsError::Errno)?;
        self.reach(lim.as_ref(), r.header.as_ref(), &[dir])?;
        Ok(mapped(
            lim.as_ref(),
            pb::AttrReply {
                attr: Some(attr_pb(&a)),
                ..Default::default()
            },
        ))
    }

    async fn snapshot_read_dir(
        &self,
        req: Request<pb::SnapshotReadDirRequest>,
    ) -> Res<pb::ReadDirReply> {
        let lim = self.limits(&req);
        let r = req.into_inner();
        let (dir, parent, (entries, eof)) = self
            .node
            .read(|s| {
                crate::snapshots::get(s, r.snap_id).and_then(|sn| {
                    sn.readdir(r.ino, r.cookie, r.max_entries as usize, r.plus)
                        .map(|page| (sn.dir, sn.parent_of(r.ino), page))
                })
            })
            .await?
            .map_err(MdsError::Errno)?;
        self.reach(lim.as_ref(), r.header.as_ref(), &[dir])?;
        Ok(mapped(
            lim.as_ref(),
            pb::ReadDirReply {
                entries: entries
                    .into_iter()
                    .map(|e| pb::DirEntry {
                        name: e.name.into(),
                        ino: e.ino,
                        mode: e.mode,
                        cookie: e.cookie,
                        attr: e.attr.as_ref().map(attr_pb),
                        no_xattrs: false,
                    })
                    .collect(),
                eof,
                parent,
                next_cookie: 0,
            },
        ))
    }

    async fn snapshot_readlink(
        &self,
        req: Request<pb::SnapshotLookupRequest>,
    ) -> Res<pb::ReadlinkReply> {
        let lim = self.limits(&req);
        let r = req.into_inner();
        let (dir, target) = self
            .node
            .read(|s| {
                crate::snapshots::get(s, r.snap_id)
                    .and_then(|sn| sn.readlink(r.ino).map(|t| (sn.dir, t)))
            })
            .await?
            .map_err(MdsError::Errno)?;
        self.reach(lim.as_ref(), r.header.as_ref(), &[dir])?;
        Ok(Response::new(pb::ReadlinkReply {
            target: target.into(),
        }))
    }

    async fn snapshot_xattr(
        &self,
        req: Request<pb::SnapshotXattrRequest>,
    ) -> Res<pb::SnapshotXattrReply> {
        let lim = self.limits(&req);
        let r = req.into_inner();
        let (dir, reply) = self
            .node
            .read(|s| {
                crate::snapshots::get(s, r.snap_id).and_then(|sn| {
                    let reply = if r.name.is_empty() {
                        sn.listxattr(r.ino).map(|names| pb::SnapshotXattrReply {
                            names: names.into_iter().map(Into::into).collect(),
                            ..Default::default()
                        })
                    } else {
                        sn.getxattr(r.ino, &r.name).map(|v| pb::SnapshotXattrReply {
                            value: v.into(),
                            ..Default::default()
                        })
                    };
                    reply.map(|x| (sn.dir, x))
                })
            })
            .await?
            .map_err(MdsError::Errno)?;
        self.reach(lim.as_ref(), r.header.as_ref(), &[dir])?;
        let mut reply = reply;
        if let Some((_, c)) = lim.as_ref() {
            if let Some(v) = caps::map_acl(c, &r.name, &reply.value, false) {
                reply.value = v.into();
            }
        }
        Ok(Response::new(reply))
    }
}

/// Serializes snapshot creates on a leader (see `snapshot_create`).
static SNAPSHOT_CREATES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A snapshot's wire form, with its directory's path now.
fn snapshot_info(s: &State, sn: &crate::snapshots::Snapshot) -> pb::SnapshotInfo {
    pb::SnapshotInfo {
        id: sn.id,
        dir: sn.dir,
        path: crate::trash::dir_path(s, sn.dir),
        name: sn.name.clone().into(),
        created_ns: sn.created_ns,
        inodes: sn.inodes.len() as u64,
    }
}

impl MetaService {
    /// The reply to a snapshot create: snapshot `id` as it is recorded.
    fn snapshot_reply(&self, id: u64) -> Res<pb::SnapshotInfo> {
        let info = self
            .node
            .read_local(|s| crate::snapshots::get(s, id).map(|sn| snapshot_info(s, sn)))
            .map_err(MdsError::Errno)?;
        tracing::info!(id, path = %info.path, inodes = info.inodes, "snapshot taken");
        Ok(Response::new(info))
    }

    /// The directory a snapshot request names: `ino`, or `path` from the root.
    async fn snapshot_dir(&self, ino: u64, path: &str) -> Result<u64, MdsError> {
        let dir = if ino != 0 {
            ino
        } else {
            self.node
                .read(|s| s.resolve_dir(path.as_bytes()))
                .await?
                .map_err(MdsError::Errno)?
        };
        let is_dir = self.node.read_local(|s| s.is_dir(dir));
        if !is_dir {
            return Err(MdsError::Errno(libc::ENOTDIR));
        }
        Ok(dir)
    }

    /// Before snapshot `id` of `dir` is recorded: every session with a
    /// file below open stores what it buffered for it, commits
    /// its size and writes with `snap_seq` `id` from then on (a demand
    /// each, waited for as a shared-write one).
    async fn snapshot_writers(&self, dir: u64, id: u64) {
        // Every session with the file open, not only known writers: a
        // file just created counts as open but not yet as written, and a
        // reader's answer costs one round trip.
        let writers: Vec<(u64, u64)> = {
            let t = self.node.lock_opens();
            t.entries.keys().copied().collect()
        };
        let below: Vec<(u64, u64)> = self.node.read_local(|s| {
            writers
                .into_iter()
                .filter(|(_, ino)| {
                    let parent = s.inodes.get(ino).map_or(0, |i| i.parent);
                    parent != 0 && crate::rstats::ancestors(s, parent).any(|a| a == dir)
                })
                .collect()
        });
        let leases = &self.node.leases;
        futures::future::join_all(below.into_iter().map(|(sid, ino)| async move {
            let r = pb::Recall {
                ino,
                snap_seq: id,
                ..Default::default()
            };
            if !leases.demand(sid, r, SHARED_WRITE_WAIT).await {
                tracing::warn!(session = sid, ino, "snapshot demand unanswered; going on");
            }
        }))
        .await;
    }
}
