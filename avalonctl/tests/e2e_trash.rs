//! The trash through real mounts:
//! - `rm -rf` of a tree (files of several modes, owners, xattrs and
//!   mtimes, nested directories, a symlink) in a directory with
//!   `avalon.trash_seconds`, a kill of the MDS leader, then
//!   `avalonctl trash restore` of the top: `diff -r` against a copy and a
//!   stat/xattr walk show the tree as it was, on this mount and another;
//!   a restore never overwrites an existing name;
//! - with a short retention the space comes back by itself (status shows
//!   it, the chunks are deleted on the OSDs) while a long one keeps its
//!   data until `trash purge`.

mod common;

use avalonctl::dir_quota;
use common::{leader, run, user_xattrs, wait_converged, wait_until, SecondMount, TestCluster};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

const MIB: usize = 1 << 20;

fn ctl_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(avalonctl::local_cluster::default_bin_dir().join("avalonctl"));
    c.args(args);
    c
}

fn ctl(args: &[&str]) -> String {
    run(&mut ctl_cmd(args))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `avalonctl status --json` of the cluster in `dir`.
fn status(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&ctl(&["status", s(dir), "--json"])).expect("status json")
}

fn trash_counts(dir: &Path) -> (u64, u64) {
    let st = status(dir);
    (
        st["trash_entries"].as_u64().expect("trash_entries"),
        st["trash_bytes"].as_u64().expect("trash_bytes"),
    )
}

/// `avalonctl trash ls --json PATH`: (id, path, ino) of each entry.
fn trash_ls(dir: &Path, under: &str) -> Vec<(u64, String, u64)> {
    let out = ctl(&["trash", "ls", under, "--cluster", s(dir), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("ls json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["id"].as_u64().expect("id"),
                e["path"].as_str().expect("path").to_string(),
                e["ino"].as_u64().expect("ino"),
            )
        })
        .collect()
}

/// One file of a tree as stat(2), listxattr(2) and its contents show it.
#[derive(Debug, PartialEq, Eq)]
struct Item {
    path: String,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    xattrs: Vec<(String, Vec<u8>)>,
    /// SHA-256 of a file, a symlink's target, nothing for a directory.
    content: Vec<u8>,
}

