//! Crash consistency: data written and fsync'ed is never lost when the
//! client, an OSD or the MDS leader is killed with -9; data not yet
//! fsync'ed may be lost, but a file never holds bytes nobody wrote there
//! (every byte is what was written at that offset, or zero) nor grows past
//! what was written.
//!
//! Each case runs two writers on the mount while the kill happens: one
//! creates files and fsyncs each (recording it only once fsync returned),
//! one writes files without fsync.

mod common;

use avalonctl::local_cluster::LocalCluster;
use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes of an un-fsynced file (written 16 KiB at a time).
const UNSYNCED_LEN: usize = 1 << 20;
const PIECE: usize = 16 << 10;

/// Planned contents of synced file `i`: sizes vary, some span several
/// 64 KiB blocks.
fn synced_body(i: usize) -> Vec<u8> {
    data(3000 + (i * 97_331) % 600_000, 0x5000 + i as u64)
}

fn unsynced_body(j: usize) -> Vec<u8> {
    data(UNSYNCED_LEN, 0x9000 + j as u64)
}

/// What the writers did, as far as they know.
#[derive(Default)]
struct Record {
    /// Files whose fsync returned: name → contents.
    synced: Vec<(String, Vec<u8>)>,
    /// Files written without fsync: name → (planned contents, end of the
    /// last write started).
    unsynced: Vec<(String, Vec<u8>, usize)>,
    /// The file the synced writer was at when it stopped (its fsync did
    /// not return).
    syncing: Option<(String, Vec<u8>)>,
}

struct Writers {
    stop: Arc<AtomicBool>,
    rec: Arc<Mutex<Record>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writers {
    fn start(dir: &Path) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let rec = Arc::new(Mutex::new(Record::default()));
        let synced = {
            let (dir, stop, rec) = (dir.to_path_buf(), stop.clone(), rec.clone());
            std::thread::spawn(move || write_synced(&dir, &stop, &rec))
        };
        let unsynced = {
            let (dir, stop, rec) = (dir.to_path_buf(), stop.clone(), rec.clone());
            std::thread::spawn(move || write_unsynced(&dir, &stop, &rec))
        };
        Writers {
            stop,
            rec,
            threads: vec![synced, unsynced],
        }
    }

    fn synced(&self) -> usize {
        self.rec.lock().unwrap().synced.len()
    }

    fn unsynced_bytes(&self) -> usize {
        self.rec.lock().unwrap().unsynced.iter().map(|u| u.2).sum()
    }

    /// Waits (bounded) until `f` holds of the writers' progress.
    fn wait(&self, what: &str, f: impl Fn(&Writers) -> bool) {
        assert!(
            wait_until(Duration::from_secs(90), || f(self)),
            "writers made no progress: {what} (synced {}, unsynced bytes {})",
            self.synced(),
            self.unsynced_bytes()
        );
    }

    fn finish(self) -> Record {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("writer thread");
        }
        Arc::try_unwrap(self.rec)
            .ok()
            .expect("writers done")
            .into_inner()
            .unwrap()
    }
}

/// Creates files, writes each in a few pieces and fsyncs it; a file
/// counts as synced once fsync returned. Stops at `stop` or at the first
/// error (a killed client).
fn write_synced(dir: &Path, stop: &AtomicBool, rec: &Mutex<Record>) {
    for i in 0.. {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let name = format!("s{i}");
        let body = synced_body(i);
        rec.lock().unwrap().syncing = Some((name.clone(), body.clone()));
        let r = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(dir.join(&name))?;
            for piece in body.chunks(body.len() / 3 + 1) {
                f.write_all(piece)?;
            }
            f.sync_all()
        })();
        if let Err(e) = r {
            eprintln!("synced writer stops at {name}: {e}");
            return;
        }
        let mut g = rec.lock().unwrap();
        g.syncing = None;
        g.synced.push((name, body));
    }
}

/// Writes files 16 KiB at a time with no fsync, recording before each
/// write how far it reaches.
fn write_unsynced(dir: &Path, stop: &AtomicBool, rec: &Mutex<Record>) {
    for j in 0.. {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let name = format!("u{j}");
        let body = unsynced_body(j);
        let mut f = match std::fs::File::create(dir.join(&name)) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("unsynced writer stops at {name}: {e}");
                return;
            }
        };
        let k = {
            let mut g = rec.lock().unwrap();
            g.unsynced.push((name.clone(), body.clone(), 0));
            g.unsynced.len() - 1
        };
        for (n, piece) in body.chunks(PIECE).enumerate() {
            rec.lock().unwrap().unsynced[k].2 = (n + 1) * PIECE;
            if let Err(e) = f.write_all(piece) {
                eprintln!("unsynced writer stops in {name}: {e}");
                return;
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
        }
    }
}

