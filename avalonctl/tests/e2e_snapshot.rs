//! Directory snapshots through real mounts:
//! - `mkdir DIR/.snap/NAME` while another mount has a file open with
//!   buffered writes: the snapshot holds its data up to that moment, not
//!   what it writes after;
//! - the snapshot reads the same, from both mounts, while the live tree
//!   is overwritten, truncated, unlinked and renamed, and after a kill of
//!   the MDS leader; every change inside it fails with EROFS; `.snap` is
//!   not listed by readdir but can be looked up;
//! - `avalonctl snapshot create|ls|rm` and `rmdir DIR/.snap/NAME`: once
//!   both snapshots are gone, the OSDs have freed the clones only they
//!   kept (and the chunks of the file unlinked meanwhile).

mod common;

use common::{
    data, leader, run, user_xattrs, wait_converged, wait_until, SecondMount, TestCluster,
};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MIB: usize = 1 << 20;

fn ctl(args: &[&str]) -> String {
    run(Command::new(avalonctl::local_cluster::default_bin_dir().join("avalonctl")).args(args))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Snapshot clone files of `ino` on every OSD of the cluster in `dir`.
fn clones(dir: &Path, ino: u64) -> usize {
    let prefix = format!("{ino:016x}.");
    (1..=3)
        .map(|n| {
            let top = dir.join(format!("osd{n}/chunks/snaps"));
            let Ok(buckets) = std::fs::read_dir(&top) else {
                return 0;
            };
            buckets
                .flatten()
                .flat_map(|b| std::fs::read_dir(b.path()).into_iter().flatten().flatten())
                .filter(|f| {
                    let name = f.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with(&prefix) && !name.contains(".meta") && !name.ends_with(".tmp")
                })
                .count()
        })
        .sum()
}

/// The chunk files (heads) of `ino` on every OSD.
fn chunks(dir: &Path, ino: u64) -> Vec<PathBuf> {
    (1..=3)
        .flat_map(|n| {
            avalon_osd::chunk_store::files_of(&dir.join(format!("osd{n}/chunks")), ino)
                .unwrap_or_default()
        })
        .collect()
}

fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// What the snapshot at `snap` must show (files by path, contents).
fn check_snapshot(snap: &Path, want: &[(&str, &[u8])]) {
    for (name, bytes) in want {
        let got = std::fs::read(snap.join(name))
            .unwrap_or_else(|e| panic!("read {}: {e}", snap.join(name).display()));
        assert_eq!(got.len(), bytes.len(), "{name} in {}", snap.display());
        assert!(got == *bytes, "{name} in {} differs", snap.display());
    }
    assert_eq!(
        std::fs::read_link(snap.join("link")).expect("readlink"),
        Path::new("a")
    );
    let mut names: Vec<String> = std::fs::read_dir(snap)
        .expect("readdir snapshot")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "gone", "link", "open.bin", "sub"]);
}

