//! Recursive statistics and directory quotas through real mounts:
//! - the `avalon.dir.*` xattrs and `avalonctl du` of a tree changed by two
//!   mounts at once (creates, writes, truncates, renames between
//!   directories) match a `find` count once quiet;
//! - a byte quota stops writers on two mounts with EDQUOT, with usage
//!   within the documented overshoot (one commit window, 4 MiB); `df` on a
//!   mount of the quota directory shows the quota; raising it lets writes
//!   continue;
//! - an inode quota refuses creates with EDQUOT; nested quotas: the
//!   tightest applies; `avalonctl quota ls` lists them;
//! - only root sets a quota: another user gets EPERM, even as the owner of
//!   the directory.

mod common;

use avalonctl::dir_quota;
use common::{run, wait_until, SecondMount, TestCluster};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The MDS's commit window (`avalon_mds::quota::WINDOW`): the documented
/// bound of the overshoot.
const WINDOW: u64 = 4 << 20;
const MIB: u64 = 1 << 20;

fn ctl(args: &[&str]) -> String {
    run(Command::new(avalonctl::local_cluster::default_bin_dir().join("avalonctl")).args(args))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// (bytes of non-directories, non-directories, directories) strictly below
/// `dir`, counted by find(1).
fn find_counts(dir: &Path) -> (u64, u64, u64) {
    let sizes = run(Command::new("find").arg(dir).args([
        "-mindepth",
        "1",
        "-not",
        "-type",
        "d",
        "-printf",
        "%s\\n",
    ]));
    let bytes = sizes
        .lines()
        .map(|l| l.trim().parse::<u64>().expect("size"))
        .sum();
    let files = sizes.lines().count() as u64;
    let dirs = run(Command::new("find")
        .arg(dir)
        .args(["-mindepth", "1", "-type", "d"]))
    .lines()
    .count() as u64;
    (bytes, files, dirs)
}

/// Latest ctime in the tree at `dir` (itself included), in ns.
fn max_ctime(dir: &Path) -> i128 {
    run(Command::new("find").arg(dir).args(["-printf", "%C@\\n"]))
        .lines()
        .map(|l| {
            let (sec, frac) = l.trim().split_once('.').unwrap_or((l.trim(), "0"));
            let frac = format!("{frac:0<9}");
            sec.parse::<i128>().expect("sec") * 1_000_000_000
                + frac[..9].parse::<i128>().expect("ns")
        })
        .max()
        .unwrap_or(0)
}

fn xattr_num(p: &Path, name: &str) -> u64 {
    let v = dir_quota::get(p, name).expect("getxattr").expect("set");
    String::from_utf8(v)
        .expect("utf-8")
        .trim()
        .parse()
        .expect("number")
}

/// The names listxattr(2) gives for `p`.
fn list_xattrs(p: &Path) -> Vec<String> {
    let c = std::ffi::CString::new(s(p)).expect("path");
    let mut buf = vec![0u8; 65536];
    // SAFETY: c is NUL-terminated; buf is valid for its length.
    let n = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "listxattr: {}", std::io::Error::last_os_error());
    buf.truncate(n as usize);
    buf.split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

/// A mount of a subdirectory of the cluster (`SOURCE:/sub`).
struct SubMount {
    path: PathBuf,
}

impl SubMount {
    fn new(c: &avalonctl::local_cluster::LocalCluster, sub: &str, path: PathBuf) -> SubMount {
        std::fs::create_dir_all(&path).expect("mount point");
        let source = format!("{}{sub}", c.layout.source());
        let opts = format!(
            "log={},{}",
            path.with_extension("log").display(),
            avalonctl::local_cluster::mount_key_option(&c.dir, &c.layout)
        );
        run(
            Command::new(avalonctl::local_cluster::default_bin_dir().join("avalon-fuse"))
                .arg(&source)
                .arg(&path)
                .arg("-o")
                .arg(opts),
        );
        assert!(avalonctl::local_cluster::is_mounted(&path));
        SubMount { path }
    }
}

impl Drop for SubMount {
    fn drop(&mut self) {
        avalonctl::local_cluster::unmount(&self.path);
    }
}

/// Sets xattr `name` on `path` as uid/gid 65534 (nobody, no supplementary
/// groups) in a forked child; the errno it got, 0 on success. (No
/// setfattr binary is needed: a child calls setxattr(2) directly.)
fn set_xattr_as_nobody(path: &Path, name: &str, value: &[u8]) -> i32 {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    let n = std::ffi::CString::new(name).expect("name");
    // SAFETY: the child only makes system calls and _exits.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(65534, 65534, 65534) != 0
                || libc::setresuid(65534, 65534, 65534) != 0
            {
                libc::_exit(255);
            }
            let r = libc::setxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            );
            libc::_exit(if r == 0 { 0 } else { *libc::__errno_location() });
        },
        pid => {
            let mut status = 0;
            // SAFETY: waits for the child forked above.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert!(libc::WIFEXITED(status), "child status {status}");
            let code = libc::WEXITSTATUS(status);
            assert_ne!(code, 255, "the child could not become nobody");
            code
        }
    }
}

