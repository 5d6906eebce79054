//! Network partitions against a real cluster and real mounts (issue #18).
//! Every node listens on and connects from its own loopback address, and
//! nftables rules on `lo` ([`avalon_chaos::partition`]) drop the traffic
//! between two sets of them:
//!
//! - the MDS leader and one mount cut off from the other MDS nodes and
//!   mount: a majority elects a new leader whose acknowledged changes every
//!   mount reads after the heal, the mount left with the old leader never
//!   reads stale data, and the old leader steps down;
//! - a mount cut off from every MDS (not from the OSDs): once its lease
//!   runs out it serves nothing from its cache that another mount changed
//!   meanwhile, and sees those changes after the heal;
//! - an OSD cut off from the other OSDs and the MDS nodes while clients
//!   write and fsync: every fsynced write is there after the heal, and
//!   every replica holds the same bytes.
//!
//! Each test runs its cluster on its own addresses (127.N.0.x), so they
//! can run side by side. Needs root and nftables (`./dev setup`).

use avalon_chaos::check::{self, Verdict};
use avalon_chaos::cluster::Cluster;
use avalon_chaos::history::{Op, Outcome, Recorder};
use avalon_chaos::nemesis::{self, partition_sides, FaultKind};
use avalon_chaos::workload::{self, Workload};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The MDS session lease the local cluster runs with (`lease_ms`).
const LEASE: Duration = Duration::from_secs(2);

fn start(net: u8, mounts: usize) -> (tempfile::TempDir, Cluster) {
    assert!(
        avalon_chaos::partition::available(),
        "nft does not work here: run as root with nftables installed (./dev setup)"
    );
    let dir = tempfile::Builder::new()
        .prefix("avalon-partition-test-")
        // To look at the logs of a failure.
        .disable_cleanup(std::env::var_os("AVALON_KEEP_TEST_DIR").is_some())
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    let bin = avalonctl::local_cluster::default_bin_dir();
    let c = Cluster::start_on(dir.path(), &bin, 3, 3, mounts, net).expect("cluster starts");
    (dir, c)
}

/// Runs `f` on a thread of its own and waits at most `d` for it (a syscall
/// on a cut-off mount may block); `None` if it did not return in time.
fn within<T: Send + 'static>(d: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(d).ok()
}

/// Runs `f` on a thread of its own; its result comes on the channel.
fn background<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::sync::mpsc::Receiver<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// Retries `f` (each try bounded) until it succeeds, for at most `bound`.
fn retry(
    what: &str,
    bound: Duration,
    f: impl Fn() -> std::io::Result<()> + Send + Clone + 'static,
) {
    let deadline = Instant::now() + bound;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let g = f.clone();
        match within(left.max(Duration::from_millis(1)), g) {
            Some(Ok(())) => return,
            Some(Err(e)) if Instant::now() < deadline => {
                eprintln!("{what}: {e}; again");
                std::thread::sleep(Duration::from_millis(200));
            }
            other => panic!("{what}: not done within {bound:?}: {other:?}"),
        }
    }
}

fn write_file(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.write_all(content)?;
    f.sync_all()
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// What one probe of a mount asked.
#[derive(Debug, Clone)]
enum Ask {
    /// Open and read a whole file.
    Read(PathBuf),
    /// `lstat` a name.
    Stat(PathBuf),
}

/// One probe: asked at `inv`, answered at `done` (`None`: still blocked
/// at the end) with the bytes read / `Ok(empty)` for a stat, or an errno.
#[derive(Debug, Clone)]
struct Probe {
    ask: Ask,
    inv: Instant,
    done: Option<Instant>,
    res: Option<Result<Vec<u8>, i32>>,
}

/// Probes a mount every `period`, each ask on a thread of its own, so that
/// one blocked syscall does not stop the others.
struct Prober {
    stop: Arc<AtomicBool>,
    probes: Arc<Mutex<Vec<Probe>>>,
    handle: std::thread::JoinHandle<()>,
}

impl Prober {
    fn start(asks: Vec<Ask>, period: Duration) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let probes: Arc<Mutex<Vec<Probe>>> = Arc::default();
        let handle = {
            let (stop, probes) = (stop.clone(), probes.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    for ask in &asks {
                        let idx = {
                            let mut p = probes.lock().unwrap();
                            p.push(Probe {
                                ask: ask.clone(),
                                inv: Instant::now(),
                                done: None,
                                res: None,
                            });
                            p.len() - 1
                        };
                        let (ask, probes) = (ask.clone(), probes.clone());
                        std::thread::spawn(move || {
                            let res = match &ask {
                                Ask::Read(p) => std::fs::read(p).map_err(|e| errno(&e)),
                                Ask::Stat(p) => std::fs::symlink_metadata(p)
                                    .map(|_| Vec::new())
                                    .map_err(|e| errno(&e)),
                            };
                            let mut p = probes.lock().unwrap();
                            p[idx].done = Some(Instant::now());
                            p[idx].res = Some(res);
                        });
                    }
                    std::thread::sleep(period);
                }
            })
        };
        Prober {
            stop,
            probes,
            handle,
        }
    }

    /// Stops probing and waits up to `bound` for the probes under way.
    fn finish(self, bound: Duration) -> Vec<Probe> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.handle.join();
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline
            && self.probes.lock().unwrap().iter().any(|p| p.done.is_none())
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let p = self.probes.lock().unwrap().clone();
        p
    }
}

