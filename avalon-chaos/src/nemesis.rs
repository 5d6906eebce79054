//! The nemesis: injects one fault at a time while the workload runs,
//! chosen by the seed, undoes it, lets the cluster recover (bounded), and
//! goes on until told to stop. Faults never exceed what the cluster is
//! built to survive at once (one MDS of three, one OSD of three).

use crate::cluster::{status_of, Cluster, Role};
use crate::history::Recorder;
use avalon_proto::tls::ClientTls;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL the MDS leader, restart it after a moment.
    KillMdsLeader,
    /// SIGKILL an MDS follower, restart it after a moment.
    KillMdsFollower,
    /// SIGKILL an OSD, restart it after a moment.
    KillOsd,
    /// SIGSTOP the MDS leader for longer than a lease, then SIGCONT.
    PauseMdsLeader,
    /// SIGSTOP an MDS follower likewise.
    PauseMdsFollower,
    /// SIGSTOP an OSD likewise.
    PauseOsd,
    /// Kill and restart an OSD several times in quick succession.
    FlapOsd,
    /// Restart an OSD with slow chunk writes and fsyncs (fail points).
    SlowDisk,
    /// Restart an OSD whose chunk writes and reads sometimes fail with EIO.
    FailingDisk,
    /// Restart an MDS with a slow raft log fsync.
    SlowMdsDisk,
    /// Cut the MDS leader and one mount off from the other MDS nodes and
    /// mounts (the OSDs reach both sides).
    PartitionMdsLeader,
    /// Cut a mount off from every MDS (not from the OSDs).
    PartitionMount,
    /// Cut an OSD off from the other OSDs and every MDS (not from the mounts).
    PartitionOsd,
}

impl FaultKind {
    /// Every kind of `--nemesis all`: partitions are not among them yet
    /// (an OSD partition loses fsynced writes, see the README).
    pub const ALL: [FaultKind; 10] = [
        FaultKind::KillMdsLeader,
        FaultKind::KillMdsFollower,
        FaultKind::KillOsd,
        FaultKind::PauseMdsLeader,
        FaultKind::PauseMdsFollower,
        FaultKind::PauseOsd,
        FaultKind::FlapOsd,
        FaultKind::SlowDisk,
        FaultKind::FailingDisk,
        FaultKind::SlowMdsDisk,
    ];

    /// Needs daemons built with the `failpoints` features.
    pub fn needs_failpoints(self) -> bool {
        matches!(
            self,
            FaultKind::SlowDisk | FaultKind::FailingDisk | FaultKind::SlowMdsDisk
        )
    }

    /// Needs nftables (`nft`) and root.
    pub fn needs_nft(self) -> bool {
        matches!(
            self,
            FaultKind::PartitionMdsLeader | FaultKind::PartitionMount | FaultKind::PartitionOsd
        )
    }
}

/// A `--nemesis` name that names no group.
#[derive(Debug, thiserror::Error)]
#[error("unknown nemesis {0:?} (kill, pause, flap, disk, partition, all, none)")]
pub struct UnknownNemesis(String);

/// The groups of `--nemesis`: `kill`, `pause`, `flap`, `disk`,
/// `partition`, `all`, `none`.
pub struct Kinds(pub Vec<FaultKind>);

impl FromStr for Kinds {
    type Err = UnknownNemesis;
    fn from_str(s: &str) -> Result<Kinds, UnknownNemesis> {
        use FaultKind::*;
        let mut v = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "kill" => v.extend([KillMdsLeader, KillMdsFollower, KillOsd]),
                "pause" => v.extend([PauseMdsLeader, PauseMdsFollower, PauseOsd]),
                "flap" => v.push(FlapOsd),
                "disk" => v.extend([SlowDisk, FailingDisk, SlowMdsDisk]),
                "partition" => v.extend([PartitionMdsLeader, PartitionMount, PartitionOsd]),
                "all" => v.extend(FaultKind::ALL),
                "none" => {}
                other => return Err(UnknownNemesis(other.to_string())),
            }
        }
        v.sort();
        v.dedup();
        Ok(Kinds(v))
    }
}

