//! Metadata leases: which client sessions may cache which inodes, and the
//! recall that must reach them before another session's change is
//! acknowledged.
//!
//! A session's lease is renewed by its heartbeats and covers everything the
//! leader sent it: attributes of an inode, and the entries of a directory
//! it looked names up in. The table lives in the leader's memory only. A
//! new leader knows nobody's cache, so it holds back changes until every
//! lease the old leader granted to another session has lapsed
//! (`fresh_leader.rs`).
//!
//! Ordering: a reader is registered *before* (or under the same state lock
//! as) the read of the state it will cache, and a change is recalled
//! *after* it is applied, so every reader that may hold the old state is
//! in the recalled set. The client ignores replies that cross a recall.

use avalon_proto::pb;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How often a demand checks whether a session without a recall stream
/// has opened one, and whether a session it waits for is still alive.
const STREAM_POLL: Duration = Duration::from_millis(20);

/// One recalled entry (see `pb::Recall`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub ino: u64,
    /// Some: the entry `name` of directory `ino`; None: `ino`'s attributes.
    pub name: Option<Vec<u8>>,
    /// The file's contents changed too.
    pub data: bool,
    /// For an entry: the inode it named before the change (0: none).
    pub child: u64,
}

impl Change {
    /// `ino`'s attributes changed.
    pub fn attr(ino: u64) -> Change {
        Change {
            ino,
            name: None,
            data: false,
            child: 0,
        }
    }

    /// `ino`'s attributes and contents changed.
    pub fn data(ino: u64) -> Change {
        Change {
            ino,
            name: None,
            data: true,
            child: 0,
        }
    }

    /// Entry `name` of directory `dir` changed (and so did `dir`'s times).
    pub fn entry(dir: u64, name: &[u8]) -> Change {
        Change {
            ino: dir,
            name: Some(name.to_vec()),
            data: false,
            child: 0,
        }
    }

    /// Entry `name` of directory `dir`, which named `child` (if any),
    /// changed.
    pub fn entry_of(dir: u64, name: &[u8], child: Option<u64>) -> Change {
        Change {
            child: child.unwrap_or(0),
            ..Change::entry(dir, name)
        }
    }
}

#[derive(Default)]
struct SessionLease {
    /// The session's recall stream, if connected.
    tx: Option<mpsc::Sender<Result<pb::SessionEvent, tonic::Status>>>,
    /// Until when the session may trust its cache (leader's clock).
    valid_until: Option<Instant>,
    /// Inodes the session may cache.
    held: HashSet<u64>,
    next_seq: u64,
    /// Unacknowledged recalls: seq → waiters.
    waiting: HashMap<u64, Vec<oneshot::Sender<()>>>,
    next_flush_seq: u64,
    /// Unacknowledged shared-write demands: flush_seq → waiter. Kept apart
    /// from `waiting`: a flush may outlast a lease and must not void it.
    flushing: HashMap<u64, oneshot::Sender<()>>,
    /// Last heartbeat from the session (to this leader).
    heard: Option<Instant>,
}

impl SessionLease {
    fn stream_open(&self) -> bool {
        self.tx.as_ref().is_some_and(|t| !t.is_closed())
    }
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<u64, SessionLease>,
    holders: HashMap<u64, HashSet<u64>>,
    /// Changes on their way whose recalls are not sent yet: ticket →
    /// (changing session, inodes) (see [`LeaseTable::announce`]).
    changing: HashMap<u64, (u64, Vec<u64>)>,
    next_ticket: u64,
}

/// The leader's lease table.
pub struct LeaseTable {
    inner: Mutex<Inner>,
    ttl: Duration,
}

impl LeaseTable {
    /// A table whose leases last `ttl` past each heartbeat.
    pub fn new(ttl: Duration) -> Self {
        LeaseTable {
            inner: Mutex::new(Inner::default()),
            ttl,
        }
    }

    /// Lease length.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that session `sid` may cache what it is sent about `inos`.
    /// Call before reading the state sent (or under the state lock).
    pub fn grant(&self, sid: u64, inos: impl IntoIterator<Item = u64>) {
        if sid == 0 {
            return;
        }
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(s) = inner.sessions.get_mut(&sid) else {
            return;
        };
        if s.valid_until.is_none_or(|t| Instant::now() >= t) {
            return;
        }
        for ino in inos {
            if ino != 0 && s.held.insert(ino) {
                inner.holders.entry(ino).or_default().insert(sid);
            }
        }
    }

