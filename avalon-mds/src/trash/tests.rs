use super::*;
use crate::command::{Layout, Op, Reply};
use crate::rstats::tests::run_at;
use crate::rstats::{compute, stats};

const SEC: i64 = 1_000_000_000;

fn ino(r: Result<Reply, i32>) -> u64 {
    match r {
        Ok(Reply::Attr(a)) => a.ino,
        other => panic!("expected attributes, got {other:?}"),
    }
}

fn mkdir(s: &mut State, now: i64, parent: u64, name: &str, mode: u32, uid: u32) -> u64 {
    ino(run_at(
        s,
        now,
        Op::Mkdir {
            parent,
            name: name.into(),
            mode,
            uid,
            gid: uid,
        },
    ))
}

fn file(s: &mut State, now: i64, parent: u64, name: &str, size: u64) -> u64 {
    let f = ino(run_at(
        s,
        now,
        Op::Mknod {
            parent,
            name: name.into(),
            mode: S_IFREG | 0o640,
            rdev: 0,
            uid: 1000,
            gid: 100,
            exclusive: true,
            layout: Layout::default(),
        },
    ));
    run_at(s, now, Op::CommitWrite { ino: f, size }).expect("write");
    f
}

fn setx(s: &mut State, ino: u64, name: &[u8], value: &str) -> Result<Reply, i32> {
    run_at(
        s,
        SEC,
        Op::SetXattr {
            ino,
            name: name.to_vec(),
            value: value.into(),
            flags: 0,
        },
    )
}

fn unlink(s: &mut State, now: i64, parent: u64, name: &str) -> Result<Reply, i32> {
    run_at(
        s,
        now,
        Op::Unlink {
            parent,
            name: name.into(),
            guard: None,
        },
    )
}

fn rmdir(s: &mut State, now: i64, parent: u64, name: &str) -> Result<Reply, i32> {
    run_at(
        s,
        now,
        Op::Rmdir {
            parent,
            name: name.into(),
        },
    )
}

fn restore(s: &mut State, now: i64, id: u64, to: Option<&str>) -> Result<Reply, i32> {
    run_at(
        s,
        now,
        Op::TrashRestore {
            id,
            to: to.map(|t| t.as_bytes().to_vec()),
        },
    )
}

fn id_of(s: &State, ino: u64) -> u64 {
    *s.trash.by_ino.get(&ino).expect("in the trash")
}

