use super::*;
use crate::command::{Layout, MetaCommand, Op, Reply};
use crate::namespace::{State, RENAME_EXCHANGE};
use proptest::prelude::*;

/// Applies `op` as a command stamped `now` (also used by the trash tests).
pub(crate) fn run_at(s: &mut State, now: i64, op: Op) -> Result<Reply, i32> {
    s.apply(&MetaCommand {
        now_ns: now,
        session_id: 0,
        request_id: 0,
        op,
    })
    .0
}

fn run(s: &mut State, op: Op) -> Result<Reply, i32> {
    run_at(s, 1_000, op)
}

fn ino(r: Result<Reply, i32>) -> u64 {
    match r {
        Ok(Reply::Attr(a)) => a.ino,
        other => panic!("expected attributes, got {other:?}"),
    }
}

fn mkdir(s: &mut State, parent: u64, name: &str) -> Result<Reply, i32> {
    run(
        s,
        Op::Mkdir {
            parent,
            name: name.into(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        },
    )
}

fn mknod(s: &mut State, parent: u64, name: &str) -> Result<Reply, i32> {
    run(
        s,
        Op::Mknod {
            parent,
            name: name.into(),
            mode: libc::S_IFREG | 0o644,
            rdev: 0,
            uid: 0,
            gid: 0,
            exclusive: true,
            layout: Layout::default(),
        },
    )
}

fn write(s: &mut State, ino: u64, size: u64) -> Result<Reply, i32> {
    run(s, Op::CommitWrite { ino, size })
}

fn truncate(s: &mut State, ino: u64, size: u64) -> Result<Reply, i32> {
    run(
        s,
        Op::SetAttr {
            ino,
            mode: None,
            uid: None,
            gid: None,
            size: Some(size),
            atime: None,
            mtime: None,
            ctime_ns: None,
        },
    )
}

fn rename(s: &mut State, p: u64, n: &str, np: u64, nn: &str, flags: u32) -> Result<Reply, i32> {
    run(
        s,
        Op::Rename {
            parent: p,
            name: n.into(),
            new_parent: np,
            new_name: nn.into(),
            flags,
            guard: None,
        },
    )
}

fn setx(s: &mut State, ino: u64, name: &[u8], value: &str) -> Result<Reply, i32> {
    run(
        s,
        Op::SetXattr {
            ino,
            name: name.to_vec(),
            value: value.into(),
            flags: 0,
        },
    )
}

/// (rbytes, rfiles, rsubdirs) of `dir`.
fn counts(s: &State, dir: u64) -> (u64, u64, u64) {
    let st = stats(s, dir);
    (st.rbytes, st.rfiles, st.rsubdirs)
}

/// The incremental table matches a walk of every live directory.
fn check(s: &State) {
    for (d, i) in &s.inodes {
        if !i.is_dir() || i.attr.nlink == 0 {
            continue;
        }
        let want = compute(s, *d);
        let got = stats(s, *d);
        assert_eq!(
            (got.rbytes, got.rfiles, got.rsubdirs),
            (want.rbytes, want.rfiles, want.rsubdirs),
            "directory {d}"
        );
        assert!(got.rctime >= want.rctime, "rctime of {d}");
    }
    // Each linked non-directory has one of its links' directories as
    // primary; an unlinked one has none.
    for (n, i) in &s.inodes {
        if i.is_dir() {
            continue;
        }
        if i.attr.nlink == 0 {
            assert_eq!(i.parent, 0, "inode {n}");
        } else {
            assert!(
                s.dentries.get_key_value(&(i.parent, Vec::new())).is_none()
                    && s.dentries
                        .iter()
                        .any(|((d, _), e)| e.ino == *n && *d == i.parent),
                "inode {n}: primary {} is not one of its directories",
                i.parent
            );
        }
    }
}

#[test]
fn creates_writes_and_removes_add_up_to_the_root() {
    let mut s = State::new();
    let a = ino(mkdir(&mut s, ROOT_INO, "a"));
    let b = ino(mkdir(&mut s, a, "b"));
    let f = ino(mknod(&mut s, b, "f"));
    write(&mut s, f, 1000).expect("write");
    assert_eq!(counts(&s, b), (1000, 1, 0));
    assert_eq!(counts(&s, a), (1000, 1, 1));
    assert_eq!(counts(&s, ROOT_INO), (1000, 1, 2));
    truncate(&mut s, f, 10).expect("truncate");
    assert_eq!(counts(&s, ROOT_INO), (10, 1, 2));
    run(
        &mut s,
        Op::Symlink {
            parent: a,
            name: "l".into(),
            target: b"abcd".to_vec(),
            uid: 0,
            gid: 0,
        },
    )
    .expect("symlink");
    assert_eq!(counts(&s, a), (14, 2, 1));
    run(
        &mut s,
        Op::Unlink {
            parent: b,
            name: "f".into(),
            guard: None,
        },
    )
    .expect("unlink");
    assert_eq!(counts(&s, ROOT_INO), (4, 1, 2));
    run(
        &mut s,
        Op::Rmdir {
            parent: a,
            name: "b".into(),
        },
    )
    .expect("rmdir");
    assert_eq!(counts(&s, ROOT_INO), (4, 1, 1));
    assert!(!s.rstats.dirs.contains_key(&b));
    check(&s);
}

#[test]
fn renames_move_whole_subtrees() {
    let mut s = State::new();
    let a = ino(mkdir(&mut s, ROOT_INO, "a"));
    let b = ino(mkdir(&mut s, ROOT_INO, "b"));
    let t = ino(mkdir(&mut s, a, "t"));
    let f = ino(mknod(&mut s, t, "f"));
    write(&mut s, f, 500).expect("write");
    rename(&mut s, a, "t", b, "t", 0).expect("rename dir");
    assert_eq!(counts(&s, a), (0, 0, 0));
    assert_eq!(counts(&s, b), (500, 1, 1));
    rename(&mut s, t, "f", a, "g", 0).expect("rename file");
    assert_eq!(counts(&s, a), (500, 1, 0));
    assert_eq!(counts(&s, b), (0, 0, 1));
    // Exchange a file and a directory between a and b.
    rename(&mut s, a, "g", b, "t", RENAME_EXCHANGE).expect("exchange");
    assert_eq!(counts(&s, a), (0, 0, 1));
    assert_eq!(counts(&s, b), (500, 1, 0));
    assert_eq!(counts(&s, ROOT_INO), (500, 1, 3));
    check(&s);
}

#[test]
fn hard_links_count_once_under_the_primary_directory() {
    let mut s = State::new();
    let a = ino(mkdir(&mut s, ROOT_INO, "a"));
    let b = ino(mkdir(&mut s, ROOT_INO, "b"));
    let f = ino(mknod(&mut s, a, "f"));
    write(&mut s, f, 100).expect("write");
    run(
        &mut s,
        Op::Link {
            ino: f,
            new_parent: b,
            new_name: "f2".into(),
        },
    )
    .expect("link");
    assert_eq!(counts(&s, a), (100, 1, 0));
    assert_eq!(counts(&s, b), (0, 0, 0));
    assert_eq!(counts(&s, ROOT_INO), (100, 1, 2));
    // The primary link goes: the other one becomes primary.
    run(
        &mut s,
        Op::Unlink {
            parent: a,
            name: "f".into(),
            guard: None,
        },
    )
    .expect("unlink");
    assert_eq!(counts(&s, a), (0, 0, 0));
    assert_eq!(counts(&s, b), (100, 1, 0));
    assert_eq!(s.inodes[&f].parent, b);
    // a is empty now and can go.
    run(
        &mut s,
        Op::Rmdir {
            parent: ROOT_INO,
            name: "a".into(),
        },
    )
    .expect("rmdir");
    check(&s);
}

#[test]
fn rctime_is_the_latest_change_below() {
    let mut s = State::new();
    let a = ino(run_at(
        &mut s,
        10,
        Op::Mkdir {
            parent: ROOT_INO,
            name: "a".into(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        },
    ));
    let b = ino(run_at(
        &mut s,
        20,
        Op::Mkdir {
            parent: a,
            name: "b".into(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        },
    ));
    assert_eq!(stats(&s, a).rctime, 20);
    run_at(
        &mut s,
        3_000_000_005,
        Op::SetXattr {
            ino: b,
            name: b"user.x".to_vec(),
            value: b"1".to_vec(),
            flags: 0,
        },
    )
    .expect("setxattr");
    assert_eq!(stats(&s, ROOT_INO).rctime, 3_000_000_005);
    assert_eq!(
        s.getxattr(a, RCTIME).expect("rctime"),
        b"3.000000005".to_vec()
    );
    assert_eq!(s.getxattr(a, RSUBDIRS).expect("rsubdirs"), b"1".to_vec());
    assert!(s.listxattr(a).expect("list").is_empty());
    assert_eq!(setx(&mut s, a, RBYTES, "5"), Err(libc::EPERM));
}

#[test]
fn an_old_snapshot_is_rebuilt() {
    let mut s = State::new();
    let a = ino(mkdir(&mut s, ROOT_INO, "a"));
    let f = ino(mknod(&mut s, a, "f"));
    write(&mut s, f, 42).expect("write");
    let full = postcard::to_allocvec(&s).expect("encode");
    let tail = postcard::to_allocvec(&s.rstats).expect("rstats").len()
        + postcard::to_allocvec(&s.quotas).expect("quotas").len()
        + postcard::to_allocvec(&s.trash).expect("trash").len()
        + postcard::to_allocvec(&s.snapshots)
            .expect("snapshots")
            .len();
    // A snapshot written before rstats: it ends before the later fields,
    // and its files have no primary directory.
    let mut old: State = postcard::from_bytes(&full[..full.len() - tail]).expect("decode");
    assert!(!old.rstats.ready);
    old.inodes.get_mut(&f).expect("f").parent = 0;
    assert_eq!(counts(&old, ROOT_INO), (42, 1, 1));
    mknod(&mut old, ROOT_INO, "g").expect("create");
    assert!(old.rstats.ready);
    assert_eq!(old.inodes[&f].parent, a);
    assert_eq!(counts(&old, ROOT_INO), (42, 2, 1));
    assert_eq!(counts(&old, a), (42, 1, 0));
    check(&old);
}

#[test]
fn quotas_refuse_creates_and_growth() {
    let mut s = State::new();
    let q = ino(mkdir(&mut s, ROOT_INO, "q"));
    let inner = ino(mkdir(&mut s, q, "inner"));
    setx(&mut s, q, crate::quota::MAX_FILES, "3").expect("set");
    setx(&mut s, inner, crate::quota::MAX_BYTES, "10M").expect("set");
    assert_eq!(
        s.getxattr(inner, crate::quota::MAX_BYTES).expect("get"),
        b"10485760".to_vec()
    );
    let f = ino(mknod(&mut s, inner, "f"));
    mknod(&mut s, q, "g").expect("third inode");
    assert_eq!(mknod(&mut s, inner, "h"), Err(libc::EDQUOT));
    assert_eq!(mkdir(&mut s, q, "d"), Err(libc::EDQUOT));
    // Truncates must fit; commits may pass by one window while not full.
    assert_eq!(truncate(&mut s, f, 11 << 20), Err(libc::EDQUOT));
    write(&mut s, f, 9 << 20).expect("fits");
    write(&mut s, f, 12 << 20).expect("window");
    assert_eq!(write(&mut s, f, 13 << 20), Err(libc::EDQUOT));
    assert_eq!(s.inodes[&f].attr.size, 12 << 20);
    // Raising the limit lets it grow again; 0 lifts it.
    setx(&mut s, inner, crate::quota::MAX_BYTES, "20M").expect("raise");
    write(&mut s, f, 13 << 20).expect("raised");
    setx(&mut s, q, crate::quota::MAX_FILES, "0").expect("lift");
    mknod(&mut s, inner, "h").expect("lifted");
    assert_eq!(s.getxattr(q, crate::quota::MAX_FILES), Err(libc::ENODATA));
    check(&s);
}

#[test]
fn nested_quotas_the_tightest_applies_and_renames_are_checked() {
    let mut s = State::new();
    let outer = ino(mkdir(&mut s, ROOT_INO, "outer"));
    let inner = ino(mkdir(&mut s, outer, "inner"));
    let other = ino(mkdir(&mut s, ROOT_INO, "other"));
    setx(&mut s, outer, crate::quota::MAX_BYTES, "1000").expect("set");
    setx(&mut s, inner, crate::quota::MAX_BYTES, "100000").expect("set");
    let f = ino(mknod(&mut s, inner, "f"));
    assert_eq!(truncate(&mut s, f, 2000), Err(libc::EDQUOT));
    truncate(&mut s, f, 900).expect("fits both");
    let g = ino(mknod(&mut s, other, "g"));
    truncate(&mut s, g, 200).expect("no quota there");
    assert_eq!(rename(&mut s, other, "g", inner, "g", 0), Err(libc::EDQUOT));
    // Within the same quota a rename changes nothing.
    rename(&mut s, inner, "f", outer, "f", 0).expect("rename inside");
    let base = crate::namespace::StatFs {
        total_bytes: 1 << 40,
        free_bytes: 1 << 39,
        avail_bytes: 1 << 39,
        total_inodes: 1 << 30,
        free_inodes: 1 << 30,
        block_size: 4096,
        max_name_len: 255,
    };
    let fs = crate::quota::statfs(&s, inner, base);
    assert_eq!((fs.total_bytes, fs.free_bytes), (1000, 100));
    let list = crate::quota::list(&s, ROOT_INO);
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].path, "outer");
    assert_eq!(list[1].path, "outer/inner");
    assert_eq!(list[0].stats.rbytes, 900);
    // Removing the directory drops its quota.
    run(
        &mut s,
        Op::Rmdir {
            parent: outer,
            name: "inner".into(),
        },
    )
    .expect("rmdir");
    assert_eq!(crate::quota::list(&s, ROOT_INO).len(), 1);
    check(&s);
}

/// One random namespace change, by indices into the live directories
/// and files.
#[derive(Debug, Clone)]
enum Step {
    Mkdir(usize),
    Create(usize),
    Grow(usize, u64),
    Truncate(usize, u64),
    Unlink(usize),
    Rmdir(usize),
    Rename(usize, usize, bool),
    Link(usize, usize),
    Exchange(usize, usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        any::<usize>().prop_map(Step::Mkdir),
        any::<usize>().prop_map(Step::Create),
        (any::<usize>(), 0u64..10_000).prop_map(|(a, b)| Step::Grow(a, b)),
        (any::<usize>(), 0u64..10_000).prop_map(|(a, b)| Step::Truncate(a, b)),
        any::<usize>().prop_map(Step::Unlink),
        any::<usize>().prop_map(Step::Rmdir),
        (any::<usize>(), any::<usize>(), any::<bool>()).prop_map(|(a, b, c)| Step::Rename(a, b, c)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Step::Link(a, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Step::Exchange(a, b)),
    ]
}

/// Every entry: (directory, name, inode, is_dir).
fn entries(s: &State) -> Vec<(u64, String, u64, bool)> {
    s.dentries
        .iter()
        .map(|((d, n), e)| {
            (
                *d,
                String::from_utf8_lossy(n).into_owned(),
                e.ino,
                s.inodes.get(&e.ino).is_some_and(|i| i.is_dir()),
            )
        })
        .collect()
}

fn dirs(s: &State) -> Vec<u64> {
    s.inodes
        .iter()
        .filter(|(_, i)| i.is_dir() && i.attr.nlink > 0)
        .map(|(d, _)| *d)
        .collect()
}

proptest! {
    #[test]
    fn incremental_matches_a_walk(steps in proptest::collection::vec(step(), 1..80)) {
        let mut s = State::new();
        for (n, st) in steps.into_iter().enumerate() {
            let ds = dirs(&s);
            let es = entries(&s);
            let files: Vec<_> = es.iter().filter(|e| !e.3).cloned().collect();
            let name = format!("n{n}");
            // Errors are fine (EEXIST, ENOTEMPTY...): the table must match.
            let _ = match st {
                Step::Mkdir(d) => mkdir(&mut s, ds[d % ds.len()], &name),
                Step::Create(d) => mknod(&mut s, ds[d % ds.len()], &name),
                Step::Grow(f, by) if !files.is_empty() => {
                    let f = files[f % files.len()].2;
                    let size = s.inodes[&f].attr.size + by;
                    write(&mut s, f, size)
                }
                Step::Truncate(f, to) if !files.is_empty() => {
                    truncate(&mut s, files[f % files.len()].2, to)
                }
                Step::Unlink(e) if !files.is_empty() => {
                    let (d, n, _, _) = &files[e % files.len()];
                    run(&mut s, Op::Unlink { parent: *d, name: n.clone().into_bytes(), guard: None })
                }
                Step::Rmdir(e) if !es.is_empty() => {
                    let (d, n, _, _) = &es[e % es.len()];
                    run(&mut s, Op::Rmdir { parent: *d, name: n.clone().into_bytes() })
                }
                Step::Rename(e, d, keep) if !es.is_empty() => {
                    let (p, n, _, _) = &es[e % es.len()];
                    let to = ds[d % ds.len()];
                    let nn = if keep { n.clone() } else { name.clone() };
                    rename(&mut s, *p, n, to, &nn, 0)
                }
                Step::Link(f, d) if !files.is_empty() => {
                    let f = files[f % files.len()].2;
                    run(&mut s, Op::Link { ino: f, new_parent: ds[d % ds.len()], new_name: name.into_bytes() })
                }
                Step::Exchange(a, b) if es.len() > 1 => {
                    let (p, n, _, _) = &es[a % es.len()];
                    let (q, m, _, _) = &es[b % es.len()];
                    rename(&mut s, *p, n, *q, m, RENAME_EXCHANGE)
                }
                _ => Ok(Reply::None),
            };
            check(&s);
        }
    }
}
