//! Cluster status as `avalonctl status` shows it: every MDS (asked
//! directly, so an unreachable one shows as such), and the OSDs and clients
//! as the leader sees them. The MDS status page renders the same.

use crate::limits::MAX_MESSAGE_BYTES;
use crate::pb::{self, meta_client::MetaClient, OsdState, StatusReply};
use crate::tls::{ClientTls, Dial};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// One metadata server.
#[derive(Debug, Clone, Serialize)]
pub struct MdsRow {
    pub id: u64,
    pub addr: String,
    pub pid: u32,
    /// leader, follower, candidate, learner or unreachable.
    pub role: String,
    pub term: u64,
    pub last_applied: u64,
    pub leader_id: u64,
    /// Its data dir's filesystem: size, free bytes, and whether the free
    /// space is under the metadata reserve (creates refused).
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub disk_low: bool,
    /// Protocol version and release, "2 (0.1.0)"; "1" for a release from
    /// before versioning, "" when unknown (see [`version_text`]).
    pub version: String,
    /// Its Prometheus and status page listener ("": none).
    pub metrics_addr: String,
    /// Its metadata operation totals since start.
    pub totals: Totals,
}

/// Counters since a process started (see `pb::OpTotals`); all zero when
/// the process runs without metrics.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq, Eq)]
pub struct Totals {
    pub ops: u64,
    pub op_micros: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
}

impl From<Option<&pb::OpTotals>> for Totals {
    fn from(t: Option<&pb::OpTotals>) -> Totals {
        t.map_or_else(Totals::default, |t| Totals {
            ops: t.ops,
            op_micros: t.op_micros,
            read_bytes: t.read_bytes,
            written_bytes: t.written_bytes,
        })
    }
}

/// One object storage daemon.
#[derive(Debug, Clone, Serialize)]
pub struct OsdRow {
    pub id: u64,
    pub addr: String,
    pub pid: u32,
    /// up, down or out.
    pub state: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub failure_domain: String,
    pub last_seen_ms: u64,
    /// Taken out by hand (`avalonctl osd out|drain`).
    pub admin_out: bool,
    /// Map epoch of the OSD's last report (0: none yet).
    pub report_epoch: u64,
    /// PGs it is an up member of, and of those not peered yet.
    pub pgs: u32,
    pub pgs_peering: u32,
    /// Chunks and bytes its recovery still has to copy.
    pub recovery_chunks: u64,
    pub recovery_bytes: u64,
    /// Totals since the OSD started.
    pub recovered_chunks: u64,
    pub scrubbed_chunks: u64,
    pub scrub_errors: u64,
    pub repaired_chunks: u64,
    pub removed_chunks: u64,
    /// Snapshot clones it keeps, and their bytes.
    pub clones: u64,
    pub clone_bytes: u64,
    /// Its data dir's filesystem (0: not reported yet), and how full the
    /// OSD judges it: ok, nearfull or full (writes to its PGs refused).
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub disk_used_bytes: u64,
    pub disk_fill: String,
    /// Protocol version and release as the leader last heard them.
    pub version: String,
    /// Its operation totals (bytes: as primary) since start.
    pub totals: Totals,
}

impl OsdRow {
    /// Fill ratio of its disk as df's Use%, used / (used + free) (0 when
    /// not reported).
    pub fn fill_ratio(&self) -> f64 {
        let room = self.disk_used_bytes.saturating_add(self.disk_free_bytes);
        if room == 0 {
            return 0.0;
        }
        self.disk_used_bytes as f64 / room as f64
    }
}

/// One client session.
#[derive(Debug, Clone, Serialize)]
pub struct ClientRow {
    pub session_id: u64,
    pub hostname: String,
    pub mountpoint: String,
    pub pid: u32,
    pub last_seen_ms: u64,
    /// Protocol version and release as the leader last heard them.
    pub version: String,
    /// The mount's operation totals since start.
    pub totals: Totals,
}

