//! Peering, recovery and repair: keeps this OSD from serving stale or
//! corrupt chunks and brings its copies up to date.
//!
//! * **PG gate.** A placement group is *peered* under the signature of its
//!   member list (ids, states, addresses, pg_count). Until this OSD has
//!   peered a PG under the current map's signature, client reads and writes
//!   of its chunks answer `Unavailable` ("peering"), so the client tries the
//!   next member. A map change that leaves a PG's members alone keeps it
//!   peered.
//! * **Peering round** (at start and after every map change): for every PG
//!   this OSD belongs to and has not peered under the current signature, ask
//!   each other UP member for its chunk list (`ListChunks`, one call per
//!   peer), pull every chunk for which a peer holds a newer version (whole
//!   chunk, throttled), then mark the PG peered. A PG is peered only if
//!   enough members answered that any write acknowledged by the write quorum
//!   was seen: `answered >= members - write_quorum`, or every other UP member
//!   answered and this process had peered the PG before (an OSD that stayed
//!   up while the others went down keeps serving).
//! * **Non-primary service.** An OSD that is not the acting primary (first
//!   UP member) of a chunk and receives a client read or write for it (the
//!   client failed over before the map changed) first probes the other UP
//!   members' versions of that chunk (`ReadChunk` of 0 bytes) and pulls a
//!   newer copy, so it never serves or extends stale data.
//! * **Stale chunks.** A forwarded write that skips versions (after the
//!   reorder wait, or at once while the PG is not peered) is refused and the
//!   chunk marked stale: client reads and writes of it answer `Unavailable`
//!   until a copy at least that new is pulled. A chunk that fails its
//!   checksum is marked likewise and repaired from a peer holding the same
//!   or a newer version.
//!
//! Requests between OSDs carry the metadata key [`INTERNAL_KEY`]; they are
//! served from local data without the gate (each reply carries the chunk's
//! version, and the caller picks the newest).

use crate::chunk_store::{ChunkStore, StoreError};
use crate::error::OsdError;
use crate::membership::Membership;
use crate::replication::Peers;
use avalon_proto::limits::MAX_CHUNK_SIZE;
use avalon_proto::pb::{ClusterMap, OsdInfo, OsdState};
use avalon_proto::placement::{chunk_members, pg_members, pg_of};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// gRPC metadata key marking a request from another OSD.
pub const INTERNAL_KEY: &str = "x-avalon-internal";

/// How long a version probe of one peer may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the background loop looks for work without being woken.
const TICK: Duration = Duration::from_millis(500);

/// Why a chunk is marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    /// Only a copy of at least this version clears the mark.
    min_version: u64,
    /// The local copy failed verification: a copy of the same version is
    /// good enough to replace it.
    corrupt: bool,
}

/// A chunk to pull: ino, index, version, source address, local copy corrupt.
type Pull = (u64, u64, u64, String, bool);

/// Recovery counters (for logs and tests).
#[derive(Debug, Default)]
pub struct RecoveryStats {
    pub pulled_chunks: AtomicU64,
    pub pulled_bytes: AtomicU64,
    pub repaired_chunks: AtomicU64,
    pub peered_pgs: AtomicU64,
}

#[derive(Default)]
struct PgTable {
    /// pg -> signature it was peered under.
    peered: HashMap<u32, u64>,
    /// PGs peered at least once by this process (with the pg_count).
    ever: HashSet<(u32, u32)>,
}

/// Peering and repair state of one OSD.
pub struct Recovery {
    store: Arc<ChunkStore>,
    membership: Arc<Membership>,
    peers: Arc<Peers>,
    pgs: Mutex<PgTable>,
    marks: Mutex<HashMap<(u64, u64), Mark>>,
    kick: Notify,
    bytes_per_sec: u64,
    pub stats: RecoveryStats,
}

