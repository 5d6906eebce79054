//! Identity and cluster map: registration with the MDS, the persisted OSD
//! id, heartbeats and map refreshes.

use crate::chunk_store::ChunkStore;
use crate::disk_space::DiskSpace;
use crate::error::OsdError;
use avalon_proto::errno::has_errno;
use avalon_proto::mds_conn::MdsConn;
use avalon_proto::pb::{
    CheckInodesRequest, ClusterMap, Empty, OsdHeartbeatRequest, OsdReport, RegisterOsdRequest,
};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const ID_FILE: &str = "osd_id";

/// Reads the persisted OSD id (0 when none is stored yet).
pub fn read_osd_id(data_dir: &Path) -> anyhow::Result<u64> {
    let path = data_dir.join(ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .map_err(|e| anyhow::anyhow!("bad OSD id in {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// Persists the OSD id durably: temp file, fsync, rename, fsync of the dir.
pub fn write_osd_id(data_dir: &Path, id: u64) -> std::io::Result<()> {
    let tmp = data_dir.join(format!("{ID_FILE}.tmp"));
    let path = data_dir.join(ID_FILE);
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{id}")?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// This OSD's place in the cluster: its id, address and current map.
pub struct Membership {
    mds: MdsConn,
    addr: String,
    failure_domain: String,
    capacity: u64,
    data_dir: PathBuf,
    id: AtomicU64,
    map: RwLock<Option<Arc<ClusterMap>>>,
    /// Times a new map skipped epochs (see [`Membership::map_gaps`]).
    gaps: AtomicU64,
    refresh: tokio::sync::Mutex<()>,
    /// The id in this OSD's certificate (`osd.N`): the only one it may use.
    key_id: Option<u64>,
}

impl Membership {
    /// A membership not registered yet.
    pub fn new(
        mds: MdsConn,
        addr: String,
        failure_domain: String,
        capacity: u64,
        data_dir: PathBuf,
        key_id: Option<u64>,
    ) -> Membership {
        Membership {
            mds,
            addr,
            failure_domain,
            capacity,
            data_dir,
            id: AtomicU64::new(0),
            map: RwLock::new(None),
            gaps: AtomicU64::new(0),
            refresh: tokio::sync::Mutex::new(()),
            key_id,
        }
    }

    /// Our OSD id (0 before registration).
    pub fn osd_id(&self) -> u64 {
        self.id.load(Ordering::Acquire)
    }

    /// The address we advertise.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Capacity we report.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// How many times a new map skipped epochs. A skipped map may have
    /// marked this OSD down and up again (a partition, a pause): its
    /// placement groups then look the same as before, but the other
    /// members took writes without it meanwhile, so every PG peers again
    /// (part of the peering signature). Read after [`Membership::map`].
    pub fn map_gaps(&self) -> u64 {
        self.gaps.load(Ordering::SeqCst)
    }

    /// The current cluster map; `None` before registration.
    pub fn map(&self) -> Option<Arc<ClusterMap>> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Epoch of the current map (0 before registration).
    pub fn epoch(&self) -> u64 {
        self.map().map_or(0, |m| m.epoch)
    }

    fn set_map(&self, map: ClusterMap) {
        let mut g = self.map.write().unwrap_or_else(|e| e.into_inner());
        if let Some(cur) = g.as_ref().filter(|m| map.epoch > m.epoch + 1) {
            tracing::info!(
                from = cur.epoch,
                to = map.epoch,
                "cluster maps skipped: every placement group peers again"
            );
            self.gaps.fetch_add(1, Ordering::SeqCst);
        }
        if g.as_ref().map_or(0, |m| m.epoch) != map.epoch {
            tracing::info!(
                epoch = map.epoch,
                osds = map.osds.len(),
                "cluster map updated"
            );
        }
        *g = Some(Arc::new(map));
    }

    /// Registers once (retrying inside `budget`); persists the id and
    /// installs the map.
    pub async fn register_once(&self, used: u64, budget: Duration) -> Result<u64, OsdError> {
        let known = match self.osd_id() {
            0 => read_osd_id(&self.data_dir).map_err(|e| OsdError::Mds(e.to_string()))?,
            id => id,
        };
        // With TLS the certificate names the id: a new data dir takes it,
        // one that already belongs to another id is refused.
        let known = match (self.key_id, known) {
            (Some(k), 0) => k,
            (Some(k), d) if d != k => {
                return Err(OsdError::Mds(format!(
                    "data dir {} belongs to OSD {d}, but the keyfile is for osd.{k}",
                    self.data_dir.display()
                )))
            }
            (_, d) => d,
        };
        let req = RegisterOsdRequest {
            header: None,
            osd_id: known,
            addr: self.addr.clone(),
            capacity_bytes: self.capacity,
            used_bytes: used,
            failure_domain: self.failure_domain.clone(),
            pid: std::process::id(),
            version: Some(avalon_proto::version::local()),
        };
        let reply = self
            .mds
            .call_within(budget, |mut c| {
                let r = req.clone();
                async move { c.register_osd(r).await }
            })
            .await
            .inspect_err(stop_if_refused)
            .map_err(|s| OsdError::Mds(format!("{:?}: {}", s.code(), s.message())))?;
        if let Err(s) = avalon_proto::version::check("this OSD", "the MDS", reply.version.as_ref())
        {
            stop_if_refused(&s);
        }
        if reply.osd_id == 0 {
            return Err(OsdError::Mds("MDS assigned OSD id 0".into()));
        }
        if known != 0 && reply.osd_id != known {
            tracing::warn!(
                old = known,
                new = reply.osd_id,
                "MDS assigned a different OSD id"
            );
        }
        if reply.osd_id != known {
            let dir = self.data_dir.clone();
            let id = reply.osd_id;
            tokio::task::spawn_blocking(move || write_osd_id(&dir, id))
                .await
                .map_err(|e| OsdError::Mds(format!("persisting OSD id: {e}")))?
                .map_err(|e| {
                    OsdError::Mds(format!(
                        "cannot persist OSD id in {}: {e}",
                        self.data_dir.display()
                    ))
                })?;
        }
        self.id.store(reply.osd_id, Ordering::Release);
        let map = match reply.map {
            Some(m) => m,
            None => self.fetch_map(budget).await?,
        };
        self.set_map(map);
        tracing::info!(osd_id = reply.osd_id, addr = %self.addr, "registered with the MDS");
        Ok(reply.osd_id)
    }

    /// Registers, retrying until the MDS answers or `shutdown` fires.
    pub async fn register(&self, store: &ChunkStore, shutdown: &CancellationToken) -> Option<u64> {
        loop {
            let attempt = self.register_once(store.used_bytes(), Duration::from_secs(10));
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = attempt => match r {
                    Ok(id) => return Some(id),
                    Err(e) => tracing::warn!(error = %e, "registration failed; retrying"),
                },
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    async fn fetch_map(&self, budget: Duration) -> Result<ClusterMap, OsdError> {
        self.mds
            .call_within(
                budget,
                |mut c| async move { c.get_cluster_map(Empty {}).await },
            )
            .await
            .map_err(|s| OsdError::Mds(format!("GetClusterMap: {}", s.message())))
    }

    /// Which of `inos` the MDS reports deleted for good (empty when the MDS
    /// cannot be asked: callers then keep the data).
    pub async fn dead_inos(&self, mut inos: Vec<u64>) -> HashSet<u64> {
        inos.sort_unstable();
        inos.dedup();
        let mut dead = HashSet::new();
        for batch in inos.chunks(10_000) {
            let req = CheckInodesRequest {
                header: None,
                inos: batch.to_vec(),
            };
            match self
                .mds
                .call_within(Duration::from_secs(5), |mut c| {
                    let r = req.clone();
                    async move { c.check_inodes(r).await }
                })
                .await
            {
                Ok(r) => dead.extend(r.dead),
                Err(s) => {
                    tracing::debug!(error = %s.message(), "cannot check inodes with the MDS");
                    return HashSet::new();
                }
            }
        }
        dead
    }

    /// The current map, refreshed from the MDS first when `epoch` is newer.
    pub async fn map_at_least(&self, epoch: u64) -> Result<Arc<ClusterMap>, OsdError> {
        let cur = self.map().ok_or(OsdError::NotReady)?;
        if cur.epoch >= epoch {
            return Ok(cur);
        }
        let _g = self.refresh.lock().await;
        let cur = self.map().ok_or(OsdError::NotReady)?;
        if cur.epoch >= epoch {
            return Ok(cur);
        }
        let m = self.fetch_map(Duration::from_secs(5)).await?;
        self.set_map(m);
        self.map().ok_or(OsdError::NotReady)
    }

    /// A heartbeat with this OSD's identity, usage and version.
    fn heartbeat_request(
        &self,
        used_bytes: u64,
        report: Option<OsdReport>,
        stopping: bool,
    ) -> OsdHeartbeatRequest {
        OsdHeartbeatRequest {
            header: None,
            osd_id: self.osd_id(),
            capacity_bytes: self.capacity,
            used_bytes,
            pid: std::process::id(),
            addr: self.addr.clone(),
            report,
            version: Some(avalon_proto::version::local()),
            stopping,
        }
    }

    /// Tells the MDS this OSD is shutting down, so that it is marked down
    /// now rather than after `osd_down_after_ms` of silence, during which
    /// clients would keep trying it. Call after the heartbeat loop ended (a
    /// later heartbeat would not undo it: the MDS ignores heartbeats of a
    /// stopping process until it registers again). Bounded by `budget`;
    /// without an answer the MDS finds out from the missed heartbeats.
    pub async fn announce_stopping(&self, used_bytes: u64, budget: Duration) {
        if self.osd_id() == 0 {
            return;
        }
        let req = self.heartbeat_request(used_bytes, None, true);
        let res = self
            .mds
            .call_within(budget, |mut c| {
                let r = req.clone();
                async move { c.osd_heartbeat(r).await }
            })
            .await;
        match res {
            Ok(_) => tracing::info!("told the MDS we are stopping"),
            Err(s) => {
                tracing::warn!(error = %s.message(), "could not tell the MDS we are stopping")
            }
        }
    }

    /// Heartbeats every `interval` until `shutdown`; refetches the map when
    /// the MDS reports another epoch, re-registers when it no longer knows us,
    /// and hands the OSDs the MDS reports full to `space`.
    pub async fn heartbeat_loop(
        self: Arc<Self>,
        store: Arc<ChunkStore>,
        interval: Duration,
        report: Arc<dyn Fn() -> OsdReport + Send + Sync>,
        space: Arc<DiskSpace>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let budget = (interval * 2).max(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let req = self.heartbeat_request(store.used_bytes(), Some(report()), false);
            let beat = self.mds.call_within(budget, |mut c| {
                let r = req.clone();
                async move { c.osd_heartbeat(r).await }
            });
            let res = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = beat => r,
            };
            if let Err(s) = &res {
                stop_if_refused(s);
            }
            match res {
                Ok(reply) => {
                    space.set_full_osds(reply.full_osds);
                    if reply.map_epoch != self.epoch() {
                        match self.fetch_map(budget).await {
                            Ok(m) => self.set_map(m),
                            Err(e) => tracing::warn!(error = %e, "map refresh failed"),
                        }
                    }
                }
                Err(s) if has_errno(&s) || s.code() == tonic::Code::NotFound => {
                    tracing::warn!(error = %s.message(), "MDS refused our heartbeat; re-registering");
                    if let Err(e) = self.register_once(store.used_bytes(), budget).await {
                        tracing::warn!(error = %e, "re-registration failed");
                    }
                }
                Err(s) => {
                    tracing::warn!(code = ?s.code(), error = %s.message(), "heartbeat failed")
                }
            }
        }
    }
}

/// Exits when the MDS refused this OSD's protocol version (or it found the
/// MDS's too old): no retry can help, and the message says what to upgrade.
fn stop_if_refused(s: &tonic::Status) {
    if avalon_proto::version::is_refusal(s) {
        tracing::error!("{}", s.message());
        eprintln!("avalon-osd: {}", s.message());
        std::process::exit(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_roundtrip() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_osd_id(d.path()).expect("none"), 0);
        write_osd_id(d.path(), 17).expect("write");
        assert_eq!(read_osd_id(d.path()).expect("read"), 17);
        std::fs::write(d.path().join(ID_FILE), "garbage").expect("write");
        assert!(read_osd_id(d.path()).is_err());
    }
}
