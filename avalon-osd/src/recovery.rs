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

use crate::chunk_store::{ChunkStore, SnapStamp, StampedCopy, StoreError};
use crate::error::OsdError;
use crate::membership::Membership;
use crate::replication::Peers;
use avalon_proto::limits::MAX_CHUNK_SIZE;
use avalon_proto::pb::{ClusterMap, OsdInfo, OsdReport, OsdState};
use avalon_proto::placement::{chunk_members, pg_members, pg_of};
use avalon_proto::request_id;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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
    /// Snapshot clones copied from peers.
    pub pulled_clones: AtomicU64,
    pub repaired_chunks: AtomicU64,
    pub peered_pgs: AtomicU64,
    /// Copies replaced because their content differed from the chosen
    /// copy at the same version.
    pub diverged_chunks: AtomicU64,
    /// Chunks the scrubber verified, and errors it found (bad checksums,
    /// content differing from the members' at the same version).
    pub scrubbed_chunks: AtomicU64,
    pub scrub_errors: AtomicU64,
    /// Chunks removed by garbage collection (deleted files, strays of PGs
    /// this OSD is no longer a member of).
    pub removed_chunks: AtomicU64,
}

/// One member's copy of a chunk, as peering sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub osd: u64,
    pub addr: String,
    pub version: u64,
    pub digest: u64,
    pub length: u64,
    /// The holder has served this chunk's PG since it started (a restarted
    /// OSD's copies have not: they may hold a write nobody acknowledged).
    pub serving: bool,
}

/// Which digest wins among copies of the same (newest) version: copies of
/// serving holders first; then the digest most of them hold; then the
/// acting primary's; then the lowest OSD id's. Every member computes the
/// same answer from the same lists, so replicas converge on one content.
pub fn winning_digest(holders: &[&Copy], acting: Option<u64>) -> u64 {
    let serving: Vec<&Copy> = holders.iter().copied().filter(|c| c.serving).collect();
    let pool = if serving.is_empty() {
        holders.to_vec()
    } else {
        serving
    };
    let mut count: BTreeMap<u64, usize> = BTreeMap::new();
    for c in &pool {
        *count.entry(c.digest).or_default() += 1;
    }
    let top = count.values().copied().max().unwrap_or(0);
    let tied: Vec<u64> = count
        .iter()
        .filter(|(_, n)| **n == top)
        .map(|(d, _)| *d)
        .collect();
    if tied.len() == 1 {
        return tied[0];
    }
    if let Some(a) = pool
        .iter()
        .find(|c| Some(c.osd) == acting && tied.contains(&c.digest))
    {
        return a.digest;
    }
    pool.iter()
        .filter(|c| tied.contains(&c.digest))
        .min_by_key(|c| c.osd)
        .map_or(0, |c| c.digest)
}

/// Decides whether to pull a chunk: `mine` is the local copy (None when
/// missing or `corrupt`), `remote` the other members' copies. Returns the
/// index in `remote` to pull from and whether a copy of the same version
/// must replace the local one.
pub fn choose_pull(
    mine: Option<&Copy>,
    corrupt: bool,
    remote: &[Copy],
    acting: Option<u64>,
) -> Option<(usize, bool)> {
    let maxr = remote.iter().map(|c| c.version).max()?;
    let lv = mine.map_or(0, |c| c.version);
    if corrupt {
        // A corrupt copy: any copy at least as new replaces it.
        return remote
            .iter()
            .enumerate()
            .filter(|(_, c)| c.version >= lv)
            .max_by_key(|(_, c)| c.version)
            .map(|(i, _)| (i, true));
    }
    if maxr < lv {
        return None;
    }
    let mut holders: Vec<&Copy> = remote.iter().filter(|c| c.version == maxr).collect();
    if let Some(m) = mine.filter(|m| m.version == maxr) {
        holders.push(m);
    }
    let win = winning_digest(&holders, acting);
    if mine.is_some_and(|m| m.version == maxr && m.digest == win) {
        return None;
    }
    let replace = lv == maxr;
    remote
        .iter()
        .position(|c| c.version == maxr && c.digest == win)
        .map(|i| (i, replace))
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
    /// PGs of this OSD not peered yet (as of the last round).
    pub pending_pgs: AtomicU64,
    /// Chunks and bytes the current peering round still has to pull.
    pub pending_chunks: AtomicU64,
    pub pending_bytes: AtomicU64,
    /// The live snapshot ids and newest id of the last `TrimSnapshots`.
    live_snaps: Mutex<Option<(BTreeSet<u64>, u64)>>,
}