/// Every synced file is byte-identical; every other file is no longer
/// than what was written and holds, at every offset, what was written
/// there or zero.
fn check(dir: &Path, rec: &Record) {
    for (name, body) in &rec.synced {
        let got = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"));
        assert_eq!(got.len(), body.len(), "fsynced {name}: size");
        assert!(got == *body, "fsynced {name}: contents differ");
    }
    let syncing = rec.syncing.iter().map(|(n, b)| (n, b, b.len()));
    for (name, body, reached) in rec
        .unsynced
        .iter()
        .map(|(n, b, r)| (n, b, *r))
        .chain(syncing)
    {
        let got = match std::fs::read(dir.join(name)) {
            Ok(g) => g,
            // The create itself may be what the kill interrupted.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("read {name}: {e}"),
        };
        assert!(
            got.len() <= reached,
            "{name}: {} bytes, but only {reached} were written",
            got.len()
        );
        if let Some(at) = got
            .iter()
            .zip(body.iter())
            .position(|(g, w)| *g != *w && *g != 0)
        {
            panic!("{name}: garbage at offset {at} (neither written nor zero)");
        }
    }
    eprintln!(
        "checked {} fsynced and {} other files",
        rec.synced.len(),
        rec.unsynced.len()
    );
}

/// A cluster of 3 MDS and 3 OSDs with a directory to write in.
fn setup() -> (TestCluster, PathBuf) {
    let tc = TestCluster::start(3, 3);
    let dir = tc.mnt().join("crash");
    std::fs::create_dir(&dir).unwrap();
    (tc, dir)
}

/// Lets the writers get going: some files fsynced, some data unsynced.
fn warm_up(w: &Writers) {
    w.wait("before the kill", |w| {
        w.synced() >= 4 && w.unsynced_bytes() >= 4 * PIECE
    });
}

#[test]
fn kill_9_of_the_client_loses_no_fsynced_data_and_leaves_no_garbage() {
    let (mut tc, _) = setup();
    let dir_name = "crash";
    let w = Writers::start(&tc.mnt().join(dir_name));
    warm_up(&w);
    let c = tc.c();
    let (_, pid) = c
        .pids()
        .into_iter()
        .find(|(n, _)| n == "client")
        .expect("client pid");
    run(std::process::Command::new("kill").args(["-9", &pid.to_string()]));
    let killed = Instant::now();
    // The dead mount fails every call: both writers stop by themselves.
    let rec = w.finish();
    eprintln!("writers stopped {:?} after the kill", killed.elapsed());
    c.unmount();
    c.mount().expect("remount");
    check(&tc.mnt().join(dir_name), &rec);
}

#[test]
fn kill_9_of_an_osd_loses_no_fsynced_data_and_leaves_no_garbage() {
    let (mut tc, dir) = setup();
    let w = Writers::start(&dir);
    warm_up(&w);
    let before = (w.synced(), w.unsynced_bytes());
    tc.c().kill_osd(2);
    // Writes go on through the other members.
    w.wait("after the OSD kill", |w| {
        w.synced() >= before.0 + 3 && w.unsynced_bytes() >= before.1 + 4 * PIECE
    });
    let rec = w.finish();
    check(&dir, &rec);
    // And once it is back and has caught up.
    let c: &mut LocalCluster = tc.c();
    c.restart_stopped().expect("restart the OSD");
    c.wait_healthy(Duration::from_secs(60))
        .expect("healthy again");
    check(&dir, &rec);
}

#[test]
fn kill_9_of_the_mds_leader_loses_no_fsynced_data_and_leaves_no_garbage() {
    let (mut tc, dir) = setup();
    let w = Writers::start(&dir);
    warm_up(&w);
    let before = (w.synced(), w.unsynced_bytes());
    let c = tc.c();
    let addrs = c.layout.mds_addrs();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (leader, _) = rt
        .block_on(avalonctl::mds_admin::find_leader(c.tls(), &addrs))
        .expect("an MDS leader");
    c.kill_mds(leader);
    eprintln!("killed the leader mds{leader}");
    // The client follows the new leader; the writers carry on.
    w.wait("after the leader kill", |w| {
        w.synced() >= before.0 + 3 && w.unsynced_bytes() >= before.1 + 4 * PIECE
    });
    let rec = w.finish();
    check(&dir, &rec);
    let c = tc.c();
    c.restart_stopped().expect("restart the old leader");
    c.wait_healthy(Duration::from_secs(60))
        .expect("healthy again");
    check(&dir, &rec);
}