/// Every file of the tree at `root` (itself included), by path.
fn manifest(root: &Path) -> Vec<Item> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).expect("lstat");
        let content = if md.is_dir() {
            for e in std::fs::read_dir(&p).expect("readdir") {
                stack.push(e.expect("entry").path());
            }
            Vec::new()
        } else if md.file_type().is_symlink() {
            std::fs::read_link(&p)
                .expect("readlink")
                .as_os_str()
                .as_bytes()
                .to_vec()
        } else {
            common::sha_file(&p)
        };
        out.push(Item {
            path: p
                .strip_prefix(root)
                .expect("below root")
                .display()
                .to_string(),
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            size: md.size(),
            mtime: (md.mtime(), md.mtime_nsec()),
            xattrs: user_xattrs(&p),
            content,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    dir_quota::set(p, name, Some(value)).expect("setxattr");
}

/// Sets `p`'s mtime (and atime) to `secs` + `nanos` after the epoch.
fn set_mtime(p: &Path, secs: u64, nanos: u32) {
    let t = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
    let f = std::fs::File::open(p).expect("open for utimens");
    f.set_times(std::fs::FileTimes::new().set_accessed(t).set_modified(t))
        .expect("set times");
}

/// A file with contents, owner, mode, xattrs and mtime.
fn put_file(
    p: &Path,
    len: usize,
    seed: u64,
    owner: (u32, u32),
    mode: u32,
    xattrs: &[(&str, &str)],
) {
    std::fs::write(p, common::data(len, seed)).expect("write");
    std::os::unix::fs::chown(p, Some(owner.0), Some(owner.1)).expect("chown");
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    for (n, v) in xattrs {
        set_xattr(p, n, v.as_bytes());
    }
    set_mtime(p, 1_000_000_000 + seed, (seed as u32) * 1000);
}

fn put_dir(p: &Path, owner: (u32, u32), mode: u32, xattrs: &[(&str, &str)]) {
    std::fs::create_dir(p).expect("mkdir");
    std::os::unix::fs::chown(p, Some(owner.0), Some(owner.1)).expect("chown");
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    for (n, v) in xattrs {
        set_xattr(p, n, v.as_bytes());
    }
}

/// The tree that is removed and restored.
fn build_tree(t: &Path) {
    put_dir(t, (1000, 1000), 0o755, &[("user.top", "yes")]);
    put_file(
        &t.join("a.txt"),
        1000,
        1,
        (1000, 1000),
        0o644,
        &[("user.color", "blue")],
    );
    put_file(
        &t.join("big.bin"),
        5 * MIB + 123,
        2,
        (2000, 2000),
        0o600,
        &[],
    );
    put_file(&t.join("exec.sh"), 77, 3, (1000, 100), 0o4755, &[]);
    put_file(&t.join("empty"), 0, 4, (0, 0), 0o444, &[]);
    std::os::unix::fs::symlink("a.txt", t.join("link")).expect("symlink");
    let sub = t.join("sub");
    put_dir(&sub, (1000, 1000), 0o750, &[("user.dir", "1")]);
    let deeper = sub.join("deeper");
    put_dir(&deeper, (2000, 2000), 0o700, &[]);
    put_file(
        &deeper.join("f"),
        3000,
        5,
        (2000, 2000),
        0o640,
        &[("user.a", "1"), ("user.b", "two")],
    );
    put_file(&sub.join("g"), 70_000, 6, (0, 0), 0o666, &[]);
    put_dir(&t.join("emptydir"), (0, 0), 0o1777, &[]);
    // Directories last, deepest first: their mtimes stay as set.
    set_mtime(&deeper, 1_100_000_000, 7);
    set_mtime(&sub, 1_200_000_000, 8);
    set_mtime(&t.join("emptydir"), 1_300_000_000, 9);
    set_mtime(t, 1_400_000_000, 10);
}

#[test]
fn rm_rf_survives_a_leader_kill_and_restores_identical() {
    let mut tc = TestCluster::start(3, 3);
    let dir = tc.dir.path().to_path_buf();
    let mnt = tc.mnt();
    let m2 = SecondMount::new(tc.c(), dir.join("m2"));
    let proj = mnt.join("proj");
    std::fs::create_dir(&proj).expect("mkdir proj");
    set_xattr(&proj, "avalon.trash_seconds", b"3600");
    assert_eq!(
        dir_quota::get(&proj, "avalon.trash_seconds").expect("get"),
        Some(b"3600".to_vec())
    );
    let tree = proj.join("tree");
    build_tree(&tree);
    assert_eq!(
        dir_quota::get(&tree.join("sub"), "avalon.trash_seconds").expect("get"),
        Some(b"3600".to_vec()),
        "inherited by new directories"
    );
    let before = manifest(&tree);
    assert_eq!(before.len(), 11);
    let copy = dir.join("copy");
    run(Command::new("cp").arg("-a").arg(&tree).arg(&copy));
    run(Command::new("diff").arg("-r").arg(&tree).arg(&copy));
    let files_bytes: u64 = before
        .iter()
        .filter(|i| i.mode & libc::S_IFMT == libc::S_IFREG)
        .map(|i| i.size)
        .sum();
    // What rstats count: files and symlinks (their target's length).
    let tree_bytes: u64 = before
        .iter()
        .filter(|i| i.mode & libc::S_IFMT != libc::S_IFDIR)
        .map(|i| i.size)
        .sum();
    // The other mount has the tree cached.
    assert_eq!(manifest(&m2.path.join("proj/tree")), before);

    run(Command::new("rm").arg("-rf").arg(&tree));
    assert!(!tree.exists());
    assert!(!m2.path.join("proj/tree").exists());
    assert_eq!(dir_quota::du(&proj).expect("du").rbytes, 0, "not in rstats");
    // A file a mount still had open (its release is asynchronous) enters
    // the trash when that mount closes it.
    let want = (before.len() as u64, files_bytes);
    assert!(
        wait_until(Duration::from_secs(60), || trash_counts(&dir) == want),
        "trash {:?}, want {want:?}",
        trash_counts(&dir)
    );
    let listed = trash_ls(&dir, "/proj/tree");
    assert_eq!(listed.len(), before.len(), "{listed:?}");
    assert!(ctl(&["status", s(&dir)]).contains("trash: 11 entries"));

    // Kept in the Raft state: a new leader has it.
    let victim = leader(tc.c());
    tc.c().kill_mds(victim);
    let new = leader(tc.c());
    assert_ne!(new, victim);
    assert_eq!(trash_ls(&dir, "/proj").len(), before.len());

    let top = listed
        .iter()
        .find(|(_, p, _)| p == "/proj/tree")
        .map(|(id, _, _)| *id)
        .expect("the tree's own entry");
    let out = ctl(&["trash", "restore", &top.to_string(), "--cluster", s(&dir)]);
    assert!(out.contains("restored /proj/tree (11 inodes)"), "{out}");
    run(Command::new("diff").arg("-r").arg(&tree).arg(&copy));
    assert_eq!(manifest(&tree), before, "this mount");
    assert_eq!(
        manifest(&m2.path.join("proj/tree")),
        before,
        "the other mount"
    );
    assert_eq!(trash_counts(&dir), (0, 0));
    assert_eq!(dir_quota::du(&proj).expect("du").rbytes, tree_bytes);

    // A name that exists is never overwritten.
    let x = proj.join("x");
    std::fs::write(&x, b"first").expect("write x");
    std::fs::remove_file(&x).expect("rm x");
    std::fs::write(&x, b"second").expect("write x again");
    let mut found = Vec::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            found = trash_ls(&dir, "/proj/x");
            !found.is_empty()
        }),
        "/proj/x not in the trash"
    );
    let id = found[0].0.to_string();
    let out = ctl_cmd(&["trash", "restore", &id, "--cluster", s(&dir)])
        .output()
        .expect("spawn");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/proj/x already exists"), "{err}");
    assert_eq!(std::fs::read(&x).expect("read x"), b"second");
    ctl(&[
        "trash",
        "restore",
        &id,
        "--to",
        "/proj/x.old",
        "--cluster",
        s(&dir),
    ]);
    assert_eq!(std::fs::read(proj.join("x.old")).expect("read"), b"first");
    assert_eq!(
        std::fs::read(m2.path.join("proj/x.old")).expect("read"),
        b"first"
    );

    tc.c().restart_mds(victim).expect("restart killed MDS");
    wait_converged(tc.c(), Duration::from_secs(120));
    drop(m2);
}