/// Writes to `path` in 1 MiB blocks until an error or `limit` bytes, then
/// fsyncs; returns (bytes written, the errno that stopped it, if any).
fn write_until_error(path: &Path, limit: u64, seed: u8) -> (u64, Option<i32>) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .expect("open");
    let block = vec![seed; MIB as usize];
    let mut n = 0;
    let mut err = None;
    while n < limit {
        match f.write_all(&block) {
            Ok(()) => n += MIB,
            Err(e) => {
                err = e.raw_os_error();
                break;
            }
        }
    }
    if let Err(e) = f.sync_all() {
        err = err.or(e.raw_os_error());
    }
    (n, err)
}

#[test]
fn rstats_match_find_after_concurrent_changes_on_two_mounts() {
    let mut t = TestCluster::start(1, 3);
    let m1 = t.mnt();
    let p2 = t.dir.path().join("m2");
    let m2 = SecondMount::new(t.c(), p2);
    let r1 = m1.join("r");
    for d in ["a", "b", "c", "c/deep/er"] {
        std::fs::create_dir_all(r1.join(d)).expect("mkdir");
    }
    let r2 = m2.path.join("r");

    // Four workers, two per mount: creates with writes, truncates,
    // renames of files and directories between directories.
    std::thread::scope(|sc| {
        let (r1, r2) = (&r1, &r2);
        sc.spawn(move || {
            for i in 0..40u64 {
                let p = r1.join(format!("a/f{i}"));
                std::fs::write(&p, common::data((i * 3001 % 70_000) as usize, i)).expect("write");
                if i % 5 == 0 {
                    std::fs::rename(&p, r1.join(format!("c/deep/f{i}"))).expect("rename");
                }
            }
        });
        sc.spawn(move || {
            for i in 0..40u64 {
                let p = r2.join(format!("b/g{i}"));
                std::fs::write(&p, common::data((i * 7919 % 150_000) as usize, i + 100))
                    .expect("write");
                if i % 3 == 0 {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .expect("open")
                        .set_len(i * 10)
                        .expect("truncate");
                }
                if i % 7 == 0 {
                    std::fs::rename(&p, r2.join(format!("a/g{i}"))).expect("rename");
                }
            }
        });
        sc.spawn(move || {
            for i in 0..15u64 {
                let d = r1.join(format!("b/d{i}"));
                std::fs::create_dir_all(d.join("sub")).expect("mkdir");
                std::fs::write(d.join("sub/x"), common::data(4096 + i as usize, i)).expect("write");
                std::os::unix::fs::symlink("some/target", d.join("link")).expect("symlink");
                if i % 2 == 0 {
                    std::fs::rename(&d, r1.join(format!("c/d{i}"))).expect("rename dir");
                }
            }
        });
        sc.spawn(move || {
            for i in 0..20u64 {
                let p = r2.join(format!("c/deep/er/h{i}"));
                let mut f = std::fs::File::create(&p).expect("create");
                f.write_all(&common::data(100_000, i + 7)).expect("write");
                f.sync_all().expect("fsync");
                drop(f);
                if i % 4 == 0 {
                    std::fs::remove_file(&p).expect("unlink");
                }
            }
        });
    });

    // Quiet: every file was closed. The statistics match find's count
    // from both mounts, through the xattrs and through `avalonctl du`.
    let want = find_counts(&r1);
    assert!(want.1 > 50, "the workload made files: {want:?}");
    for (dir, other) in [(&r1, &r2), (&r1.join("c"), &r2.join("c"))] {
        let want = find_counts(dir);
        for p in [dir, other] {
            let got = (
                xattr_num(p, "avalon.dir.rbytes"),
                xattr_num(p, "avalon.dir.rfiles"),
                xattr_num(p, "avalon.dir.rsubdirs"),
            );
            assert_eq!(got, want, "statistics of {}", p.display());
        }
        let out = ctl(&["du", s(dir)]);
        let f: Vec<&str> = out.trim().split('\t').collect();
        assert_eq!(
            (
                f[0].parse::<u64>().ok(),
                f[1].parse().ok(),
                f[2].parse().ok()
            ),
            (Some(want.0), Some(want.1), Some(want.2)),
            "avalonctl du {out}"
        );
    }
    let du = dir_quota::du(&r1).expect("du");
    assert!(
        du.rctime_ns >= max_ctime(&r1),
        "rctime {} is the latest ctime below",
        du.rctime_ns
    );
    // Not listed (as CephFS does not list its ceph.dir.*), but readable.
    let listed = list_xattrs(&r1);
    assert!(
        !listed.iter().any(|n| n.starts_with("avalon.dir")),
        "listxattr: {listed:?}"
    );
    assert_eq!(xattr_num(&r1, "avalon.dir.rsubdirs"), want.2);
    // Read-only: setting one is refused.
    let e = dir_quota::set(&r1, "avalon.dir.rbytes", Some(b"1")).expect_err("read-only");
    assert!(matches!(e, dir_quota::DirQuotaError::Xattr { .. }), "{e}");

    // The root's statistics count everything too.
    let root = find_counts(&m1);
    assert_eq!(xattr_num(&m1, "avalon.dir.rfiles"), root.1);
    drop(m2);
}

