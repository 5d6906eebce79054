//! Leader lease for linearizable reads.
//!
//! openraft's `ensure_linearizable` costs a heartbeat round trip to a
//! quorum. Once one succeeds, the followers that answered refuse to vote
//! for anyone else for their leader lease (`election_timeout_max` in
//! openraft 0.9), and a follower that restarts waits at least
//! `election_timeout_min` before it stands for election. So for a while
//! after the round trip *started*, no other leader can commit anything and
//! this node's applied state (every acknowledged write was applied here
//! before it was acknowledged) answers reads linearizably. We trust it for
//! half of `election_timeout_min`, which leaves room for clock rate
//! differences, and pay one quorum round per lease instead of one per read.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The time until which this node may serve reads from its own state.
pub struct ReadLease {
    valid_until: Mutex<Option<Instant>>,
    /// Start of the last confirmed round (kept across revokes: grants made
    /// under it count from there, see `fresh_leader.rs`).
    confirmed: Mutex<Option<Instant>>,
    /// Single flight: concurrent readers share one quorum round.
    refresh: tokio::sync::Mutex<()>,
    lease: Duration,
}

impl ReadLease {
    /// A lease that lasts `lease` after each confirmed quorum round.
    pub fn new(lease: Duration) -> Self {
        ReadLease {
            valid_until: Mutex::new(None),
            confirmed: Mutex::new(None),
            refresh: tokio::sync::Mutex::new(()),
            lease,
        }
    }

    /// Lease length for an election timeout floor of `election_min_ms`.
    pub fn for_election_min(election_min_ms: u64) -> Self {
        Self::new(Duration::from_millis(election_min_ms / 2))
    }

    /// How long a confirmed round lets this node read locally.
    pub fn length(&self) -> Duration {
        self.lease
    }

    /// When the last confirmed quorum round started, if any.
    pub fn last_confirmed(&self) -> Option<Instant> {
        *self.confirmed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_valid(&self) -> bool {
        let v = self.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        v.is_some_and(|t| Instant::now() < t)
    }

    /// Forgets the lease (leadership lost or doubted).
    pub fn revoke(&self) {
        *self.valid_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Returns once reads may be served locally: at once while the lease
    /// holds, else after `confirm` (a quorum round) succeeds, shared with
    /// every reader waiting at the same time.
    pub async fn ensure<E, F, Fut>(&self, confirm: F) -> Result<(), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        if self.is_valid() {
            return Ok(());
        }
        let _one = self.refresh.lock().await;
        if self.is_valid() {
            return Ok(());
        }
        // The lease counts from before the round: the followers' leases
        // start when they receive it, which is later.
        let started = Instant::now();
        match confirm().await {
            Ok(()) => {
                *self.confirmed.lock().unwrap_or_else(|e| e.into_inner()) = Some(started);
                *self.valid_until.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(started + self.lease);
                Ok(())
            }
            Err(e) => {
                self.revoke();
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn one_round_serves_many_reads_until_expiry() {
        let l = ReadLease::new(Duration::from_millis(200));
        let rounds = AtomicU32::new(0);
        for _ in 0..10 {
            l.ensure(|| async {
                rounds.fetch_add(1, Ordering::SeqCst);
                Ok::<(), ()>(())
            })
            .await
            .unwrap();
        }
        assert_eq!(rounds.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(250)).await;
        l.ensure(|| async {
            rounds.fetch_add(1, Ordering::SeqCst);
            Ok::<(), ()>(())
        })
        .await
        .unwrap();
        assert_eq!(rounds.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn failed_round_grants_nothing_and_revoke_forces_a_round() {
        let l = ReadLease::new(Duration::from_secs(60));
        assert_eq!(
            l.ensure(|| async { Err::<(), _>("no quorum") }).await,
            Err("no quorum")
        );
        assert!(!l.is_valid());
        l.ensure(|| async { Ok::<(), ()>(()) }).await.unwrap();
        assert!(l.is_valid());
        l.revoke();
        assert!(!l.is_valid());
    }

    #[tokio::test]
    async fn concurrent_readers_share_one_round() {
        let l = Arc::new(ReadLease::new(Duration::from_secs(60)));
        let rounds = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (l, rounds) = (l.clone(), rounds.clone());
            tasks.push(tokio::spawn(async move {
                l.ensure(|| async {
                    rounds.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<(), ()>(())
                })
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(rounds.load(Ordering::SeqCst), 1);
    }
}