    /// A heartbeat from `sid`: renews its lease unless a recall to it is
    /// unanswered. Returns the lease granted (zero: none, drop caches).
    /// `dropped`: the client emptied its cache, so it holds nothing.
    pub fn heartbeat(&self, sid: u64, dropped: bool) -> Duration {
        let mut g = self.lock();
        let inner = &mut *g;
        let s = inner.sessions.entry(sid).or_default();
        s.heard = Some(Instant::now());
        // No lease for a session that cannot be recalled (no open stream),
        // nor while a recall to it is unanswered.
        if !s.waiting.is_empty() || !s.stream_open() {
            return Duration::ZERO;
        }
        if dropped || s.valid_until.is_none_or(|t| Instant::now() >= t) {
            // A lapsed lease restarts empty: the client dropped its cache.
            let held = std::mem::take(&mut s.held);
            Self::unhold(&mut inner.holders, sid, held);
        }
        let s = inner.sessions.entry(sid).or_default();
        s.valid_until = Some(Instant::now() + self.ttl);
        self.ttl
    }

    /// True if session `sid`'s recall stream is connected to this node.
    pub fn has_stream(&self, sid: u64) -> bool {
        self.lock()
            .sessions
            .get(&sid)
            .is_some_and(SessionLease::stream_open)
    }

    /// Attaches the session's recall stream (replacing an older one). Its
    /// first event names the recalls sent so far (and carries none): the
    /// client counts replies' recall marks from there.
    pub fn attach(&self, sid: u64, tx: mpsc::Sender<Result<pb::SessionEvent, tonic::Status>>) {
        let mut g = self.lock();
        let s = g.sessions.entry(sid).or_default();
        let _ = tx.try_send(Ok(pb::SessionEvent {
            seq: s.next_seq,
            recalls: Vec::new(),
            flush_seq: 0,
        }));
        s.tx = Some(tx);
    }

    /// The recall mark of a reply to session `sid`: how many recalls it
    /// was sent. None while a change by another session to an inode it
    /// holds, announced before the reply was made, is on its way with its
    /// recalls unsent (the reply may have read it): ask again shortly
    /// with the same `horizon` (0 on the first call; it is set to the
    /// last ticket then, so that later changes never hold the reply up).
    pub fn sent(&self, sid: u64, horizon: &mut u64) -> Option<u64> {
        let g = self.lock();
        if *horizon == 0 {
            *horizon = g.next_ticket;
        }
        let touched = g.changing.iter().any(|(t, (from, inos))| {
            *t <= *horizon
                && *from != sid
                && inos
                    .iter()
                    .any(|ino| g.holders.get(ino).is_some_and(|h| h.contains(&sid)))
        });
        if touched {
            return None;
        }
        Some(g.sessions.get(&sid).map_or(0, |s| s.next_seq))
    }