/// One injected fault.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    pub kind: FaultKind,
    /// The daemon it hit.
    pub target: String,
    /// Seconds since the run started.
    pub start_s: f64,
    pub end_s: f64,
    /// Seconds until the cluster was healthy again after it was undone
    /// (`None`: not within the bound).
    pub recovered_after_s: Option<f64>,
}

/// Settings of the nemesis.
#[derive(Debug, Clone)]
pub struct Config {
    pub kinds: Vec<FaultKind>,
    /// The MDS metadata lease; pauses last 2-3 times as long.
    pub lease: Duration,
    /// Quiet time between faults.
    pub gap: (Duration, Duration),
    /// How long to wait for health after each fault before the next.
    pub recover_bound: Duration,
}

/// Sleeps `d`, or less if `stop` is set.
fn nap(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}

fn ms(rng: &mut StdRng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.gen_range(lo..hi))
}

/// Runs faults until `stop`; returns what it injected.
pub fn run(
    cluster: &Mutex<Cluster>,
    rec: &Recorder,
    cfg: &Config,
    rng: &mut StdRng,
    stop: &AtomicBool,
) -> Vec<Fault> {
    let mut faults = Vec::new();
    if cfg.kinds.is_empty() {
        return faults;
    }
    let lock = || cluster.lock().unwrap_or_else(|p| p.into_inner());
    let (addrs, mds_idx, osd_idx, tls) = {
        let c = lock();
        let mds: Vec<usize> = (0..c.daemons.len())
            .filter(|&i| matches!(c.daemons[i].role, Role::Mds(_)))
            .collect();
        let osd: Vec<usize> = (0..c.daemons.len())
            .filter(|&i| matches!(c.daemons[i].role, Role::Osd(_)))
            .collect();
        (c.layout.mds_addrs(), mds, osd, c.tls.clone())
    };
    let leader_idx = |rng: &mut StdRng| -> usize {
        let leader = status_of(&tls, &addrs).leader_id;
        let c = lock();
        leader
            .and_then(|id| c.index(&format!("mds{id}")))
            .unwrap_or_else(|| *mds_idx.choose(rng).expect("an MDS"))
    };
    while !stop.load(Ordering::Relaxed) {
        nap(
            stop,
            ms(
                rng,
                cfg.gap.0.as_millis() as u64,
                cfg.gap.1.as_millis() as u64,
            ),
        );
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let kind = *cfg.kinds.choose(rng).expect("a kind");
        let target = match kind {
            FaultKind::KillMdsLeader
            | FaultKind::PauseMdsLeader
            | FaultKind::PartitionMdsLeader => leader_idx(rng),
            FaultKind::KillMdsFollower | FaultKind::PauseMdsFollower | FaultKind::SlowMdsDisk => {
                let l = leader_idx(rng);
                let others: Vec<usize> = mds_idx.iter().copied().filter(|&i| i != l).collect();
                *others.choose(rng).expect("a follower")
            }
            // A mount's index, not a daemon's.
            FaultKind::PartitionMount => rng.gen_range(0..lock().mounts.len().max(1)),
            _ => *osd_idx.choose(rng).expect("an OSD"),
        };
        let name = match kind {
            FaultKind::PartitionMount => format!("mount{target}"),
            _ => lock().daemons[target].name.clone(),
        };
        let start_s = rec.now_ns() as f64 / 1e9;
        eprintln!("nemesis {start_s:8.3}s: {kind:?} {name}");
        // Faults run to their end even when `stop` is set meanwhile, so
        // that each is undone the way it was meant to be.
        let never = AtomicBool::new(false);
        let res: anyhow::Result<()> = (|| {
            match kind {
                FaultKind::KillMdsLeader | FaultKind::KillMdsFollower | FaultKind::KillOsd => {
                    lock().kill(target);
                    nap(&never, ms(rng, 500, 4000));
                    lock().spawn(target, None)?;
                }
                FaultKind::PauseMdsLeader | FaultKind::PauseMdsFollower | FaultKind::PauseOsd => {
                    lock().pause(target);
                    let lease = cfg.lease.as_millis() as u64;
                    nap(&never, ms(rng, 2 * lease, 3 * lease));
                    lock().resume(target);
                }
                FaultKind::FlapOsd => {
                    for _ in 0..rng.gen_range(3..6) {
                        lock().kill(target);
                        nap(&never, ms(rng, 100, 800));
                        lock().spawn(target, None)?;
                        nap(&never, ms(rng, 300, 1500));
                    }
                }
                FaultKind::SlowDisk | FaultKind::FailingDisk | FaultKind::SlowMdsDisk => {
                    let fp = match kind {
                        FaultKind::SlowDisk => {
                            "osd-chunk-fsync=sleep(150);osd-chunk-write=20%sleep(100)"
                        }
                        FaultKind::FailingDisk => {
                            "osd-chunk-write=10%return(EIO);osd-chunk-read=5%return(EIO)"
                        }
                        _ => "mds-log-before-fsync=sleep(100)",
                    };
                    lock().kill(target);
                    lock().spawn(target, Some(fp))?;
                    nap(&never, ms(rng, 4000, 10000));
                    lock().kill(target);
                    lock().spawn(target, None)?;
                }
                FaultKind::PartitionMdsLeader
                | FaultKind::PartitionMount
                | FaultKind::PartitionOsd => {
                    let (a, b) = partition_sides(&lock(), kind, target);
                    eprintln!("nemesis: cut {a:?} from {b:?}");
                    lock().partition(&a, &b)?;
                    // Longer than a session lease, and for an OSD sometimes
                    // longer than the MDS's 10 s before it marks it down.
                    let lease = cfg.lease.as_millis() as u64;
                    let hi = if kind == FaultKind::PartitionOsd {
                        15000
                    } else {
                        5 * lease
                    };
                    nap(&never, ms(rng, 2 * lease, hi));
                    lock().heal_network()?;
                }
            }
            Ok(())
        })();
        if let Err(e) = res {
            eprintln!("nemesis: {kind:?} {name}: {e:#}");
        }
        let end_s = rec.now_ns() as f64 / 1e9;
        let t = Instant::now();
        let healthy = lock().heal().is_ok()
            && wait_healthy(&tls, &addrs, lock().layout.osds.len(), cfg.recover_bound);
        faults.push(Fault {
            kind,
            target: name,
            start_s,
            end_s,
            recovered_after_s: healthy.then(|| t.elapsed().as_secs_f64()),
        });
    }
    faults
}

