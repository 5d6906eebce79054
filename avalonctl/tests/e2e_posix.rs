//! POSIX behaviour that needs more than one client or process: fcntl and
//! flock locks held by the MDS across two mounts of one cluster (ranges,
//! F_GETLK, blocking waits, release on close, process exit, session expiry,
//! leader failover), setgid directories and POSIX ACLs.

mod common;
#[path = "common/prom.rs"]
mod prom;

use avalonctl::local_cluster::LocalCluster;
use common::*;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn open_rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

fn flock_struct(typ: i32, start: i64, len: i64) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

/// fcntl(F_SETLK) of [start, start+len) (len 0 = to EOF); the errno on failure.
fn setlk(f: &File, typ: i32, start: i64, len: i64) -> Result<(), i32> {
    let fl = flock_struct(typ, start, len);
    // SAFETY: valid fd and a valid flock struct.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// fcntl(F_GETLK): (type, start, len) of the conflicting lock.
fn getlk(f: &File, typ: i32, start: i64, len: i64) -> (i32, i64, i64) {
    let mut fl = flock_struct(typ, start, len);
    // SAFETY: valid fd and a valid flock struct.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) };
    assert_eq!(r, 0, "F_GETLK: {}", std::io::Error::last_os_error());
    (i32::from(fl.l_type), fl.l_start, fl.l_len)
}

/// fcntl with an open-file-description lock command (F_OFD_SETLK,
/// F_OFD_SETLKW, F_OFD_GETLK): the flock struct after the call, or the errno.
fn ofd(f: &File, cmd: i32, typ: i32, start: i64, len: i64) -> Result<libc::flock, i32> {
    let mut fl = flock_struct(typ, start, len);
    // SAFETY: valid fd and a valid flock struct.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    if r == 0 {
        Ok(fl)
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn flock(f: &File, op: i32) -> Result<(), i32> {
    // SAFETY: valid fd.
    let r = unsafe { libc::flock(f.as_raw_fd(), op) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A python child that locks `path` (`how`: "lockf" = F_SETLKW write lock
/// on the whole file, "flock" = blocking LOCK_EX), prints "waiting" before
/// and "got <time>" after, and holds the lock until its stdin closes.
struct Locker {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Locker {
    fn spawn(path: &Path, how: &str) -> Locker {
        let script = format!(
            "import fcntl, sys, time\n\
             f = open(sys.argv[1], 'r+')\n\
             print('waiting', flush=True)\n\
             {}\n\
             print('got', time.time(), flush=True)\n\
             sys.stdin.read()\n",
            match how {
                "lockf" => "fcntl.lockf(f, fcntl.LOCK_EX)",
                _ => "fcntl.flock(f, fcntl.LOCK_EX)",
            }
        );
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let out: ChildStdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Locker { child, lines }
    }

    fn expect_line(&self, prefix: &str, within: Duration) -> String {
        let l = self
            .lines
            .recv_timeout(within)
            .unwrap_or_else(|e| panic!("no '{prefix}' line from the locker: {e}"));
        assert!(l.starts_with(prefix), "expected {prefix}, got {l}");
        l
    }

    /// Waits for "got T" and returns T.
    fn got(&self, within: Duration) -> f64 {
        let l = self.expect_line("got", within);
        l[4..].trim().parse().unwrap()
    }

    fn finish(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn fcntl_and_flock_locks_exclude_across_mounts_and_processes() {
    let tc = TestCluster::start(1, 3);
    eprintln!("cluster in {}", tc.dir.path().display());
    let m1 = tc.mnt();
    let m2 = SecondMount::new(tc.cluster.as_ref().unwrap(), tc.dir.path().join("mnt2"));
    std::fs::write(m1.join("f"), vec![7u8; 4096]).unwrap();
    let a = open_rw(&m1.join("f"));
    let b = open_rw(&m2.path.join("f"));

    // Ranges, conflicts and F_GETLK across clients.
    setlk(&a, libc::F_WRLCK, 0, 100).expect("write lock on client 1");
    assert_eq!(setlk(&b, libc::F_WRLCK, 50, 10), Err(libc::EAGAIN));
    assert_eq!(setlk(&b, libc::F_RDLCK, 99, 1), Err(libc::EAGAIN));
    let (t, s, l) = getlk(&b, libc::F_RDLCK, 0, 0);
    assert_eq!((t, s, l), (libc::F_WRLCK, 0, 100));
    setlk(&b, libc::F_WRLCK, 100, 100).expect("adjacent range is free");
    assert_eq!(getlk(&a, libc::F_RDLCK, 0, 10).0, libc::F_UNLCK);
    // Splitting: unlock the middle of client 1's lock.
    setlk(&a, libc::F_UNLCK, 40, 20).unwrap();
    setlk(&b, libc::F_WRLCK, 45, 10).expect("hole in client 1's lock");
    assert_eq!(setlk(&b, libc::F_WRLCK, 39, 1), Err(libc::EAGAIN));
    assert_eq!(setlk(&b, libc::F_WRLCK, 60, 1), Err(libc::EAGAIN));
    // Shared read locks.
    setlk(&b, libc::F_UNLCK, 0, 0).unwrap();
    setlk(&a, libc::F_RDLCK, 0, 0).unwrap();
    setlk(&b, libc::F_RDLCK, 0, 0).expect("two readers");
    assert_eq!(setlk(&a, libc::F_WRLCK, 0, 1), Err(libc::EAGAIN));
    // Closing any descriptor of the file drops the process's locks.
    drop(b);
    setlk(&a, libc::F_WRLCK, 0, 0).expect("upgrade after the reader closed");
    let b = open_rw(&m2.path.join("f"));
    assert_eq!(setlk(&b, libc::F_RDLCK, 0, 0), Err(libc::EAGAIN));

    // A blocking waiter on the other client gets the lock once it is
    // released, and not before.
    let w = Locker::spawn(&m2.path.join("f"), "lockf");
    w.expect_line("waiting", Duration::from_secs(30));
    // The waiter cannot get it while we hold it; the release time bounds
    // when it may get it.
    assert_eq!(setlk(&b, libc::F_WRLCK, 0, 0), Err(libc::EAGAIN));
    let released_at = now_secs();
    setlk(&a, libc::F_UNLCK, 0, 0).unwrap();
    let got = w.got(Duration::from_secs(60));
    assert!(
        got >= released_at - 0.01,
        "waiter got the lock before release"
    );
    // Another process on the same mount is another owner.
    assert_eq!(setlk(&a, libc::F_RDLCK, 0, 0), Err(libc::EAGAIN));
    let (t, _, _) = getlk(&a, libc::F_WRLCK, 0, 0);
    assert_eq!(t, libc::F_WRLCK);
    // Process exit (SIGKILL) releases its locks.
    w.kill();
    assert!(
        wait_until(Duration::from_secs(30), || setlk(&a, libc::F_WRLCK, 0, 0)
            .is_ok()),
        "lock of a killed process not released"
    );
    setlk(&a, libc::F_UNLCK, 0, 0).unwrap();

    // flock: whole file, shared/exclusive, across clients.
    std::fs::write(m1.join("g"), b"x").unwrap();
    let fa = open_rw(&m1.join("g"));
    let fb = open_rw(&m2.path.join("g"));
    flock(&fa, libc::LOCK_SH | libc::LOCK_NB).unwrap();
    flock(&fb, libc::LOCK_SH | libc::LOCK_NB).expect("two shared flocks");
    assert_eq!(
        flock(&fb, libc::LOCK_EX | libc::LOCK_NB),
        Err(libc::EWOULDBLOCK)
    );
    flock(&fa, libc::LOCK_UN).unwrap();
    flock(&fb, libc::LOCK_EX | libc::LOCK_NB).expect("upgrade once alone");
    assert_eq!(
        flock(&fa, libc::LOCK_SH | libc::LOCK_NB),
        Err(libc::EWOULDBLOCK)
    );
    // The flock command of util-linux on the other mount, non-blocking.
    let st = Command::new("flock")
        .args(["-n"])
        .arg(m1.join("g"))
        .arg("true")
        .status()
        .unwrap();
    assert!(
        !st.success(),
        "flock -n succeeded while another client holds it"
    );
    // A blocking flock waiter wakes when the holder closes the file.
    let w = Locker::spawn(&m1.join("g"), "flock");
    w.expect_line("waiting", Duration::from_secs(30));
    let released_at = now_secs();
    drop(fb);
    let got = w.got(Duration::from_secs(60));
    assert!(got >= released_at - 0.01);
    w.finish();
    // The kernel sends the release of a closed file in the background.
    assert!(
        wait_until(Duration::from_secs(30), || Command::new("flock")
            .args(["-n"])
            .arg(m2.path.join("g"))
            .arg("true")
            .status()
            .unwrap()
            .success()),
        "flock not released on the waiter's exit"
    );
    drop((a, b, fa));
}

/// generic/478: an OFD lock belongs to its open file description; it stays
/// while any descriptor of it is open and goes with the last one.
#[test]
fn ofd_locks_go_with_their_open_file() {
    let tc = TestCluster::start(1, 3);
    let m1 = tc.mnt();
    let m2 = SecondMount::new(tc.cluster.as_ref().unwrap(), tc.dir.path().join("mnt2"));
    let f = m1.join("f");
    std::fs::write(&f, vec![1u8; 4096]).unwrap();
    let wr = |f: &File| ofd(f, libc::F_OFD_SETLK, libc::F_WRLCK, 0, 10);
    let probe = |f: &File| ofd(f, libc::F_OFD_GETLK, libc::F_WRLCK, 0, 10).unwrap();

    for round in 0..3 {
        let a = open_rw(&f);
        let b = open_rw(&f);
        wr(&a).expect("OFD write lock");
        // Another open file of the same process is another owner.
        assert_eq!(probe(&b).l_type, libc::F_WRLCK as i16, "round {round}");
        assert_eq!(wr(&b), Err(libc::EAGAIN));
        // Closing a duplicate keeps it (and this process's flush of the
        // other descriptor does not drop it either).
        let dup = a.try_clone().unwrap();
        drop(dup);
        let c = open_rw(&f);
        drop(c);
        assert_eq!(wr(&b), Err(libc::EAGAIN), "round {round}");
        // Closing the last descriptor releases it at once for this mount:
        // a waiter does not hang.
        drop(a);
        assert_eq!(probe(&b).l_type, libc::F_UNLCK as i16, "round {round}");
        ofd(&b, libc::F_OFD_SETLKW, libc::F_WRLCK, 0, 10).expect("SETLKW after close");
        drop(b);
    }

    // A process's POSIX lock outlives the release of another open file it
    // locked through earlier (its flush already dropped those locks).
    let a = open_rw(&f);
    let b = open_rw(&f);
    setlk(&a, libc::F_WRLCK, 0, 10).unwrap();
    drop(a); // flush drops the POSIX lock taken through a
    setlk(&b, libc::F_WRLCK, 20, 10).unwrap();
    let other = open_rw(&m2.path.join("f"));
    assert_eq!(setlk(&other, libc::F_WRLCK, 0, 10), Ok(()));
    assert_eq!(setlk(&other, libc::F_WRLCK, 20, 1), Err(libc::EAGAIN));
    setlk(&other, libc::F_UNLCK, 0, 0).unwrap();

    // Across mounts: held while open, free after the close.
    let a = open_rw(&f);
    wr(&a).unwrap();
    assert_eq!(probe(&other).l_type, libc::F_WRLCK as i16);
    drop(a);
    // The kernel sends the release in the background: the other mount
    // sees it shortly after the close.
    assert!(
        wait_until(Duration::from_secs(10), || probe(&other).l_type
            == libc::F_UNLCK as i16),
        "OFD lock outlived its file on the other mount"
    );
    wr(&other).expect("free on the other mount");
    drop((b, other));
}

/// The leader's id.
fn leader(c: &LocalCluster) -> u64 {
    let addrs = c.layout.mds_addrs();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut found = None;
    assert!(
        wait_until(Duration::from_secs(60), || {
            found = rt
                .block_on(avalonctl::mds_admin::find_leader(c.tls(), &addrs))
                .map(|(id, _)| id);
            found.is_some()
        }),
        "no MDS leader"
    );
    found.unwrap()
}

#[test]
fn locks_survive_leader_failover_and_die_with_their_session() {
    let mut tc = TestCluster::start(3, 3);
    let m1 = tc.mnt();
    let m2 = SecondMount::new(tc.cluster.as_ref().unwrap(), tc.dir.path().join("mnt2"));
    std::fs::write(m1.join("f"), b"data").unwrap();
    let a = open_rw(&m1.join("f"));
    let b = open_rw(&m2.path.join("f"));
    setlk(&a, libc::F_WRLCK, 10, 10).unwrap();
    // Released before the failover: free after it.
    setlk(&a, libc::F_WRLCK, 100, 10).unwrap();
    setlk(&a, libc::F_UNLCK, 100, 10).unwrap();
    // The other mount holds one too.
    setlk(&b, libc::F_RDLCK, 200, 10).unwrap();
    let victim = leader(tc.c());
    tc.c().kill_mds(victim);
    let new = leader(tc.c());
    assert_ne!(new, victim);
    // The new leader knows the locks (locks live in the leader's memory:
    // the clients reclaimed them).
    assert_eq!(setlk(&b, libc::F_WRLCK, 15, 1), Err(libc::EAGAIN));
    assert_eq!(getlk(&b, libc::F_WRLCK, 0, 0).0, libc::F_WRLCK);
    assert_eq!(setlk(&a, libc::F_WRLCK, 205, 1), Err(libc::EAGAIN));
    setlk(&a, libc::F_RDLCK, 205, 1).expect("two readers after the failover");
    setlk(&b, libc::F_WRLCK, 100, 10).expect("released before the failover");
    setlk(&b, libc::F_UNLCK, 100, 10).unwrap();
    setlk(&a, libc::F_UNLCK, 0, 0).unwrap();
    setlk(&b, libc::F_WRLCK, 15, 1).expect("free after unlock on the new leader");
    setlk(&b, libc::F_UNLCK, 0, 0).unwrap();
    tc.c().restart_stopped().unwrap();

    // A client that dies without closing: its locks go with its session.
    let w = Locker::spawn(&m2.path.join("f"), "lockf");
    w.expect_line("waiting", Duration::from_secs(30));
    w.got(Duration::from_secs(60));
    assert_eq!(setlk(&a, libc::F_RDLCK, 0, 0), Err(libc::EAGAIN));
    let pid = m2.pid();
    run(Command::new("kill").args(["-9", &pid.to_string()]));
    w.kill();
    drop(b);
    // The MDS expires the session after session_timeout_ms (30 s default).
    assert!(
        wait_until(Duration::from_secs(120), || setlk(&a, libc::F_WRLCK, 0, 0)
            .is_ok()),
        "lock of an expired session not released"
    );
    drop(m2);
    let _ = std::io::stdout().flush();
}

/// A client of the release before FEATURE_LOCK_RECLAIM (played with
/// AVALON_TEST_FEATURES_OFF) cannot reclaim: its locks go through the Raft
/// log and a new leader has them with nothing to reclaim; it and a
/// current client exclude each other before and after a failover.
#[test]
fn locks_of_older_clients_go_through_the_log() {
    let mut tc = TestCluster::start(3, 3);
    let m1 = tc.mnt();
    let off = avalon_proto::version::FEATURE_LOCK_RECLAIM.to_string();
    let old = SecondMount::with_env(
        tc.cluster.as_ref().unwrap(),
        tc.dir.path().join("mnt-old"),
        "",
        &[("AVALON_TEST_FEATURES_OFF", off.as_str())],
    );
    std::fs::write(m1.join("f"), b"data").unwrap();
    let a = open_rw(&m1.join("f"));
    let b = open_rw(&old.path.join("f"));
    setlk(&b, libc::F_WRLCK, 0, 10).expect("old client's lock");
    setlk(&a, libc::F_WRLCK, 20, 10).expect("current client's lock");
    assert_eq!(setlk(&a, libc::F_RDLCK, 5, 1), Err(libc::EAGAIN));
    assert_eq!(setlk(&b, libc::F_RDLCK, 25, 1), Err(libc::EAGAIN));
    // Released by the old client before the failover: free after it.
    setlk(&b, libc::F_WRLCK, 40, 10).unwrap();
    setlk(&b, libc::F_UNLCK, 40, 10).unwrap();
    let victim = leader(tc.c());
    tc.c().kill_mds(victim);
    assert_ne!(leader(tc.c()), victim);
    assert_eq!(setlk(&a, libc::F_RDLCK, 5, 1), Err(libc::EAGAIN));
    assert_eq!(getlk(&a, libc::F_WRLCK, 0, 0).0, libc::F_WRLCK);
    assert_eq!(setlk(&b, libc::F_RDLCK, 25, 1), Err(libc::EAGAIN));
    setlk(&a, libc::F_WRLCK, 40, 10).expect("released before the failover");
    // Closing drops the old client's locks (through the log too).
    drop(b);
    assert!(
        wait_until(Duration::from_secs(30), || setlk(&a, libc::F_WRLCK, 0, 10)
            .is_ok()),
        "old client's lock not released by its close"
    );
    tc.c().restart_stopped().unwrap();
    drop((a, old));
}

/// Lock requests the MDS decided (SetLock RPCs), from its metrics.
fn mds_setlk_calls(c: &LocalCluster) -> f64 {
    c.layout
        .metrics_addrs()
        .iter()
        .filter(|(name, _)| name.starts_with("mds"))
        .map(|(name, addr)| {
            let (code, body) = prom::http_get(addr, "/metrics")
                .unwrap_or_else(|e| panic!("scraping {name} at {addr}: {e}"));
            assert_eq!(code, 200, "{name}: HTTP {code}");
            prom::parse(&body)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .sum("avalon_mds_op_duration_seconds_count", &[("op", "setlk")])
        })
        .sum()
}

/// A file only one mount locks: after its first lock the mount decides
/// its processes' lock requests itself (lock cache, what sqlite's lock
/// calls need), with the same answers; another mount's request takes the
/// cache back first and sees every lock the first one holds.
#[test]
fn a_lone_mount_keeps_its_locks_until_another_asks() {
    let mut tc = TestCluster::start(1, 3);
    let m1 = tc.mnt();
    let m2 = SecondMount::new(tc.cluster.as_ref().unwrap(), tc.dir.path().join("mnt2"));
    std::fs::write(m1.join("db"), vec![1u8; 8192]).unwrap();
    let a = open_rw(&m1.join("db"));
    setlk(&a, libc::F_WRLCK, 0, 10).expect("first lock");
    let before = mds_setlk_calls(tc.c());
    // Two open files of this mount are two OFD owners: they still
    // exclude each other, decided here.
    let o1 = open_rw(&m1.join("db"));
    let o2 = open_rw(&m1.join("db"));
    for i in 0..200i64 {
        setlk(&a, libc::F_RDLCK, 100 + i, 1).unwrap();
        setlk(&a, libc::F_UNLCK, 100 + i, 1).unwrap();
        ofd(&o1, libc::F_OFD_SETLK, libc::F_WRLCK, 500, 1).expect("ofd lock");
        assert_eq!(
            ofd(&o2, libc::F_OFD_SETLK, libc::F_RDLCK, 500, 1).map(|_| ()),
            Err(libc::EAGAIN),
            "another open file's lock, round {i}"
        );
        ofd(&o1, libc::F_OFD_SETLK, libc::F_UNLCK, 500, 1).unwrap();
    }
    let conflict = ofd(&o2, libc::F_OFD_GETLK, libc::F_WRLCK, 0, 0).expect("getlk");
    assert_eq!(
        (i32::from(conflict.l_type), conflict.l_start, conflict.l_len),
        (libc::F_WRLCK, 0, 10)
    );
    let after = mds_setlk_calls(tc.c());
    // Without the cache all 1,000 go; with it none should, but a lease
    // that lapses on a loaded machine sends requests meanwhile.
    assert!(
        after - before < 400.0,
        "{} of 1,000 lock requests went to the MDS",
        after - before
    );
    // The other mount: the MDS takes the cache back and knows our lock.
    let b = open_rw(&m2.path.join("db"));
    assert_eq!(setlk(&b, libc::F_WRLCK, 5, 1), Err(libc::EAGAIN));
    assert_eq!(getlk(&b, libc::F_RDLCK, 0, 0), (libc::F_WRLCK, 0, 10));
    setlk(&b, libc::F_WRLCK, 10, 10).expect("a free range");
    // Back at the MDS: the first mount now sees the other's lock.
    assert_eq!(setlk(&a, libc::F_RDLCK, 15, 1), Err(libc::EAGAIN));
    setlk(&a, libc::F_UNLCK, 0, 10).unwrap();
    setlk(&b, libc::F_WRLCK, 0, 10).expect("released by the first mount");
    drop((a, b, o1, o2, m2));
}

fn meta(p: &Path) -> std::fs::Metadata {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
}

/// Runs `cmd` as uid/gid 65534 (nobody) without supplementary groups;
/// true if it succeeded.
fn as_nobody(args: &[&str]) -> bool {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(args)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn setgid_directories_and_posix_acls() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tc = TestCluster::start(1, 3);
    let m = tc.mnt();
    std::fs::set_permissions(tc.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // setgid directory: group and (for subdirectories) the bit are inherited.
    let d = m.join("sgid");
    std::fs::create_dir(&d).unwrap();
    std::os::unix::fs::chown(&d, None, Some(4321)).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o2775)).unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    std::fs::write(d.join("file"), b"x").unwrap();
    std::os::unix::fs::symlink("file", d.join("link")).unwrap();
    assert_eq!(meta(&d.join("sub")).gid(), 4321);
    assert_ne!(
        meta(&d.join("sub")).mode() & 0o2000,
        0,
        "subdir inherits S_ISGID"
    );
    assert_eq!(meta(&d.join("file")).gid(), 4321);
    assert_eq!(meta(&d.join("file")).mode() & 0o2000, 0);
    assert_eq!(meta(&d.join("link")).gid(), 4321);
    std::fs::create_dir(d.join("sub/deeper")).unwrap();
    assert_eq!(meta(&d.join("sub/deeper")).gid(), 4321);

    // Access ACLs: enforced by the kernel, mode kept in step.
    let f = m.join("secret");
    std::fs::write(&f, b"s3cret").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&m, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fs_ = f.to_str().unwrap();
    assert!(!as_nobody(&["cat", fs_]), "nobody reads a 0600 file");
    run(Command::new("setfacl").args(["-m", "u:65534:r", fs_]));
    let acl = run(Command::new("getfacl").args(["-c", "-n", fs_]));
    assert!(acl.contains("user:65534:r--"), "getfacl: {acl}");
    assert!(acl.contains("mask::r--"), "getfacl: {acl}");
    assert_eq!(meta(&f).mode() & 0o777, 0o640, "group bits show the mask");
    assert!(
        as_nobody(&["cat", fs_]),
        "the ACL grants nobody read access"
    );
    assert!(!as_nobody(&["sh", "-c", &format!("echo x >> {fs_}")]));
    // chmod rewrites the mask.
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    let acl = run(Command::new("getfacl").args(["-c", "-n", fs_]));
    assert!(acl.contains("mask::---"), "getfacl after chmod: {acl}");
    assert!(!as_nobody(&["cat", fs_]), "the mask limits the named user");
    run(Command::new("setfacl").args(["-b", fs_]));
    let acl = run(Command::new("getfacl").args(["-c", "-n", fs_]));
    assert!(!acl.contains("65534"), "getfacl after -b: {acl}");

    // Default ACLs are inherited by new files and directories.
    let dd = m.join("shared");
    std::fs::create_dir(&dd).unwrap();
    let dds = dd.to_str().unwrap();
    run(Command::new("setfacl").args(["-d", "-m", "u:65534:rwx", dds]));
    run(Command::new("setfacl").args(["-m", "u:65534:rwx", dds]));
    assert!(as_nobody(&[
        "sh",
        "-c",
        &format!("echo hi > {dds}/by-nobody")
    ]));
    std::fs::write(dd.join("new"), b"n").unwrap();
    let acl = run(Command::new("getfacl").args(["-c", "-n", dd.join("new").to_str().unwrap()]));
    assert!(
        acl.contains("user:65534:rwx"),
        "inherited access ACL: {acl}"
    );
    std::fs::create_dir(dd.join("subdir")).unwrap();
    let acl = run(Command::new("getfacl").args(["-c", "-n", dd.join("subdir").to_str().unwrap()]));
    assert!(
        acl.contains("default:user:65534:rwx"),
        "inherited default ACL: {acl}"
    );
    assert!(as_nobody(&[
        "sh",
        "-c",
        &format!("echo hi > {dds}/subdir/f")
    ]));

    // Setting an access ACL as a non-member clears S_ISGID.
    let g = m.join("sgid-file");
    std::fs::write(&g, b"g").unwrap();
    std::os::unix::fs::chown(&g, Some(65534), Some(4321)).unwrap();
    std::fs::set_permissions(&g, std::fs::Permissions::from_mode(0o2755)).unwrap();
    assert!(as_nobody(&["setfacl", "-m", "u:1:r", g.to_str().unwrap()]));
    assert_eq!(meta(&g).mode() & 0o2000, 0, "S_ISGID cleared");
}

/// Opens a directory (O_RDONLY | O_DIRECTORY).
fn open_dir(p: &Path) -> File {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// getdents64 from the descriptor's current offset until the end:
/// (name, d_ino, d_off) in order.
fn getdents(f: &File) -> Vec<(Vec<u8>, u64, i64)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: valid fd and a buffer of the given length.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                f.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
        if n == 0 {
            return out;
        }
        let mut at = 0usize;
        while at < n as usize {
            let b = &buf[at..];
            let ino = u64::from_ne_bytes(b[0..8].try_into().unwrap());
            let off = i64::from_ne_bytes(b[8..16].try_into().unwrap());
            let reclen = u16::from_ne_bytes(b[16..18].try_into().unwrap()) as usize;
            let name = &b[19..reclen];
            let len = name.iter().position(|c| *c == 0).unwrap_or(name.len());
            out.push((name[..len].to_vec(), ino, off));
            at += reclen;
        }
    }
}

/// generic/257, generic/637: ".." carries the parent's inode number, read
/// from the start or after a seek; generic/736: a listing ends while its
/// entries are renamed away and back.
#[test]
fn dotdot_and_directory_streams() {
    use std::os::unix::fs::MetadataExt;
    let tc = TestCluster::start(1, 3);
    let m = tc.mnt();
    std::fs::create_dir_all(m.join("a/b")).unwrap();
    std::fs::write(m.join("a/b/f"), b"x").unwrap();
    for (dir, parent) in [
        (m.clone(), m.clone()), // the mount root is its own parent
        (m.join("a"), m.clone()),
        (m.join("a/b"), m.join("a")),
    ] {
        let want = meta(&parent).ino();
        let f = open_dir(&dir);
        let all = getdents(&f);
        let dd = all.iter().find(|e| e.0 == b"..").expect("..");
        assert_eq!(dd.1, want, "'..' of {} from the start", dir.display());
        let dot = all.iter().find(|e| e.0 == b".").expect(".");
        assert_eq!(dot.1, meta(&dir).ino());
        // Seek to just after "." (its d_off) and read again.
        // SAFETY: valid fd.
        let r = unsafe { libc::lseek(f.as_raw_fd(), dot.2, libc::SEEK_SET) };
        assert_eq!(r, dot.2);
        let rest = getdents(&f);
        assert_eq!(rest[0].0, b"..");
        assert_eq!(rest[0].1, want, "'..' of {} after lseek", dir.display());
        assert_eq!(rest.len(), all.len() - 1);
    }

    // Rename every entry away and back while listing (each rename gives
    // the entry a new cookie at the end): the listing still ends.
    const N: usize = 300;
    let d = m.join("renames");
    std::fs::create_dir(&d).unwrap();
    for i in 0..N {
        std::fs::write(d.join(i.to_string()), b"").unwrap();
    }
    let mut seen = 0usize;
    for e in std::fs::read_dir(&d).unwrap() {
        let name = e.unwrap().file_name();
        seen += 1;
        assert!(seen <= 3 * N, "listing does not end");
        std::fs::rename(d.join(&name), d.join("TEMPFILE")).unwrap();
        std::fs::rename(d.join("TEMPFILE"), d.join(&name)).unwrap();
    }
    assert!(seen >= N, "only {seen} of {N} entries listed");
    // A listing that starts afterwards sees every entry once.
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), N);
}

/// generic/035: a directory removed (rmdir, or replaced by rename) while
/// open can still be fstat'ed, with nlink 0, also from another mount.
#[test]
fn open_directories_outlive_their_removal() {
    use std::os::unix::fs::MetadataExt;
    let tc = TestCluster::start(1, 3);
    let m = tc.mnt();
    let m2 = SecondMount::new(tc.cluster.as_ref().unwrap(), tc.dir.path().join("mnt2"));
    let fstat = |f: &File| {
        f.metadata()
            .unwrap_or_else(|e| panic!("fstat of a removed open directory: {e}"))
    };

    std::fs::create_dir(m.join("d")).unwrap();
    let fd = open_dir(&m.join("d"));
    let ino = fstat(&fd).ino();
    std::fs::remove_dir(m.join("d")).unwrap();
    let st = fstat(&fd);
    assert_eq!((st.ino(), st.nlink()), (ino, 0));
    assert!(st.is_dir());
    // Nothing can be created in it.
    // SAFETY: valid fd, NUL-terminated name.
    let r = unsafe {
        libc::openat(
            fd.as_raw_fd(),
            c"new".as_ptr(),
            libc::O_CREAT | libc::O_WRONLY,
            0o644,
        )
    };
    assert_eq!(r, -1);
    drop(fd);

    // rename over an empty directory that is open.
    std::fs::create_dir(m.join("d1")).unwrap();
    std::fs::create_dir(m.join("d2")).unwrap();
    std::fs::write(m.join("d1/f"), b"x").unwrap();
    let fd2 = open_dir(&m.join("d2"));
    std::fs::rename(m.join("d1"), m.join("d2")).unwrap();
    assert_eq!(fstat(&fd2).nlink(), 0);
    assert_eq!(std::fs::read(m.join("d2/f")).unwrap(), b"x");
    drop(fd2);

    // Open on the other mount, removed on this one.
    std::fs::create_dir(m.join("e")).unwrap();
    let fe = open_dir(&m2.path.join("e"));
    // The other client reports its open directories with its heartbeats.
    std::thread::sleep(Duration::from_secs(1));
    std::fs::remove_dir(m.join("e")).unwrap();
    assert_eq!(fstat(&fe).nlink(), 0);
    drop(fe);
    // Once closed, the name can be used again for a new directory.
    std::fs::create_dir(m.join("e")).unwrap();
    assert_eq!(meta(&m.join("e")).nlink(), 2);
}

/// lseek(SEEK_DATA / SEEK_HOLE): Ok(offset) or the errno.
fn seek(f: &File, off: i64, whence: i32) -> Result<i64, i32> {
    // SAFETY: valid fd.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r >= 0 {
        Ok(r)
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// SEEK_DATA and SEEK_HOLE find the holes of sparse files (never-written
/// chunks and blocks, punched ranges, the tail past the stored data) and
/// answer ENXIO at or past the end (generic/285 and the other seek tests).
#[test]
fn seek_data_and_seek_hole_find_holes() {
    use std::os::unix::fs::FileExt;
    const MB: i64 = 1 << 20;
    let tc = TestCluster::start(1, 3);
    let m = tc.mnt();
    let f = open_rw(&m.join("sparse"));
    let (data, hole) = (libc::SEEK_DATA, libc::SEEK_HOLE);
    // Empty file: ENXIO everywhere.
    assert_eq!(seek(&f, 0, data), Err(libc::ENXIO));
    assert_eq!(seek(&f, 0, hole), Err(libc::ENXIO));
    // 64 KiB of data at 0, a hole, 64 KiB at 9 MiB (the third 4 MiB
    // chunk; the second is never written), then a hole up to 16 MiB.
    f.write_all_at(&vec![1u8; 64 << 10], 0).unwrap();
    f.write_all_at(&vec![2u8; 64 << 10], 9 * MB as u64).unwrap();
    f.set_len(16 * MB as u64).unwrap();
    assert_eq!(seek(&f, 0, data), Ok(0));
    assert_eq!(seek(&f, 0, hole), Ok(64 << 10));
    assert_eq!(seek(&f, 100, hole), Ok(64 << 10));
    assert_eq!(seek(&f, 64 << 10, data), Ok(9 * MB));
    assert_eq!(seek(&f, 5 * MB, data), Ok(9 * MB));
    assert_eq!(seek(&f, 9 * MB + 5, data), Ok(9 * MB + 5));
    assert_eq!(seek(&f, 9 * MB, hole), Ok(9 * MB + (64 << 10)));
    assert_eq!(seek(&f, 10 * MB, data), Err(libc::ENXIO));
    assert_eq!(seek(&f, 10 * MB, hole), Ok(10 * MB));
    assert_eq!(seek(&f, 16 * MB - 1, hole), Ok(16 * MB - 1));
    assert_eq!(seek(&f, 16 * MB, data), Err(libc::ENXIO));
    assert_eq!(seek(&f, 16 * MB, hole), Err(libc::ENXIO));
    // A punched range becomes a hole.
    // SAFETY: valid fd.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            64 << 10,
        )
    };
    assert_eq!(r, 0, "punch: {}", std::io::Error::last_os_error());
    assert_eq!(seek(&f, 0, data), Ok(9 * MB));
    assert_eq!(seek(&f, 0, hole), Ok(0));
    // Data written but still buffered in the client counts.
    f.write_all_at(b"late", 13 * MB as u64).unwrap();
    assert_eq!(seek(&f, 10 * MB, data), Ok(13 * MB));
    // A file without holes: data up to the end, the hole at the end.
    std::fs::write(m.join("full"), vec![3u8; 100_000]).unwrap();
    let g = File::open(m.join("full")).unwrap();
    assert_eq!(seek(&g, 0, hole), Ok(100_000));
    assert_eq!(seek(&g, 99_999, data), Ok(99_999));
    // cp --sparse keeps the holes and the content.
    let st = Command::new("cp")
        .args(["--sparse=always"])
        .arg(m.join("sparse"))
        .arg(m.join("copy"))
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        sha_file(&m.join("copy")),
        sha_file(&m.join("sparse")),
        "copy differs"
    );
    let c = File::open(m.join("copy")).unwrap();
    assert_eq!(seek(&c, 0, data), Ok(9 * MB));
}

/// generic/003: with relatime (the default) a read renews atime when it is
/// not after mtime/ctime, and only then; ctime stays.
#[test]
fn relatime_updates_atime_on_read() {
    use std::os::unix::fs::MetadataExt;
    let tc = TestCluster::start(1, 3);
    let m = tc.mnt();
    let f = m.join("f");
    std::fs::write(&f, b"aaa").unwrap();
    let times = |p: &Path| {
        let s = meta(p);
        (
            (s.atime(), s.atime_nsec()),
            (s.mtime(), s.mtime_nsec()),
            (s.ctime(), s.ctime_nsec()),
        )
    };
    let (a0, m0, c0) = times(&f);
    assert!(a0 <= m0);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(std::fs::read(&f).unwrap(), b"aaa");
    let (a1, m1, c1) = times(&f);
    assert!(
        a1 > a0 && a1 > m1,
        "first read renews atime: {a0:?} -> {a1:?}"
    );
    assert_eq!((m1, c1), (m0, c0), "a read changes neither mtime nor ctime");
    // atime is now after mtime: another read leaves it.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::read(&f).unwrap();
    assert_eq!(times(&f).0, a1, "second read");
    // After a write, the next read renews it again.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&f, b"bbb").unwrap();
    let (a2, m2, _) = times(&f);
    assert_eq!(a2, a1);
    assert!(m2 > a2);
    std::thread::sleep(Duration::from_millis(20));
    std::fs::read(&f).unwrap();
    assert!(times(&f).0 > m2, "read after a write");
}

/// generic/003: with strictatime every read renews atime, also a read the
/// kernel could serve from the pages it kept since an earlier open (atime
/// is already after mtime, so relatime would leave it).
#[test]
fn strictatime_renews_atime_on_every_read() {
    use std::os::unix::fs::MetadataExt;
    let tc = TestCluster::start(1, 3);
    let strict = SecondMount::with_options(
        tc.cluster.as_ref().unwrap(),
        tc.dir.path().join("strict"),
        "strictatime",
    );
    let f = strict.path.join("f");
    std::fs::write(&f, b"aaa").unwrap();
    let atime = |p: &Path| {
        let s = meta(p);
        (s.atime(), s.atime_nsec())
    };
    let mut last = atime(&f);
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(std::fs::read(&f).unwrap(), b"aaa");
        let now = atime(&f);
        assert!(now > last, "read {i} renews atime: {last:?} -> {now:?}");
        last = now;
    }
}

/// generic/683-685: fallocate, punch hole and zero range by an unprivileged
/// caller drop S_ISUID and S_ISGID (root keeps them); generic/213:
/// allocating more than the free space fails with ENOSPC.
#[test]
fn fallocate_drops_setid_bits_and_checks_free_space() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tc = TestCluster::start(1, 3);
    let m = tc.mnt();
    std::fs::set_permissions(tc.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&m, std::fs::Permissions::from_mode(0o777)).unwrap();
    let f = m.join("setid");
    let fs_ = f.to_str().unwrap();
    for (args, mode) in [
        (vec!["-o", "0", "-l", "65536"], 0o6666),
        (vec!["-p", "-o", "0", "-l", "4096"], 0o6676),
        (vec!["-z", "-o", "4096", "-l", "4096"], 0o2666),
    ] {
        std::fs::write(&f, vec![1u8; 65536]).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut cmd = vec!["fallocate"];
        cmd.extend(args.iter().copied());
        cmd.push(fs_);
        assert!(as_nobody(&cmd), "fallocate {args:?} as nobody");
        assert_eq!(meta(&f).mode() & 0o7777, mode & 0o777, "{args:?}");
        // Root keeps them.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
        run(Command::new("fallocate").args(&args).arg(&f));
        assert_eq!(meta(&f).mode() & 0o7777, mode, "{args:?} as root");
    }

    // More than the free space: ENOSPC, and the size is unchanged.
    // SAFETY: statvfs with a valid path and out struct.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    let p = std::ffi::CString::new(m.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::statvfs(p.as_ptr(), &mut sv) }, 0);
    let avail = sv.f_bavail * sv.f_frsize;
    let g = open_rw(&m.join("big"));
    // SAFETY: valid fd.
    let r = unsafe { libc::fallocate(g.as_raw_fd(), 0, 0, (2 * avail) as i64) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENOSPC)
    );
    assert_eq!(g.metadata().unwrap().len(), 0);
    // SAFETY: valid fd.
    let r = unsafe { libc::fallocate(g.as_raw_fd(), 0, 0, 1 << 20) };
    assert_eq!(r, 0, "a small fallocate still works");
    assert_eq!(g.metadata().unwrap().len(), 1 << 20);
}