    /// A change of `inos` is about to be made (after any delegation of
    /// them was revoked, before it is proposed): until its recalls are
    /// sent ([`LeaseTable::recall`] with the ticket) or the returned guard
    /// is dropped, replies to their holders wait for their mark.
    /// `from`: the changing session (never recalled, so never waits).
    pub fn announce(&self, from: u64, inos: Vec<u64>) -> Announced<'_> {
        let mut g = self.lock();
        g.next_ticket += 1;
        let ticket = g.next_ticket;
        g.changing.insert(ticket, (from, inos));
        Announced {
            table: self,
            ticket,
        }
    }

    /// The session acknowledged every recall up to `seq` and the
    /// shared-write demand `flush_seq` (0: none).
    pub fn ack(&self, sid: u64, seq: u64, flush_seq: u64) {
        let mut g = self.lock();
        if let Some(s) = g.sessions.get_mut(&sid) {
            if let Some(w) = s.flushing.remove(&flush_seq) {
                let _ = w.send(());
            }
            let done: Vec<u64> = s.waiting.keys().copied().filter(|q| *q <= seq).collect();
            for q in done {
                for w in s.waiting.remove(&q).unwrap_or_default() {
                    let _ = w.send(());
                }
            }
        }
    }

    /// Forgets a session (ended or expired).
    pub fn remove_session(&self, sid: u64) {
        let mut g = self.lock();
        let inner = &mut *g;
        if let Some(s) = inner.sessions.remove(&sid) {
            Self::unhold(&mut inner.holders, sid, s.held);
        }
    }

    fn unhold(holders: &mut HashMap<u64, HashSet<u64>>, sid: u64, held: HashSet<u64>) {
        for ino in held {
            if let Some(h) = holders.get_mut(&ino) {
                h.remove(&sid);
                if h.is_empty() {
                    holders.remove(&ino);
                }
            }
        }
    }

    /// Recalls `changes` from every session but `from` that may cache them
    /// and waits until each has acknowledged or its lease has lapsed.
    /// `announced`: the change's ticket, retired once its recalls are sent.
    pub async fn recall(&self, from: u64, changes: &[Change], announced: Option<Announced<'_>>) {
        let mut waits = Vec::new();
        {
            let mut g = self.lock();
            let inner = &mut *g;
            // Who holds what is read for every change first: several
            // changes may name one inode (two entries of one directory).
            let mut per_session: HashMap<u64, Vec<&Change>> = HashMap::new();
            for c in changes {
                if let Some(h) = inner.holders.get(&c.ino) {
                    for sid in h.iter().filter(|s| **s != from) {
                        per_session.entry(*sid).or_default().push(c);
                    }
                }
            }
            // The holders stay registered: a recall drops one entry or an
            // inode's attributes, and the client keeps the rest it cached
            // of that inode (the other entries of a directory), which a
            // later change must recall too.
            let now = Instant::now();
            if !per_session.is_empty() {
                tracing::debug!(from, sessions = per_session.len(), "recalling");
            }
            for (sid, cs) in per_session {
                let Some(s) = inner.sessions.get_mut(&sid) else {
                    continue;
                };
                let Some(deadline) = s.valid_until.filter(|t| *t > now) else {
                    continue;
                };
                s.next_seq += 1;
                let seq = s.next_seq;
                let ev = pb::SessionEvent {
                    seq,
                    recalls: cs
                        .iter()
                        .map(|c| pb::Recall {
                            ino: c.ino,
                            name: c.name.clone().unwrap_or_default().into(),
                            entry: c.name.is_some(),
                            data: c.data,
                            child: c.child,
                            ..Default::default()
                        })
                        .collect(),
                    flush_seq: 0,
                };
                crate::metrics::recall_sent();
                let (wtx, wrx) = oneshot::channel();
                s.waiting.entry(seq).or_default().push(wtx);
                if let Some(tx) = &s.tx {
                    if tx.try_send(Ok(ev)).is_err() {
                        s.tx = None;
                    }
                }
                waits.push((sid, seq, deadline, wrx));
            }
            if let Some(a) = &announced {
                inner.changing.remove(&a.ticket);
            }
        }
        drop(announced);
        for (sid, seq, deadline, wrx) in waits {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, wrx).await.is_err() {
                self.lapse(sid, seq);
            }
        }
    }

    /// Tells session `sid` that file `ino` has another writer now: it
    /// sends what it buffered for the file, commits the size and writes
    /// through from then on. Waits for its acknowledgement, for at most
    /// `max_wait`. A session without a recall stream here is waited for
    /// while it is alive: its client writes through, stores what it
    /// buffered and commits sizes before it opens a stream (see the
    /// client's recall loop), and a stream left on a former leader is
    /// reopened once a heartbeat reply says it is not here.
    pub async fn demand_flush(&self, sid: u64, ino: u64, max_wait: Duration) -> bool {
        let r = pb::Recall {
            ino,
            data: true,
            shared_write: true,
            ..Default::default()
        };
        let answered = self.demand(sid, r, max_wait).await;
        if !answered {
            tracing::warn!(
                session = sid,
                ino,
                "shared-write demand unanswered; going on"
            );
        }
        answered
    }

    /// Sends session `sid` the demand `r` (acknowledged on its own, with a
    /// `flush_seq`) and waits for the acknowledgement while the session is
    /// alive (heard from within a lease, counted from this call at the
    /// earliest), for at most `max_wait`. A session without a stream is
    /// waited for until it opens one. False if no acknowledgement came.
    /// Its heartbeats renew its lease meanwhile: storing what it buffered
    /// may take longer than a lease.
    pub async fn demand(&self, sid: u64, r: pb::Recall, max_wait: Duration) -> bool {
        let start = Instant::now();
        let give_up = start + max_wait;
        let tx = loop {
            {
                let g = self.lock();
                let s = g.sessions.get(&sid);
                if let Some(tx) = s.and_then(|s| s.tx.clone()).filter(|t| !t.is_closed()) {
                    break tx;
                }
            }
            if !self.alive(sid, start) || Instant::now() >= give_up {
                return false;
            }
            tokio::time::sleep(STREAM_POLL).await;
        };
        let mut tx = tx;
        let (flush_seq, mut wrx, ev) = {
            let mut g = self.lock();
            let Some(s) = g.sessions.get_mut(&sid) else {
                return false;
            };
            s.next_flush_seq += 1;
            let flush_seq = s.next_flush_seq;
            let ev = pb::SessionEvent {
                seq: 0,
                recalls: vec![r],
                flush_seq,
            };
            if tx.try_send(Ok(ev.clone())).is_err() {
                return false;
            }
            crate::metrics::demand_sent();
            let (wtx, wrx) = oneshot::channel();
            s.flushing.insert(flush_seq, wtx);
            (flush_seq, wrx, ev)
        };
        loop {
            tokio::select! {
                r = &mut wrx => return r.is_ok(),
                () = tokio::time::sleep(STREAM_POLL) => {}
            }
            // The session opened a new stream (its old one went quiet, say
            // across a partition): what was sent on the old one may never
            // arrive, so the demand goes again on the new one (answering
            // it twice is harmless). Else a live session would hold the
            // demand, and every open waiting for it, for `max_wait`.
            let newer = self
                .lock()
                .sessions
                .get(&sid)
                .and_then(|s| s.tx.clone())
                .filter(|t| !t.same_channel(&tx) && !t.is_closed());
            if let Some(t) = newer {
                if t.try_send(Ok(ev.clone())).is_ok() {
                    tracing::debug!(
                        session = sid,
                        flush_seq,
                        "demand sent again on a new stream"
                    );
                    tx = t;
                }
            }
            if !self.alive(sid, start) || Instant::now() >= give_up {
                if let Some(s) = self.lock().sessions.get_mut(&sid) {
                    s.flushing.remove(&flush_seq);
                }
                return false;
            }
        }
    }

    /// True if session `sid` was heard from within a lease of now, where a
    /// session not heard from since `since` counts as heard then.
    fn alive(&self, sid: u64, since: Instant) -> bool {
        let heard = self
            .lock()
            .sessions
            .get(&sid)
            .and_then(|s| s.heard)
            .map_or(since, |h| h.max(since));
        Instant::now() < heard + self.ttl
    }

    /// True if session `sid` was heard from within a lease of now: while
    /// it was not, it holds no lease it could act on.
    pub fn heard_within_lease(&self, sid: u64) -> bool {
        self.lock()
            .sessions
            .get(&sid)
            .and_then(|s| s.heard)
            .is_some_and(|h| Instant::now() < h + self.ttl)
    }

    /// True if a session other than `sid` may cache `ino`.
    pub fn held_by_others(&self, sid: u64, ino: u64) -> bool {
        self.lock()
            .holders
            .get(&ino)
            .is_some_and(|h| h.iter().any(|s| *s != sid))
    }

    /// How long session `sid`'s lease still holds (zero: none).
    pub fn lease_left(&self, sid: u64) -> Duration {
        self.lock()
            .sessions
            .get(&sid)
            .and_then(|s| s.valid_until)
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// A recall went unanswered until the lease ran out: the session's
    /// cache is void; it learns so from its next heartbeat's zero lease.
    fn lapse(&self, sid: u64, seq: u64) {
        let mut g = self.lock();
        let inner = &mut *g;
        if let Some(s) = inner.sessions.get_mut(&sid) {
            tracing::info!(session = sid, seq, "recall unanswered; lease lapsed");
            s.waiting.clear();
            s.valid_until = None;
            let held = std::mem::take(&mut s.held);
            Self::unhold(&mut inner.holders, sid, held);
        }
    }

    /// Forgets every lease and stream (this node stopped leading).
    pub fn clear(&self) {
        *self.lock() = Inner::default();
    }

    /// Number of (session, inode) leases held.
    pub fn len(&self) -> usize {
        self.lock().sessions.values().map(|s| s.held.len()).sum()
    }

    /// True if no lease is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A change announced to the lease table (see [`LeaseTable::announce`]).
pub struct Announced<'a> {
    table: &'a LeaseTable,
    ticket: u64,
}

