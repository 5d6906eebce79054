//! fcntl and flock locks at the MDS: held in the leader's memory, not in the
//! Raft log, and reclaimed by the clients after a change of leader (as
//! NFSv4 does).
//!
//! The leader's table (one per term, [`LeaderLocks`]) decides every lock
//! request; the lock algebra is `avalon_proto::locks`. A new leader starts
//! its table from the replicated one (`State::locks`: locks of clients that
//! cannot reclaim, and those an older MDS wrote) and asks every session
//! that existed at the start of its term for its locks (the heartbeat
//! reply's `reclaim_locks`; lock requests of such a session are refused
//! with "reclaim locks first" until it sent them). During a grace period
//! (the orphan grace, 5 s by default: every live client heartbeats several
//! times in it) no lock is granted or tested, so nothing can be given to
//! another session before its holder reclaimed it; the grace ends early
//! once every session reclaimed or is known not to (older clients).
//!
//! What goes through the log as well ("write-through", applied to the
//! table first, then replicated before the answer, in the same order):
//! requests of clients without `FEATURE_LOCK_RECLAIM` (they cannot
//! reclaim), every request while a voter lacks the bit (a leader without it
//! would neither ask for reclaims nor know memory-only locks), and the
//! release of an owner that has locks in the replicated table (so that it
//! holds no lock its owner dropped).
//!
//! A deposed leader grants nothing: every request first checks the read
//! lease (as reads do), and a new leader is elected only after it lapsed.
//!
//! **Lock cache.** A lock request of a session that no other session
//! competes with on that file (no other session holds a lock on it, none
//! had to recall a cache of it lately) may be answered `cached`: the client
//! then decides its own processes' lock requests on the file itself, as
//! sqlite's half-dozen lock calls per transaction need, and the leader's
//! table no longer knows that session's locks on it. Any other session's
//! request on the file first recalls the cache (a demand on the holder's
//! recall stream); the holder sends back its locks on the file
//! (`ReclaimLocks` with `returned_ino`), which replace those the table had,
//! and only then is the request decided. While a holder does not answer
//! (dead or cut off), its locks are unknown until it answers or its
//! session ends, when they go as every lock of an ended session does: lock
//! requests get EAGAIN meanwhile, F_GETLK fails as unavailable (the
//! client retries). A holder uses the cache only
//! while its lease holds, so a holder cut off from the leader stops
//! deciding before the leader could give up on it. Caches belong to the
//! leader's term, like the table: a new leader asks for every lock
//! (reclaim, which sends the cached ones too) and the clients forget
//! their caches then.

pub use avalon_proto::locks::{FileLock, LockKind, LockTable};

use crate::command::Op;
use crate::node::{MdsError, MdsNode};
use avalon_proto::pb;
use avalon_proto::version::FEATURE_LOCK_RECLAIM;
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often a request waiting for the grace period looks again.
const GRACE_POLL: Duration = Duration::from_millis(20);

/// No cache is offered for a file whose cache another session had to
/// recall within this long: two sessions taking turns would otherwise pay
/// a recall per lock.
const CONTENDED_FOR: Duration = Duration::from_secs(2);

/// How long a request waits for a live holder to return a lock cache.
const RETURN_WAIT: Duration = Duration::from_secs(5);

/// How often a request asks a holder to return a lock cache before it
/// fails as unavailable.
const RECALL_TRIES: usize = 3;

/// The leader's lock table of one term and its reclaim state.
#[derive(Default)]
struct TermLocks {
    /// The term the table belongs to (0: none loaded).
    term: u64,
    table: LockTable,
    /// When the table was loaded: the grace period counts from here.
    since: Option<Instant>,
    /// Sessions of the state at load time that have not reclaimed yet.
    unreclaimed: HashSet<u64>,
    /// The grace period is over: locks are granted.
    open: bool,
    /// Files whose locks a session keeps itself (lock cache): inode ->
    /// session.
    cached: HashMap<u64, u64>,
    /// When a file's lock cache was last recalled (see [`CONTENDED_FOR`]).
    contended: HashMap<u64, Instant>,
}

impl TermLocks {
    /// Offers `session` the lock cache of `ino`: true if it may keep the
    /// file's locks itself from now on.
    fn offer_cache(&mut self, ino: u64, session: u64) -> bool {
        if self.cached.contains_key(&ino) || self.table.others_hold(ino, session) {
            return false;
        }
        if self.contended.len() > 4096 {
            self.contended.retain(|_, t| t.elapsed() < CONTENDED_FOR);
        }
        if self
            .contended
            .get(&ino)
            .is_some_and(|t| t.elapsed() < CONTENDED_FOR)
        {
            return false;
        }
        self.cached.insert(ino, session);
        true
    }
}

