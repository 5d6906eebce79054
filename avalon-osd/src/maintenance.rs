//! Background maintenance: the scrubber and garbage collection.
//!
//! * **Scrub** (every `scrub_interval_ms`, throttled to
//!   `scrub_bytes_per_sec`): re-reads every local chunk verifying the crc of
//!   every block; a bad chunk is counted and marked for repair (recovery
//!   pulls a good copy from a member). Then compares versions and content
//!   digests with the other members of the PGs this OSD serves
//!   ([`Recovery::reconcile`] in scrub mode) and replaces copies that lag
//!   or differ.
//! * **GC** (every `gc_interval_ms`, and soon after start): asks the MDS
//!   which of the inodes stored here no longer exist (`CheckInodes`; inode
//!   numbers are never reused) and deletes their chunks — this catches the
//!   deletes an OSD missed while it was down; then removes *strays*:
//!   copies of PGs this OSD is no longer a member of (after an OSD joined or
//!   came back in), once every current member holds that chunk at least as
//!   new.

use crate::chunk_store::{ChunkStore, StoreError};
use crate::membership::Membership;
use crate::recovery::Recovery;
use crate::replication::Peers;
use avalon_proto::pb::OsdState;
use avalon_proto::placement::{pg_members, pg_of};
use avalon_proto::request_id;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Scrubber and garbage collector of one OSD.
pub struct Maintenance {
    pub store: Arc<ChunkStore>,
    pub membership: Arc<Membership>,
    pub peers: Arc<Peers>,
    pub recovery: Arc<Recovery>,
    /// 0 = never.
    pub scrub_interval: Duration,
    /// 0 = unlimited.
    pub scrub_bytes_per_sec: u64,
    /// 0 = never.
    pub gc_interval: Duration,
    /// Inodes the MDS called deleted, and since when (see [`DEAD_GRACE`]).
    pub dead_since: std::sync::Mutex<HashMap<u64, std::time::Instant>>,
}

/// How long the MDS must keep calling an inode deleted before its chunks
/// go. A client numbers the files it creates under a delegation itself
/// and may store their data before the create reaches the MDS; a new MDS
/// leader does not know which numbers are so promised, and calls them
/// deleted until the create arrives (the client sends it within seconds,
/// also across a failover).
pub const DEAD_GRACE: Duration = Duration::from_secs(10);