/// Everything a restore must bring back of an inode.
#[derive(Debug, PartialEq, Eq)]
struct Look {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime_ns: i64,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn look(s: &State, ino: u64) -> Look {
    let i = &s.inodes[&ino];
    Look {
        mode: i.attr.mode,
        uid: i.attr.uid,
        gid: i.attr.gid,
        size: i.attr.size,
        mtime_ns: i.attr.mtime_ns,
        xattrs: i.xattrs.clone(),
    }
}

/// The statistics table matches a walk of every live directory.
fn check_stats(s: &State) {
    for (d, i) in &s.inodes {
        if i.is_dir() && i.attr.nlink > 0 {
            let (want, got) = (compute(s, *d), stats(s, *d));
            assert_eq!(
                (got.rbytes, got.rfiles, got.rsubdirs),
                (want.rbytes, want.rfiles, want.rsubdirs),
                "directory {d}"
            );
        }
    }
}

/// /t (trash on, 60 s) with d/ (0700, uid 7) holding f1 (10 B, an
/// xattr), e/ and e/f2 (20 B); returns (t, d, e, f1, f2).
fn tree(s: &mut State) -> (u64, u64, u64, u64, u64) {
    let t = mkdir(s, SEC, ROOT_INO, "t", 0o755, 0);
    setx(s, t, TRASH_SECONDS, "60").expect("trash on");
    let d = mkdir(s, 2 * SEC, t, "d", 0o700, 7);
    let e = mkdir(s, 3 * SEC, d, "e", 0o750, 8);
    let f1 = file(s, 4 * SEC, d, "f1", 10);
    setx(s, f1, b"user.k", "v").expect("xattr");
    let f2 = file(s, 5 * SEC, e, "f2", 20);
    (t, d, e, f1, f2)
}

/// `rm -rf /t/d`: children first.
fn rm_rf(s: &mut State, t: u64, d: u64, e: u64) {
    unlink(s, 100 * SEC, e, "f2").expect("rm f2");
    rmdir(s, 101 * SEC, d, "e").expect("rmdir e");
    unlink(s, 102 * SEC, d, "f1").expect("rm f1");
    rmdir(s, 103 * SEC, t, "d").expect("rmdir d");
}

#[test]
fn retentions_parse_and_stay_on_directories() {
    assert_eq!(parse_seconds(b"60"), Ok(60));
    assert_eq!(parse_seconds(b"2h"), Ok(7200));
    assert_eq!(parse_seconds(b"1d\0"), Ok(86_400));
    assert_eq!(parse_seconds(b"0"), Ok(0));
    assert_eq!(parse_seconds(b"-1"), Err(libc::EINVAL));
    assert_eq!(parse_seconds(b"1y"), Err(libc::EINVAL));
    assert_eq!(parse_seconds(b"99999999999w"), Err(libc::EINVAL));

    let mut s = State::new();
    let t = mkdir(&mut s, SEC, ROOT_INO, "t", 0o755, 0);
    assert_eq!(s.getxattr(t, TRASH_SECONDS), Ok(b"0".to_vec()), "off");
    setx(&mut s, t, TRASH_SECONDS, "1h").expect("set");
    assert_eq!(s.getxattr(t, TRASH_SECONDS), Ok(b"3600".to_vec()));
    assert!(s.listxattr(t).expect("list").is_empty(), "not listed");
    let sub = mkdir(&mut s, SEC, t, "sub", 0o755, 0);
    assert_eq!(seconds_of(&s, sub), 3600, "inherited");
    let f = file(&mut s, SEC, t, "f", 1);
    assert_eq!(setx(&mut s, f, TRASH_SECONDS, "5"), Err(libc::EINVAL));
    assert_eq!(s.getxattr(f, TRASH_SECONDS), Err(libc::ENODATA));
    assert_eq!(setx(&mut s, t, TRASH_SECONDS, "soon"), Err(libc::EINVAL));
    setx(&mut s, sub, TRASH_SECONDS, "0").expect("off");
    assert_eq!(seconds_of(&s, sub), 0);
    run_at(
        &mut s,
        SEC,
        Op::RemoveXattr {
            ino: t,
            name: TRASH_SECONDS.to_vec(),
        },
    )
    .expect("removexattr");
    assert_eq!(seconds_of(&s, t), 0);
}

#[test]
fn rm_rf_then_restore_brings_the_tree_back_as_it_was() {
    let mut s = State::new();
    let (t, d, e, f1, f2) = tree(&mut s);
    let before: Vec<_> = [d, e, f1, f2].iter().map(|i| look(&s, *i)).collect();
    let t_stats = stats(&s, t);
    rm_rf(&mut s, t, d, e);

    // Out of the namespace and of the statistics, kept with its data.
    assert!(s.lookup(t, b"d").is_err());
    assert_eq!(stats(&s, t).rbytes, 0);
    assert_eq!(stats(&s, ROOT_INO).rfiles, 0);
    assert!(s.gc_queue.is_empty(), "nothing to delete on the OSDs");
    assert_eq!(s.trash.entries.len(), 4);
    assert_eq!(s.trash.bytes, 30);
    assert!(holds(&s, f2) && !s.inodes.contains_key(&f2));
    let listed = list(&s, "/t/d", 100);
    let paths: Vec<&str> = listed.iter().map(|l| l.path.as_str()).collect();
    assert_eq!(paths, ["/t/d/e/f2", "/t/d/e", "/t/d/f1", "/t/d"]);
    assert_eq!(listed[0].deleted_ns, 100 * SEC);
    assert_eq!(listed[0].expires_ns, 160 * SEC);
    assert!(list(&s, "/t/dx", 100).is_empty());
    check_stats(&s);

    let id_d = id_of(&s, d);
    let r = restore(&mut s, 200 * SEC, id_d, None).expect("restore");
    assert!(matches!(r, Reply::Attr(a) if a.ino == d));
    assert!(s.trash.entries.is_empty() && s.trash.bytes == 0);
    assert_eq!(s.lookup(t, b"d").map(|a| a.ino), Ok(d));
    assert_eq!(s.lookup(d, b"e").map(|a| a.ino), Ok(e));
    assert_eq!(s.lookup(d, b"f1").map(|a| a.ino), Ok(f1));
    assert_eq!(s.lookup(e, b"f2").map(|a| a.ino), Ok(f2));
    let after: Vec<_> = [d, e, f1, f2].iter().map(|i| look(&s, *i)).collect();
    assert_eq!(before, after, "modes, owners, sizes, mtimes, xattrs");
    assert_eq!(s.getattr(d).map(|a| a.nlink), Ok(3));
    assert_eq!(s.getattr(t).map(|a| a.nlink), Ok(3));
    assert_eq!(s.getattr(f1).map(|a| a.nlink), Ok(1));
    assert_eq!(s.getattr(t).map(|a| a.mtime_ns), Ok(200 * SEC), "t changed");
    let now = stats(&s, t);
    assert_eq!(
        (now.rbytes, now.rfiles, now.rsubdirs),
        (t_stats.rbytes, t_stats.rfiles, t_stats.rsubdirs)
    );
    check_stats(&s);
}

#[test]
fn a_file_restore_recreates_only_the_directories_above_it() {
    let mut s = State::new();
    let (t, d, e, f1, f2) = tree(&mut s);
    rm_rf(&mut s, t, d, e);
    let id_f2 = id_of(&s, f2);
    restore(&mut s, 200 * SEC, id_f2, None).expect("restore f2");
    assert_eq!(s.lookup(e, b"f2").map(|a| a.ino), Ok(f2));
    assert_eq!(s.lookup(t, b"d").map(|a| a.ino), Ok(d));
    assert!(s.lookup(d, b"f1").is_err(), "a sibling stays in the trash");
    assert!(holds(&s, f1));
    assert_eq!(s.trash.entries.len(), 1);
    // The rest comes back into the recreated directory.
    let id_f1 = id_of(&s, f1);
    restore(&mut s, 201 * SEC, id_f1, None).expect("restore f1");
    assert_eq!(s.lookup(d, b"f1").map(|a| a.ino), Ok(f1));
    check_stats(&s);
}

#[test]
fn a_restore_never_overwrites_and_says_where_it_cannot_go() {
    let mut s = State::new();
    let (t, _, _, f1, _) = tree(&mut s);
    let d = s.child_ino(t, b"d").expect("d");
    unlink(&mut s, 10 * SEC, d, "f1").expect("rm");
    let id = id_of(&s, f1);
    let other = file(&mut s, 11 * SEC, d, "f1", 3);
    let before = s.clone();
    assert_eq!(
        plan(&s, id, None),
        Err(RestoreError::Exists("/t/d/f1".into()))
    );
    assert_eq!(restore(&mut s, 12 * SEC, id, None), Err(libc::EEXIST));
    assert_eq!(s, before, "nothing changed");
    assert_eq!(s.lookup(d, b"f1").map(|a| a.ino), Ok(other));
    assert_eq!(
        restore(&mut s, 12 * SEC, 999, None),
        Err(libc::ENOENT),
        "no entry"
    );
    assert_eq!(
        restore(&mut s, 12 * SEC, id, Some("/nowhere/x")),
        Err(libc::ENOENT)
    );
    // --to a directory: inside it, under its own name; --to a new name.
    restore(&mut s, 12 * SEC, id, Some("/t")).expect("into /t");
    assert_eq!(s.lookup(t, b"f1").map(|a| a.ino), Ok(f1));
    unlink(&mut s, 13 * SEC, t, "f1").expect("rm again");
    let id_f1 = id_of(&s, f1);
    restore(&mut s, 14 * SEC, id_f1, Some("/t/d/old")).expect("as /t/d/old");
    assert_eq!(s.lookup(d, b"old").map(|a| a.ino), Ok(f1));
    check_stats(&s);
}

#[test]
fn a_lost_parent_needs_to() {
    let mut s = State::new();
    let (t, d, e, _, f2) = tree(&mut s);
    rm_rf(&mut s, t, d, e);
    let id_e = id_of(&s, e);
    let n = purge(&mut s, &[id_e]);
    assert_eq!(n, 2, "e and what was deleted from it");
    assert!(!holds(&s, f2));
    assert!(s.gc_queue.contains(&f2), "data freed through the GC");

    let mut s = State::new();
    let (t, d, e, f1, _) = tree(&mut s);
    rm_rf(&mut s, t, d, e);
    // The directory expires first: f1 has no place to go back to.
    let id = id_of(&s, f1);
    let did = id_of(&s, d);
    assert_eq!(purge(&mut s, &[did]), 4);
    assert_eq!(
        plan(&s, id, None),
        Err(RestoreError::NoEntry(id)),
        "purged with its directory"
    );
    let mut s = State::new();
    let (t, d, _, f1, _) = tree(&mut s);
    unlink(&mut s, 10 * SEC, d, "f1").expect("rm f1");
    // d removed without trash (turned off first): f1's directory is gone.
    setx(&mut s, t, TRASH_SECONDS, "0").expect("off");
    run_at(
        &mut s,
        11 * SEC,
        Op::Rename {
            parent: d,
            name: b"e".to_vec(),
            new_parent: t,
            new_name: b"e2".to_vec(),
            flags: 0,
            guard: None,
        },
    )
    .expect("mv e out");
    rmdir(&mut s, 12 * SEC, t, "d").expect("rmdir d");
    let id = id_of(&s, f1);
    assert_eq!(
        plan(&s, id, None),
        Err(RestoreError::NoParent("/t/d/f1".into()))
    );
    restore(&mut s, 13 * SEC, id, Some("/t/e2/f1")).expect("restore with --to");
    assert!(s.lookup(s.child_ino(t, b"e2").expect("e2"), b"f1").is_ok());
}

#[test]
fn expiry_frees_data_through_the_gc_queue() {
    let mut s = State::new();
    let (t, d, e, f1, f2) = tree(&mut s);
    rm_rf(&mut s, t, d, e);
    assert_eq!(next_expiry(&s), Some(160 * SEC));
    assert_eq!(
        run_at(&mut s, 159 * SEC, Op::TrashExpire),
        Ok(Reply::Count(0))
    );
    assert_eq!(
        run_at(&mut s, 162 * SEC, Op::TrashExpire),
        Ok(Reply::Count(3)),
        "f2, e, f1 due; d at 163 s"
    );
    assert!(s.gc_queue.contains(&f1) && s.gc_queue.contains(&f2));
    assert_eq!(s.trash.bytes, 0);
    assert_eq!(
        run_at(&mut s, 500 * SEC, Op::TrashExpire),
        Ok(Reply::Count(1))
    );
    assert!(s.trash.entries.is_empty() && s.trash.children.is_empty());
    assert!(s.trash.by_ino.is_empty() && s.trash.by_expiry.is_empty());
    assert_eq!(next_expiry(&s), None);
}

#[test]
fn purge_all_and_trash_off_free_at_once() {
    let mut s = State::new();
    let (t, d, e, f1, f2) = tree(&mut s);
    rm_rf(&mut s, t, d, e);
    assert_eq!(
        run_at(
            &mut s,
            SEC,
            Op::TrashPurge {
                ids: vec![],
                all: true
            }
        ),
        Ok(Reply::Count(4))
    );
    assert!(s.gc_queue.contains(&f1) && s.gc_queue.contains(&f2));
    assert!(s.trash.entries.is_empty());

    let mut s = State::new();
    let a = mkdir(&mut s, SEC, ROOT_INO, "a", 0o755, 0);
    let f = file(&mut s, SEC, a, "f", 5);
    unlink(&mut s, 2 * SEC, a, "f").expect("rm");
    assert!(s.gc_queue.contains(&f), "no trash: freed");
    assert!(s.trash.entries.is_empty());
}

#[test]
fn hard_links_rename_over_and_open_files() {
    let mut s = State::new();
    let t = mkdir(&mut s, SEC, ROOT_INO, "t", 0o755, 0);
    setx(&mut s, t, TRASH_SECONDS, "60").expect("trash on");
    let f = file(&mut s, SEC, t, "f", 5);
    run_at(
        &mut s,
        SEC,
        Op::Link {
            ino: f,
            new_parent: t,
            new_name: b"g".to_vec(),
        },
    )
    .expect("link");
    unlink(&mut s, 2 * SEC, t, "f").expect("rm one link");
    assert!(s.trash.entries.is_empty(), "not the last link");
    unlink(&mut s, 3 * SEC, t, "g").expect("rm the last");
    assert!(holds(&s, f));

    // A rename over a file keeps the replaced one.
    let old = file(&mut s, 4 * SEC, t, "conf", 7);
    let new = file(&mut s, 4 * SEC, t, "conf.tmp", 8);
    run_at(
        &mut s,
        5 * SEC,
        Op::Rename {
            parent: t,
            name: b"conf.tmp".to_vec(),
            new_parent: t,
            new_name: b"conf".to_vec(),
            flags: 0,
            guard: None,
        },
    )
    .expect("rename over");
    assert_eq!(s.lookup(t, b"conf").map(|a| a.ino), Ok(new));
    assert_eq!(list(&s, "/t/conf", 100).first().map(|l| l.ino), Some(old));

    // Removed while open: an orphan first, in the trash once closed.
    let o = file(&mut s, 6 * SEC, t, "open", 9);
    run_at(
        &mut s,
        7 * SEC,
        Op::Unlink {
            parent: t,
            name: b"open".to_vec(),
            guard: Some(0),
        },
    )
    .expect("rm open");
    assert!(s.orphans.contains(&o) && s.inodes.contains_key(&o));
    assert!(holds(&s, o) && !s.trash.by_ino.contains_key(&o));
    run_at(&mut s, 8 * SEC, Op::ReclaimOrphans { inos: vec![o] }).expect("closed");
    assert!(!s.inodes.contains_key(&o) && !s.gc_queue.contains(&o));
    let l = list(&s, "/t/open", 100);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].deleted_ns, 7 * SEC);
    // A number in the trash cannot be taken by a delegated create.
    let r = run_at(
        &mut s,
        9 * SEC,
        Op::CreateAs {
            ino: o,
            parent: t,
            name: b"x".to_vec(),
            mode: S_IFREG | 0o644,
            uid: 0,
            gid: 0,
            target: None,
            layout: Layout::default(),
        },
    );
    assert_eq!(r, Err(libc::EINVAL));
}