/// A file handle as `name_to_handle_at` fills it (MAX_HANDLE_SZ bytes).
#[repr(C)]
struct Handle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; 128],
}

fn name_to_handle(p: &Path) -> Handle {
    let mut h = Handle {
        handle_bytes: 128,
        handle_type: 0,
        f_handle: [0; 128],
    };
    let path = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut mount_id = 0;
    // SAFETY: a valid path, a handle buffer of the size it declares and
    // a valid out pointer.
    let r = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            path.as_ptr(),
            (&mut h as *mut Handle).cast::<libc::file_handle>(),
            &mut mount_id,
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "name_to_handle_at {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    h
}

/// open_by_handle_at on the mount of `mount_fd`: the open file, or the errno.
fn open_by_handle(mount_fd: &File, h: &mut Handle, flags: i32) -> Result<File, i32> {
    use std::os::unix::io::FromRawFd;
    // SAFETY: a valid fd and a handle that name_to_handle_at filled.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            (h as *mut Handle).cast::<libc::file_handle>(),
            flags,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Drops the kernel's unused dentries and inodes (FUSE sends FORGET).
fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop_caches (needs root)");
}

/// generic/426, 467, 477: a file handle outlives the kernel's cache of its
/// inode (drop_caches, a new client process after umount/mount): the
/// kernel looks the node id up as "." and a directory's parents as ".."
/// (FUSE_EXPORT_SUPPORT), and gets the same file back, with its content
/// and, for a directory, its path. A handle to a file that was removed is
/// stale (ESTALE), also when the file was still open at the time.
#[test]
fn file_handles_outlive_the_kernel_cache() {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut tc = TestCluster::start(1, 3);
    let m = tc.mnt();
    std::fs::create_dir_all(m.join("d/sub/deeper")).unwrap();
    let content = data(300_000, 426);
    std::fs::write(m.join("d/sub/f"), &content).unwrap();
    std::fs::write(m.join("d/gone"), b"removed").unwrap();
    std::fs::write(m.join("d/gone-open"), b"removed while open").unwrap();
    let mut hf = name_to_handle(&m.join("d/sub/f"));
    let mut hd = name_to_handle(&m.join("d/sub/deeper"));
    let mut hg = name_to_handle(&m.join("d/gone"));
    let mut ho = name_to_handle(&m.join("d/gone-open"));
    let f_ino = meta(&m.join("d/sub/f")).ino();
    let d_ino = meta(&m.join("d/sub/deeper")).ino();
    std::fs::remove_file(m.join("d/gone")).unwrap();
    let held = File::open(m.join("d/gone-open")).unwrap();
    std::fs::remove_file(m.join("d/gone-open")).unwrap();
    // Still open: the kernel has the inode and the handle opens it.
    let mut mount_fd = File::open(&m).unwrap();
    let mut s = String::new();
    open_by_handle(&mount_fd, &mut ho, libc::O_RDONLY)
        .expect("handle to an unlinked open file")
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "removed while open");
    drop(held);

    let check = |mount_fd: &File, hf: &mut Handle, hd: &mut Handle, dir_path: &Path| {
        let mut f = open_by_handle(mount_fd, hf, libc::O_RDONLY).expect("file handle");
        assert_eq!(f.metadata().unwrap().ino(), f_ino);
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert!(got == content, "content read through the handle differs");
        let d = open_by_handle(mount_fd, hd, libc::O_RDONLY | libc::O_DIRECTORY)
            .expect("directory handle");
        assert_eq!(d.metadata().unwrap().ino(), d_ino);
        // The kernel connected the directory to the tree through "..".
        let path = std::fs::read_link(format!("/proc/self/fd/{}", d.as_raw_fd())).unwrap();
        assert_eq!(path, dir_path);
    };

    // Same client, kernel caches dropped.
    drop_caches();
    check(&mount_fd, &mut hf, &mut hd, &m.join("d/sub/deeper"));
    drop_caches();
    assert_eq!(
        open_by_handle(&mount_fd, &mut hg, libc::O_RDONLY).err(),
        Some(libc::ESTALE),
        "handle to a removed file"
    );
    // The kernel keeps the inode until the client answered the release
    // that close(2) sent without waiting: stale once that is done.
    assert!(
        wait_until(Duration::from_secs(20), || {
            drop_caches();
            open_by_handle(&mount_fd, &mut ho, libc::O_RDONLY).err() == Some(libc::ESTALE)
        }),
        "handle to a file removed while open, now closed"
    );

    // A new client process, after the parent directory was renamed.
    std::fs::rename(m.join("d/sub"), m.join("d/moved")).unwrap();
    drop(mount_fd);
    tc.c().unmount();
    tc.c().mount().unwrap();
    mount_fd = File::open(&m).unwrap();
    check(&mount_fd, &mut hf, &mut hd, &m.join("d/moved/deeper"));
    assert_eq!(
        open_by_handle(&mount_fd, &mut hg, libc::O_RDONLY).err(),
        Some(libc::ESTALE),
        "handle to a removed file, new client"
    );
    // A removed directory's handle is stale too.
    std::fs::remove_dir(m.join("d/moved/deeper")).unwrap();
    drop_caches();
    assert_eq!(
        open_by_handle(&mount_fd, &mut hd, libc::O_RDONLY).err(),
        Some(libc::ESTALE),
        "handle to a removed directory"
    );
}

