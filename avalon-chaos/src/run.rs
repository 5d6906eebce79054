//! One chaos run, start to end: cluster up, workload on, faults for a
//! while, faults off, recovery, workload off, checks, report.

use crate::check::{self, CheckResult};
use crate::cluster::{has_failpoints, Cluster};
use crate::history::Recorder;
use crate::nemesis::{self, FaultKind};
use crate::report::{longest_gap, op_counts, Report};
use crate::workload::{self, Workload};
use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Set by SIGINT/SIGTERM: the run stops early and cleans up.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub mode: String,
    /// How long faults are injected.
    pub duration: Duration,
    pub kinds: Vec<FaultKind>,
    pub clients_per_mount: u32,
    /// Number of FUSE mounts (clients spread over them).
    pub mounts: usize,
    /// Relative weights of namespace, data, append and lock operations.
    pub mix: [u32; 4],
    /// Run directory (fresh).
    pub dir: PathBuf,
    pub bin_dir: PathBuf,
    /// How long the cluster may take to be healthy once faults stop.
    pub recover_bound: Duration,
    /// Second octet of every address (127.N.0.x): runs side by side need
    /// different ones.
    pub net: u8,
}

/// Sleeps `d` unless interrupted; false if interrupted.
fn wait(d: Duration) -> bool {
    let end = std::time::Instant::now() + d;
    while std::time::Instant::now() < end {
        if INTERRUPTED.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    !INTERRUPTED.load(Ordering::Relaxed)
}

/// Runs the whole thing and returns its report (also written to
/// `DIR/report.txt` and `DIR/report.json`, the history to
/// `DIR/history.json`).
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    if opts.dir.exists() && std::fs::read_dir(&opts.dir)?.next().is_some() {
        bail!("run directory {} is not empty", opts.dir.display());
    }
    std::fs::create_dir_all(&opts.dir)?;
    let failpoints = has_failpoints(&opts.bin_dir.join("avalon-osd"))
        && has_failpoints(&opts.bin_dir.join("avalon-mds"));
    eprintln!(
        "avalon-chaos: seed {} ({}), faults for {:?}, run directory {}",
        opts.seed,
        opts.mode,
        opts.duration,
        opts.dir.display()
    );
    let cluster = Cluster::start_on(&opts.dir, &opts.bin_dir, 3, 3, opts.mounts.max(1), opts.net)
        .context("cluster start")?;
    let mounts: Vec<PathBuf> = cluster.mounts.iter().map(|m| m.path.clone()).collect();
    let addrs = cluster.layout.mds_addrs();
    let tls = cluster.tls.clone();
    let osds = cluster.layout.osds.len();
    let cluster = Arc::new(Mutex::new(cluster));
    let wcfg = workload::Config {
        mounts: mounts.clone(),
        clients_per_mount: opts.clients_per_mount,
        ns_dirs: 3,
        names: 4,
        append_files: 2,
        lock_files: 2,
        seed: opts.seed,
        mix: opts.mix,
    };
    workload::setup(&wcfg).context("workload setup")?;
    let rec = Arc::new(Recorder::new());
    // The history's times count from here: this ties them to the logs.
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    println!(
        "avalon-chaos: history time 0 is UNIX time {:.6}",
        t0.as_secs_f64()
    );
    let wl = Workload::start(&wcfg, rec.clone());
    let start_ns = rec.now_ns();
    // A few seconds of calm first, so a fault never hits an idle system.
    wait(Duration::from_secs(3));
    let stop = Arc::new(AtomicBool::new(false));
    let mut kinds = opts.kinds.clone();
    if kinds.iter().any(|k| k.needs_nft()) && !crate::partition::available() {
        eprintln!(
            "avalon-chaos: nft does not work here (install nftables, run as root): no partitions"
        );
        kinds.retain(|k| !k.needs_nft());
    }
    let ncfg = nemesis::Config {
        kinds,
        lease: Duration::from_millis(2000),
        gap: (Duration::from_millis(1000), Duration::from_millis(4000)),
        recover_bound: Duration::from_secs(30),
    };
    let nem = {
        let (cluster, rec, stop) = (cluster.clone(), rec.clone(), stop.clone());
        let mut rng = StdRng::seed_from_u64(opts.seed.wrapping_add(0x6e65_6d65));
        std::thread::Builder::new()
            .name("nemesis".into())
            .spawn(move || nemesis::run(&cluster, &rec, &ncfg, &mut rng, &stop))?
    };
    let fault_start = rec.now_ns();
    let completed = wait(opts.duration);
    stop.store(true, Ordering::SeqCst);
    let faults = nem.join().unwrap_or_default();
    let fault_end = rec.now_ns();
    if !completed {
        wl.stop(Duration::from_secs(10));
        bail!("interrupted");
    }
    // Faults off: undo anything left, then time the recovery.
    let t = std::time::Instant::now();
    cluster.lock().unwrap_or_else(|p| p.into_inner()).heal()?;
    let healthy = nemesis::wait_healthy(&tls, &addrs, osds, opts.recover_bound);
    let healthy_after = healthy.then(|| t.elapsed().as_secs_f64());
    eprintln!("avalon-chaos: faults stopped; healthy again: {healthy_after:?}");
    // Some calm operations afterwards: everything must work again.
    wait(Duration::from_secs(5));
    let stuck = wl.stop(Duration::from_secs(60));
    let end_ns = rec.now_ns();
    let history = rec.snapshot();
    std::fs::write(opts.dir.join("history.json"), serde_json::to_vec(&history)?)?;

    let mut checks = Vec::new();
    let mut first_seen = None;
    for (i, m) in mounts.iter().enumerate() {
        let m = m.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(workload::observe(&m));
        });
        match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(Ok(observed)) => {
                let mut f = check::files::check(&history, &observed);
                f.name = format!("{} via mount {i}", f.name);
                checks.push(f);
                let mut a = check::appends::check(&history, &observed);
                a.name = format!("{} via mount {i}", a.name);
                checks.push(a);
                first_seen.get_or_insert(observed);
            }
            Ok(Err(e)) => {
                let mut r = CheckResult::new(&format!("reading the files via mount {i}"));
                r.fail(e);
                checks.push(r);
            }
            Err(_) => {
                let mut r = CheckResult::new(&format!("reading the files via mount {i}"));
                r.fail("reads did not return within 180 s".into());
                checks.push(r);
            }
        }
    }
    checks.push(check::locks::check(&history));
    checks.push(check::namespace::check(&history));
    let mut recovery = CheckResult::new(&format!(
        "healthy again within {:?} after the faults stopped",
        opts.recover_bound
    ));
    recovery.checked = 1;
    if !healthy {
        recovery.fail(format!(
            "not healthy after {:?}:\n{}",
            opts.recover_bound,
            avalonctl::status::render(&crate::cluster::status_of(&tls, &addrs))
        ));
    }
    checks.push(recovery);

    let mut faults_by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for f in &faults {
        *faults_by_kind
            .entry(
                serde_json::to_value(f.kind)?
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
            )
            .or_default() += 1;
    }
    let (gap, gap_at) = longest_gap(&history, start_ns, end_ns);
    let mut report = Report {
        seed: opts.seed,
        mode: opts.mode.clone(),
        fault_window_s: (fault_end - fault_start) as f64 / 1e9,
        failpoints_compiled: failpoints,
        faults_by_kind,
        faults,
        ops: op_counts(&history),
        total_ops: history.len(),
        longest_unavailability_s: gap,
        longest_unavailability_at_s: gap_at,
        healthy_after_faults_s: healthy_after,
        stuck_clients: stuck,
        checks,
        passed: false,
        dir: opts.dir.display().to_string(),
    };
    report.conclude();
    if !report.passed {
        // What the files held, for the bug report (DIR/observed/PATH).
        for (path, content) in first_seen.iter().flatten() {
            let to = opts.dir.join("observed").join(path);
            if let (Some(parent), Some(c)) = (to.parent(), content) {
                std::fs::create_dir_all(parent)?;
                std::fs::write(&to, c)?;
            }
        }
    }
    std::fs::write(opts.dir.join("report.txt"), report.render())?;
    std::fs::write(
        opts.dir.join("report.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    drop(cluster);
    Ok(report)
}