impl Drop for Announced<'_> {
    fn drop(&mut self) {
        self.table.lock().changing.remove(&self.ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> LeaseTable {
        LeaseTable::new(Duration::from_millis(300))
    }

    type Events = mpsc::Receiver<Result<pb::SessionEvent, tonic::Status>>;

    /// Takes the first event of a stream: no recalls, `sent` counted.
    fn hello(rx: &mut Events, sent: u64) {
        let ev = rx.try_recv().unwrap().unwrap();
        assert!(ev.recalls.is_empty() && ev.flush_seq == 0);
        assert_eq!(ev.seq, sent);
    }

    /// Attaches a recall stream for `sid` and takes a lease.
    fn lease(t: &LeaseTable, sid: u64) -> Events {
        let (tx, mut rx) = mpsc::channel(8);
        t.attach(sid, tx);
        hello(&mut rx, t.sent(sid, &mut 0).unwrap());
        assert_eq!(t.heartbeat(sid, false), Duration::from_millis(300));
        rx
    }

    #[tokio::test]
    async fn recall_reaches_other_holders_and_waits_for_ack() {
        let t = std::sync::Arc::new(table());
        let _rx1 = lease(&t, 1);
        let mut rx = lease(&t, 2);
        t.grant(1, [10]);
        t.grant(2, [10, 11]);
        let t2 = t.clone();
        let acker = tokio::spawn(async move {
            let ev = rx.recv().await.unwrap().unwrap();
            assert_eq!(ev.recalls.len(), 1);
            assert_eq!(ev.recalls[0].ino, 10);
            assert!(ev.recalls[0].entry);
            t2.ack(2, ev.seq, 0);
        });
        let start = Instant::now();
        t.recall(1, &[Change::entry(10, b"x")], None).await;
        assert!(
            start.elapsed() < Duration::from_millis(250),
            "waited for the lease"
        );
        acker.await.unwrap();
        // Both keep what they hold: 2 still caches the rest of 10.
        assert_eq!(t.len(), 3);
        // Replies to 2 now carry the mark 1, to 1 none; a new stream of 2
        // starts counting from there.
        let sent = |sid| t.sent(sid, &mut 0);
        assert_eq!((sent(2), sent(1)), (Some(1), Some(0)));
        // A change by 1 to what 2 holds, announced and not yet recalled:
        // 2's replies wait; 1 holds nothing of it. 2's own change holds
        // nothing up for 2, and one announced after a reply was made does
        // not hold that reply up.
        let mut horizon = 0;
        let a = t.announce(1, vec![11]);
        assert_eq!((t.sent(2, &mut horizon), sent(1)), (None, Some(0)));
        let own = t.announce(2, vec![11]);
        let mut before = 0;
        assert_eq!(t.sent(2, &mut before), None, "1's change still counts");
        drop(a);
        assert_eq!(t.sent(2, &mut horizon), Some(1));
        let later = t.announce(1, vec![11]);
        assert_eq!(
            t.sent(2, &mut horizon),
            Some(1),
            "announced after the reply"
        );
        assert_eq!(sent(2), None);
        drop((own, later));
        assert_eq!(t.sent(2, &mut 0), Some(1));
        let (tx, mut rx) = mpsc::channel(8);
        t.attach(2, tx);
        hello(&mut rx, 1);
    }

    #[tokio::test]
    async fn two_changes_to_one_directory_both_reach_its_holder() {
        let t = std::sync::Arc::new(table());
        let mut rx = lease(&t, 2);
        t.grant(2, [10]);
        let t2 = t.clone();
        let acker = tokio::spawn(async move {
            let ev = rx.recv().await.unwrap().unwrap();
            t2.ack(2, ev.seq, 0);
            ev.recalls.len()
        });
        t.recall(
            1,
            &[Change::entry(10, b"old"), Change::entry(10, b"new")],
            None,
        )
        .await;
        assert_eq!(acker.await.unwrap(), 2);
    }

    #[tokio::test]
    async fn unanswered_recall_waits_for_the_lease_then_voids_it() {
        let t = table();
        // A stream nobody reads: recalls go unanswered.
        let _rx = lease(&t, 2);
        t.grant(2, [10, 11]);
        let start = Instant::now();
        t.recall(1, &[Change::attr(10)], None).await;
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(250),
            "returned after {took:?}"
        );
        assert!(t.is_empty(), "the whole lease is void");
        // Renewed again only by a heartbeat, and then from empty.
        assert_eq!(t.heartbeat(2, false), Duration::from_millis(300));
        t.grant(2, [12]);
        assert_eq!(t.len(), 1);
    }

    #[tokio::test]
    async fn pending_recall_blocks_renewal_and_no_lease_no_grant() {
        let t = std::sync::Arc::new(table());
        let _rx = lease(&t, 2);
        t.grant(2, [10]);
        let t2 = t.clone();
        let r = tokio::spawn(async move { t2.recall(1, &[Change::data(10)], None).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(t.heartbeat(2, false), Duration::ZERO);
        r.await.unwrap();
        // Session 3 never heartbeated: nothing is registered for it. A
        // session without a recall stream gets no lease.
        t.grant(3, [10]);
        assert!(t.is_empty());
        assert_eq!(t.heartbeat(3, false), Duration::ZERO);
        t.grant(3, [10]);
        assert!(t.is_empty());
        let rx5 = lease(&t, 5);
        drop(rx5);
        assert_eq!(t.heartbeat(5, false), Duration::ZERO, "stream closed");
        t.remove_session(2);
        assert!(t.is_empty());
        // A client that emptied its cache holds nothing any more.
        let _rx4 = lease(&t, 4);
        t.grant(4, [1, 2]);
        assert_eq!(t.len(), 2);
        t.heartbeat(4, true);
        assert!(t.is_empty());
    }

    #[tokio::test]
    async fn shared_write_demand_waits_for_its_own_ack_and_keeps_the_lease() {
        let t = std::sync::Arc::new(table());
        let mut rx = lease(&t, 2);
        let t2 = t.clone();
        let acker = tokio::spawn(async move {
            let ev = rx.recv().await.unwrap().unwrap();
            assert_eq!((ev.seq, ev.recalls.len()), (0, 1));
            assert!(ev.recalls[0].shared_write && ev.recalls[0].data);
            // A flush may outlast the lease: renewal goes on meanwhile,
            // and a plain recall ack does not answer the demand.
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert_eq!(t2.heartbeat(2, false), Duration::from_millis(300));
            }
            t2.ack(2, 100, 0);
            tokio::time::sleep(Duration::from_millis(50)).await;
            t2.ack(2, 0, ev.flush_seq);
        });
        let start = Instant::now();
        t.demand_flush(2, 10, Duration::from_secs(5)).await;
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(450),
            "returned after {took:?}"
        );
        assert!(took < Duration::from_secs(5), "timed out");
        acker.await.unwrap();
        // Nobody to tell: no session at all, or a closed stream and no
        // heartbeat: given up after a lease, not at `max_wait`.
        let start = Instant::now();
        assert!(
            !t.demand(9, pb::Recall::default(), Duration::from_secs(30))
                .await
        );
        let (tx, rx3) = mpsc::channel(1);
        t.attach(3, tx);
        drop(rx3);
        assert!(
            !t.demand(3, pb::Recall::default(), Duration::from_secs(30))
                .await
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "waited for max_wait"
        );
    }

    #[tokio::test]
    async fn demand_waits_for_a_live_session_to_open_its_stream() {
        let t = std::sync::Arc::new(table());
        // A session that heartbeats here but whose stream is elsewhere
        // (a former leader): no lease, and told it has no stream.
        assert_eq!(t.heartbeat(4, false), Duration::ZERO);
        assert!(!t.has_stream(4));
        let t2 = t.clone();
        let client = tokio::spawn(async move {
            // Heartbeats go on for longer than a lease before the stream
            // opens (the client first stores what it buffered).
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                t2.heartbeat(4, false);
            }
            let (tx, mut rx) = mpsc::channel(8);
            t2.attach(4, tx);
            assert!(t2.has_stream(4));
            hello(&mut rx, 0);
            let ev = rx.recv().await.unwrap().unwrap();
            assert!(ev.recalls[0].shared_write);
            t2.ack(4, 0, ev.flush_seq);
        });
        let r = pb::Recall {
            ino: 10,
            shared_write: true,
            ..Default::default()
        };
        assert!(
            t.demand(4, r, Duration::from_secs(30)).await,
            "told once its stream opened"
        );
        client.await.unwrap();
    }
}