/// Signature of a PG's placement: changes whenever its members, their
/// states or addresses, or the PG count change.
pub fn pg_signature(map: &ClusterMap, pg: u32) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    map.pg_count.hash(&mut h);
    map.write_quorum.hash(&mut h);
    for o in pg_members(map, pg) {
        o.id.hash(&mut h);
        o.state.hash(&mut h);
        o.addr.hash(&mut h);
    }
    h.finish()
}

fn is_up(o: &OsdInfo) -> bool {
    o.state == OsdState::Up as i32
}

/// Answers needed from other members so that a quorum write is seen.
fn needed_answers(members: usize, write_quorum: u32) -> usize {
    members.saturating_sub(write_quorum.max(1) as usize)
}

impl Recovery {
    /// Recovery over `store`, copying at most `bytes_per_sec` (0 = no limit).
    pub fn new(
        store: Arc<ChunkStore>,
        membership: Arc<Membership>,
        peers: Arc<Peers>,
        bytes_per_sec: u64,
    ) -> Recovery {
        Recovery {
            store,
            membership,
            peers,
            pgs: Mutex::new(PgTable::default()),
            marks: Mutex::new(HashMap::new()),
            kick: Notify::new(),
            bytes_per_sec,
            stats: RecoveryStats::default(),
        }
    }

    /// Wakes the background loop.
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// True when `pg` is peered under `map`.
    pub fn is_peered(&self, map: &ClusterMap, pg: u32) -> bool {
        let sig = pg_signature(map, pg);
        let g = self.pgs.lock().unwrap_or_else(|e| e.into_inner());
        g.peered.get(&pg) == Some(&sig)
    }

    /// Number of marked (stale or corrupt) chunks.
    pub fn marked(&self) -> usize {
        self.marks.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Marks a chunk stale: only a copy of at least `min_version` clears it.
    pub fn mark_stale(&self, ino: u64, index: u64, min_version: u64) {
        let mut g = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        let m = g.entry((ino, index)).or_insert(Mark {
            min_version,
            corrupt: false,
        });
        m.min_version = m.min_version.max(min_version);
        drop(g);
        self.kick();
    }

    /// Marks a chunk whose local copy failed verification for repair.
    pub fn mark_corrupt(&self, ino: u64, index: u64) {
        let local = self.local_version_meta(ino, index);
        let mut g = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        let m = g.entry((ino, index)).or_insert(Mark {
            min_version: local,
            corrupt: true,
        });
        m.corrupt = true;
        m.min_version = m.min_version.max(local);
        drop(g);
        tracing::warn!(
            ino,
            index,
            "chunk failed verification; repairing from a peer"
        );
        self.kick();
    }

    /// The version recorded in a chunk's metadata even when its data is
    /// corrupt (0 when unknown).
    fn local_version_meta(&self, ino: u64, index: u64) -> u64 {
        self.store.meta_version(ino, index).unwrap_or(0)
    }

    fn clear_if_satisfied(&self, ino: u64, index: u64, version: u64) {
        let mut g = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = g.get(&(ino, index)) {
            if version >= m.min_version {
                g.remove(&(ino, index));
            }
        }
    }

    /// Admits a client read or write of chunk `(ino, index)` under `map`:
    /// this OSD must be an UP member, the PG peered and the chunk not
    /// marked; a member that is not the acting primary first makes sure no
    /// other member holds a newer copy.
    pub async fn admit(&self, map: &ClusterMap, ino: u64, index: u64) -> Result<(), OsdError> {
        let me = self.membership.osd_id();
        let members = chunk_members(map, ino, index);
        let Some(mine) = members.iter().find(|o| o.id == me) else {
            return Err(OsdError::StaleMap(format!(
                "OSD {me} holds no replica of chunk {ino:016x}/{index:016x} in cluster map epoch {}; \
                 refresh the map",
                map.epoch
            )));
        };
        if !is_up(mine) {
            return Err(OsdError::Peering(format!(
                "OSD {me} is not up in cluster map epoch {}",
                map.epoch
            )));
        }
        let pg = pg_of(ino, index, map.pg_count);
        if !self.is_peered(map, pg) {
            self.kick();
            return Err(OsdError::Peering(format!(
                "OSD {me}: placement group {pg} is peering (map epoch {})",
                map.epoch
            )));
        }
        if self
            .marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&(ino, index))
        {
            self.kick();
            return Err(OsdError::Peering(format!(
                "OSD {me}: chunk {ino:016x}/{index:016x} is being recovered"
            )));
        }
        let acting = members.iter().find(|o| is_up(o)).map(|o| o.id);
        if acting != Some(me) {
            self.catch_up_chunk(map, &members, ino, index).await?;
        }
        Ok(())
    }