/// The whole picture.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ClusterStatus {
    pub leader_id: Option<u64>,
    pub map_epoch: u64,
    pub replicas: u32,
    pub write_quorum: u32,
    pub inodes: u64,
    /// Entries in the trash and the bytes of data they keep (not in any
    /// quota nor directory statistics).
    pub trash_entries: u64,
    pub trash_bytes: u64,
    /// Live directory snapshots, and the clones the OSDs keep for them
    /// (summed over the OSDs: every replica's copy counts).
    pub snapshots: u64,
    pub clones: u64,
    pub clone_bytes: u64,
    pub mds: Vec<MdsRow>,
    pub osds: Vec<OsdRow>,
    pub clients: Vec<ClientRow>,
    pub pgs: PgHealth,
    /// HEALTH_OK, HEALTH_WARN (a disk near full) or HEALTH_ERR (an OSD
    /// full: writes to its PGs fail with ENOSPC; an MDS under its reserve:
    /// creates fail with ENOSPC; no leader).
    pub health: String,
    /// What made it WARN or ERR, one line each.
    pub health_detail: Vec<String>,
}

/// Overall health and its reasons, from the disks the status shows.
pub fn health_of(leader: Option<u64>, mds: &[MdsRow], osds: &[OsdRow]) -> (String, Vec<String>) {
    let mut err = Vec::new();
    let mut warn = Vec::new();
    if leader.is_none() {
        err.push("no MDS leader".to_string());
    }
    for o in osds.iter().filter(|o| o.state == "up") {
        let pct = o.fill_ratio() * 100.0;
        match o.disk_fill.as_str() {
            "full" => err.push(format!(
                "osd.{} is full ({pct:.1}% used, {} free): writes to its PGs fail with ENOSPC",
                o.id,
                human(o.disk_free_bytes)
            )),
            "nearfull" => warn.push(format!(
                "osd.{} is near full ({pct:.1}% used, {} free)",
                o.id,
                human(o.disk_free_bytes)
            )),
            _ => {}
        }
    }
    for m in mds.iter().filter(|m| m.disk_low) {
        err.push(format!(
            "mds.{} is under its metadata disk reserve ({} free): creates fail with ENOSPC",
            m.id,
            human(m.disk_free_bytes)
        ));
    }
    let level = if !err.is_empty() {
        "HEALTH_ERR"
    } else if !warn.is_empty() {
        "HEALTH_WARN"
    } else {
        "HEALTH_OK"
    };
    err.extend(warn);
    (level.to_string(), err)
}

/// Placement-group health, from the cluster map and the OSDs' reports.
#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct PgHealth {
    pub pg_count: u32,
    /// PGs with fewer up members than they should have (a member is down,
    /// or too few OSDs are in).
    pub degraded: u32,
    /// PG copies that their (up) OSD has not peered yet under the current
    /// map: being compared or copied.
    pub recovering: u32,
    /// PG copies the up OSDs hold under the current map (the total of which
    /// `recovering` are not peered yet).
    pub pg_copies: u32,
    /// Chunks and bytes still to copy, summed over the OSDs.
    pub recovery_chunks: u64,
    pub recovery_bytes: u64,
    /// Up OSDs whose last report is not for the current map epoch yet.
    pub stale_reports: u32,
    /// Every PG has `replicas` up members, each of which reports it peered
    /// with nothing left to copy.
    pub healthy: bool,
}