/// The two sides of a partition of `kind` around `target` (a daemon's
/// index; a mount's for [`FaultKind::PartitionMount`]).
pub fn partition_sides(
    c: &Cluster,
    kind: FaultKind,
    target: usize,
) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
    let mds: Vec<Ipv4Addr> = c.mds_indexes().iter().map(|&i| c.daemon_ip(i)).collect();
    let mounts: Vec<Ipv4Addr> = (0..c.mounts.len()).map(|i| c.mount_ip(i)).collect();
    match kind {
        FaultKind::PartitionMdsLeader => {
            // The old leader keeps one mount (the first), so that a client
            // still talks to it; the majority keeps the others.
            let leader = c.daemon_ip(target);
            let mut a = vec![leader];
            a.extend(mounts.first());
            let mut b: Vec<Ipv4Addr> = mds.into_iter().filter(|&ip| ip != leader).collect();
            b.extend(mounts.iter().skip(1));
            (a, b)
        }
        FaultKind::PartitionMount => (vec![c.mount_ip(target)], mds),
        _ => {
            let osd = c.daemon_ip(target);
            let mut b: Vec<Ipv4Addr> = c
                .osd_indexes()
                .iter()
                .map(|&i| c.daemon_ip(i))
                .filter(|&ip| ip != osd)
                .collect();
            b.extend(mds);
            (vec![osd], b)
        }
    }
}

/// Waits up to `bound` for a leader, every OSD up and every PG healthy.
pub fn wait_healthy(tls: &ClientTls, addrs: &[String], osds: usize, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        let s = status_of(tls, addrs);
        if s.healthy(osds) && s.pgs.healthy {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
