//! Write delegations on the client (see avalon-mds `delegation.rs`): the
//! state of this session's delegations and of the queue of changes made
//! under them. The operations that make and send those changes are
//! `Client`'s (`client/delegated.rs`).
//!
//! While this session holds the delegation of a directory, creates in it
//! (and in the directories created there), and changes to what was so
//! created (chmod, chown, utimes, the size a close commits, unlink,
//! rename inside the group), are made here, answered at once, and queued.
//! The queue goes to the MDS with `Apply` in order: every few milliseconds,
//! before any other request to the MDS (so a request never overtakes a
//! change made before it), at fsync, and when the MDS revokes the
//! delegation because another session needs the directory.
//!
//! A local change needs everything it decides on in the metadata cache
//! (the name's absence, the attributes it changes, that the parent has no
//! default ACL); when something is missing it goes the synchronous way.
//!
//! A batch is sent until the MDS answers it, across failovers, for as long
//! as the session lives, always with the same request id: the MDS
//! deduplicates by it in its replicated state, so a batch the old leader
//! applied (its reply lost) is not applied again by the new one. Changes
//! the MDS refuses, or that a lost session leaves behind, are logged and
//! reported at the next fsync or close of what they touch
//! (`lost_changes.rs`); a request that waited for them fails.

use crate::lost_changes::LostChanges;
use avalon_proto::pb::{self, delegated_op::Op as D, time_set::How, TimeSet};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often queued changes go to the MDS at the latest.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Queued atime updates alone wait this long to be sent (unless anything
/// else is sent first): each flush is a raft entry on every MDS, and a
/// reader of many files would otherwise make one every [`FLUSH_EVERY`] for
/// times nobody waits for (Linux's lazytime keeps them in memory longer).
pub(crate) const LAZY_EVERY: Duration = Duration::from_secs(1);
/// Queued changes that make the flusher go at once.
pub(crate) const FLUSH_AT: usize = 1024;
/// Most changes per Apply (the MDS takes up to 4096).
pub(crate) const APPLY_MAX: usize = 2048;
/// Queued changes that make a create wait for the flusher: sending them
/// waits for their files' data to be stored, and anything that must wait
/// for the queue (a listing of a directory changed in it, a synchronous
/// request) would otherwise wait for seconds of work.
pub(crate) const PENDING_MAX: usize = 2 * FLUSH_AT;
/// Files whose buffered data a flush stores at a time.
pub(crate) const STORES_AT_ONCE: usize = 16;
/// Longest a create waits for the flusher before queueing anyway.
pub(crate) const PENDING_WAIT: Duration = Duration::from_secs(5);
/// Inode numbers asked for at a time.
pub(crate) const INOS_WANTED: u32 = 2048;
/// Inode numbers left that make the client ask for more.
pub(crate) const INOS_LOW: u64 = 256;
/// How long a directory the MDS would not delegate is not asked for again.
pub(crate) const REFUSED_FOR: Duration = Duration::from_secs(2);
/// Pause between two sendings of a batch no MDS leader took (each sending
/// itself follows the leader for the connection's retry budget).
pub(crate) const RESEND_AFTER: Duration = Duration::from_secs(1);

/// The delegation state of one client.
#[derive(Default)]
pub struct Delegations {
    pub(crate) st: Mutex<State>,
    /// One flush at a time, so that batches reach the MDS in order.
    pub(crate) flushing: tokio::sync::Mutex<()>,
    /// Wakes the flusher early.
    pub(crate) wake: tokio::sync::Notify,
    /// Woken whenever a flush has sent a batch.
    pub(crate) drained: tokio::sync::Notify,
    /// One Delegate request at a time.
    pub(crate) asking: tokio::sync::Mutex<()>,
    /// Changes the MDS will never apply, reported at fsync and close.
    pub lost: LostChanges,
}

/// A batch of changes on its way to the MDS. It stays here until the MDS
/// answered it, so a flush that is cancelled or fails midway leaves it to
/// the next one, which sends it again under the same request id.
pub(crate) struct Batch {
    pub(crate) req: Arc<pb::ApplyRequest>,
    /// The buffered data of the files whose sizes it commits is stored.
    pub(crate) stored: bool,
}

#[derive(Default)]
pub(crate) struct State {
    /// Inode → root directory of the delegation it is under (roots map to
    /// themselves).
    pub(crate) owned: HashMap<u64, u64>,
    /// Directories the MDS did not delegate lately.
    pub(crate) refused: HashMap<u64, Instant>,
    /// Reserved inode numbers not used yet: [next, end) ranges.
    pub(crate) inos: VecDeque<(u64, u64)>,
    /// Layout of regular files created here: chunk size, replicas, quorum.
    pub(crate) layout: (u32, u32, u32),
    /// Changes not sent yet, in order.
    pub(crate) pending: Vec<pb::DelegatedOp>,
    /// When the oldest of `pending` was queued.
    pub(crate) pending_since: Option<Instant>,
    /// `pending` holds more than atime updates.
    pub(crate) pending_eager: bool,
    /// Directories whose entries queued or in-flight changes add, remove
    /// or move → how many such changes (a listing of any other directory
    /// need not wait for them).
    pub(crate) pending_dirs: HashMap<u64, usize>,
    /// The batch on its way (taken from `pending`, not answered yet).
    pub(crate) batch: Option<Batch>,
    /// The MDS expired this session: nothing queued will be applied, and
    /// nothing is delegated any more.
    pub(crate) session_lost: bool,
    /// Opens of files created here that the MDS does not count yet
    /// (ino → open flags of each).
    pub(crate) unregistered: HashMap<u64, Vec<u32>>,
    /// Revokes received so far: a grant whose request was in flight while
    /// one came may be the revoked one, and is not used.
    pub(crate) revokes: u64,
    /// The metadata lease generation (`MetaCache::lease_held`) the
    /// delegations in `owned` were granted under.
    pub(crate) lease: Option<u64>,
}

impl State {
    pub(crate) fn take_ino(&mut self) -> Option<u64> {
        let (next, end) = self.inos.front_mut()?;
        let ino = *next;
        *next += 1;
        if *next >= *end {
            self.inos.pop_front();
        }
        Some(ino)
    }

    pub(crate) fn inos_left(&self) -> u64 {
        self.inos.iter().map(|(n, e)| e - n).sum()
    }

    pub(crate) fn push(&mut self, now_ns: i64, op: D, lazy: bool) {
        if self.pending.is_empty() {
            self.pending_since = Some(Instant::now());
        }
        self.pending_eager |= !lazy;
        for d in entry_dirs(&op).into_iter().flatten() {
            *self.pending_dirs.entry(d).or_default() += 1;
        }
        self.pending.push(pb::DelegatedOp {
            now_ns,
            op: Some(op),
        });
    }
}

/// Wall clock now, in nanoseconds since the epoch.
pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn ns(t: i64) -> Option<TimeSet> {
    Some(TimeSet {
        how: Some(How::Ns(t)),
    })
}

/// The directories whose entries a delegated change touches.
pub(crate) fn entry_dirs(op: &D) -> [Option<u64>; 2] {
    match op {
        D::Create(c) => [Some(c.parent), None],
        D::Unlink(u) | D::Rmdir(u) => [Some(u.parent), None],
        D::Rename(m) => [Some(m.parent), Some(m.new_parent)],
        D::SetAttr(_) | D::CommitWrite(_) => [None, None],
    }
}

/// What a create under delegation makes.
pub enum NewNode<'a> {
    File,
    Dir,
    Symlink(&'a [u8]),
}

impl Delegations {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state, to act on a delegation while the lease is `lease` (the
    /// generation held now, `MetaCache::lease_held`). The delegations are
    /// forgotten unless they were granted under that very lease: the MDS
    /// revokes a delegation without asking a holder whose lease ran out
    /// (or that has none yet), and the holder's own lease ends first.
    pub(crate) fn lock_under(&self, lease: Option<u64>) -> std::sync::MutexGuard<'_, State> {
        let mut s = self.lock();
        if !s.owned.is_empty() && (lease.is_none() || lease != s.lease) {
            s.owned.clear();
            s.revokes += 1;
        }
        s
    }

    /// Queues change `op` made at `now` (under the state lock `s`); wakes
    /// the flusher once enough are queued.
    pub(crate) fn queue(&self, s: &mut State, now: i64, op: D) {
        self.queue_as(s, now, op, false);
    }

    /// [`Delegations::queue`], saying whether the change is only an atime
    /// update (sent within [`LAZY_EVERY`] rather than [`FLUSH_EVERY`]).
    pub(crate) fn queue_as(&self, s: &mut State, now: i64, op: D, lazy: bool) {
        s.push(now, op, lazy);
        if s.pending.len() >= FLUSH_AT {
            self.wake.notify_one();
        }
    }

    /// Waits while [`PENDING_MAX`] changes are queued (for at most
    /// [`PENDING_WAIT`]).
    pub(crate) async fn backpressure(&self) {
        let until = tokio::time::Instant::now() + PENDING_WAIT;
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.lock().pending.len() < PENDING_MAX {
                return;
            }
            self.wake.notify_one();
            if tokio::time::timeout_at(until, drained).await.is_err() {
                return;
            }
        }
    }

    /// True if changes wait to be sent (or are on their way).
    pub fn busy(&self) -> bool {
        let s = self.lock();
        !s.pending.is_empty() || s.batch.is_some()
    }

    /// True if the flusher should send what is queued now (a batch not
    /// answered yet: at once).
    pub(crate) fn due(&self) -> bool {
        let s = self.lock();
        s.batch.is_some()
            || !s.pending.is_empty()
                && (s.pending_eager || s.pending_since.is_none_or(|t| t.elapsed() >= LAZY_EVERY))
    }

    /// True if queued or in-flight changes add, remove or move entries of
    /// directory `dir`.
    pub fn changes_dir(&self, dir: u64) -> bool {
        self.lock().pending_dirs.contains_key(&dir)
    }

    /// The lease generation the delegation `ino` is under was granted
    /// under (None: not delegated here).
    pub fn lease_of(&self, ino: u64) -> Option<u64> {
        let s = self.lock();
        s.lease.filter(|_| s.owned.contains_key(&ino))
    }

    /// True if `ino` is under one of this session's delegations.
    pub fn owns(&self, ino: u64) -> bool {
        self.lock().owned.contains_key(&ino)
    }

    /// Forgets every delegation (the lease or the recall stream was lost:
    /// the MDS may revoke them without being heard). Queued changes still
    /// go out.
    pub fn drop_all(&self) {
        let mut s = self.lock();
        s.owned.clear();
        s.revokes += 1;
    }

    /// The MDS expired this session (it answered a heartbeat with "no
    /// session"): delegations go, none is asked for again, and what is
    /// queued is lost (the next flush logs and records it). Sending it
    /// anyway could apply a batch twice: the MDS dropped the session's
    /// request ids with it.
    pub fn lose_session(&self) {
        let mut s = self.lock();
        if !s.session_lost {
            tracing::error!(
                queued = s.pending.len() + s.batch.as_ref().map_or(0, |b| b.req.ops.len()),
                "the MDS expired this session: its queued delegated changes are lost"
            );
        }
        s.session_lost = true;
        s.owned.clear();
        s.revokes += 1;
        drop(s);
        self.wake.notify_one();
    }

    /// True once the MDS expired this session.
    pub fn session_lost(&self) -> bool {
        self.lock().session_lost
    }

    /// Forgets the delegation rooted at `root`; returns the files under it
    /// that are open here without the MDS counting them.
    pub(crate) fn drop_group(&self, root: u64) -> Vec<(u64, Vec<u32>)> {
        let mut s = self.lock();
        s.revokes += 1;
        let inos: Vec<u64> = s
            .owned
            .iter()
            .filter(|(_, r)| **r == root)
            .map(|(i, _)| *i)
            .collect();
        let mut opens = Vec::new();
        for i in inos {
            s.owned.remove(&i);
            if let Some(f) = s.unregistered.remove(&i) {
                opens.push((i, f));
            }
        }
        opens
    }

    /// An open of `ino` with `flags` ends: true if the MDS never counted it
    /// (a file created here), so there is nothing to tell it.
    pub fn release_unregistered(&self, ino: u64, flags: u32) -> bool {
        let mut s = self.lock();
        let Some(v) = s.unregistered.get_mut(&ino) else {
            return false;
        };
        // The kernel's release flags differ from the create's (O_CREAT,
        // O_EXCL are gone): the access mode tells the opens apart.
        let mode = flags & libc::O_ACCMODE as u32;
        let Some(i) = v.iter().position(|f| *f & libc::O_ACCMODE as u32 == mode) else {
            return false;
        };
        v.swap_remove(i);
        if v.is_empty() {
            s.unregistered.remove(&ino);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding(lease: Option<u64>) -> Delegations {
        let d = Delegations::default();
        {
            let mut s = d.lock();
            s.lease = lease;
            s.owned.insert(7, 7);
            s.owned.insert(9, 7);
        }
        d
    }

    #[test]
    fn delegations_hold_only_under_the_lease_they_were_granted_under() {
        let d = holding(Some(3));
        assert!(d.lock_under(Some(3)).owned.contains_key(&9));
        // A lease that lapsed and was renewed is another generation: the
        // MDS may have revoked them unheard meanwhile.
        let s = d.lock_under(Some(4));
        assert!(s.owned.is_empty());
        assert_eq!(s.revokes, 1);
        drop(s);
        // No lease at all (before the first heartbeat, or run out).
        let d = holding(Some(3));
        assert!(d.lock_under(None).owned.is_empty());
        // Nothing held: nothing to drop, no revoke counted.
        let d = Delegations::default();
        assert_eq!(d.lock_under(None).revokes, 0);
    }
}
