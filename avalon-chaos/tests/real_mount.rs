//! The harness end to end on a real cluster and real mounts: a workload of
//! data writes and locks on both mounts while the MDS leader and an OSD
//! are killed and restarted; the file and lock checkers pass on what the
//! mounts show afterwards; then a durable write is destroyed behind the
//! workload's back and the file checker must catch it.

use avalon_chaos::check::{self, Verdict};
use avalon_chaos::cluster::Cluster;
use avalon_chaos::history::{Op, Outcome, Recorder};
use avalon_chaos::nemesis::{self, FaultKind};
use avalon_chaos::workload::{self, Workload};
use rand::SeedableRng;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[test]
fn checkers_pass_on_a_real_mount_and_catch_a_destroyed_write() {
    let dir = tempfile::Builder::new()
        .prefix("avalon-chaos-test-")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    let bin = avalonctl::local_cluster::default_bin_dir();
    let cluster = Cluster::start(dir.path(), &bin, 3, 3, 2).expect("cluster starts");
    let mounts: Vec<_> = cluster.mounts.iter().map(|m| m.path.clone()).collect();
    let addrs = cluster.layout.mds_addrs();
    let tls = cluster.tls.clone();
    let cluster = Arc::new(Mutex::new(cluster));
    let cfg = workload::Config {
        mounts: mounts.clone(),
        clients_per_mount: 2,
        ns_dirs: 1,
        names: 4,
        append_files: 1,
        lock_files: 1,
        seed: 7,
        mix: [0, 80, 0, 20],
    };
    workload::setup(&cfg).expect("setup");
    let rec = Arc::new(Recorder::new());
    let wl = Workload::start(&cfg, rec.clone());

    // Two faults, one after the other, while the clients run.
    let stop = AtomicBool::new(false);
    let ncfg = nemesis::Config {
        kinds: vec![FaultKind::KillMdsLeader, FaultKind::KillOsd],
        lease: Duration::from_secs(2),
        gap: (Duration::from_millis(1000), Duration::from_millis(2000)),
        recover_bound: Duration::from_secs(60),
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let faults = std::thread::scope(|s| {
        let h = s.spawn(|| nemesis::run(&cluster, &rec, &ncfg, &mut rng, &stop));
        std::thread::sleep(Duration::from_secs(12));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        h.join().expect("nemesis")
    });
    assert!(!faults.is_empty(), "no fault injected");
    cluster.lock().unwrap().heal().expect("heal");
    assert!(
        nemesis::wait_healthy(&tls, &addrs, 3, Duration::from_secs(180)),
        "cluster not healthy again"
    );
    assert_eq!(
        wl.stop(Duration::from_secs(120)),
        0,
        "a client stayed blocked"
    );
    let history = rec.snapshot();
    let writes = history
        .iter()
        .filter(|e| matches!(e.op, Op::Write { .. }) && e.outcome == Outcome::Ok)
        .count();
    assert!(writes > 20, "only {writes} writes succeeded");

    for m in &mounts {
        let seen = workload::observe(m).expect("read the files");
        let r = check::files::check(&history, &seen);
        assert_eq!(r.verdict, Verdict::Pass, "{r:?}");
        assert!(r.checked > 2, "{r:?}");
    }
    let r = check::locks::check(&history);
    assert_eq!(r.verdict, Verdict::Pass, "{r:?}");

    // Destroy the last durable write of some file (its bytes become
    // 0xee), as a system that lost it would: the checker must say so.
    let victim = history.iter().enumerate().rev().find_map(|(i, e)| {
        let Op::Write {
            file, offset, len, ..
        } = &e.op
        else {
            return None;
        };
        let synced_after = history[i + 1..].iter().any(|f| {
            matches!(&f.op, Op::Fsync { file: g } if g == file) && f.outcome == Outcome::Ok
        });
        let later_change = history[i + 1..].iter().any(|f| {
            matches!(&f.op, Op::Write { file: g, .. } | Op::Truncate { file: g, .. } if g == file)
        });
        (e.outcome == Outcome::Ok && synced_after && !later_change)
            .then(|| (file.clone(), *offset, *len))
    });
    let (file, offset, len) = victim.expect("a durable write that nothing overwrote");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(mounts[0].join(&file))
        .expect("open victim");
    f.write_all_at(&vec![0xee; len as usize], offset)
        .expect("overwrite");
    f.sync_all().expect("fsync");
    drop(f);
    let seen = workload::observe(&mounts[1]).expect("read the files");
    let r = check::files::check(&history, &seen);
    assert_eq!(
        r.verdict,
        Verdict::Fail,
        "destroyed write not caught: {r:?}"
    );
    assert!(r.details.iter().any(|d| d.contains(&file)), "{r:?}");
    drop(cluster);
}
