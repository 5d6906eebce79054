//! End-to-end tests of MDS leader failover as clients see it, with real
//! processes and real mounts: a loop of exclusive creates goes on across
//! leader kills (SIGKILL) without losing or duplicating an acknowledged
//! create, and a new leader does not acknowledge a create while another
//! mount may still trust a negative entry the old leader let it cache.
//! How fast failover is, is measured by `bench/failover.py`, not here.
//!
//! Run with: cargo build --release --workspace --bins && \
//!   cargo test --release -p avalonctl --test e2e_failover -- --test-threads=1

mod common;

use common::{leader, wait_converged, wait_until, SecondMount, TestCluster};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A thread creating `f<i>` in a directory with O_CREAT|O_EXCL, one new
/// name after another, until stopped.
struct CreateLoop {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    handle: std::thread::JoinHandle<(Vec<String>, Vec<String>)>,
}

impl CreateLoop {
    fn start(dir: PathBuf) -> CreateLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let (s, a) = (stop.clone(), acked.clone());
        let handle = std::thread::spawn(move || {
            let mut ok = Vec::new();
            let mut failed = Vec::new();
            // Bounded: the test stops it long before.
            for i in 0..1_000_000usize {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let name = format!("f{i}");
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(dir.join(&name))
                {
                    Ok(_) => {
                        ok.push(name);
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failed.push(format!("{name}: {e}")),
                }
            }
            (ok, failed)
        });
        CreateLoop {
            stop,
            acked,
            handle,
        }
    }

    fn count(&self) -> usize {
        self.acked.load(Ordering::SeqCst)
    }

    /// Waits (generously) until `n` creates were acknowledged.
    fn wait_for(&self, n: usize) {
        assert!(
            wait_until(Duration::from_secs(180), || self.count() >= n
                || self.handle.is_finished()),
            "creates stalled at {} (wanted {n})",
            self.count()
        );
        assert!(!self.handle.is_finished(), "the create loop ended early");
    }

    fn finish(self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("create loop")
    }
}

/// Name → inode number of every entry of `dir`, failing on a name listed
/// twice.
fn listing(dir: &Path) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("readdir") {
        let e = e.expect("entry");
        let n = e.file_name().to_string_lossy().into_owned();
        let ino = e.metadata().expect("stat").ino();
        assert!(m.insert(n.clone(), ino).is_none(), "{n} listed twice");
    }
    m
}

/// Every acknowledged create is there once, nothing else is, and no two
/// names share an inode.
fn check_listing(dir: &Path, acked: &[String]) {
    let listed = listing(dir);
    let want: BTreeSet<&str> = acked.iter().map(String::as_str).collect();
    assert_eq!(want.len(), acked.len(), "a name acknowledged twice");
    let missing: Vec<&&str> = want
        .iter()
        .filter(|n| !listed.contains_key(**n))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged creates missing in {}: {missing:?}",
        dir.display()
    );
    let extra: Vec<&String> = listed
        .keys()
        .filter(|n| !want.contains(n.as_str()))
        .take(10)
        .collect();
    assert!(extra.is_empty(), "entries nobody created: {extra:?}");
    let inos: BTreeSet<u64> = listed.values().copied().collect();
    assert_eq!(inos.len(), listed.len(), "two names share an inode");
}

#[test]
fn creates_go_on_across_leader_kills() {
    let mut tc = TestCluster::start(3, 3);
    let dir = tc.mnt().join("loop");
    std::fs::create_dir(&dir).expect("mkdir");
    let w = CreateLoop::start(dir.clone());
    // Twice: the second time the node restarted after the first kill is
    // one of the two that must elect a leader.
    for round in 0..2 {
        w.wait_for(w.count() + 300);
        let victim = leader(tc.c());
        tc.c().kill_mds(victim);
        let at = w.count();
        eprintln!("round {round}: killed leader mds{victim} after {at} creates");
        w.wait_for(at + 300);
        eprintln!("round {round}: {} creates", w.count());
        tc.c().restart_mds(victim).expect("restart killed MDS");
        wait_converged(tc.c(), Duration::from_secs(120));
    }
    let (acked, failed) = w.finish();
    assert!(failed.is_empty(), "failed creates: {failed:?}");
    check_listing(&dir, &acked);
    // A mount that caches nothing yet sees the same.
    let path = tc.dir.path().join("other");
    let other = SecondMount::new(tc.c(), path);
    check_listing(&other.path.join("loop"), &acked);
}

#[test]
fn new_leader_does_not_hide_a_create_behind_an_old_negative_entry() {
    let mut tc = TestCluster::start(3, 3);
    let dir = tc.mnt().join("d");
    std::fs::create_dir(&dir).expect("mkdir");
    let path = tc.dir.path().join("b");
    let b = SecondMount::new(tc.c(), path);
    let b_dir = b.path.join("d");
    const NAMES: usize = 8;
    // Mount B caches "absent" for names A will create: the kernel keeps
    // negative entries for the rest of B's lease, granted by this leader.
    assert!(
        wait_until(Duration::from_secs(60), || b_dir.is_dir()),
        "B does not see the directory"
    );
    for j in 0..NAMES {
        assert!(!b_dir.join(format!("n{j}")).exists());
    }
    let victim = leader(tc.c());
    tc.c().kill_mds(victim);
    // A creates each name through the new leader; once A's create
    // returned, B must see it, whatever B cached from the old leader.
    for j in 0..NAMES {
        let name = format!("n{j}");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(&name))
            .unwrap_or_else(|e| panic!("create {name} on A: {e}"));
        assert!(
            b_dir.join(&name).exists(),
            "{name} acknowledged on A but absent on B"
        );
    }
    tc.c().restart_mds(victim).expect("restart killed MDS");
    wait_converged(tc.c(), Duration::from_secs(120));
    let listed = listing(&b_dir);
    assert_eq!(listed.len(), NAMES, "B lists {listed:?}");
}