impl PgHealth {
    /// Computes PG health from the leader's map (with the OSD reports).
    pub fn of(map: &pb::ClusterMap) -> PgHealth {
        let mut h = PgHealth {
            pg_count: map.pg_count,
            ..Default::default()
        };
        let in_osds = map
            .osds
            .iter()
            .filter(|o| o.state != OsdState::Out as i32)
            .count();
        let want = (map.replicas.max(1) as usize).min(in_osds);
        for pg in 0..map.pg_count {
            let members = crate::placement::pg_members(map, pg);
            let up = members
                .iter()
                .filter(|o| o.state == OsdState::Up as i32)
                .count();
            if up < want || want < map.replicas.max(1) as usize {
                h.degraded += 1;
            }
        }
        for o in map.osds.iter().filter(|o| o.state == OsdState::Up as i32) {
            match &o.report {
                Some(r) if r.map_epoch == map.epoch => {
                    h.pg_copies += r.pgs;
                    h.recovering += r.pgs_peering;
                    h.recovery_chunks += r.recovery_chunks;
                    h.recovery_bytes += r.recovery_bytes;
                }
                _ => h.stale_reports += 1,
            }
        }
        h.healthy = h.degraded == 0 && h.recovering == 0 && h.stale_reports == 0;
        h
    }
}

impl ClusterStatus {
    /// True when a leader is known and `want_osds` OSDs are up.
    pub fn healthy(&self, want_osds: usize) -> bool {
        self.leader_id.is_some()
            && self.osds.iter().filter(|o| o.state == "up").count() >= want_osds
    }
}

fn disk_fill(f: i32) -> &'static str {
    match pb::DiskFill::try_from(f) {
        Ok(pb::DiskFill::Ok) => "ok",
        Ok(pb::DiskFill::NearFull) => "nearfull",
        Ok(pb::DiskFill::Full) => "full",
        Err(_) => "unknown",
    }
}

fn osd_state(s: i32) -> &'static str {
    match OsdState::try_from(s) {
        Ok(OsdState::Up) => "up",
        Ok(OsdState::Down) => "down",
        Ok(OsdState::Out) => "out",
        Err(_) => "unknown",
    }
}

/// A node's version as status shows it: "2 (0.1.0)", "1" for a release
/// from before versioning, "" when not heard yet.
pub fn version_text(v: Option<&pb::NodeVersion>) -> String {
    v.map(crate::version::describe).unwrap_or_default()
}

async fn ask(tls: &ClientTls, addr: &str, timeout: Duration) -> Option<StatusReply> {
    let ch = tls.channel(addr, Dial::Mds, timeout).ok()?;
    let mut c = MetaClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES);
    match tokio::time::timeout(timeout, c.status(pb::Empty {})).await {
        Ok(Ok(r)) => Some(r.into_inner()),
        _ => None,
    }
}