/// Signature of a PG's placement: changes whenever its members, their
/// states or addresses, or the PG count change, and when this OSD skipped
/// maps (`gaps`, [`Membership::map_gaps`]).
pub fn pg_signature(map: &ClusterMap, pg: u32, gaps: u64) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    gaps.hash(&mut h);
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
            pending_pgs: AtomicU64::new(0),
            pending_chunks: AtomicU64::new(0),
            pending_bytes: AtomicU64::new(0),
            live_snaps: Mutex::new(None),
        }
    }

    /// Wakes the background loop.
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// PG and background-work counters for heartbeats and status.
    pub fn report(&self) -> OsdReport {
        let st = &self.stats;
        let mut r = OsdReport {
            recovery_chunks: self.pending_chunks.load(Ordering::Relaxed),
            recovery_bytes: self.pending_bytes.load(Ordering::Relaxed),
            recovered_chunks: st.pulled_chunks.load(Ordering::Relaxed),
            scrubbed_chunks: st.scrubbed_chunks.load(Ordering::Relaxed),
            scrub_errors: st.scrub_errors.load(Ordering::Relaxed),
            repaired_chunks: st.repaired_chunks.load(Ordering::Relaxed)
                + st.diverged_chunks.load(Ordering::Relaxed),
            removed_chunks: st.removed_chunks.load(Ordering::Relaxed),
            clones: self.store.clone_count(),
            clone_bytes: self.store.clone_bytes(),
            totals: crate::metrics::totals(),
            ..Default::default()
        };
        let Some(map) = self.membership.map() else {
            return r;
        };
        let gaps = self.membership.map_gaps();
        r.map_epoch = map.epoch;
        let me = self.membership.osd_id();
        let g = self.pgs.lock().unwrap_or_else(|e| e.into_inner());
        for pg in 0..map.pg_count.max(1) {
            let members = pg_members(&map, pg);
            if !members.iter().any(|o| o.id == me && is_up(o)) {
                continue;
            }
            r.pgs += 1;
            if g.peered.get(&pg) != Some(&pg_signature(&map, pg, gaps)) {
                r.pgs_peering += 1;
            }
        }
        if r.pgs_peering == 0 {
            r.recovery_chunks = 0;
            r.recovery_bytes = 0;
        }
        r
    }

    /// True when `pg` is peered under `map`.
    pub fn is_peered(&self, map: &ClusterMap, pg: u32) -> bool {
        let sig = pg_signature(map, pg, self.membership.map_gaps());
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
    /// newer (or, with `replace_equal`, as new) than the local copy, with
    /// its snapshot stamp; the snapshot clones the copy's stamp implies
    /// and this OSD lacks are copied first. Returns the version pulled.
    async fn pull(
        &self,
        addr: &str,
        ino: u64,
        index: u64,
        replace_equal: bool,
    ) -> Result<u64, String> {
        let timeout = Duration::from_secs(60);
        let fmt = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
        let (data, version, stamp) = match self
            .peers
            .read_copy_internal(addr, ino, index, 0, timeout)
            .await
        {
            Ok(r) => (
                r.data,
                r.version,
                SnapStamp {
                    seq: r.stamp_seq,
                    born: r.stamp_born,
                },
            ),
            // A peer from before copies carried stamps (mixed versions
            // during an upgrade): the bytes alone, as then.
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                let r = self
                    .peers
                    .read_internal(addr, ino, index, 0, MAX_CHUNK_SIZE, timeout)
                    .await
                    .map_err(fmt)?;
                (r.data, r.version, SnapStamp::default())
            }
            Err(s) => return Err(fmt(s)),
        };
        if version == 0 {
            return Err("the peer no longer holds the chunk".into());
        }
        if stamp.seq > stamp.born {
            self.pull_clones_under(addr, ino, index, stamp.seq).await?;
        }
        let len = data.len() as u64;
        let installed = self
            .store
            .blocking(move |s| s.install_stamped(ino, index, &data, version, stamp, replace_equal))
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

    /// Before a head stamped `seq` replaces the local one: copies from
    /// `addr` the clones of the chunk newer than the local stamp and up to
    /// `seq` (the changes this OSD missed under snapshots made them), so
    /// its snapshot reads never fall through to the newer head.
    async fn pull_clones_under(
        &self,
        addr: &str,
        ino: u64,
        index: u64,
        seq: u64,
    ) -> Result<(), String> {
        let (local, have) = self
            .store
            .blocking(move |s| {
                let head = s.read_stamped(ino, index, 0, 0, 0)?;
                let clone = s.read_stamped(ino, index, 0, 0, seq)?;
                Ok::<_, StoreError>((head.stamp.seq, clone.version != 0))
            })
            .await
            .unwrap_or((0, false));
        if seq <= local || have {
            return Ok(());
        }
        let Some(map) = self.membership.map() else {
            return Err("no cluster map".into());
        };
        let pg_count = map.pg_count.max(1);
        let listed = self
            .peers
            .list_pg_internal(addr, pg_of(ino, index, pg_count), pg_count)
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        for c in listed.clones {
            let Some(id) = c.chunk else { continue };
            if (id.ino, id.index) == (ino, index) && c.seq > local && c.seq <= seq {
                self.pull_clone(addr, ino, index, c.seq).await?;
            }
        }
        Ok(())
    }

    /// Copies clone `seq` of a chunk from `addr` unless this OSD has it.
    async fn pull_clone(&self, addr: &str, ino: u64, index: u64, seq: u64) -> Result<(), String> {
        let r = self
            .peers
            .read_copy_internal(addr, ino, index, seq, Duration::from_secs(60))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        if r.version == 0 {
            // Trimmed there meanwhile: no live snapshot needs it.
            return Ok(());
        }
        let copy = StampedCopy {
            data: r.data.into(),
            version: r.version,
            stamp: SnapStamp {
                seq: r.stamp_seq,
                born: r.stamp_born,
            },
        };
        let len = copy.data.len() as u64;
        let installed = self
            .store
            .blocking(move |s| s.install_clone(ino, index, seq, &copy))
            .await
            .map_err(|e| e.to_string())?;
        if installed {
            self.stats.pulled_clones.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                ino,
                index,
                seq,
                bytes = len,
                from = addr,
                "pulled snapshot clone"
            );
            self.throttle(len).await;
        }
        Ok(())
    }

    /// Records the live snapshots the MDS last told (`TrimSnapshots`), so
    /// that peering does not copy back clones only removed ones needed.
    pub fn note_live_snapshots(&self, live: BTreeSet<u64>, newest: u64) {
        *self.live_snaps.lock().unwrap_or_else(|e| e.into_inner()) = Some((live, newest));
    }

    /// False if the last trim said no live snapshot needs clone `seq` of a
    /// chunk whose clones (here and at its peers) are `all`.
    fn clone_needed(&self, seq: u64, all: &BTreeSet<u64>) -> bool {
        let g = self.live_snaps.lock().unwrap_or_else(|e| e.into_inner());
        let Some((live, newest)) = g.as_ref() else {
            return true;
        };
        if seq > *newest {
            return true;
        }
        let prev = all.range(..seq).next_back().copied().unwrap_or(0);
        live.range(prev + 1..=seq).next().is_some()
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
            // One request id per round: its lines here and its calls to
            // peers carry it.
            let round = request_id::scope(request_id::fresh(), async {
                self.peer_round().await;
                self.repair_round().await;
            });
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = round => {}
            }
        }
    }

    /// One peering pass over the PGs not peered under the current map.
    pub async fn peer_round(&self) {
        self.reconcile(false).await;
    }

    /// PGs this process has peered under the current map's PG count (its
    /// copies there have been serving clients).
    pub fn serving_pgs(&self) -> (u32, Vec<u32>) {
        let pg_count = self.membership.map().map_or(0, |m| m.pg_count);
        let g = self.pgs.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<u32> = g
            .ever
            .iter()
            .filter(|(_, n)| *n == pg_count)
            .map(|(pg, _)| *pg)
            .collect();
        v.sort_unstable();
        (pg_count, v)
    }

    /// Compares this OSD's chunks with the other UP members' and pulls
    /// newer copies, and copies whose content differs at the same version
    /// ([`choose_pull`]). With `scrub == false` it works on the PGs not
    /// peered under the current map and marks them peered when done; with
    /// `scrub == true` on the PGs already peered, leaving the gate alone.
    /// Returns the number of chunks pulled.
    pub async fn reconcile(&self, scrub: bool) -> u64 {
        let Some(map) = self.membership.map() else {
            return 0;
        };
        let gaps = self.membership.map_gaps();
        let me = self.membership.osd_id();
        let pg_count = map.pg_count.max(1);
        let todo: BTreeMap<u32, Vec<&OsdInfo>> = {
            let mut g = self.pgs.lock().unwrap_or_else(|e| e.into_inner());
            let mut todo = BTreeMap::new();
            for pg in 0..pg_count {
                let members = pg_members(&map, pg);
                let Some(mine) = members.iter().find(|o| o.id == me) else {
                    // Not a member any more: forget it was peered. Should it
                    // come back under the same member list (replicas changed
                    // back, an OSD out and in again), the writes it missed
                    // meanwhile must be pulled before it serves.
                    g.peered.remove(&pg);
                    continue;
                };
                let peered = g.peered.get(&pg) == Some(&pg_signature(&map, pg, gaps));
                if !is_up(mine) || peered != scrub {
                    continue;
                }
                todo.insert(pg, members);
            }
            todo
        };
        if todo.is_empty() {
            return 0;
        }
        if !scrub {
            self.pending_pgs.store(todo.len() as u64, Ordering::Relaxed);
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
            let epoch = map.epoch;
            async move { (id, addr.clone(), peers.list_internal(&addr, epoch).await) }
        }))
        .await;
        // Every remote copy per chunk, considering only PG members.
        let mut answered: HashSet<u64> = HashSet::new();
        let mut copies: HashMap<(u64, u64), Vec<Copy>> = HashMap::new();
        // Every remote clone, with one member holding it.
        let mut remote_clones: BTreeMap<(u64, u64, u64), String> = BTreeMap::new();
        for (id, addr, r) in lists {
            match r {
                Ok(reply) => {
                    for c in &reply.clones {
                        let Some(cid) = c.chunk else { continue };
                        let pg = pg_of(cid.ino, cid.index, pg_count);
                        if todo.get(&pg).is_some_and(|m| m.iter().any(|o| o.id == id)) {
                            remote_clones
                                .entry((cid.ino, cid.index, c.seq))
                                .or_insert_with(|| addr.clone());
                        }
                    }
                    answered.insert(id);
                    let serving: HashSet<u32> = if reply.pg_count == pg_count {
                        reply.serving_pgs.iter().copied().collect()
                    } else {
                        HashSet::new()
                    };
                    for c in reply.chunks {
                        let Some(cid) = c.chunk else { continue };
                        let pg = pg_of(cid.ino, cid.index, pg_count);
                        let Some(members) = todo.get(&pg) else {
                            continue;
                        };
                        if !members.iter().any(|o| o.id == id) {
                            continue;
                        }
                        copies.entry((cid.ino, cid.index)).or_default().push(Copy {
                            osd: id,
                            addr: addr.clone(),
                            version: c.version,
                            digest: c.digest,
                            length: u64::from(c.length),
                            serving: serving.contains(&pg),
                        });
                    }
                }
                Err(s) => {
                    tracing::info!(osd = id, %addr, error = %s.message(), "peer did not list its chunks")
                }
            }
        }
        let todo_pgs: HashSet<u32> = todo.keys().copied().collect();
        let listed = self
            .store
            .blocking(move |s| {
                let want = |ino, index| todo_pgs.contains(&pg_of(ino, index, pg_count));
                Ok::<_, StoreError>((s.list(want)?, s.list_clones(want)?))
            })
            .await;
        let (local, local_clones) = match listed {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list local chunks for peering");
                return 0;
            }
        };
        // Clones peers hold and this OSD lacks (clones never change: a
        // missing one is copied), unless the last trim said no live
        // snapshot needs them.
        let mut clones_of: HashMap<(u64, u64), BTreeSet<u64>> = HashMap::new();
        for &(ino, index, seq) in remote_clones.keys().chain(local_clones.iter()) {
            clones_of.entry((ino, index)).or_default().insert(seq);
        }
        let local_clones: HashSet<(u64, u64, u64)> = local_clones.into_iter().collect();
        let mut clone_pulls: BTreeMap<u32, Vec<(u64, u64, u64, String)>> = BTreeMap::new();
        let mut clone_inos: HashSet<u64> = HashSet::new();
        for ((ino, index, seq), addr) in &remote_clones {
            if local_clones.contains(&(*ino, *index, *seq))
                || !self.clone_needed(*seq, &clones_of[&(*ino, *index)])
            {
                continue;
            }
            clone_inos.insert(*ino);
            clone_pulls
                .entry(pg_of(*ino, *index, pg_count))
                .or_default()
                .push((*ino, *index, *seq, addr.clone()));
        }
        let local: HashMap<(u64, u64), (Option<u64>, u64)> = local
            .into_iter()
            .map(|c| ((c.ino, c.index), (c.state.map(|s| s.0), c.digest)))
            .collect();
        let ever: HashSet<u32> = {
            let g = self.pgs.lock().unwrap_or_else(|e| e.into_inner());
            g.ever
                .iter()
                .filter(|(_, n)| *n == pg_count)
                .map(|(pg, _)| *pg)
                .collect()
        };
        let mut by_pg: BTreeMap<u32, Vec<Pull>> = BTreeMap::new();
        let mut missing: HashSet<u64> = HashSet::new();
        let mut pending_bytes = 0u64;
        for ((ino, index), remote) in &copies {
            let pg = pg_of(*ino, *index, pg_count);
            let acting = todo[&pg].iter().find(|o| is_up(o)).map(|o| o.id);
            let lc = local.get(&(*ino, *index)).copied();
            let corrupt = matches!(lc, Some((None, _)));
            let mine = match lc {
                Some((Some(v), d)) => Some(Copy {
                    osd: me,
                    addr: String::new(),
                    version: v,
                    digest: d,
                    length: 0,
                    serving: ever.contains(&pg),
                }),
                _ => None,
            };
            if let Some((i, replace)) = choose_pull(mine.as_ref(), corrupt, remote, acting) {
                let c = &remote[i];
                if lc.is_none() {
                    missing.insert(*ino);
                }
                pending_bytes += c.length;
                by_pg.entry(pg).or_default().push((
                    *ino,
                    *index,
                    c.version,
                    c.addr.clone(),
                    corrupt || replace,
                ));
            }
        }
        // Chunks this OSD lacks entirely: skip those of deleted files (an
        // OSD that was down during a delete must not spread them again).
        // Likewise clones of files gone for good (no snapshot holds them).
        missing.extend(clone_inos);
        if !missing.is_empty() {
            let dead = self
                .membership
                .dead_inos(missing.into_iter().collect())
                .await;
            if !dead.is_empty() {
                for pulls in by_pg.values_mut() {
                    pulls.retain(|p| !dead.contains(&p.0));
                }
                for pulls in clone_pulls.values_mut() {
                    pulls.retain(|p| !dead.contains(&p.0));
                }
            }
        }
        self.pending_bytes.store(pending_bytes, Ordering::Relaxed);
        self.pending_chunks.store(
            by_pg.values().map(|v| v.len() as u64).sum(),
            Ordering::Relaxed,
        );
        // PGs where this OSD is the acting primary first: they gate writes.
        let mut order: Vec<u32> = todo.keys().copied().collect();
        order.sort_by_key(|pg| {
            let acting = todo[pg].iter().find(|o| is_up(o)).map(|o| o.id);
            (acting != Some(me), *pg)
        });
        let mut pulled = 0u64;
        let mut unpeered = 0u64;
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
            if !enough && !scrub {
                tracing::debug!(
                    pg,
                    answered = n_answered,
                    "too few members answered; PG stays unpeered"
                );
                unpeered += 1;
                continue;
            }
            let mut ok = true;
            // Clones first: a head installed with a newer stamp must find
            // the clones its snapshots read.
            for (ino, index, seq, addr) in clone_pulls.remove(&pg).unwrap_or_default() {
                if let Err(e) = self.pull_clone(&addr, ino, index, seq).await {
                    tracing::warn!(ino, index, seq, %addr, error = %e, "pulling a snapshot clone failed");
                    ok = false;
                }
            }
            for (ino, index, v, addr, replace) in by_pg.remove(&pg).unwrap_or_default() {
                let was = self.local_version_meta(ino, index);
                match self.pull(&addr, ino, index, replace).await {
                    Ok(got) if got >= v => {
                        pulled += 1;
                        if replace && was == got {
                            self.stats.diverged_chunks.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                ino,
                                index,
                                version = got,
                                from = %addr,
                                "replaced a copy whose content differed at the same version"
                            );
                        }
                    }
                    Ok(got) => {
                        tracing::info!(ino, index, want = v, got, "peer returned an older copy");
                        ok = false;
                    }
                    Err(e) => {
                        tracing::warn!(ino, index, %addr, error = %e, "pulling a chunk failed");
                        ok = false;
                    }
                }
                let left = self.pending_chunks.load(Ordering::Relaxed);
                self.pending_chunks
                    .store(left.saturating_sub(1), Ordering::Relaxed);
            }
            if scrub {
                continue;
            }
            if ok {
                let mut g = self.pgs.lock().unwrap_or_else(|e| e.into_inner());
                g.peered.insert(pg, pg_signature(&map, pg, gaps));
                g.ever.insert((pg, pg_count));
                self.stats.peered_pgs.fetch_add(1, Ordering::Relaxed);
            } else {
                unpeered += 1;
            }
        }
        if !scrub {
            self.pending_pgs.store(unpeered, Ordering::Relaxed);
            if unpeered == 0 {
                self.pending_bytes.store(0, Ordering::Relaxed);
                self.pending_chunks.store(0, Ordering::Relaxed);
            }
        }
        tracing::debug!(epoch = map.epoch, scrub, pulled, "reconcile round done");
        pulled
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

    fn copy(osd: u64, version: u64, digest: u64, serving: bool) -> Copy {
        Copy {
            osd,
            addr: format!("osd{osd}"),
            version,
            digest,
            length: 10,
            serving,
        }
    }

    #[test]
    fn pull_newer_and_nothing_when_equal() {
        let mine = copy(1, 3, 7, true);
        let remote = vec![copy(2, 4, 9, true), copy(3, 3, 7, true)];
        assert_eq!(
            choose_pull(Some(&mine), false, &remote, Some(1)),
            Some((0, false))
        );
        let remote = vec![copy(2, 3, 7, true), copy(3, 2, 5, true)];
        assert_eq!(choose_pull(Some(&mine), false, &remote, Some(1)), None);
        assert_eq!(choose_pull(None, false, &remote, Some(1)), Some((0, false)));
        assert_eq!(choose_pull(Some(&mine), false, &[], Some(1)), None);
    }

    #[test]
    fn restarted_copy_yields_to_serving_copies() {
        // A restarted OSD (not serving) holds version 3 with other content
        // than the two members that kept serving: it pulls, they do not.
        let stale = copy(1, 3, 100, false);
        let a = copy(2, 3, 200, true);
        let b = copy(3, 3, 200, true);
        assert_eq!(
            choose_pull(Some(&stale), false, &[a.clone(), b.clone()], Some(1)),
            Some((0, true))
        );
        assert_eq!(
            choose_pull(Some(&a), false, &[stale.clone(), b.clone()], Some(1)),
            None
        );
        assert_eq!(choose_pull(Some(&b), false, &[stale, a], Some(1)), None);
    }

    #[test]
    fn three_way_divergence_converges() {
        let c1 = copy(1, 5, 10, true);
        let c2 = copy(2, 5, 20, true);
        let c3 = copy(3, 5, 30, true);
        let all = [c1.clone(), c2.clone(), c3.clone()];
        let win = winning_digest(&all.iter().collect::<Vec<_>>(), Some(2));
        assert_eq!(win, 20);
        // Everyone but osd2 pulls from osd2.
        assert_eq!(
            choose_pull(Some(&c1), false, &[c2.clone(), c3.clone()], Some(2)),
            Some((0, true))
        );
        assert_eq!(
            choose_pull(Some(&c2), false, &[c1.clone(), c3.clone()], Some(2)),
            None
        );
        assert_eq!(
            choose_pull(Some(&c3), false, &[c1, c2], Some(2)),
            Some((1, true))
        );
    }

    #[test]
    fn corrupt_pulls_same_or_newer() {
        let remote = vec![copy(2, 3, 1, true), copy(3, 2, 1, true)];
        let mine = copy(1, 3, 0, true);
        assert_eq!(
            choose_pull(Some(&mine), true, &remote, None),
            Some((0, true))
        );
    }
}