/// The state another mount's acknowledged change left: a file's content,
/// a name gone, a name present.
struct Fresh<'a> {
    file: &'a Path,
    content: &'a [u8],
    gone: &'a Path,
    present: &'a Path,
}

/// The probes asked after `after` whose answer contradicts `fresh`: a stale
/// read. Errors (other than a missing new name) and blocking are fine.
fn stale(probes: &[Probe], after: Instant, fresh: &Fresh<'_>) -> Vec<String> {
    probes
        .iter()
        .filter(|p| p.inv > after)
        .filter_map(|p| {
            let res = p.res.as_ref()?;
            let bad = match (&p.ask, res) {
                (Ask::Read(f), Ok(b)) => f == fresh.file && b != fresh.content,
                (Ask::Stat(n), Ok(_)) => n == fresh.gone,
                (Ask::Stat(n), Err(e)) => n == fresh.present && *e == libc::ENOENT,
                _ => false,
            };
            bad.then(|| {
                format!(
                    "{:?} asked {:?} after the change was acknowledged, answered {:?}",
                    p.ask,
                    p.inv.duration_since(after),
                    res.as_ref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                )
            })
        })
        .collect()
}

/// Counts of probes asked in [from, to): answered ok before `to`,
/// answered with an error before `to`, answered later or never.
fn tally(probes: &[Probe], from: Instant, to: Instant) -> (usize, usize, usize) {
    let mut t = (0, 0, 0);
    for p in probes.iter().filter(|p| p.inv >= from && p.inv < to) {
        match (&p.res, p.done) {
            (Some(Ok(_)), Some(d)) if d < to => t.0 += 1,
            (Some(Err(_)), Some(d)) if d < to => t.1 += 1,
            _ => t.2 += 1,
        }
    }
    t
}

fn leader_index(c: &Cluster) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(i) = c.leader().and_then(|id| c.index(&format!("mds{id}"))) {
            return i;
        }
        assert!(Instant::now() < deadline, "no MDS leader");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Makes `dir` with file `f` = `v1` and name `x` through `writer`, and
/// has `reader` cache them (and the absence of `y`).
fn setup_files(writer: &Path, reader: &Path, dir: &str) {
    std::fs::create_dir(writer.join(dir)).expect("mkdir");
    write_file(&writer.join(dir).join("f"), b"v1").expect("write v1");
    write_file(&writer.join(dir).join("x"), b"").expect("create x");
    assert_eq!(
        std::fs::read(reader.join(dir).join("f")).expect("read"),
        b"v1"
    );
    std::fs::symlink_metadata(reader.join(dir).join("x")).expect("x seen");
    assert!(std::fs::symlink_metadata(reader.join(dir).join("y")).is_err());
}