/// Asks every MDS in `addrs` (and every member they name) for its status.
pub async fn collect(tls: &ClientTls, addrs: &[String], timeout: Duration) -> ClusterStatus {
    let mut replies: BTreeMap<String, Option<StatusReply>> = BTreeMap::new();
    let first = ask_all(tls, addrs, timeout).await;
    for (a, r) in addrs.iter().zip(first) {
        replies.insert(a.clone(), r);
    }
    // Members we were not told about directly.
    let extra: Vec<String> = replies
        .values()
        .flatten()
        .flat_map(|r| r.members.iter().map(|m| m.addr.clone()))
        .filter(|a| !replies.contains_key(a))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let more = ask_all(tls, &extra, timeout).await;
    for (a, r) in extra.iter().zip(more) {
        replies.insert(a.clone(), r);
    }

    let known_ids: BTreeMap<String, u64> = replies
        .values()
        .flatten()
        .flat_map(|r| r.members.iter().map(|m| (m.addr.clone(), m.id)))
        .collect();
    let mut mds: Vec<MdsRow> = replies
        .iter()
        .map(|(addr, r)| match r.as_ref().and_then(|r| r.self_.clone()) {
            Some(s) => MdsRow {
                id: s.id,
                addr: addr.clone(),
                pid: s.pid,
                role: s.role,
                term: s.term,
                last_applied: s.last_applied,
                leader_id: s.leader_id,
                disk_total_bytes: s.disk_total_bytes,
                disk_free_bytes: s.disk_free_bytes,
                disk_low: s.disk_low,
                // An MDS from before versioning answers without one.
                version: version_text(Some(&crate::version::of_peer(s.version.as_ref()))),
                metrics_addr: s.metrics_addr,
                totals: s.totals.as_ref().into(),
            },
            None => MdsRow {
                id: known_ids.get(addr).copied().unwrap_or(0),
                addr: addr.clone(),
                pid: 0,
                role: "unreachable".into(),
                term: 0,
                last_applied: 0,
                leader_id: 0,
                disk_total_bytes: 0,
                disk_free_bytes: 0,
                disk_low: false,
                version: String::new(),
                metrics_addr: String::new(),
                totals: Totals::default(),
            },
        })
        .collect();
    mds.sort_by_key(|m| (m.id, m.addr.clone()));

    let leader = replies
        .values()
        .flatten()
        .find(|r| r.self_.as_ref().is_some_and(|s| s.role == "leader"));
    let mut pg_health = PgHealth::default();
    let (osds, clients, map_epoch, replicas, write_quorum, inodes) = match leader {
        Some(r) => {
            let map = r.map.clone().unwrap_or_default();
            let osds = map
                .osds
                .iter()
                .map(|o| OsdRow {
                    id: o.id,
                    addr: o.addr.clone(),
                    pid: o.pid,
                    state: osd_state(o.state).into(),
                    capacity_bytes: o.capacity_bytes,
                    used_bytes: o.used_bytes,
                    failure_domain: o.failure_domain.clone(),
                    last_seen_ms: o.last_seen_ms,
                    admin_out: o.admin_out,
                    report_epoch: o.report.as_ref().map_or(0, |r| r.map_epoch),
                    pgs: o.report.as_ref().map_or(0, |r| r.pgs),
                    pgs_peering: o.report.as_ref().map_or(0, |r| r.pgs_peering),
                    recovery_chunks: o.report.as_ref().map_or(0, |r| r.recovery_chunks),
                    recovery_bytes: o.report.as_ref().map_or(0, |r| r.recovery_bytes),
                    recovered_chunks: o.report.as_ref().map_or(0, |r| r.recovered_chunks),
                    scrubbed_chunks: o.report.as_ref().map_or(0, |r| r.scrubbed_chunks),
                    scrub_errors: o.report.as_ref().map_or(0, |r| r.scrub_errors),
                    repaired_chunks: o.report.as_ref().map_or(0, |r| r.repaired_chunks),
                    removed_chunks: o.report.as_ref().map_or(0, |r| r.removed_chunks),
                    clones: o.report.as_ref().map_or(0, |r| r.clones),
                    clone_bytes: o.report.as_ref().map_or(0, |r| r.clone_bytes),
                    disk_total_bytes: o.report.as_ref().map_or(0, |r| r.disk_total_bytes),
                    disk_free_bytes: o.report.as_ref().map_or(0, |r| r.disk_free_bytes),
                    disk_used_bytes: o.report.as_ref().map_or(0, |r| r.disk_used_bytes),
                    disk_fill: o
                        .report
                        .as_ref()
                        .filter(|r| r.disk_total_bytes > 0)
                        .map_or("", |r| disk_fill(r.disk_fill))
                        .to_string(),
                    version: version_text(o.version.as_ref()),
                    totals: o.report.as_ref().and_then(|r| r.totals.as_ref()).into(),
                })
                .collect();
            pg_health = PgHealth::of(&map);
            let clients = r
                .clients
                .iter()
                .map(|c| ClientRow {
                    session_id: c.session_id,
                    hostname: c.hostname.clone(),
                    mountpoint: String::from_utf8_lossy(&c.mountpoint).into_owned(),
                    pid: c.pid,
                    last_seen_ms: c.last_seen_ms,
                    version: version_text(c.version.as_ref()),
                    totals: c.totals.as_ref().into(),
                })
                .collect();
            (
                osds,
                clients,
                map.epoch,
                map.replicas,
                map.write_quorum,
                r.inodes,
            )
        }
        None => (Vec::new(), Vec::new(), 0, 0, 0, 0),
    };
    let leader_id = leader.and_then(|r| r.self_.as_ref().map(|s| s.id));
    let (trash_entries, trash_bytes) = leader.map_or((0, 0), |r| (r.trash_entries, r.trash_bytes));
    let snapshots = leader.map_or(0, |r| r.snapshots);
    let clones = osds.iter().map(|o| o.clones).sum();
    let clone_bytes = osds.iter().map(|o| o.clone_bytes).sum();
    let (health, health_detail) = health_of(leader_id, &mds, &osds);
    ClusterStatus {
        leader_id,
        health,
        health_detail,
        map_epoch,
        replicas,
        write_quorum,
        inodes,
        trash_entries,
        trash_bytes,
        snapshots,
        clones,
        clone_bytes,
        mds,
        osds,
        clients,
        pgs: pg_health,
    }
}