/// The chunk files of `ino` on every OSD of the cluster in `dir`.
fn chunks(dir: &Path, ino: u64) -> Vec<PathBuf> {
    (1..=3)
        .flat_map(|n| {
            avalon_osd::chunk_store::files_of(&dir.join(format!("osd{n}/chunks")), ino)
                .unwrap_or_default()
        })
        .collect()
}

#[test]
fn expired_entries_free_their_space_and_purge_frees_the_rest() {
    let tc = TestCluster::start(1, 3);
    let dir = tc.dir.path().to_path_buf();
    let mnt = tc.mnt();
    let keep = mnt.join("keep");
    let short = mnt.join("short");
    std::fs::create_dir(&keep).expect("mkdir");
    std::fs::create_dir(&short).expect("mkdir");
    set_xattr(&keep, "avalon.trash_seconds", b"1h");
    set_xattr(&short, "avalon.trash_seconds", b"3");
    std::fs::write(keep.join("k"), common::data(MIB, 1)).expect("write");
    std::fs::create_dir(short.join("d")).expect("mkdir");
    for (name, len) in [("s1", 2 * MIB), ("s2", 3 * MIB), ("d/s3", 5000)] {
        std::fs::write(short.join(name), common::data(len, len as u64)).expect("write");
    }
    let ino = |p: PathBuf| std::fs::metadata(p).expect("stat").ino();
    let k = ino(keep.join("k"));
    let short_inos: Vec<u64> = ["s1", "s2", "d/s3"]
        .iter()
        .map(|n| ino(short.join(n)))
        .collect();
    assert!(
        wait_until(Duration::from_secs(60), || {
            !chunks(&dir, k).is_empty() && short_inos.iter().all(|i| !chunks(&dir, *i).is_empty())
        }),
        "chunks not on the OSDs"
    );

    std::fs::remove_file(keep.join("k")).expect("rm");
    run(Command::new("rm").arg("-rf").arg(&short));
    let mut ls = String::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            ls = ctl(&["trash", "ls", "--cluster", s(&dir)]);
            ls.contains("/keep/k\n")
        }),
        "{ls}"
    );
    assert_eq!(dir_quota::du(&keep).expect("du").rbytes, 0);

    // The short retention runs out: its entries go, their chunks too.
    assert!(
        wait_until(Duration::from_secs(120), || {
            trash_counts(&dir) == (1, MIB as u64)
                && short_inos.iter().all(|i| chunks(&dir, *i).is_empty())
        }),
        "short-retention entries not freed: {:?}",
        trash_counts(&dir)
    );
    assert!(!chunks(&dir, k).is_empty(), "kept entry's data deleted");
    assert_eq!(trash_ls(&dir, "/keep")[0].2, k);

    let out = ctl(&["trash", "purge", "--all", "--cluster", s(&dir)]);
    assert!(out.contains("purged 1 entry"), "{out}");
    assert_eq!(trash_counts(&dir), (0, 0));
    assert!(
        wait_until(Duration::from_secs(60), || chunks(&dir, k).is_empty()),
        "purged entry's chunks not deleted"
    );
    assert!(trash_ls(&dir, "").is_empty());
}