/// The locks a leader holds in memory (see the module doc).
#[derive(Default)]
pub struct LeaderLocks {
    inner: Mutex<TermLocks>,
    /// One load of the replicated table per term.
    load: tokio::sync::Mutex<()>,
    /// Keeps the log order of write-through changes that of the table.
    through: tokio::sync::Mutex<()>,
}

/// One lock request, as the leader decides it.
pub struct LockOp<'a> {
    pub hdr: Option<&'a pb::RequestHeader>,
    pub session: u64,
    pub ino: u64,
    pub owner: u64,
    pub pid: u32,
    pub start: u64,
    pub end: u64,
    pub kind: LockKind,
    /// The client reclaims after a change of leader.
    pub reclaims: bool,
    /// The client can keep the file's locks itself (lock cache).
    pub caches: bool,
}

impl LeaderLocks {
    fn lock(&self) -> MutexGuard<'_, TermLocks> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The table of `term`, or an error if this node moved on.
    fn table(&self, term: u64) -> Result<MutexGuard<'_, TermLocks>, MdsError> {
        let t = self.lock();
        if t.term != term {
            return Err(MdsError::Unavailable("the leader changed".into()));
        }
        Ok(t)
    }

    /// The current term, once this node is a confirmed leader (read
    /// lease) with its table loaded for the term.
    async fn term(&self, node: &MdsNode) -> Result<u64, MdsError> {
        node.read(|_| ()).await?;
        let term = node.raft.metrics().borrow().current_term;
        if self.lock().term == term {
            return Ok(term);
        }
        let _one = self.load.lock().await;
        if self.lock().term == term {
            return Ok(term);
        }
        // Applied through this term's first entry: every lock and session
        // a predecessor committed is in the state.
        node.raft
            .ensure_linearizable()
            .await
            .map_err(|e| node.raft_err(e))?;
        let m = node.raft.metrics().borrow().clone();
        if m.current_term != term || m.current_leader != Some(node.id) {
            return Err(MdsError::NotLeader(node.leader_addr()));
        }
        let (table, sessions) =
            node.read_local(|s| (s.locks.clone(), s.sessions.keys().copied().collect()));
        *self.lock() = TermLocks {
            term,
            table,
            since: Some(Instant::now()),
            unreclaimed: sessions,
            open: false,
            cached: HashMap::new(),
            contended: HashMap::new(),
        };
        tracing::info!(term, "lock table loaded; waiting for the clients' reclaims");
        Ok(term)
    }

    /// Refuses a reclaiming session's request until it reclaimed.
    fn check_reclaimed(&self, term: u64, op: &LockOp<'_>) -> Result<(), MdsError> {
        if op.reclaims && self.table(term)?.unreclaimed.contains(&op.session) {
            return Err(MdsError::ReclaimFirst);
        }
        Ok(())
    }

    /// Waits until the grace period of `term` is over (every session of
    /// the term's start reclaimed, is gone, or the grace ran out).
    async fn wait_grace(&self, node: &MdsNode, term: u64) -> Result<(), MdsError> {
        if self.table(term)?.open {
            return Ok(());
        }
        self.grace_over(node, term).await?;
        // The read lease again: it may have lapsed while this waited, and
        // a deposed leader must not decide.
        node.read(|_| ()).await?;
        if node.raft.metrics().borrow().current_term != term {
            return Err(MdsError::NotLeader(node.leader_addr()));
        }
        Ok(())
    }

    /// The wait of [`LeaderLocks::wait_grace`].
    async fn grace_over(&self, node: &MdsNode, term: u64) -> Result<(), MdsError> {
        let grace = Duration::from_millis(node.cfg.orphan_grace_ms);
        loop {
            {
                let mut t = self.table(term)?;
                if t.open {
                    return Ok(());
                }
                let waiting: Vec<u64> = t.unreclaimed.iter().copied().collect();
                let gone: Vec<u64> = node.read_local(|s| {
                    waiting
                        .into_iter()
                        .filter(|sid| !s.sessions.contains_key(sid))
                        .collect()
                });
                for sid in gone {
                    t.unreclaimed.remove(&sid);
                }
                if t.unreclaimed.is_empty() || t.since.is_none_or(|s| s.elapsed() >= grace) {
                    if !t.unreclaimed.is_empty() {
                        tracing::warn!(
                            sessions = ?t.unreclaimed,
                            "lock grace period over without these sessions' reclaims"
                        );
                    }
                    t.open = true;
                    return Ok(());
                }
            }
            node.check_leader()?;
            tokio::time::sleep(GRACE_POLL).await;
        }
    }

    /// True if a request of this session must also go through the log.
    fn through(node: &MdsNode, op: &LockOp<'_>) -> bool {
        !op.reclaims
            || node.read_local(|s| s.locks.holds(op.ino, op.session, op.owner))
            || !node.voters_have(FEATURE_LOCK_RECLAIM)
    }

    /// Takes the lock cache of `op.ino` back from the session that keeps
    /// it, if another one does: once this returns, the table has every
    /// lock on the file. A holder that cannot answer (silent for a lease:
    /// dead or cut off) keeps the file's locks unknown until its session
    /// ends; `busy` is the answer meanwhile.
    async fn recall_cache(
        &self,
        node: &MdsNode,
        term: u64,
        op: &LockOp<'_>,
        busy: impl Fn() -> MdsError,
    ) -> Result<(), MdsError> {
        for _ in 0..RECALL_TRIES {
            let holder = {
                let mut t = self.table(term)?;
                match t.cached.get(&op.ino).copied() {
                    None => return Ok(()),
                    // The holder asks instead of deciding: it forgot its
                    // cache without returning it, so its locks here are
                    // unknown; a reclaim sends them all.
                    Some(h) if h == op.session => return Err(MdsError::ReclaimFirst),
                    Some(h) => {
                        t.contended.insert(op.ino, Instant::now());
                        h
                    }
                }
            };
            let recall = pb::Recall {
                ino: op.ino,
                locks: true,
                ..Default::default()
            };
            if node.leases.demand(holder, recall, RETURN_WAIT).await {
                continue;
            }
            if !node.read_local(|s| s.sessions.contains_key(&holder)) {
                // The session ended: its locks went with it.
                let mut t = self.table(term)?;
                if t.cached.get(&op.ino) == Some(&holder) {
                    t.cached.remove(&op.ino);
                    t.table.drop_session_on(op.ino, holder);
                }
            } else if !node.leases.heard_within_lease(holder) {
                return Err(busy());
            }
        }
        if self.table(term)?.cached.contains_key(&op.ino) {
            return Err(busy());
        }
        Ok(())
    }

    /// F_SETLK: sets or clears a lock; EAGAIN on a conflict. True if the
    /// session keeps the file's locks itself from now on (lock cache).
    pub async fn set(&self, node: &MdsNode, op: LockOp<'_>) -> Result<bool, MdsError> {
        let term = self.term(node).await?;
        self.check_reclaimed(term, &op)?;
        if op.kind != LockKind::Unlock {
            self.wait_grace(node, term).await?;
            if !node.read_local(|s| s.inodes.contains_key(&op.ino)) {
                return Err(MdsError::Errno(libc::ENOENT));
            }
        }
        // Locks of unknown extent held by a client out of reach: as any
        // conflict (a blocking request polls until its session ends).
        self.recall_cache(node, term, &op, || MdsError::Errno(libc::EAGAIN))
            .await?;
        let set = |t: &mut LockTable| {
            t.set(
                op.ino, op.session, op.owner, op.pid, op.start, op.end, op.kind,
            )
        };
        if !Self::through(node, &op) {
            let mut t = self.table(term)?;
            set(&mut t.table).map_err(MdsError::Errno)?;
            let cached =
                op.caches && op.kind != LockKind::Unlock && t.offer_cache(op.ino, op.session);
            return Ok(cached);
        }
        let _order = self.through.lock().await;
        let saved = {
            let mut t = self.table(term)?;
            let saved = t.table.owner_locks(op.ino, op.session, op.owner);
            set(&mut t.table).map_err(MdsError::Errno)?;
            saved
        };
        let write = Op::SetLock {
            ino: op.ino,
            session: op.session,
            owner: op.owner,
            pid: op.pid,
            start: op.start,
            end: op.end,
            kind: op.kind,
        };
        if let Err(e) = node.write(op.hdr, write).await {
            // Not durable: the table must not keep it either.
            if let Ok(mut t) = self.table(term) {
                t.table.restore_owner(op.ino, op.session, op.owner, saved);
            }
            return Err(e);
        }
        Ok(false)
    }

    /// F_GETLK: the first conflicting lock of another owner, if any.
    pub async fn get(&self, node: &MdsNode, op: LockOp<'_>) -> Result<Option<FileLock>, MdsError> {
        let term = self.term(node).await?;
        self.check_reclaimed(term, &op)?;
        self.wait_grace(node, term).await?;
        // No lock to report for a client out of reach: the caller retries.
        let busy = || {
            MdsError::Unavailable(format!(
                "another client keeps the locks of inode {} and has not returned them yet",
                op.ino
            ))
        };
        self.recall_cache(node, term, &op, busy).await?;
        Ok(self
            .table(term)?
            .table
            .conflict(op.ino, op.session, op.owner, op.start, op.end, op.kind))
    }

    /// Drops every lock of `(session, owner)` on the inode (close, flock
    /// release).
    pub async fn release(&self, node: &MdsNode, op: LockOp<'_>) -> Result<(), MdsError> {
        let term = self.term(node).await?;
        self.check_reclaimed(term, &op)?;
        let _order = if Self::through(node, &op) {
            Some(self.through.lock().await)
        } else {
            None
        };
        self.table(term)?
            .table
            .release_owner(op.ino, op.session, op.owner);
        if node.read_local(|s| s.locks.holds(op.ino, op.session, op.owner)) {
            let write = Op::ReleaseLocks {
                ino: op.ino,
                session: op.session,
                owner: op.owner,
            };
            node.write(op.hdr, write).await?;
        }
        Ok(())
    }

    /// A session's reclaim: its locks become `held`; returns those another
    /// session took meanwhile (after the grace period), which it lost.
    /// With `returned_ino` nonzero, the return of that file's lock cache:
    /// `held` are the session's locks on it alone.
    pub async fn reclaim(
        &self,
        node: &MdsNode,
        session: u64,
        held: &[pb::HeldLock],
        returned_ino: u64,
    ) -> Result<Vec<pb::HeldLock>, MdsError> {
        let term = self.term(node).await?;
        if !node.read_local(|s| s.sessions.contains_key(&session)) {
            return Err(MdsError::NotFound(format!("no session {session}")));
        }
        let mut t = self.table(term)?;
        if returned_ino != 0 {
            // A cache of a former leader's term: this leader wants them all.
            if t.unreclaimed.contains(&session) {
                return Err(MdsError::ReclaimFirst);
            }
            if held.iter().any(|h| h.ino != returned_ino) {
                return Err(MdsError::Invalid(
                    "a returned lock cache holds locks of another file".into(),
                ));
            }
            if t.cached.get(&returned_ino) == Some(&session) {
                t.cached.remove(&returned_ino);
            }
            t.table.drop_session_on(returned_ino, session);
        } else {
            t.table.retain_sessions(|s| s != session);
            t.cached.retain(|_, s| *s != session);
        }
        let mut lost = Vec::new();
        for h in held {
            let ok = FileLock::from_held(session, h).is_some_and(|l| {
                t.table
                    .set(h.ino, session, l.owner, l.pid, l.start, l.end, l.kind)
                    .is_ok()
            });
            if !ok {
                lost.push(*h);
            }
        }
        if returned_ino == 0 {
            t.unreclaimed.remove(&session);
        }
        if !lost.is_empty() {
            tracing::warn!(
                session,
                lost = lost.len(),
                "reclaimed locks lost to other sessions"
            );
        }
        Ok(lost)
    }

    /// Heartbeat of a session: whether it must reclaim (a client with the
    /// feature), or that it never will (`reclaims` false: an older client,
    /// whose locks are all in the replicated table).
    pub async fn heartbeat(&self, node: &MdsNode, session: u64, reclaims: bool) -> bool {
        let Ok(term) = self.term(node).await else {
            return false;
        };
        let Ok(mut t) = self.table(term) else {
            return false;
        };
        if reclaims {
            t.unreclaimed.contains(&session)
        } else {
            t.unreclaimed.remove(&session);
            false
        }
    }

    /// Forgets the locks of sessions that are gone (expired, revoked).
    pub fn drop_sessions(&self, gone: &HashSet<u64>) {
        let mut t = self.lock();
        t.table.retain_sessions(|s| !gone.contains(&s));
        t.unreclaimed.retain(|s| !gone.contains(s));
        t.cached.retain(|_, s| !gone.contains(s));
    }

    /// The sessions the table knows: holding locks or yet to reclaim.
    pub fn sessions(&self) -> Vec<u64> {
        let t = self.lock();
        let mut v: Vec<u64> = t
            .table
            .files
            .values()
            .flatten()
            .map(|l| l.session)
            .chain(t.unreclaimed.iter().copied())
            .chain(t.cached.values().copied())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Drops the table (this node stepped down).
    pub fn clear(&self) {
        *self.lock() = TermLocks::default();
    }
}