#[test]
fn snapshot_is_consistent_read_only_survives_failover_and_frees_its_clones() {
    let mut tc = TestCluster::start(3, 3);
    let dir = tc.dir.path().to_path_buf();
    let mnt = tc.mnt();
    let m2 = SecondMount::new(tc.c(), dir.join("m2"));
    let proj = mnt.join("proj");
    std::fs::create_dir_all(proj.join("sub")).expect("mkdir");
    let a = data(MIB + 5, 1);
    let b = data(3 * MIB, 2);
    let gone = data(2 * MIB, 3);
    std::fs::write(proj.join("a"), &a).expect("write a");
    std::fs::write(proj.join("sub/b"), &b).expect("write b");
    std::fs::write(proj.join("gone"), &gone).expect("write gone");
    std::os::unix::fs::symlink("a", proj.join("link")).expect("symlink");
    let tag = |p: &Path, v: &str| {
        avalonctl::dir_quota::set(p, "user.tag", Some(v.as_bytes())).expect("setxattr")
    };
    tag(&proj.join("a"), "before");
    tag(&proj.join("sub"), "dir");

    // The other mount writes a file and keeps it open: what it wrote is
    // buffered in that client when the snapshot is taken.
    let before = data(2 * MIB, 4);
    let after = data(MIB, 5);
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(m2.path.join("proj/open.bin"))
        .expect("open on m2");
    w.write_all(&before).expect("write before");

    std::fs::create_dir(proj.join(".snap/s1")).expect("mkdir .snap/s1");
    w.write_all(&after).expect("write after");
    w.sync_all().expect("fsync");
    drop(w);

    let snap = proj.join(".snap/s1");
    let want: Vec<(&str, &[u8])> = vec![
        ("a", a.as_slice()),
        ("sub/b", b.as_slice()),
        ("gone", gone.as_slice()),
        ("open.bin", before.as_slice()),
    ];
    check_snapshot(&snap, &want);
    let live: Vec<u8> = [before.clone(), after.clone()].concat();
    assert!(std::fs::read(proj.join("open.bin")).expect("read live") == live);
    // `.snap` is looked up but not listed.
    assert!(std::fs::metadata(proj.join(".snap"))
        .expect("stat .snap")
        .is_dir());
    assert!(std::fs::read_dir(&proj)
        .expect("readdir")
        .all(|e| e.expect("entry").file_name() != ".snap"));
    let listed: Vec<String> = std::fs::read_dir(proj.join(".snap"))
        .expect("readdir .snap")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, ["s1"]);
    // Snapshot inodes do not collide with the live ones.
    let ino = |p: &Path| std::fs::metadata(p).expect("stat").ino();
    assert_ne!(ino(&snap.join("a")), ino(&proj.join("a")));

    // The live tree changes; the snapshot does not.
    let ino_a = ino(&proj.join("a"));
    let ino_b = ino(&proj.join("sub/b"));
    let ino_gone = ino(&proj.join("gone"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(proj.join("a"))
        .expect("open a");
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.write_all(&data(MIB + 5, 9)).expect("overwrite a");
    drop(f);
    std::fs::OpenOptions::new()
        .write(true)
        .open(proj.join("sub/b"))
        .expect("open b")
        .set_len(1000)
        .expect("truncate b");
    std::fs::remove_file(proj.join("gone")).expect("unlink gone");
    std::fs::rename(proj.join("sub"), proj.join("sub2")).expect("rename sub");
    std::fs::write(proj.join("new"), b"new").expect("create new");
    tag(&proj.join("a"), "after");
    check_snapshot(&snap, &want);
    check_snapshot(&m2.path.join("proj/.snap/s1"), &want);
    // Extended attributes as they were.
    let xa = |v: &str| vec![("user.tag".to_string(), v.as_bytes().to_vec())];
    assert_eq!(user_xattrs(&snap.join("a")), xa("before"));
    assert_eq!(user_xattrs(&snap.join("sub")), xa("dir"));
    assert_eq!(user_xattrs(&snap.join("sub/b")), vec![]);
    assert_eq!(user_xattrs(&proj.join("a")), xa("after"));

    // Read-only: every change inside fails with EROFS.
    let erofs = libc::EROFS;
    assert_eq!(
        errno_of(std::fs::OpenOptions::new().write(true).open(snap.join("a"))),
        erofs
    );
    assert_eq!(errno_of(std::fs::write(snap.join("x"), b"x")), erofs);
    assert_eq!(errno_of(std::fs::remove_file(snap.join("a"))), erofs);
    assert_eq!(
        errno_of(std::fs::rename(snap.join("a"), snap.join("c"))),
        erofs
    );
    assert_eq!(errno_of(std::fs::create_dir(snap.join("d"))), erofs);
    assert_eq!(errno_of(std::fs::remove_dir(snap.join("sub"))), erofs);
    assert_eq!(
        errno_of(std::os::unix::fs::symlink("a", snap.join("l2"))),
        erofs
    );
    assert_eq!(
        errno_of(std::fs::set_permissions(
            snap.join("a"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600)
        )),
        erofs
    );

    // A second snapshot through avalonctl, after the changes.
    let out = ctl(&["snapshot", "create", "/proj", "s2", "--cluster", s(&dir)]);
    assert!(out.contains("/proj/.snap/s2"), "{out}");
    let ls = ctl(&["snapshot", "ls", "/proj", "--cluster", s(&dir)]);
    assert!(
        ls.contains("/proj/.snap/s1") && ls.contains("/proj/.snap/s2"),
        "{ls}"
    );
    assert_eq!(
        std::fs::read(proj.join(".snap/s2/sub2/b")).expect("read s2"),
        b[..1000].to_vec()
    );

    // The overwrite kept the old chunk as a clone; the unlinked file's
    // data stays as clones once the GC deleted its chunks.
    assert!(
        wait_until(Duration::from_secs(60), || {
            chunks(&dir, ino_gone).is_empty() && clones(&dir, ino_gone) > 0
        }),
        "unlinked file: chunks {:?}, clones {}",
        chunks(&dir, ino_gone),
        clones(&dir, ino_gone)
    );
    assert!(clones(&dir, ino_a) > 0, "no clone of the overwritten file");
    assert!(clones(&dir, ino_b) > 0, "no clone of the truncated file");

    // Kept in the Raft state: a new leader serves it.
    let victim = leader(tc.c());
    tc.c().kill_mds(victim);
    let new = leader(tc.c());
    assert_ne!(new, victim);
    check_snapshot(&snap, &want);
    check_snapshot(&m2.path.join("proj/.snap/s1"), &want);
    tc.c().restart_mds(victim).expect("restart killed MDS");
    wait_converged(tc.c(), Duration::from_secs(120));

    // Removing both frees what only they kept.
    std::fs::remove_dir(&snap).expect("rmdir .snap/s1");
    assert!(!snap.exists());
    ctl(&["snapshot", "rm", "/proj", "s2", "--cluster", s(&dir)]);
    let ls = ctl(&["snapshot", "ls", "--cluster", s(&dir)]);
    assert_eq!(ls.lines().count(), 1, "only the header: {ls}");
    assert!(
        wait_until(Duration::from_secs(60), || {
            [ino_a, ino_b, ino_gone]
                .iter()
                .all(|&i| clones(&dir, i) == 0)
        }),
        "clones left: a {}, b {}, gone {}",
        clones(&dir, ino_a),
        clones(&dir, ino_b),
        clones(&dir, ino_gone)
    );
    assert!(chunks(&dir, ino_gone).is_empty());
    // The live tree is whole.
    assert_eq!(
        std::fs::read(proj.join("a")).expect("read a"),
        data(MIB + 5, 9)
    );
    assert_eq!(
        std::fs::read(proj.join("sub2/b")).expect("read b"),
        b[..1000].to_vec()
    );
    drop(m2);
}