/// Asks all `addrs` concurrently.
async fn ask_all(tls: &ClientTls, addrs: &[String], timeout: Duration) -> Vec<Option<StatusReply>> {
    let tasks: Vec<_> = addrs
        .iter()
        .map(|a| {
            let a = a.clone();
            {
                let tls = tls.clone();
                tokio::spawn(async move { ask(&tls, &a, timeout).await })
            }
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.ok().flatten());
    }
    out
}

/// Bytes for people, in binary units: "512 B", "1.5 KiB", "2.0 GiB".
pub fn human(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

/// The status as a table a person reads at a glance.
pub fn render(s: &ClusterStatus) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let health = match s.leader_id {
        Some(id) => format!("leader mds.{id}"),
        None => "NO LEADER".to_string(),
    };
    let up = s.osds.iter().filter(|x| x.state == "up").count();
    let _ = writeln!(
        o,
        "cluster: {health}, {up}/{} OSDs up, map epoch {}, replicas {} (write quorum {}), {} inodes",
        s.osds.len(),
        s.map_epoch,
        s.replicas,
        s.write_quorum,
        s.inodes
    );
    let p = &s.pgs;
    let _ = writeln!(
        o,
        "pgs: {} total, {} degraded, {} recovering, {} to copy ({} chunks){}{}",
        p.pg_count,
        p.degraded,
        p.recovering,
        human(p.recovery_bytes),
        p.recovery_chunks,
        if p.stale_reports > 0 {
            format!(", {} OSD reports pending", p.stale_reports)
        } else {
            String::new()
        },
        if p.healthy { "; HEALTHY" } else { "" }
    );
    let _ = writeln!(
        o,
        "trash: {} entries, {} ({} bytes)",
        s.trash_entries,
        human(s.trash_bytes),
        s.trash_bytes
    );
    let _ = writeln!(
        o,
        "snapshots: {}, clones on the OSDs: {} ({})",
        s.snapshots,
        s.clones,
        human(s.clone_bytes)
    );
    if !s.health.is_empty() {
        let _ = writeln!(o, "health: {}", s.health);
        for d in &s.health_detail {
            let _ = writeln!(o, "  {d}");
        }
    }
    let _ = writeln!(
        o,
        "\nMDS\n  {:<4} {:<22} {:>8} {:<12} {:>6} {:>10}  VERSION",
        "ID", "ADDRESS", "PID", "ROLE", "TERM", "APPLIED"
    );
    for m in &s.mds {
        let _ = writeln!(
            o,
            "  {:<4} {:<22} {:>8} {:<12} {:>6} {:>10}  {}",
            m.id, m.addr, m.pid, m.role, m.term, m.last_applied, m.version
        );
    }
    let _ = writeln!(
        o,
        "\nOSD\n  {:<4} {:<22} {:>8} {:<9} {:>11} {:>11} {:>14} {:>10} {:>5} {:>7} {:>10} {:>8} {:>8}  VERSION",
        "ID",
        "ADDRESS",
        "PID",
        "STATE",
        "CAPACITY",
        "USED",
        "DISK",
        "SEEN",
        "PGS",
        "PEERING",
        "TO COPY",
        "SCRUBBED",
        "REPAIRED"
    );
    for d in &s.osds {
        let state = if d.admin_out {
            format!("{}(adm)", d.state)
        } else {
            d.state.clone()
        };
        let disk = match d.disk_fill.as_str() {
            "" => "-".to_string(),
            "ok" => format!("{:.1}%", d.fill_ratio() * 100.0),
            f => format!("{:.1}% {f}", d.fill_ratio() * 100.0),
        };
        let _ = writeln!(
            o,
            "  {:<4} {:<22} {:>8} {:<9} {:>11} {:>11} {:>14} {:>8}ms {:>5} {:>7} {:>10} {:>8} {:>8}  {}",
            d.id,
            d.addr,
            d.pid,
            state,
            human(d.capacity_bytes),
            human(d.used_bytes),
            disk,
            d.last_seen_ms,
            d.pgs,
            d.pgs_peering,
            human(d.recovery_bytes),
            d.scrubbed_chunks,
            d.repaired_chunks,
            d.version
        );
    }
    let _ = writeln!(
        o,
        "\nCLIENTS\n  {:<8} {:<16} {:>8} {:>10}  {:<12} MOUNTPOINT",
        "SESSION", "HOST", "PID", "SEEN", "VERSION"
    );
    for c in &s.clients {
        let _ = writeln!(
            o,
            "  {:<8} {:<16} {:>8} {:>8}ms  {:<12} {}",
            c.session_id, c.hostname, c.pid, c.last_seen_ms, c.version, c.mountpoint
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn osd(id: u64, fill: &str, free: u64) -> OsdRow {
        OsdRow {
            id,
            addr: String::new(),
            pid: 0,
            state: "up".into(),
            capacity_bytes: 0,
            used_bytes: 0,
            failure_domain: String::new(),
            last_seen_ms: 0,
            admin_out: false,
            report_epoch: 0,
            pgs: 0,
            pgs_peering: 0,
            recovery_chunks: 0,
            recovery_bytes: 0,
            recovered_chunks: 0,
            scrubbed_chunks: 0,
            scrub_errors: 0,
            repaired_chunks: 0,
            removed_chunks: 0,
            clones: 0,
            clone_bytes: 0,
            disk_total_bytes: 100 << 20,
            disk_free_bytes: free,
            disk_used_bytes: (100 << 20) - free,
            version: String::new(),
            disk_fill: fill.into(),
            totals: Totals::default(),
        }
    }

    #[test]
    fn bytes_for_people() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(2 << 30), "2.0 GiB");
    }

    #[test]
    fn health_names_the_osd_and_its_fill() {
        let (h, d) = health_of(Some(1), &[], &[osd(1, "ok", 50 << 20)]);
        assert_eq!((h.as_str(), d.len()), ("HEALTH_OK", 0));
        let (h, d) = health_of(
            Some(1),
            &[],
            &[osd(1, "ok", 50 << 20), osd(2, "nearfull", 10 << 20)],
        );
        assert_eq!(h, "HEALTH_WARN");
        assert_eq!(d, vec!["osd.2 is near full (90.0% used, 10.0 MiB free)"]);
        let (h, d) = health_of(
            Some(1),
            &[],
            &[osd(3, "full", 1 << 20), osd(2, "nearfull", 10 << 20)],
        );
        assert_eq!(h, "HEALTH_ERR");
        assert!(d[0].starts_with("osd.3 is full (99.0% used"), "{d:?}");
        assert_eq!(d.len(), 2);
        let (h, _) = health_of(None, &[], &[]);
        assert_eq!(h, "HEALTH_ERR");
    }
}