/// The MDS leader and mount 0 are cut off from the other two MDS nodes and
/// mount 1. Mount 1 writes and renames through the new leader; mount 0,
/// left with the old one, must never read the old state after that was
/// acknowledged; what mount 0 got acknowledged must survive; after the
/// heal the old leader is a follower of a later term and both mounts read
/// the new state.
#[test]
fn minority_mds_leader_steps_down_and_nobody_reads_stale() {
    let (_dir, mut c) = start(1, 2);
    let (m0, m1) = (c.mounts[0].path.clone(), c.mounts[1].path.clone());
    setup_files(&m1, &m0, "a");
    let f = m0.join("a/f");
    let (x, y) = (m0.join("a/x"), m0.join("a/y"));
    let old = leader_index(&c);
    let old_id = c.daemons[old].name.clone();
    let old_term = c.status().mds.iter().map(|m| m.term).max().unwrap_or(0);
    let (a, b) = partition_sides(&c, FaultKind::PartitionMdsLeader, old);
    assert!(a.contains(&c.mount_ip(0)) && b.contains(&c.mount_ip(1)));
    eprintln!("cutting {a:?} from {b:?} (leader {old_id}, term {old_term})");
    c.partition(&a, &b).expect("cut");
    let cut_at = Instant::now();
    let prober = Prober::start(
        vec![
            Ask::Read(f.clone()),
            Ask::Stat(x.clone()),
            Ask::Stat(y.clone()),
        ],
        Duration::from_millis(300),
    );
    // Mount 0 writes too: if that is acknowledged, it must survive.
    let m0_wrote = background({
        let w = m0.join("a/w0");
        move || write_file(&w, b"from the minority")
    });

    // The majority: a new leader, then mount 1's changes are acknowledged.
    let deadline = Instant::now() + Duration::from_secs(60);
    let new = loop {
        let s = c.status();
        let row = |id: u64| s.mds.iter().find(|m| m.id == id).cloned();
        let others: Vec<_> = s
            .mds
            .iter()
            .filter(|m| format!("mds{}", m.id) != old_id && m.role == "leader")
            .map(|m| m.id)
            .collect();
        if let Some(&id) = others.first() {
            eprintln!("new leader mds{id}: {:?}", row(id));
            break id;
        }
        assert!(
            Instant::now() < deadline,
            "the majority elected no leader: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let (f1, x1, y1) = (m1.join("a/f"), m1.join("a/x"), m1.join("a/y"));
    retry("mount 1 writes v2", Duration::from_secs(90), move || {
        write_file(&f1, b"v2")
    });
    retry(
        "mount 1 renames x to y",
        Duration::from_secs(90),
        move || match std::fs::rename(&x1, &y1) {
            Err(e) if errno(&e) == libc::ENOENT && y1.exists() => Ok(()),
            r => r,
        },
    );
    let acked = Instant::now();
    eprintln!(
        "mount 1's changes acknowledged {:?} after the cut",
        acked - cut_at
    );
    // Mount 0 keeps asking for a while after the acknowledgement.
    std::thread::sleep(3 * LEASE);
    c.heal_network().expect("heal");
    let healed = Instant::now();
    assert!(
        nemesis::wait_healthy(&c.tls, &c.layout.mds_addrs(), 3, Duration::from_secs(120)),
        "not healthy after the heal"
    );
    // The old leader stepped down: a follower in a later term.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = c.status();
        let row = s
            .mds
            .iter()
            .find(|m| format!("mds{}", m.id) == old_id)
            .cloned();
        if let Some(r) = &row {
            if r.role != "leader" && r.term > old_term && r.leader_id != 0 && r.leader_id != r.id {
                eprintln!("old leader after the heal: {r:?}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "old leader did not step down: {row:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(2 * LEASE);
    let probes = prober.finish(Duration::from_secs(120));
    let fresh = Fresh {
        file: &f,
        content: b"v2",
        gone: &x,
        present: &y,
    };
    let bad = stale(&probes, acked, &fresh);
    let during = tally(&probes, acked, healed);
    let after = tally(&probes, healed, Instant::now());
    eprintln!(
        "mount 0 probes (ok, error, blocked until the next phase): acknowledgement to heal {during:?}, after the heal {after:?}"
    );
    assert!(
        bad.is_empty(),
        "stale reads on the minority mount: {bad:#?}"
    );
    assert!(after.0 > 0, "mount 0 answered nothing after the heal");
    assert!(
        probes.iter().all(|p| p.done.is_some()),
        "a probe of mount 0 stayed blocked after the heal"
    );
    // Both mounts read the majority's changes; what the minority got
    // acknowledged (if anything) is there too.
    for m in [&m0, &m1] {
        assert_eq!(std::fs::read(m.join("a/f")).expect("read f"), b"v2");
        assert!(!m.join("a/x").exists(), "x still there via {}", m.display());
        assert!(m.join("a/y").exists(), "y missing via {}", m.display());
    }
    match m0_wrote.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(())) => {
            eprintln!("mount 0's write was acknowledged");
            assert_eq!(
                std::fs::read(m1.join("a/w0")).expect("acknowledged write lost"),
                b"from the minority"
            );
        }
        Ok(Err(e)) => eprintln!("mount 0's write failed: {e}"),
        Err(_) => panic!("mount 0's write still blocked a minute after the heal"),
    }
    eprintln!("new leader during the cut: mds{new}");
    drop(c);
}

/// Mount 0 is cut off from every MDS (it still reaches the OSDs) right
/// after it cached a file, a name and an absent name. Mount 1 changes all
/// three: the MDS acknowledges once mount 0's lease has run out, and from
/// then on mount 0 must answer with errors or block, never with what it
/// cached; after the heal it reads the changes.
#[test]
fn mount_cut_from_the_mds_gives_up_its_cache_and_sees_changes_after() {
    let (_dir, mut c) = start(2, 2);
    let (m0, m1) = (c.mounts[0].path.clone(), c.mounts[1].path.clone());
    setup_files(&m1, &m0, "b");
    let f = m0.join("b/f");
    let (x, y) = (m0.join("b/x"), m0.join("b/y"));
    let (a, b) = partition_sides(&c, FaultKind::PartitionMount, 0);
    assert_eq!(a, vec![c.mount_ip(0)]);
    eprintln!("cutting {a:?} from {b:?}");
    c.partition(&a, &b).expect("cut");
    let cut_at = Instant::now();
    let prober = Prober::start(
        vec![
            Ask::Read(f.clone()),
            Ask::Stat(x.clone()),
            Ask::Stat(y.clone()),
        ],
        Duration::from_millis(250),
    );
    let (f1, x1, y1) = (m1.join("b/f"), m1.join("b/x"), m1.join("b/y"));
    retry("mount 1 writes v2", Duration::from_secs(90), move || {
        write_file(&f1, b"v2")
    });
    retry(
        "mount 1 renames x to y",
        Duration::from_secs(90),
        move || match std::fs::rename(&x1, &y1) {
            Err(e) if errno(&e) == libc::ENOENT && y1.exists() => Ok(()),
            r => r,
        },
    );
    let acked = Instant::now();
    eprintln!(
        "mount 1's changes acknowledged {:?} after the cut",
        acked - cut_at
    );
    std::thread::sleep(3 * LEASE);
    c.heal_network().expect("heal");
    let healed = Instant::now();
    // After the heal mount 0 reads the new state within a bound (it
    // reconnects by itself).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (f0, x0, y0) = (f.clone(), x.clone(), y.clone());
    loop {
        let (f0, x0, y0) = (f0.clone(), x0.clone(), y0.clone());
        let seen = within(Duration::from_secs(30), move || {
            (
                std::fs::read(&f0).ok(),
                x0.exists(),
                std::fs::symlink_metadata(&y0).is_ok(),
            )
        });
        if seen == Some((Some(b"v2".to_vec()), false, true)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "mount 0 does not see mount 1's changes a minute after the heal: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "mount 0 sees the changes {:?} after the heal",
        healed.elapsed()
    );
    std::thread::sleep(LEASE);
    let probes = prober.finish(Duration::from_secs(120));
    let fresh = Fresh {
        file: &f,
        content: b"v2",
        gone: &x,
        present: &y,
    };
    let bad = stale(&probes, acked, &fresh);
    let before = tally(&probes, cut_at, acked);
    let during = tally(&probes, acked, healed);
    let after = tally(&probes, healed, Instant::now());
    eprintln!(
        "mount 0 probes (ok, error, blocked until the next phase): cut to acknowledgement {before:?}, acknowledgement to heal {during:?}, after the heal {after:?}"
    );
    assert!(
        bad.is_empty(),
        "stale answers from the cut-off mount: {bad:#?}"
    );
    assert!(
        probes.iter().all(|p| p.done.is_some()),
        "a probe of mount 0 stayed blocked after the heal"
    );
    assert!(
        during.0 + during.1 + during.2 > 0,
        "mount 0 was not asked anything while cut off after the acknowledgement"
    );
    drop(c);
}

/// An OSD is cut off from the other OSDs and every MDS (the mounts still
/// reach it) while clients on both mounts write, truncate and fsync their
/// files; it is the primary of about a third of the placement groups. For
/// longer than the MDS waits before it marks an OSD down (10 s). After the
/// heal: every fsynced write is in the files as both mounts read them, and
/// every chunk is on every OSD with the same bytes.
///
/// It lost fsynced writes before chunk versions carried the map epoch and
/// an OSD that skipped maps peered again (chaos README, "Open failures").
#[test]
fn osd_cut_off_mid_write_loses_no_fsynced_write_and_replicas_converge() {
    let (dir, c) = start(3, 2);
    let mounts: Vec<_> = c.mounts.iter().map(|m| m.path.clone()).collect();
    let addrs = c.layout.mds_addrs();
    let tls = c.tls.clone();
    let osd = c.index("osd1").expect("osd1");
    let (a, b) = partition_sides(&c, FaultKind::PartitionOsd, osd);
    let cluster = Arc::new(Mutex::new(c));
    let cfg = workload::Config {
        mounts: mounts.clone(),
        clients_per_mount: 2,
        ns_dirs: 1,
        names: 4,
        append_files: 1,
        lock_files: 1,
        seed: 18,
        mix: [0, 100, 0, 0],
    };
    workload::setup(&cfg).expect("setup");
    let rec = Arc::new(Recorder::new());
    let wl = Workload::start(&cfg, rec.clone());
    std::thread::sleep(Duration::from_secs(3));
    eprintln!("cutting {a:?} from {b:?}");
    cluster.lock().unwrap().partition(&a, &b).expect("cut");
    let cut_ns = rec.now_ns();
    std::thread::sleep(Duration::from_secs(14));
    cluster.lock().unwrap().heal_network().expect("heal");
    let heal_ns = rec.now_ns();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        wl.stop(Duration::from_secs(120)),
        0,
        "a client stayed blocked"
    );
    assert!(
        nemesis::wait_healthy(&tls, &addrs, 3, Duration::from_secs(120)),
        "not healthy (every PG fully replicated and peered) after the heal"
    );
    let history = rec.snapshot();
    let synced = |from: u64, to: u64| {
        history
            .iter()
            .filter(|e| matches!(e.op, Op::Fsync { .. }) && e.outcome == Outcome::Ok)
            .filter(|e| e.end_ns() >= from && e.end_ns() < to)
            .count()
    };
    let (before, during, after) = (
        synced(0, cut_ns),
        synced(cut_ns, heal_ns),
        synced(heal_ns, u64::MAX),
    );
    eprintln!("fsyncs acknowledged: before the cut {before}, during {during}, after {after}");
    assert!(before > 0 && after > 0, "too few fsyncs to check anything");
    for m in &mounts {
        let seen = workload::observe(m).expect("read the files");
        let r = check::files::check(&history, &seen);
        assert_eq!(r.verdict, Verdict::Pass, "via {}: {r:?}", m.display());
        assert!(r.checked > 2, "{r:?}");
    }
    // Replicas converged: each chunk on every OSD, byte for byte.
    let copies: Vec<BTreeMap<String, Vec<u8>>> = (1..=3)
        .map(|n| chunk_files(&dir.path().join(format!("osd{n}/chunks"))))
        .collect();
    assert!(!copies[0].is_empty(), "no chunk files found");
    for (n, other) in copies.iter().enumerate().skip(1) {
        let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(
            names(&copies[0]),
            names(other),
            "osd1 and osd{} hold different chunks",
            n + 1
        );
        for (name, bytes) in &copies[0] {
            assert!(
                other[name] == *bytes,
                "chunk {name} differs between osd1 and osd{}",
                n + 1
            );
        }
    }
    eprintln!("{} chunks identical on the three OSDs", copies[0].len());
    drop(cluster);
}

/// The chunk data files under an OSD's `chunks/` (buckets only, not the
/// spare files nor the checksum sidecars), by `bucket/name`.
fn chunk_files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for bucket in std::fs::read_dir(root).expect("chunks dir").flatten() {
        let bname = bucket.file_name().to_string_lossy().into_owned();
        if bname.len() != 3 || !bucket.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(bucket.path()).expect("bucket").flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.contains(".meta") || name.ends_with(".tmp") {
                continue;
            }
            out.insert(
                format!("{bname}/{name}"),
                std::fs::read(f.path()).expect("chunk"),
            );
        }
    }
    out
}

/// Mount 0 appends to a log as its only writer (the MDS said so at open)
/// and is then cut off from every MDS, the OSDs still reachable: one
/// append and fsync right after the cut (the data reaches the OSDs while
/// the lease still holds, the size commit waits for the heal). Once the
/// lease has run out, mount 1 appends and fsyncs a record (the MDS lets it
/// in at the end it knows); then mount 0 appends again. After the heal
/// every record either mount had acknowledged (write and fsync succeeded)
/// is in the file exactly once, and nothing else is.
///
/// Before such appends were fenced by the lease, mount 1's record went
/// over mount 0's first one, whose fsync succeeded after the heal, and
/// mount 0 wrote its second record over mount 1's (chaos README, "Open
/// failures" 5).
#[test]
fn an_appender_cut_from_the_mds_loses_no_acknowledged_record() {
    let (_dir, mut c) = start(4, 2);
    let (m0, m1) = (c.mounts[0].path.clone(), c.mounts[1].path.clone());
    // Created by mount 1, so that mount 0 opens it through the MDS (not
    // under a delegation of its own).
    std::fs::create_dir(m1.join("l")).expect("mkdir");
    write_file(&m1.join("l/log"), b"").expect("create log");
    let open_append = |p: &Path| std::fs::OpenOptions::new().append(true).open(p);
    // Closed, not fsynced: no write grant (an fsync under one would not
    // wait for the MDS).
    let mut f = open_append(&m0.join("l/log")).expect("mount 0 opens the log");
    f.write_all(b"A1\n").expect("A1");
    drop(f);
    let mut f0 = open_append(&m0.join("l/log")).expect("mount 0 opens the log");
    let mut f1 = open_append(&m0.join("l/log")).expect("mount 0 opens it again");
    let (a, b) = partition_sides(&c, FaultKind::PartitionMount, 0);
    eprintln!("cutting {a:?} from {b:?}");
    c.partition(&a, &b).expect("cut");
    let first = background(move || {
        let a2 = f0.write_all(b"A2\n").is_ok();
        (a2, f0.sync_all().is_ok())
    });
    std::thread::sleep(LEASE + Duration::from_secs(1));
    let log1 = m1.join("l/log");
    retry("mount 1 appends B1", Duration::from_secs(90), move || {
        let mut f = open_append(&log1)?;
        f.write_all(b"B1\n")?;
        f.sync_all()
    });
    eprintln!("mount 1's record acknowledged");
    // May block until the heal.
    let late = background(move || {
        let a3 = f1.write_all(b"A3\n").is_ok();
        (a3, f1.sync_all().is_ok())
    });
    std::thread::sleep(Duration::from_secs(2));
    c.heal_network().expect("heal");
    let wait = Duration::from_secs(120);
    let (a2, synced2) = first.recv_timeout(wait).expect("A2 returns after the heal");
    let (a3, synced3) = late.recv_timeout(wait).expect("A3 returns after the heal");
    eprintln!("mount 0: A2 written {a2}, fsync {synced2}; A3 written {a3}, fsync {synced3}");
    let mut must = vec!["A1", "B1"];
    if a2 && synced2 {
        must.push("A2");
    }
    if a3 && synced3 {
        must.push("A3");
    }
    for m in [&m0, &m1] {
        let text = String::from_utf8(std::fs::read(m.join("l/log")).expect("read log"))
            .expect("the log is text");
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        for r in &must {
            assert_eq!(
                lines.iter().filter(|l| *l == r).count(),
                1,
                "acknowledged record {r} not there exactly once through {m:?}: {text:?}"
            );
        }
        for l in &lines {
            assert!(
                ["A1", "A2", "A3", "B1"].contains(l),
                "a line no one appended through {m:?}: {l:?} in {text:?}"
            );
        }
    }
    drop(c);
}