    /// Probes the other UP members' versions of one chunk and pulls a newer
    /// copy if there is one. Fails when too few members answered to be sure.
    async fn catch_up_chunk(
        &self,
        map: &ClusterMap,
        members: &[&OsdInfo],
        ino: u64,
        index: u64,
    ) -> Result<(), OsdError> {
        let me = self.membership.osd_id();
        let others: Vec<&OsdInfo> = members
            .iter()
            .copied()
            .filter(|o| o.id != me && is_up(o))
            .collect();
        let probes = others.iter().map(|o| {
            let addr = o.addr.clone();
            let peers = Arc::clone(&self.peers);
            async move {
                let r = peers
                    .read_internal(&addr, ino, index, 0, 0, PROBE_TIMEOUT)
                    .await;
                (addr, r.map(|r| r.version))
            }
        });
        let answers = futures::future::join_all(probes).await;
        let mut answered = 0usize;
        let mut best: Option<(u64, String)> = None;
        for (addr, r) in answers {
            if let Ok(v) = r {
                answered += 1;
                if best.as_ref().is_none_or(|(bv, _)| v > *bv) {
                    best = Some((v, addr));
                }
            }
        }
        if answered < needed_answers(members.len(), map.write_quorum) {
            return Err(OsdError::Peering(format!(
                "OSD {me}: too few replicas of chunk {ino:016x}/{index:016x} answered \
                 ({answered} of {}) to be sure this copy is current",
                others.len()
            )));
        }
        let local = self
            .store
            .blocking(move |s| s.version(ino, index))
            .await
            .unwrap_or(0);
        if let Some((v, addr)) = best {
            if v > local {
                self.pull(&addr, ino, index, false).await.map_err(|e| {
                    OsdError::Peering(format!(
                        "chunk {ino:016x}/{index:016x}: catching up from {addr} failed: {e}"
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// Copies a whole chunk from the OSD at `addr` and installs it if it is
    /// newer (or, with `replace_equal`, as new) than the local copy.
    /// Returns the version pulled.
    async fn pull(
        &self,
        addr: &str,
        ino: u64,
        index: u64,
        replace_equal: bool,
    ) -> Result<u64, String> {
        let r = self
            .peers
            .read_internal(addr, ino, index, 0, MAX_CHUNK_SIZE, Duration::from_secs(60))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        if r.version == 0 {
            return Err("the peer no longer holds the chunk".into());
        }
        let version = r.version;
        let len = r.data.len() as u64;
        let data = r.data;
        let installed = self
            .store
            .blocking(move |s| s.install(ino, index, &data, version, replace_equal))
            .await
            .map_err(|e| e.to_string())?;
        if installed {
            self.stats.pulled_chunks.fetch_add(1, Ordering::Relaxed);
            self.stats.pulled_bytes.fetch_add(len, Ordering::Relaxed);
            tracing::info!(
                ino,
                index,
                version,
                bytes = len,
                from = addr,
                "pulled chunk"
            );
            self.throttle(len).await;
        }
        self.clear_if_satisfied(ino, index, version);
        Ok(version)
    }

    async fn throttle(&self, bytes: u64) {
        if self.bytes_per_sec > 0 && bytes > 0 {
            let secs = bytes as f64 / self.bytes_per_sec as f64;
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        }
    }

    /// Runs peering rounds and repairs until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.kick.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
            if self.membership.map().is_none() {
                continue;
            }
            let round = async {
                self.peer_round().await;
                self.repair_round().await;
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = round => {}
            }
        }
    }

    /// One peering pass over the PGs not peered under the current map.
    pub async fn peer_round(&self) {
        let Some(map) = self.membership.map() else {
            return;
        };
        let me = self.membership.osd_id();
        let pg_count = map.pg_count.max(1);
        let todo: BTreeMap<u32, Vec<&OsdInfo>> = {
            let g = self.pgs.lock().unwrap_or_else(|e| e.into_inner());
            (0..pg_count)
                .filter_map(|pg| {
                    let members = pg_members(&map, pg);
                    let mine = members.iter().find(|o| o.id == me)?;
                    if !is_up(mine) || g.peered.get(&pg) == Some(&pg_signature(&map, pg)) {
                        return None;
                    }
                    Some((pg, members))
                })
                .collect()
        };
        if todo.is_empty() {
            return;
        }
        // Ask every other UP member of those PGs for its chunk list, once.
        let mut addrs: BTreeMap<u64, String> = BTreeMap::new();
        for members in todo.values() {
            for o in members.iter().filter(|o| o.id != me && is_up(o)) {
                addrs.insert(o.id, o.addr.clone());
            }
        }
        let lists = futures::future::join_all(addrs.iter().map(|(id, addr)| {
            let peers = Arc::clone(&self.peers);
            let (id, addr) = (*id, addr.clone());
            async move { (id, addr.clone(), peers.list_internal(&addr).await) }
        }))
        .await;
        // Newest remote copy per chunk, considering only PG members.
        let mut answered: HashSet<u64> = HashSet::new();
        let mut best: HashMap<(u64, u64), (u64, String)> = HashMap::new();
        for (id, addr, r) in lists {
            match r {
                Ok(chunks) => {
                    answered.insert(id);
                    for c in chunks {
                        let Some(cid) = c.chunk else { continue };
                        let pg = pg_of(cid.ino, cid.index, pg_count);
                        let Some(members) = todo.get(&pg) else {
                            continue;
                        };
                        if !members.iter().any(|o| o.id == id) {
                            continue;
                        }
                        let e = best
                            .entry((cid.ino, cid.index))
                            .or_insert((0, String::new()));
                        if c.version > e.0 {
                            *e = (c.version, addr.clone());
                        }
                    }
                }
                Err(s) => {
                    tracing::info!(osd = id, %addr, error = %s.message(), "peer did not list its chunks")
                }
            }
        }
        let todo_pgs: HashSet<u32> = todo.keys().copied().collect();
        let local = match self
            .store
            .blocking(move |s| s.list(|ino, index| todo_pgs.contains(&pg_of(ino, index, pg_count))))
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list local chunks for peering");
                return;
            }
        };
        let local: HashMap<(u64, u64), Option<u64>> = local
            .into_iter()
            .map(|c| ((c.ino, c.index), c.state.map(|s| s.0)))
            .collect();
        let mut by_pg: BTreeMap<u32, Vec<Pull>> = BTreeMap::new();
        for ((ino, index), (v, addr)) in best {
            let lv = local.get(&(ino, index)).copied();
            let corrupt = matches!(lv, Some(None));
            let lv = lv.flatten().unwrap_or(0);
            if v > lv || (corrupt && v >= lv) {
                by_pg
                    .entry(pg_of(ino, index, pg_count))
                    .or_default()
                    .push((ino, index, v, addr, corrupt));
            }
        }
        // PGs where this OSD is the acting primary first: they gate writes.
        let mut order: Vec<u32> = todo.keys().copied().collect();
        order.sort_by_key(|pg| {
            let acting = todo[pg].iter().find(|o| is_up(o)).map(|o| o.id);
            (acting != Some(me), *pg)
        });
        for pg in order {
            let members = &todo[&pg];
            let others_up: Vec<u64> = members
                .iter()
                .filter(|o| o.id != me && is_up(o))
                .map(|o| o.id)
                .collect();
            let n_answered = others_up.iter().filter(|id| answered.contains(id)).count();
            let before = self
                .pgs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .ever
                .contains(&(pg, pg_count));
            let enough = n_answered >= needed_answers(members.len(), map.write_quorum)
                || (before && n_answered == others_up.len());
            if !enough {
                tracing::debug!(
                    pg,
                    answered = n_answered,
                    "too few members answered; PG stays unpeered"
                );
                continue;
            }
            let mut ok = true;
            for (ino, index, v, addr, corrupt) in by_pg.remove(&pg).unwrap_or_default() {
                match self.pull(&addr, ino, index, corrupt).await {
                    Ok(got) if got >= v => {}
                    Ok(got) => {
                        tracing::info!(ino, index, want = v, got, "peer returned an older copy");
                        ok = false;
                    }
                    Err(e) => {
                        tracing::warn!(ino, index, %addr, error = %e, "pulling a chunk failed");
                        ok = false;
                    }
                }
            }
            if ok {
                let mut g = self.pgs.lock().unwrap_or_else(|e| e.into_inner());
                g.peered.insert(pg, pg_signature(&map, pg));
                g.ever.insert((pg, pg_count));
                self.stats.peered_pgs.fetch_add(1, Ordering::Relaxed);
            }
        }
        tracing::debug!(epoch = map.epoch, "peering round done");
    }

    /// Tries to repair every marked chunk once.
    pub async fn repair_round(&self) {
        let Some(map) = self.membership.map() else {
            return;
        };
        let marks: Vec<((u64, u64), Mark)> = self
            .marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        let me = self.membership.osd_id();
        for ((ino, index), mark) in marks {
            let members = chunk_members(&map, ino, index);
            if !members.iter().any(|o| o.id == me) {
                self.marks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&(ino, index));
                continue;
            }
            let probes = members.iter().filter(|o| o.id != me && is_up(o)).map(|o| {
                let addr = o.addr.clone();
                let peers = Arc::clone(&self.peers);
                async move {
                    let r = peers
                        .read_internal(&addr, ino, index, 0, 0, PROBE_TIMEOUT)
                        .await;
                    (addr, r.map(|r| r.version))
                }
            });
            let mut best: Option<(u64, String)> = None;
            for (addr, r) in futures::future::join_all(probes).await {
                if let Ok(v) = r {
                    if v >= mark.min_version.max(1) && best.as_ref().is_none_or(|(b, _)| v > *b) {
                        best = Some((v, addr));
                    }
                }
            }
            let Some((_, addr)) = best else {
                tracing::debug!(ino, index, "no peer holds a good enough copy yet");
                continue;
            };
            match self.pull(&addr, ino, index, mark.corrupt).await {
                Ok(v) => {
                    if mark.corrupt && v >= mark.min_version {
                        self.stats.repaired_chunks.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(ino, index, version = v, from = %addr, "repaired chunk");
                    }
                }
                Err(e) => tracing::warn!(ino, index, %addr, error = %e, "repair failed"),
            }
        }
    }

    /// Handles a store error of a local read: corruption marks the chunk
    /// for repair.
    pub fn note_read_error(&self, ino: u64, index: u64, e: &StoreError) {
        if matches!(e, StoreError::Corruption { .. }) {
            self.mark_corrupt(ino, index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed() {
        assert_eq!(needed_answers(3, 2), 1);
        assert_eq!(needed_answers(3, 3), 0);
        assert_eq!(needed_answers(1, 2), 0);
        assert_eq!(needed_answers(5, 0), 4);
    }
}