#[test]
fn quotas_stop_writers_show_in_df_and_nest() {
    let mut t = TestCluster::start(1, 3);
    let m1 = t.mnt();
    let p2 = t.dir.path().join("m2");
    let m2 = SecondMount::new(t.c(), p2);
    let q1 = m1.join("q");
    std::fs::create_dir(&q1).expect("mkdir");
    let q2 = m2.path.join("q");

    // Set by xattr (as setfattr does) and read back; avalonctl agrees.
    dir_quota::set(&q1, "avalon.quota.max_bytes", Some(b"64M")).expect("set quota");
    assert_eq!(xattr_num(&q1, "avalon.quota.max_bytes"), 64 * MIB);
    assert!(wait_until(Duration::from_secs(30), || {
        dir_quota::limits(&q2).map(|l| l.max_bytes).ok() == Some(64 * MIB)
    }));
    let got = ctl(&["quota", "get", s(&q1)]);
    assert!(got.contains(&format!("of {}", 64 * MIB)), "{got}");

    // Only root sets quotas: another user gets EPERM from the MDS even on
    // a directory it owns (where the kernel's own checks let it through),
    // and no limit is set.
    let own = m1.join("nobodys");
    std::fs::create_dir(&own).expect("mkdir");
    std::os::unix::fs::chown(&own, Some(65534), Some(65534)).expect("chown");
    for name in ["avalon.quota.max_bytes", "avalon.quota.max_files"] {
        assert_eq!(
            set_xattr_as_nobody(&own, name, b"1G"),
            libc::EPERM,
            "nobody setting {name} on its own directory"
        );
        assert_eq!(dir_quota::get(&own, name).expect("get"), None);
    }
    std::fs::remove_dir(&own).expect("rmdir");

    // df on a mount of the quota directory shows the quota as the size
    // and its usage as used.
    std::fs::write(q1.join("ten"), vec![7u8; 10 * MIB as usize]).expect("write");
    let pq = t.dir.path().join("mq");
    let sub = SubMount::new(t.c(), "q", pq);
    let st = nix::sys::statvfs::statvfs(&sub.path).expect("statvfs");
    let frsize = st.fragment_size() as u64;
    assert_eq!(st.blocks() as u64 * frsize, 64 * MIB, "df size");
    let used = (st.blocks() - st.blocks_free()) as u64 * frsize;
    assert!(
        (10 * MIB..10 * MIB + frsize).contains(&used),
        "df used {used}"
    );
    let df = run(Command::new("df").arg("-B1").arg(&sub.path));
    assert!(df.contains(&(64 * MIB).to_string()), "df: {df}");
    std::fs::remove_file(q1.join("ten")).expect("rm");

    // Two writers on two mounts: both stop with EDQUOT, and what the
    // files hold stays within one window of the quota.
    let (w1, w2) = std::thread::scope(|sc| {
        let a = sc.spawn(|| write_until_error(&q1.join("w1"), 256 * MIB, 1));
        let b = sc.spawn(|| write_until_error(&q2.join("w2"), 256 * MIB, 2));
        (a.join().expect("writer 1"), b.join().expect("writer 2"))
    });
    assert_eq!(w1.1, Some(libc::EDQUOT), "writer 1 stopped by the quota");
    assert_eq!(w2.1, Some(libc::EDQUOT), "writer 2 stopped by the quota");
    let sizes = std::fs::metadata(q1.join("w1")).expect("stat").len()
        + std::fs::metadata(q1.join("w2")).expect("stat").len();
    let rbytes = xattr_num(&q1, "avalon.dir.rbytes");
    assert_eq!(rbytes, sizes, "rbytes is the files' sizes");
    assert!(
        rbytes <= 64 * MIB + WINDOW,
        "usage {rbytes} within the documented overshoot"
    );
    assert!(
        rbytes >= 64 * MIB - 2 * WINDOW,
        "usage {rbytes}: writers got near the quota"
    );
    // Nor does a truncate get past it.
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(q1.join("w1"))
        .expect("open")
        .set_len(200 * MIB)
        .expect_err("truncate past the quota");
    assert_eq!(e.raw_os_error(), Some(libc::EDQUOT));

    // Raising the quota lets writes continue.
    ctl(&["quota", "set", s(&q1), "--max-bytes", "128M"]);
    let (n, err) = write_until_error(&q2.join("w3"), 16 * MIB, 3);
    assert_eq!((n, err), (16 * MIB, None), "writes after raising the quota");

    // Inode quota: creates and mkdirs past it fail with EDQUOT.
    let n1 = q1.join("n");
    std::fs::create_dir(&n1).expect("mkdir");
    ctl(&["quota", "set", s(&n1), "--max-files", "5"]);
    for i in 0..5 {
        std::fs::write(n1.join(format!("f{i}")), b"x").expect("within the inode quota");
    }
    let e = std::fs::write(n1.join("f5"), b"x").expect_err("create past the quota");
    assert_eq!(e.raw_os_error(), Some(libc::EDQUOT));
    let e = std::fs::create_dir(q2.join("n/d")).expect_err("mkdir past the quota");
    assert_eq!(e.raw_os_error(), Some(libc::EDQUOT));
    // Moving a file in from elsewhere counts too.
    std::fs::write(m1.join("outside"), b"o").expect("write");
    let e = std::fs::rename(m1.join("outside"), n1.join("moved")).expect_err("rename in");
    assert_eq!(e.raw_os_error(), Some(libc::EDQUOT));

    // Nested: a 1M byte quota inside the 128M one is the tighter.
    dir_quota::set(&n1, "avalon.quota.max_bytes", Some(b"1M")).expect("nested");
    std::fs::remove_file(n1.join("f4")).expect("rm");
    let e = std::fs::File::create(n1.join("big"))
        .expect("create")
        .set_len(2 * MIB)
        .expect_err("the tighter quota applies");
    assert_eq!(e.raw_os_error(), Some(libc::EDQUOT));
    let pn = t.dir.path().join("mn");
    let sub_n = SubMount::new(t.c(), "q/n", pn);
    let st = nix::sys::statvfs::statvfs(&sub_n.path).expect("statvfs");
    assert_eq!(st.blocks() as u64 * st.fragment_size() as u64, MIB);
    assert_eq!(st.files() as u64, 5, "df -i shows the inode quota");

    // avalonctl quota ls lists both with usage.
    let ls = ctl(&["quota", "ls", s(&m1)]);
    let lines: Vec<&str> = ls.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("/q ") && l.contains("128.0M")),
        "{ls}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("/q/n ") && l.contains("1.0M")),
        "{ls}"
    );

    // Removing the limits lifts them.
    dir_quota::set(&n1, "avalon.quota.max_files", None).expect("removexattr");
    dir_quota::set(&n1, "avalon.quota.max_bytes", Some(b"0")).expect("lift");
    assert_eq!(
        dir_quota::get(&n1, "avalon.quota.max_files").expect("get"),
        None
    );
    std::fs::write(n1.join("f6"), vec![1u8; 2 * MIB as usize]).expect("no limit now");
    assert_eq!(
        std::fs::metadata(n1.join("f6")).expect("stat").len(),
        2 * MIB
    );
    drop(sub_n);
    drop(sub);
    drop(m2);
}
