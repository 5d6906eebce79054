//! How long a new leader holds its changes back.
//!
//! The lease table and the delegations live in the leader's memory, so a
//! new leader knows neither which clients cache what nor which directories
//! its predecessor delegated. None of its changes may be acknowledged while
//! another session may still trust something a predecessor let it cache,
//! and no delegation be granted while another session may still act under
//! an old one.
//!
//! How long that can be: a leader grants (renews) a client lease only while
//! its read lease holds (`read_lease.rs`), i.e. before `q + R`, `q` being
//! the start of its last confirmed quorum round and `R` the read lease; the
//! client counts the lease from before it sent the heartbeat, so every
//! lease it was granted ends before `q + R + lease`. Each voter that
//! answered round `q` refuses to vote for another candidate for openraft's
//! leader lease (`election_max_ms`) after it received it (a restarted one
//! from its start), and so does the old leader itself (`RaftService::vote`).
//! A new leader's quorum includes one of them, so it was elected after
//! `q + election_max`: it waits `R + lease - election_max`, plus a margin
//! for clock rates, from the moment it first acts in its term.
//!
//! Only other sessions matter: a session's own cache follows the replies to
//! its own changes and is never recalled. So when the replicated state,
//! applied up to this term's first entry (which covers every session a
//! predecessor registered), holds no session but the one asking, nothing
//! is waited for: one client's failover costs an election, not a lease.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Slack for clocks of different nodes running at slightly different rates.
pub const CLOCK_MARGIN: Duration = Duration::from_millis(50);

/// This node's view of its current term as a leader.
#[derive(Default)]
struct TermStart {
    term: u64,
    /// When this node first acted as leader in `term`.
    since: Option<Instant>,
    /// Sessions of the state as of the term's first entry.
    sessions: Option<Arc<Vec<u64>>>,
}

/// The wait of a new leader (see the module doc).
pub struct FreshLeader {
    inner: Mutex<TermStart>,
    wait: Duration,
}

impl FreshLeader {
    /// For a read lease `read_lease`, client leases of `lease` and an
    /// openraft leader lease (election timeout maximum) `leader_lease`.
    pub fn new(read_lease: Duration, lease: Duration, leader_lease: Duration) -> Self {
        FreshLeader {
            inner: Mutex::new(TermStart::default()),
            wait: (read_lease + lease).saturating_sub(leader_lease) + CLOCK_MARGIN,
        }
    }

    /// How long after its start a term's changes may need to wait.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TermStart> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn at(&self, term: u64) -> std::sync::MutexGuard<'_, TermStart> {
        let mut t = self.lock();
        if t.term != term {
            *t = TermStart {
                term,
                since: None,
                sessions: None,
            };
        }
        t
    }

    /// Until when a change in `term` may have to wait; the first call in
    /// a term starts its clock.
    pub fn until(&self, term: u64) -> Instant {
        let mut t = self.at(term);
        *t.since.get_or_insert_with(Instant::now) + self.wait
    }

    /// The sessions recorded for `term`, if any.
    pub fn sessions(&self, term: u64) -> Option<Arc<Vec<u64>>> {
        self.at(term).sessions.clone()
    }

    /// Records the sessions of the state as of `term`'s first entry.
    pub fn set_sessions(&self, term: u64, sessions: Vec<u64>) -> Arc<Vec<u64>> {
        let mut t = self.at(term);
        t.sessions.get_or_insert_with(|| Arc::new(sessions)).clone()
    }

    /// True if a change by session `from` need not wait: no other session
    /// can hold anything from a predecessor.
    pub fn alone(sessions: &[u64], from: u64) -> bool {
        sessions.iter().all(|&s| s == from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_is_what_outlives_the_election() {
        let f = FreshLeader::new(
            Duration::from_millis(150),
            Duration::from_millis(2000),
            Duration::from_millis(500),
        );
        assert_eq!(f.wait(), Duration::from_millis(1700));
        // A leader lease longer than the rest: only the margin.
        let f = FreshLeader::new(
            Duration::from_millis(100),
            Duration::from_millis(200),
            Duration::from_secs(1),
        );
        assert_eq!(f.wait(), CLOCK_MARGIN);
    }

    #[test]
    fn clock_starts_once_per_term_and_sessions_belong_to_it() {
        let f = FreshLeader::new(Duration::ZERO, Duration::from_secs(5), Duration::ZERO);
        let a = f.until(3);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(f.until(3), a);
        assert_eq!(f.set_sessions(3, vec![7]).as_slice(), &[7]);
        // Recorded once: a later call does not replace them.
        assert_eq!(f.set_sessions(3, vec![7, 8]).as_slice(), &[7]);
        assert!(f.until(4) > a);
        assert!(f.sessions(4).is_none());
    }

    #[test]
    fn only_other_sessions_count() {
        assert!(FreshLeader::alone(&[], 5));
        assert!(FreshLeader::alone(&[5], 5));
        assert!(!FreshLeader::alone(&[5, 6], 5));
        assert!(!FreshLeader::alone(&[6], 0));
    }
}