#[test]
fn a_running_executable_is_neither_opened_for_writing_nor_truncated() {
    use std::io::Read;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tc = TestCluster::start(1, 3);
    let exe = tc.mnt().join("cat");
    let original = std::fs::read("/usr/bin/cat").expect("read /usr/bin/cat");
    std::fs::write(&exe, &original).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    // cat blocks reading its stdin until the checks are done.
    let mut child = Command::new(&exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("exec a copy of cat from the mount");
    let try_open = |flags: i32| {
        OpenOptions::new()
            .read(flags & libc::O_ACCMODE != libc::O_WRONLY)
            .write(flags & libc::O_ACCMODE != libc::O_RDONLY)
            .custom_flags(flags & libc::O_TRUNC)
            .open(&exe)
            .map(drop)
            .map_err(|e| e.raw_os_error())
    };
    assert_eq!(try_open(libc::O_WRONLY), Err(Some(libc::ETXTBSY)));
    assert_eq!(try_open(libc::O_RDWR), Err(Some(libc::ETXTBSY)));
    // The kernel refuses this one only after opening the file: the open
    // must not have emptied the cached image the process runs from.
    assert_eq!(
        try_open(libc::O_RDONLY | libc::O_TRUNC),
        Err(Some(libc::ETXTBSY))
    );
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"still running\n").unwrap();
    drop(stdin);
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "the running copy of cat died: {status:?}");
    assert_eq!(out, "still running\n");
    assert!(
        std::fs::read(&exe).unwrap() == original,
        "the executable changed"
    );
    // Not running any more: O_TRUNC empties it, read-only or not (Linux).
    try_open(libc::O_RDONLY | libc::O_TRUNC).expect("open with O_TRUNC");
    assert_eq!(meta(&exe).len(), 0);
}