#[test]
fn removals_in_a_delegated_batch_take_the_leaders_time() {
    let mut s = State::new();
    let t = mkdir(&mut s, SEC, ROOT_INO, "t", 0o755, 0);
    setx(&mut s, t, TRASH_SECONDS, "10").expect("trash on");
    let f = file(&mut s, SEC, t, "f", 5);
    let r = run_at(
        &mut s,
        50 * SEC,
        Op::Batch {
            ops: vec![(
                3 * SEC,
                Op::Unlink {
                    parent: t,
                    name: b"f".to_vec(),
                    guard: None,
                },
            )],
        },
    );
    assert_eq!(r, Ok(Reply::Batch(vec![0])));
    let e = &s.trash.entries[&id_of(&s, f)];
    assert_eq!(e.origin.deleted_ns, 50 * SEC);
    assert_eq!(e.origin.expires_ns, 60 * SEC);
    assert_eq!(s.trash.clock.0, None);
}

#[test]
fn survives_a_snapshot_and_an_old_snapshot_loads() {
    let mut s = State::new();
    let (t, d, e, _, _) = tree(&mut s);
    rm_rf(&mut s, t, d, e);
    let bytes = postcard::to_allocvec(&s).expect("encode");
    let back: State = postcard::from_bytes(&bytes).expect("decode");
    assert_eq!(back, s);
    assert_eq!(back.trash.entries.len(), 4);

    // A snapshot from before the trash ends before its field.
    let tail = postcard::to_allocvec(&s.trash).expect("trash").len()
        + postcard::to_allocvec(&s.snapshots)
            .expect("snapshots")
            .len();
    let old: State = postcard::from_bytes(&bytes[..bytes.len() - tail]).expect("old");
    assert!(old.trash.entries.is_empty());
    assert_eq!(old.inodes, s.inodes);
}