impl Maintenance {
    /// Runs scrub passes and GC sweeps until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        // Wait for registration.
        while self.membership.map().is_none() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        let now = tokio::time::Instant::now();
        let far = Duration::from_secs(365 * 24 * 3600);
        let mut next_gc = if self.gc_interval.is_zero() {
            now + far
        } else {
            now + self.gc_interval.min(Duration::from_secs(3))
        };
        let mut next_scrub = if self.scrub_interval.is_zero() {
            now + far
        } else {
            now + self.scrub_interval
        };
        loop {
            let next = next_gc.min(next_scrub);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
            let now = tokio::time::Instant::now();
            if now >= next_gc {
                // One request id per pass, for its lines and its calls.
                let pass = request_id::scope(request_id::fresh(), async {
                    let n = self.gc_once().await;
                    if n > 0 {
                        tracing::info!(removed = n, "garbage collection removed chunks");
                    }
                });
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = pass => {}
                }
                next_gc = tokio::time::Instant::now() + self.gc_interval;
            }
            if now >= next_scrub {
                let pass = request_id::scope(request_id::fresh(), async {
                    let (n, bad) = self.scrub_once().await;
                    tracing::info!(scrubbed = n, errors = bad, "scrub pass done");
                });
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = pass => {}
                }
                next_scrub = tokio::time::Instant::now() + self.scrub_interval;
            }
        }
    }

    /// One GC sweep; returns the number of chunks removed.
    pub async fn gc_once(&self) -> u64 {
        let mut removed = 0u64;
        // Chunks of deleted inodes.
        let inos = match self.store.blocking(|s| s.inos()).await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "GC cannot list inodes");
                return 0;
            }
        };
        if !inos.is_empty() {
            let dead = self.membership.dead_inos(inos).await;
            let dead: Vec<u64> = {
                let now = std::time::Instant::now();
                let mut since = self.dead_since.lock().unwrap_or_else(|e| e.into_inner());
                since.retain(|ino, _| dead.contains(ino));
                dead.iter()
                    .copied()
                    .filter(|ino| {
                        now.duration_since(*since.entry(*ino).or_insert(now)) >= DEAD_GRACE
                    })
                    .collect()
            };
            for ino in dead {
                self.dead_since
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&ino);
                let before = self.store.chunk_count();
                match self.store.blocking(move |s| s.delete_object(ino)).await {
                    Ok(()) => {
                        let n = before.saturating_sub(self.store.chunk_count());
                        removed += n;
                        tracing::debug!(ino, chunks = n, "removed chunks of a deleted inode");
                    }
                    Err(e) => tracing::warn!(ino, error = %e, "GC cannot delete an object"),
                }
            }
        }
        removed += self.remove_strays().await;
        self.recovery
            .stats
            .removed_chunks
            .fetch_add(removed, Ordering::Relaxed);
        removed
    }

    /// Removes copies of PGs this OSD is not a member of once every member
    /// (all up) holds the chunk at least as new.
    async fn remove_strays(&self) -> u64 {
        let Some(map) = self.membership.map() else {
            return 0;
        };
        let me = self.membership.osd_id();
        let pg_count = map.pg_count.max(1);
        let listed = {
            let map = Arc::clone(&map);
            self.store
                .blocking(move |s| {
                    s.list(|ino, index| {
                        let pg = pg_of(ino, index, pg_count);
                        !pg_members(&map, pg).iter().any(|o| o.id == me)
                    })
                })
                .await
        };
        let listed = match listed {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "GC cannot list chunks");
                return 0;
            }
        };
        let mut by_pg: BTreeMap<u32, Vec<(u64, u64, u64)>> = BTreeMap::new();
        for c in listed {
            let v = c.state.map_or(0, |s| s.0);
            by_pg
                .entry(pg_of(c.ino, c.index, pg_count))
                .or_default()
                .push((c.ino, c.index, v));
        }
        let in_osds = map
            .osds
            .iter()
            .filter(|o| o.state != OsdState::Out as i32)
            .count();
        let want = (map.replicas.max(1) as usize).min(in_osds);
        let mut removed = 0u64;
        for (pg, chunks) in by_pg {
            let members = pg_members(&map, pg);
            if members.len() < want || members.iter().any(|o| o.state != OsdState::Up as i32) {
                continue;
            }
            // Lowest version any member holds, per chunk (absent = 0).
            let mut held: Option<HashMap<(u64, u64), u64>> = None;
            let mut ok = true;
            for o in &members {
                match self.peers.list_pg_internal(&o.addr, pg, pg_count).await {
                    Ok(r) => {
                        let theirs: HashMap<(u64, u64), u64> = r
                            .chunks
                            .iter()
                            .filter_map(|c| {
                                c.chunk.as_ref().map(|id| ((id.ino, id.index), c.version))
                            })
                            .collect();
                        held = Some(match held {
                            None => theirs,
                            Some(prev) => prev
                                .into_iter()
                                .filter_map(|(k, v)| theirs.get(&k).map(|t| (k, v.min(*t))))
                                .collect(),
                        });
                    }
                    Err(s) => {
                        tracing::debug!(pg, osd = o.id, error = %s.message(), "member did not list; keeping strays");
                        ok = false;
                        break;
                    }
                }
            }
            let (true, Some(held)) = (ok, held) else {
                continue;
            };
            for (ino, index, v) in chunks {
                let Some(&mv) = held.get(&(ino, index)) else {
                    continue;
                };
                if mv < v.max(1) {
                    continue;
                }
                match self
                    .store
                    .blocking(move |s| s.remove_chunk(ino, index, mv))
                    .await
                {
                    Ok(true) => removed += 1,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(ino, index, error = %e, "cannot remove a stray chunk"),
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed copies of PGs this OSD no longer holds");
        }
        removed
    }

    /// One scrub pass; returns (chunks verified, errors found).
    pub async fn scrub_once(&self) -> (u64, u64) {
        let stats = &self.recovery.stats;
        let diverged_before = stats.diverged_chunks.load(Ordering::Relaxed);
        let listed = match self.store.blocking(|s| s.list(|_, _| true)).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "scrub cannot list chunks");
                return (0, 0);
            }
        };
        let (mut n, mut bad) = (0u64, 0u64);
        for c in listed {
            let (ino, index) = (c.ino, c.index);
            let r = self
                .store
                .blocking(move |s| s.scrub_chunk(ino, index))
                .await;
            n += 1;
            stats.scrubbed_chunks.fetch_add(1, Ordering::Relaxed);
            let len = match r {
                Ok(len) => len,
                Err(e @ StoreError::Corruption { .. }) => {
                    tracing::warn!(ino, index, error = %e, "scrub found a corrupt chunk");
                    bad += 1;
                    stats.scrub_errors.fetch_add(1, Ordering::Relaxed);
                    self.recovery.mark_corrupt(ino, index);
                    0
                }
                Err(e) => {
                    tracing::debug!(ino, index, error = %e, "scrub could not read a chunk");
                    0
                }
            };
            if self.scrub_bytes_per_sec > 0 && len > 0 {
                let secs = len as f64 / self.scrub_bytes_per_sec as f64;
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            }
        }
        // Compare with the other members of the PGs this OSD serves.
        self.recovery.reconcile(true).await;
        let diverged = stats
            .diverged_chunks
            .load(Ordering::Relaxed)
            .saturating_sub(diverged_before);
        if diverged > 0 {
            bad += diverged;
            stats.scrub_errors.fetch_add(diverged, Ordering::Relaxed);
        }
        (n, bad)
    }
}