#[test]
fn a_directory_gets_back_the_latest_of_one_name() {
    let mut s = State::new();
    let t = mkdir(&mut s, SEC, ROOT_INO, "t", 0o755, 0);
    setx(&mut s, t, TRASH_SECONDS, "60").expect("trash on");
    let d = mkdir(&mut s, SEC, t, "d", 0o755, 0);
    let old = file(&mut s, 2 * SEC, d, "x", 1);
    unlink(&mut s, 3 * SEC, d, "x").expect("rm old");
    let new = file(&mut s, 4 * SEC, d, "x", 2);
    unlink(&mut s, 5 * SEC, d, "x").expect("rm new");
    rmdir(&mut s, 6 * SEC, t, "d").expect("rmdir");
    let id_d = id_of(&s, d);
    restore(&mut s, 7 * SEC, id_d, None).expect("restore d");
    assert_eq!(s.lookup(d, b"x").map(|a| a.ino), Ok(new));
    assert!(holds(&s, old), "the older one stays in the trash");
    assert_eq!(s.trash.bytes, 1);
    // The directory's mtime: before the first deletion it brought back.
    assert_eq!(s.getattr(d).map(|a| a.mtime_ns), Ok(4 * SEC));
    check_stats(&s);
}

#[test]
fn a_restore_counts_against_the_quota_where_it_lands() {
    let mut s = State::new();
    let (t, d, e, f1, f2) = tree(&mut s);
    rm_rf(&mut s, t, d, e);
    // While in the trash the tree counts for nothing: t holds no bytes.
    assert_eq!(stats(&s, t).rbytes, 0);
    setx(&mut s, t, crate::quota::MAX_BYTES, "25").expect("quota");
    // d comes back with e, f1 (10 bytes) and f2 (20 bytes): 30 > 25.
    let id_d = id_of(&s, d);
    assert_eq!(restore(&mut s, 200 * SEC, id_d, None), Err(libc::EDQUOT));
    assert!(
        s.lookup(t, b"d").is_err(),
        "a refused restore changes nothing"
    );
    assert_eq!(s.trash.entries.len(), 4);
    // f2 alone (with d and e above it) fits.
    let id_f2 = id_of(&s, f2);
    restore(&mut s, 201 * SEC, id_f2, None).expect("restore f2");
    assert_eq!(stats(&s, t).rbytes, 20);
    // An inode quota counts what comes back too.
    let u = mkdir(&mut s, 202 * SEC, ROOT_INO, "u", 0o755, 0);
    setx(&mut s, u, crate::quota::MAX_FILES, "1").expect("quota");
    file(&mut s, 203 * SEC, u, "taken", 1);
    let id_f1 = id_of(&s, f1);
    assert_eq!(
        restore(&mut s, 204 * SEC, id_f1, Some("/u/f1")),
        Err(libc::EDQUOT)
    );
    setx(&mut s, u, crate::quota::MAX_FILES, "2").expect("raise");
    restore(&mut s, 205 * SEC, id_f1, Some("/u/f1")).expect("restore f1");
    check_stats(&s);
}
