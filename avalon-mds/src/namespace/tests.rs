use super::*;
use crate::command::{Layout, MetaCommand, Op, Reply, TimeSpec};
use proptest::prelude::*;

const T0: i64 = 1_000;

fn cmd(op: Op) -> MetaCommand {
    MetaCommand {
        now_ns: T0,
        session_id: 0,
        request_id: 0,
        op,
    }
}

fn run(s: &mut State, op: Op) -> Result<Reply, i32> {
    s.apply(&cmd(op)).0
}

/// Registers a client session (process `pid`) at the root; its id.
fn register(s: &mut State, pid: u32) -> u64 {
    let op = Op::RegisterClient {
        hostname: "h".into(),
        mountpoint: b"/mnt".to_vec(),
        pid,
        subdir: b"/".to_vec(),
    };
    match run(s, op) {
        Ok(Reply::ClientRegistered { session_id, .. }) => session_id,
        other => panic!("register: {other:?}"),
    }
}

fn attr(r: Result<Reply, i32>) -> Result<Attr, i32> {
    match r? {
        Reply::Attr(a) => Ok(a),
        _ => Err(-1),
    }
}

fn mkdir(s: &mut State, parent: u64, name: &str) -> Result<Attr, i32> {
    attr(run(
        s,
        Op::Mkdir {
            parent,
            name: name.into(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        },
    ))
}

fn mknod(s: &mut State, parent: u64, name: &str, exclusive: bool) -> Result<Attr, i32> {
    attr(run(
        s,
        Op::Mknod {
            parent,
            name: name.into(),
            mode: libc::S_IFREG | 0o644,
            rdev: 0,
            uid: 1,
            gid: 1,
            exclusive,
            layout: Layout::default(),
        },
    ))
}

fn unlink(s: &mut State, parent: u64, name: &str) -> Result<(), i32> {
    run(
        s,
        Op::Unlink {
            parent,
            name: name.into(),
            guard: None,
        },
    )
    .map(|_| ())
}

fn rmdir(s: &mut State, parent: u64, name: &str) -> Result<(), i32> {
    run(
        s,
        Op::Rmdir {
            parent,
            name: name.into(),
        },
    )
    .map(|_| ())
}

fn rename(s: &mut State, p: u64, n: &str, np: u64, nn: &str, flags: u32) -> Result<(), i32> {
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
    .map(|_| ())
}

fn link(s: &mut State, ino: u64, np: u64, nn: &str) -> Result<Attr, i32> {
    attr(run(
        s,
        Op::Link {
            ino,
            new_parent: np,
            new_name: nn.into(),
        },
    ))
}

#[test]
fn root_exists() {
    let s = State::new();
    let a = s.getattr(ROOT_INO).expect("root");
    assert_eq!(a.mode, libc::S_IFDIR | 0o755);
    assert_eq!(a.nlink, 2);
    assert_eq!(s.getattr(0), Err(libc::EINVAL));
    assert_eq!(s.getattr(99), Err(libc::ENOENT));
}

#[test]
fn create_lookup_errnos() {
    let mut s = State::new();
    let d = mkdir(&mut s, ROOT_INO, "d").expect("mkdir");
    assert_eq!(s.getattr(ROOT_INO).expect("root").nlink, 3);
    assert_eq!(mkdir(&mut s, ROOT_INO, "d"), Err(libc::EEXIST));
    let f = mknod(&mut s, d.ino, "f", true).expect("mknod");
    assert_eq!(f.chunk_size, Layout::default().chunk_size);
    assert_eq!(mknod(&mut s, d.ino, "f", true), Err(libc::EEXIST));
    assert_eq!(mknod(&mut s, d.ino, "f", false).map(|a| a.ino), Ok(f.ino));
    assert_eq!(mknod(&mut s, ROOT_INO, "d", false), Err(libc::EISDIR));
    assert_eq!(mknod(&mut s, f.ino, "x", false), Err(libc::ENOTDIR));
    assert_eq!(s.lookup(d.ino, b"f").map(|a| a.ino), Ok(f.ino));
    assert_eq!(s.lookup(d.ino, b"nope"), Err(libc::ENOENT));
    assert_eq!(s.lookup(f.ino, b"x"), Err(libc::ENOTDIR));
    assert_eq!(mkdir(&mut s, ROOT_INO, ""), Err(libc::EINVAL));
    assert_eq!(mkdir(&mut s, ROOT_INO, ".."), Err(libc::EINVAL));
    assert_eq!(mkdir(&mut s, ROOT_INO, "a/b"), Err(libc::EINVAL));
    assert_eq!(
        mkdir(&mut s, ROOT_INO, &"x".repeat(256)),
        Err(libc::ENAMETOOLONG)
    );
    assert_eq!(mkdir(&mut s, 12345, "x"), Err(libc::ENOENT));
    assert_eq!(mkdir(&mut s, 0, "x"), Err(libc::EINVAL));
    // Directory inode got a fresh generation and nlink 2.
    assert_eq!(d.nlink, 2);
    assert_ne!(d.generation, f.generation);
}

#[test]
fn unlink_rmdir_gc() {
    let mut s = State::new();
    let d = mkdir(&mut s, ROOT_INO, "d").expect("mkdir");
    let f = mknod(&mut s, d.ino, "f", true).expect("mknod");
    assert_eq!(unlink(&mut s, ROOT_INO, "d"), Err(libc::EISDIR));
    assert_eq!(rmdir(&mut s, ROOT_INO, "d"), Err(libc::ENOTEMPTY));
    assert_eq!(rmdir(&mut s, d.ino, "f"), Err(libc::ENOTDIR));
    assert_eq!(unlink(&mut s, d.ino, "nope"), Err(libc::ENOENT));
    let l = link(&mut s, f.ino, ROOT_INO, "hard").expect("link");
    assert_eq!(l.nlink, 2);
    unlink(&mut s, d.ino, "f").expect("unlink");
    assert!(s.gc_queue.is_empty());
    assert_eq!(s.getattr(f.ino).expect("still linked").nlink, 1);
    unlink(&mut s, ROOT_INO, "hard").expect("unlink");
    assert_eq!(s.getattr(f.ino), Err(libc::ENOENT));
    assert!(s.gc_queue.contains(&f.ino));
    rmdir(&mut s, ROOT_INO, "d").expect("rmdir");
    assert_eq!(s.getattr(ROOT_INO).expect("root").nlink, 2);
    run(&mut s, Op::GcDone { inos: vec![f.ino] }).expect("gc");
    assert!(s.gc_queue.is_empty());
}

#[test]
fn link_errnos() {
    let mut s = State::new();
    let d = mkdir(&mut s, ROOT_INO, "d").expect("mkdir");
    let f = mknod(&mut s, ROOT_INO, "f", true).expect("mknod");
    assert_eq!(link(&mut s, d.ino, ROOT_INO, "x"), Err(libc::EPERM));
    assert_eq!(link(&mut s, f.ino, ROOT_INO, "d"), Err(libc::EEXIST));
    assert_eq!(link(&mut s, 999, ROOT_INO, "x"), Err(libc::ENOENT));
    if let Some(i) = s.inodes.get_mut(&f.ino) {
        i.attr.nlink = LINK_MAX;
    }
    assert_eq!(link(&mut s, f.ino, ROOT_INO, "x"), Err(libc::EMLINK));
}

#[test]
fn rename_cases() {
    let mut s = State::new();
    let a = mkdir(&mut s, ROOT_INO, "a").expect("a");
    let b = mkdir(&mut s, a.ino, "b").expect("b");
    let f = mknod(&mut s, ROOT_INO, "f", true).expect("f");
    let g = mknod(&mut s, ROOT_INO, "g", true).expect("g");
    // into own subtree
    assert_eq!(
        rename(&mut s, ROOT_INO, "a", b.ino, "x", 0),
        Err(libc::EINVAL)
    );
    assert_eq!(
        rename(&mut s, ROOT_INO, "a", a.ino, "x", 0),
        Err(libc::EINVAL)
    );
    assert_eq!(
        rename(&mut s, ROOT_INO, "nope", ROOT_INO, "x", 0),
        Err(libc::ENOENT)
    );
    assert_eq!(
        rename(&mut s, ROOT_INO, "f", ROOT_INO, "g", 1),
        Err(libc::EEXIST)
    );
    assert_eq!(
        rename(&mut s, ROOT_INO, "f", ROOT_INO, "zz", 2),
        Err(libc::ENOENT)
    );
    assert_eq!(
        rename(&mut s, ROOT_INO, "f", ROOT_INO, "a", 0),
        Err(libc::EISDIR)
    );
    assert_eq!(
        rename(&mut s, ROOT_INO, "a", ROOT_INO, "f", 0),
        Err(libc::ENOTDIR)
    );
    assert_eq!(
        rename(&mut s, ROOT_INO, "f", ROOT_INO, "g", 3),
        Err(libc::EINVAL)
    );
    // same name: no-op
    rename(&mut s, ROOT_INO, "f", ROOT_INO, "f", 0).expect("noop");
    // replace g with f: g goes to GC
    rename(&mut s, ROOT_INO, "f", ROOT_INO, "g", 0).expect("replace");
    assert_eq!(s.lookup(ROOT_INO, b"g").map(|x| x.ino), Ok(f.ino));
    assert_eq!(s.lookup(ROOT_INO, b"f"), Err(libc::ENOENT));
    assert!(s.gc_queue.contains(&g.ino));
    // move dir b from a to root: nlinks follow
    rename(&mut s, a.ino, "b", ROOT_INO, "b", 0).expect("move dir");
    assert_eq!(s.getattr(a.ino).expect("a").nlink, 2);
    assert_eq!(s.getattr(ROOT_INO).expect("root").nlink, 4);
    assert_eq!(s.inodes.get(&b.ino).map(|i| i.parent), Some(ROOT_INO));
    // replace empty dir a with dir b
    rename(&mut s, ROOT_INO, "b", ROOT_INO, "a", 0).expect("replace dir");
    assert_eq!(s.getattr(a.ino), Err(libc::ENOENT));
    assert_eq!(s.getattr(ROOT_INO).expect("root").nlink, 3);
    // non-empty target
    let c = mkdir(&mut s, ROOT_INO, "c").expect("c");
    mknod(&mut s, c.ino, "x", true).expect("x");
    let e = mkdir(&mut s, ROOT_INO, "e").expect("e");
    assert_eq!(
        rename(&mut s, ROOT_INO, "e", ROOT_INO, "c", 0),
        Err(libc::ENOTEMPTY)
    );
    // exchange a file and a dir across directories
    rename(&mut s, ROOT_INO, "e", c.ino, "x", RENAME_EXCHANGE).expect("exchange");
    assert_eq!(s.lookup(c.ino, b"x").map(|x| x.ino), Ok(e.ino));
    assert_eq!(s.getattr(c.ino).expect("c").nlink, 3);
    assert_eq!(s.inodes.get(&e.ino).map(|i| i.parent), Some(c.ino));
}

#[test]
fn readdir_cookies_are_stable() {
    let mut s = State::new();
    for n in ["a", "b", "c", "d"] {
        mknod(&mut s, ROOT_INO, n, true).expect("mknod");
    }
    let (all, eof) = s.readdir(ROOT_INO, 0, 100, false).expect("readdir");
    assert!(eof);
    assert_eq!(all.len(), 4);
    assert_eq!(all[0].cookie, FIRST_COOKIE);
    let (first, eof) = s.readdir(ROOT_INO, 0, 2, true).expect("readdir");
    assert!(!eof);
    assert!(first[0].attr.is_some());
    unlink(&mut s, ROOT_INO, "c").expect("unlink");
    mknod(&mut s, ROOT_INO, "e", true).expect("mknod");
    let (rest, eof) = s
        .readdir(ROOT_INO, first[1].cookie, 100, false)
        .expect("readdir");
    assert!(eof);
    let names: Vec<_> = rest.iter().map(|e| e.name.clone()).collect();
    assert_eq!(names, vec![b"d".to_vec(), b"e".to_vec()]);
    let f = s.lookup(ROOT_INO, b"a").expect("a");
    assert_eq!(s.readdir(f.ino, 0, 10, false), Err(libc::ENOTDIR));
}

#[test]
fn setattr_symlink_xattr_commit() {
    let mut s = State::new();
    let f = mknod(&mut s, ROOT_INO, "f", true).expect("f");
    let a = attr(run(
        &mut s,
        Op::SetAttr {
            ino: f.ino,
            mode: Some(0o170_777),
            uid: Some(5),
            gid: None,
            size: Some(10),
            atime: Some(TimeSpec::Ns(7)),
            mtime: Some(TimeSpec::Now),
            ctime_ns: None,
        },
    ))
    .expect("setattr");
    assert_eq!(a.mode, libc::S_IFREG | 0o7777 & 0o170_777);
    assert_eq!((a.uid, a.size, a.atime_ns, a.mtime_ns), (5, 10, 7, T0));
    let set_size = |ino, size| Op::SetAttr {
        ino,
        mode: None,
        uid: None,
        gid: None,
        size: Some(size),
        atime: None,
        mtime: None,
        ctime_ns: None,
    };
    assert_eq!(run(&mut s, set_size(ROOT_INO, 0)), Err(libc::EISDIR));
    assert_eq!(run(&mut s, set_size(f.ino, u64::MAX)), Err(libc::EFBIG));
    let c = attr(run(
        &mut s,
        Op::CommitWrite {
            ino: f.ino,
            size: 5,
        },
    ))
    .expect("commit");
    assert_eq!(c.size, 10);
    let c = attr(run(
        &mut s,
        Op::CommitWrite {
            ino: f.ino,
            size: 50,
        },
    ))
    .expect("commit");
    assert_eq!(c.size, 50);

    let l = attr(run(
        &mut s,
        Op::Symlink {
            parent: ROOT_INO,
            name: b"l".to_vec(),
            target: b"f".to_vec(),
            uid: 0,
            gid: 0,
        },
    ))
    .expect("symlink");
    assert_eq!(s.readlink(l.ino), Ok(b"f".to_vec()));
    assert_eq!(s.readlink(f.ino), Err(libc::EINVAL));
    let too_long = Op::Symlink {
        parent: ROOT_INO,
        name: b"m".to_vec(),
        target: vec![b'x'; PATH_MAX + 1],
        uid: 0,
        gid: 0,
    };
    assert_eq!(run(&mut s, too_long), Err(libc::ENAMETOOLONG));

    let setx = |name: &[u8], value: &[u8], flags| Op::SetXattr {
        ino: f.ino,
        name: name.to_vec(),
        value: value.to_vec(),
        flags,
    };
    assert_eq!(
        run(&mut s, setx(b"user.a", b"1", XATTR_REPLACE)),
        Err(libc::ENODATA)
    );
    run(&mut s, setx(b"user.a", b"1", XATTR_CREATE)).expect("create");
    assert_eq!(
        run(&mut s, setx(b"user.a", b"2", XATTR_CREATE)),
        Err(libc::EEXIST)
    );
    run(&mut s, setx(b"user.a", b"2", XATTR_REPLACE)).expect("replace");
    assert_eq!(s.getxattr(f.ino, b"user.a"), Ok(b"2".to_vec()));
    assert_eq!(s.getxattr(f.ino, b"user.b"), Err(libc::ENODATA));
    assert_eq!(run(&mut s, setx(&[b'n'; 256], b"", 0)), Err(libc::ERANGE));
    assert_eq!(
        run(&mut s, setx(b"user.big", &vec![0; XATTR_SIZE_MAX + 1], 0)),
        Err(libc::E2BIG)
    );
    assert_eq!(s.listxattr(f.ino), Ok(vec![b"user.a".to_vec()]));
    let rm = |name: &[u8]| Op::RemoveXattr {
        ino: f.ino,
        name: name.to_vec(),
    };
    run(&mut s, rm(b"user.a")).expect("remove");
    assert_eq!(run(&mut s, rm(b"user.a")), Err(libc::ENODATA));
}

#[test]
fn creates_under_delegation_use_reserved_numbers_and_batches_apply_each_op() {
    let mut s = State::new();
    let start = match run(&mut s, Op::ReserveInos { count: 10 }) {
        Ok(Reply::Inos(i)) => i,
        other => panic!("reserve: {other:?}"),
    };
    assert_eq!(s.next_ino, start + 10);
    let create =
        |ino: u64, parent: u64, name: &str, mode: u32, target: Option<&str>| Op::CreateAs {
            ino,
            parent,
            name: name.into(),
            mode,
            uid: 7,
            gid: 8,
            target: target.map(|t| t.into()),
            layout: Layout::default(),
        };
    let r = run(
        &mut s,
        Op::Batch {
            ops: vec![
                (T0 + 1, create(start, ROOT_INO, "d", S_IFDIR | 0o750, None)),
                (T0 + 2, create(start + 1, start, "f", S_IFREG | 0o640, None)),
                (T0 + 3, create(start + 2, start, "l", S_IFLNK, Some("f"))),
                // Taken, reused, outside the range, name taken: refused.
                (T0 + 4, create(start + 1, start, "g", S_IFREG | 0o644, None)),
                (
                    T0 + 4,
                    create(start + 20, start, "g", S_IFREG | 0o644, None),
                ),
                (T0 + 4, create(start + 3, start, "f", S_IFREG | 0o644, None)),
                (
                    T0 + 4,
                    create(start + 4, start, "x", libc::S_IFIFO | 0o644, None),
                ),
                (
                    T0 + 5,
                    Op::CommitWrite {
                        ino: start + 1,
                        size: 4096,
                    },
                ),
                (
                    T0 + 6,
                    Op::Rename {
                        parent: start,
                        name: b"f".to_vec(),
                        new_parent: start,
                        new_name: b"f2".to_vec(),
                        flags: 0,
                        guard: None,
                    },
                ),
                (T0 + 7, Op::ReserveInos { count: 5 }),
                (
                    T0 + 8,
                    Op::Unlink {
                        parent: start,
                        name: b"l".to_vec(),
                        guard: None,
                    },
                ),
            ],
        },
    );
    let errnos = match r {
        Ok(Reply::Batch(e)) => e,
        other => panic!("batch: {other:?}"),
    };
    assert_eq!(
        errnos,
        vec![
            0,
            0,
            0,
            libc::EINVAL,
            libc::EINVAL,
            libc::EEXIST,
            libc::EINVAL,
            0,
            0,
            libc::EINVAL,
            0
        ]
    );
    let d = s.getattr(start).unwrap();
    assert_eq!((d.mode, d.nlink, d.uid, d.gid), (S_IFDIR | 0o750, 2, 7, 8));
    assert_eq!(d.crtime_ns, T0 + 1);
    assert_eq!(s.getattr(ROOT_INO).unwrap().nlink, 3);
    let f = s.lookup(start, b"f2").unwrap();
    assert_eq!(
        (f.ino, f.size, f.mtime_ns, f.ctime_ns),
        (start + 1, 4096, T0 + 5, T0 + 6)
    );
    assert_eq!(f.generation, 1, "a client-numbered inode has generation 1");
    assert_eq!(s.lookup(start, b"l"), Err(libc::ENOENT));
    assert_eq!(s.next_ino, start + 10, "nested reserve refused");
}

#[test]
fn dedup_and_cluster_ops() {
    let mut s = State::new();
    let c = MetaCommand {
        now_ns: T0,
        session_id: 7,
        request_id: 1,
        op: Op::Mkdir {
            parent: ROOT_INO,
            name: b"d".to_vec(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        },
    };
    let first = s.apply(&c);
    assert!(first.0.is_ok());
    assert_eq!(s.apply(&c), first, "retry answered from the dedup table");
    let reg = |osd_id| Op::RegisterOsd {
        osd_id,
        addr: "127.0.0.1:1".into(),
        capacity_bytes: 3000,
        used_bytes: 300,
        failure_domain: String::new(),
        pid: 1,
    };
    let e0 = s.map_epoch;
    let r = run(&mut s, reg(0)).expect("register");
    assert!(matches!(r, Reply::OsdRegistered { osd_id: 1, .. }));
    assert!(s.map_epoch > e0);
    let e1 = s.map_epoch;
    run(&mut s, reg(1)).expect("re-register");
    assert_eq!(s.map_epoch, e1, "same address and state: no epoch bump");
    let st = s.statfs(3);
    assert_eq!((st.total_bytes, st.free_bytes), (1000, 900));
    run(
        &mut s,
        Op::SetOsdState {
            osd_id: 1,
            state: OsdState::Down,
        },
    )
    .expect("down");
    assert_eq!(s.map_epoch, e1 + 1);
    let r = run(
        &mut s,
        Op::RegisterClient {
            hostname: "h".into(),
            mountpoint: b"/mnt".to_vec(),
            pid: 1,
            subdir: b"/d/".to_vec(),
        },
    )
    .expect("client");
    let d = s.lookup(ROOT_INO, b"d").expect("d");
    assert_eq!(
        r,
        Reply::ClientRegistered {
            session_id: 1,
            root_ino: d.ino
        }
    );
    let missing = Op::RegisterClient {
        hostname: "h".into(),
        mountpoint: vec![],
        pid: 1,
        subdir: b"/nope".to_vec(),
    };
    assert_eq!(run(&mut s, missing), Err(libc::ENOENT));
}

/// A registration under a leader-drawn id keeps that id and its owner; a
/// taken (or zero) id is refused, for the leader to draw again.
#[test]
fn sessions_take_the_random_id_they_were_given() {
    let mut s = State::new();
    let reg = |id: u64, who: Option<&str>| Op::RegisterClientWithId {
        hostname: "h".into(),
        mountpoint: b"/mnt".to_vec(),
        pid: 1,
        subdir: b"/".to_vec(),
        identity: who.map(str::to_string),
        session_id: id,
    };
    let sid = 0x9c3a_51d2_e07f_1b44;
    assert_eq!(
        run(&mut s, reg(sid, Some("client.a"))),
        Ok(Reply::ClientRegistered {
            session_id: sid,
            root_ino: ROOT_INO
        })
    );
    assert_eq!(
        s.clients.owners.get(&sid).map(String::as_str),
        Some("client.a")
    );
    assert_eq!(run(&mut s, reg(sid, Some("client.b"))), Err(libc::EEXIST));
    assert_eq!(run(&mut s, reg(0, None)), Err(libc::EEXIST));
    assert_eq!(
        s.clients.owners.get(&sid).map(String::as_str),
        Some("client.a")
    );
    assert!(run(&mut s, reg(7, None)).is_ok());
    assert!(!s.clients.owners.contains_key(&7));
}

/// A client's batch sent again (its reply lost in a failover) is answered
/// from the dedup table, not applied twice; once the session expired (and
/// its request ids with it) a batch is refused whole.
#[test]
fn a_resent_batch_applies_once_and_an_expired_session_applies_none() {
    let mut s = State::new();
    let sid = register(&mut s, 1);
    let start = match run(&mut s, Op::ReserveInos { count: 4 }) {
        Ok(Reply::Inos(i)) => i,
        other => panic!("reserve: {other:?}"),
    };
    let create = |ino: u64, name: &str| Op::CreateAs {
        ino,
        parent: ROOT_INO,
        name: name.into(),
        mode: S_IFREG | 0o644,
        uid: 0,
        gid: 0,
        target: None,
        layout: Layout::default(),
    };
    let batch = |request_id: u64, ops: Vec<Op>| MetaCommand {
        now_ns: T0,
        session_id: sid,
        request_id,
        op: Op::Batch {
            ops: ops.into_iter().map(|o| (T0, o)).collect(),
        },
    };
    // Create a, rename it to b, create a again: applied twice, the second
    // rename would move the new a over b.
    let rename = Op::Rename {
        parent: ROOT_INO,
        name: b"a".to_vec(),
        new_parent: ROOT_INO,
        new_name: b"b".to_vec(),
        flags: 0,
        guard: None,
    };
    let b1 = batch(5, vec![create(start, "a"), rename, create(start + 1, "a")]);
    let first = s.apply(&b1);
    assert_eq!(first.0, Ok(Reply::Batch(vec![0, 0, 0])));
    let before = s.clone();
    assert_eq!(s.apply(&b1), first, "answered from the dedup table");
    assert_eq!(s, before, "the resent batch changed nothing");
    assert_eq!(s.lookup(ROOT_INO, b"b").map(|a| a.ino), Ok(start));
    assert_eq!(s.lookup(ROOT_INO, b"a").map(|a| a.ino), Ok(start + 1));

    run(&mut s, Op::ExpireSession { session_id: sid }).expect("expire");
    let before = s.clone();
    assert_eq!(s.apply(&b1).0, Err(libc::ESTALE), "resent after expiry");
    let b2 = batch(6, vec![create(start + 2, "c")]);
    assert_eq!(s.apply(&b2).0, Err(libc::ESTALE), "new batch after expiry");
    assert_eq!(s, before, "an expired session's batches change nothing");
}

// ------------------------------------------------------------------ model

/// An independent model: paths to node kinds; files carry an identity so
/// hard links can be counted.
#[derive(Clone, Debug, PartialEq)]
enum MNode {
    Dir,
    File(u64),
}

type Path = Vec<u8>; // one byte per component: names are single letters

#[derive(Default)]
struct Model {
    nodes: BTreeMap<Path, MNode>,
    next: u64,
}

impl Model {
    fn walk(&self, p: &[u8]) -> Result<(), i32> {
        for i in 1..=p.len() {
            match self.nodes.get(&p[..i]) {
                None => return Err(libc::ENOENT),
                Some(MNode::File(_)) => return Err(libc::ENOTDIR),
                Some(MNode::Dir) => {}
            }
        }
        Ok(())
    }
    fn join(p: &[u8], n: u8) -> Path {
        let mut v = p.to_vec();
        v.push(n);
        v
    }
    fn has_children(&self, p: &[u8]) -> bool {
        self.nodes
            .keys()
            .any(|k| k.len() == p.len() + 1 && k.starts_with(p))
    }
    fn apply(&mut self, op: &MOp) -> Result<(), i32> {
        match op {
            MOp::Mkdir(p, n) => {
                self.walk(p)?;
                let k = Self::join(p, *n);
                if self.nodes.contains_key(&k) {
                    return Err(libc::EEXIST);
                }
                self.nodes.insert(k, MNode::Dir);
                Ok(())
            }
            MOp::Mknod(p, n, excl) => {
                self.walk(p)?;
                let k = Self::join(p, *n);
                match self.nodes.get(&k) {
                    Some(_) if *excl => Err(libc::EEXIST),
                    Some(MNode::Dir) => Err(libc::EISDIR),
                    Some(MNode::File(_)) => Ok(()),
                    None => {
                        self.next += 1;
                        self.nodes.insert(k, MNode::File(self.next));
                        Ok(())
                    }
                }
            }
            MOp::Unlink(p, n) => {
                self.walk(p)?;
                let k = Self::join(p, *n);
                match self.nodes.get(&k) {
                    None => Err(libc::ENOENT),
                    Some(MNode::Dir) => Err(libc::EISDIR),
                    Some(MNode::File(_)) => {
                        self.nodes.remove(&k);
                        Ok(())
                    }
                }
            }
            MOp::Rmdir(p, n) => {
                self.walk(p)?;
                let k = Self::join(p, *n);
                match self.nodes.get(&k) {
                    None => Err(libc::ENOENT),
                    Some(MNode::File(_)) => Err(libc::ENOTDIR),
                    Some(MNode::Dir) if self.has_children(&k) => Err(libc::ENOTEMPTY),
                    Some(MNode::Dir) => {
                        self.nodes.remove(&k);
                        Ok(())
                    }
                }
            }
            MOp::Link(p, n, p2, n2) => {
                self.walk(p)?;
                let src = self
                    .nodes
                    .get(&Self::join(p, *n))
                    .cloned()
                    .ok_or(libc::ENOENT)?;
                self.walk(p2)?;
                let MNode::File(id) = src else {
                    return Err(libc::EPERM);
                };
                let k = Self::join(p2, *n2);
                if self.nodes.contains_key(&k) {
                    return Err(libc::EEXIST);
                }
                self.nodes.insert(k, MNode::File(id));
                Ok(())
            }
            MOp::Rename(p, n, p2, n2, noreplace) => {
                self.walk(p)?;
                self.walk(p2)?;
                let sk = Self::join(p, *n);
                let dk = Self::join(p2, *n2);
                let src = self.nodes.get(&sk).cloned().ok_or(libc::ENOENT)?;
                if sk == dk {
                    return if *noreplace {
                        Err(libc::EEXIST)
                    } else {
                        Ok(())
                    };
                }
                if src == MNode::Dir && p2.starts_with(&sk) {
                    return Err(libc::EINVAL);
                }
                if let Some(dst) = self.nodes.get(&dk).cloned() {
                    if *noreplace {
                        return Err(libc::EEXIST);
                    }
                    if matches!((&src, &dst), (MNode::File(a), MNode::File(b)) if a == b) {
                        return Ok(()); // hard links of one file
                    }
                    match (&src, &dst) {
                        (MNode::Dir, MNode::File(_)) => return Err(libc::ENOTDIR),
                        (MNode::File(_), MNode::Dir) => return Err(libc::EISDIR),
                        (MNode::Dir, MNode::Dir) if self.has_children(&dk) => {
                            return Err(libc::ENOTEMPTY)
                        }
                        _ => {}
                    }
                    self.nodes.remove(&dk);
                }
                let moved: Vec<(Path, MNode)> = self
                    .nodes
                    .iter()
                    .filter(|(k, _)| k.starts_with(&sk))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                for (k, v) in moved {
                    self.nodes.remove(&k);
                    let mut nk = dk.clone();
                    nk.extend_from_slice(&k[sk.len()..]);
                    self.nodes.insert(nk, v);
                }
                Ok(())
            }
        }
    }
}

#[derive(Clone, Debug)]
enum MOp {
    Mkdir(Path, u8),
    Mknod(Path, u8, bool),
    Unlink(Path, u8),
    Rmdir(Path, u8),
    Link(Path, u8, Path, u8),
    Rename(Path, u8, Path, u8, bool),
}

/// Resolves a model path in the real state.
fn resolve(s: &State, p: &[u8]) -> Result<u64, i32> {
    let mut cur = ROOT_INO;
    for &c in p {
        let a = s.lookup(cur, &[c])?;
        if a.mode & S_IFMT != S_IFDIR {
            return Err(libc::ENOTDIR);
        }
        cur = a.ino;
    }
    Ok(cur)
}

fn apply_real(s: &mut State, op: &MOp) -> Result<(), i32> {
    let name = |n: &u8| String::from_utf8_lossy(&[*n]).into_owned();
    match op {
        MOp::Mkdir(p, n) => mkdir(s, resolve(s, p)?, &name(n)).map(|_| ()),
        MOp::Mknod(p, n, excl) => mknod(s, resolve(s, p)?, &name(n), *excl).map(|_| ()),
        MOp::Unlink(p, n) => unlink(s, resolve(s, p)?, &name(n)),
        MOp::Rmdir(p, n) => rmdir(s, resolve(s, p)?, &name(n)),
        MOp::Link(p, n, p2, n2) => {
            let dir = resolve(s, p)?;
            let ino = s.lookup(dir, &[*n])?.ino;
            let np = resolve(s, p2)?;
            link(s, ino, np, &name(n2)).map(|_| ())
        }
        MOp::Rename(p, n, p2, n2, noreplace) => {
            let a = resolve(s, p)?;
            let b = resolve(s, p2)?;
            let flags = if *noreplace { RENAME_NOREPLACE } else { 0 };
            rename(s, a, &name(n), b, &name(n2), flags)
        }
    }
}

/// Full comparison of the real state with the model.
fn check_equal(s: &State, m: &Model) {
    // Every model path resolves to the right kind, with the right nlink.
    for (p, kind) in &m.nodes {
        let (last, dir) = p.split_last().expect("non-empty path");
        let parent = resolve(s, dir).expect("model parent exists in state");
        let a = s
            .lookup(parent, &[*last])
            .expect("model path exists in state");
        match kind {
            MNode::Dir => {
                assert_eq!(a.mode & S_IFMT, S_IFDIR, "{p:?}");
                let subdirs = m
                    .nodes
                    .iter()
                    .filter(|(k, v)| {
                        k.len() == p.len() + 1 && k.starts_with(p) && **v == MNode::Dir
                    })
                    .count() as u32;
                assert_eq!(a.nlink, 2 + subdirs, "dir nlink of {p:?}");
            }
            MNode::File(id) => {
                assert_eq!(a.mode & S_IFMT, S_IFREG, "{p:?}");
                let links = m.nodes.values().filter(|v| **v == MNode::File(*id)).count() as u32;
                assert_eq!(a.nlink, links, "file nlink of {p:?}");
            }
        }
    }
    // Every directory lists exactly the model's children.
    let mut dirs: Vec<Path> = vec![vec![]];
    dirs.extend(
        m.nodes
            .iter()
            .filter(|(_, v)| **v == MNode::Dir)
            .map(|(k, _)| k.clone()),
    );
    for d in dirs {
        let ino = resolve(s, &d).expect("dir");
        let (entries, eof) = s.readdir(ino, 0, 10_000, false).expect("readdir");
        assert!(eof);
        let mut got: Vec<u8> = entries.iter().map(|e| e.name[0]).collect();
        got.sort_unstable();
        let want: Vec<u8> = m
            .nodes
            .keys()
            .filter(|k| k.len() == d.len() + 1 && k.starts_with(&d))
            .map(|k| k[d.len()])
            .collect();
        assert_eq!(got, want, "children of {d:?}");
    }
    // No inode leaks: live inodes = root + distinct model nodes.
    let mut files = BTreeSet::new();
    let mut ndirs = 0;
    for v in m.nodes.values() {
        match v {
            MNode::Dir => ndirs += 1,
            MNode::File(id) => {
                files.insert(*id);
            }
        }
    }
    assert_eq!(s.inodes.len(), 1 + ndirs + files.len());
}

fn path() -> impl Strategy<Value = Path> {
    prop::collection::vec(prop::sample::select(vec![b'a', b'b', b'c']), 0..3)
}

fn nm() -> impl Strategy<Value = u8> {
    prop::sample::select(vec![b'a', b'b', b'c'])
}

fn mop() -> impl Strategy<Value = MOp> {
    prop_oneof![
        3 => (path(), nm()).prop_map(|(p, n)| MOp::Mkdir(p, n)),
        3 => (path(), nm(), any::<bool>()).prop_map(|(p, n, e)| MOp::Mknod(p, n, e)),
        2 => (path(), nm()).prop_map(|(p, n)| MOp::Unlink(p, n)),
        2 => (path(), nm()).prop_map(|(p, n)| MOp::Rmdir(p, n)),
        2 => (path(), nm(), path(), nm()).prop_map(|(p, n, q, m)| MOp::Link(p, n, q, m)),
        4 => (path(), nm(), path(), nm(), any::<bool>())
            .prop_map(|(p, n, q, m, f)| MOp::Rename(p, n, q, m, f)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn state_machine_matches_model(ops in prop::collection::vec(mop(), 1..60)) {
        let mut s = State::new();
        let mut m = Model::default();
        for op in &ops {
            let want = m.apply(op);
            let got = apply_real(&mut s, op);
            prop_assert_eq!(got, want, "op {:?}", op);
            check_equal(&s, &m);
        }
        // Snapshot round trip keeps the state.
        let bytes = postcard::to_allocvec(&s).expect("serialize");
        let back: State = postcard::from_bytes(&bytes).expect("deserialize");
        prop_assert_eq!(back, s);
    }

    #[test]
    fn arbitrary_commands_never_panic(
        ino in 0u64..8, name in prop::collection::vec(any::<u8>(), 0..4),
        flags in 0u32..5, size in any::<u64>(), mode in any::<u32>(),
    ) {
        let mut s = State::new();
        let _ = mkdir(&mut s, ROOT_INO, "d");
        let _ = mknod(&mut s, ROOT_INO, "f", false);
        let ops = vec![
            Op::Mknod { parent: ino, name: name.clone(), mode, rdev: 0, uid: 0, gid: 0, exclusive: false, layout: Layout::default() },
            Op::Rename { parent: ino, name: name.clone(), new_parent: 1, new_name: b"d".to_vec(), flags, guard: None },
            Op::Rename { parent: 1, name: b"d".to_vec(), new_parent: ino, new_name: name.clone(), flags, guard: None },
            Op::SetAttr { ino, mode: Some(mode), uid: None, gid: None, size: Some(size), atime: None, mtime: None, ctime_ns: None },
            Op::CommitWrite { ino, size },
            Op::Link { ino, new_parent: ino, new_name: name.clone() },
            Op::SetXattr { ino, name: name.clone(), value: vec![], flags },
            Op::Rmdir { parent: ino, name: name.clone() },
            Op::Unlink { parent: ino, name: name.clone(), guard: None },
        ];
        for op in ops {
            let _ = s.apply(&cmd(op));
        }
        let _ = s.readdir(ino, size, 10, true);
        let _ = s.resolve_dir(&name);
    }
}

#[test]
fn rename_dir_over_empty_dir() {
    let mut s = State::new();
    let c = mkdir(&mut s, ROOT_INO, "c").expect("c");
    mkdir(&mut s, c.ino, "c").expect("c/c");
    mkdir(&mut s, ROOT_INO, "a").expect("a");
    rename(&mut s, ROOT_INO, "c", ROOT_INO, "a", 0).expect("rename");
    let a = s.lookup(ROOT_INO, b"a").expect("a");
    assert_eq!(a.ino, c.ino);
    assert_eq!(a.nlink, 3);
    assert_eq!(s.getattr(ROOT_INO).expect("root").nlink, 3);
}

#[test]
fn orphans_live_until_reclaimed() {
    let mut s = State::new();
    let f = mknod(&mut s, ROOT_INO, "f", true).expect("f");
    let g = mknod(&mut s, ROOT_INO, "g", true).expect("g");
    let h = mknod(&mut s, ROOT_INO, "h", true).expect("h");
    // Guard names another inode: f is kept as an orphan.
    run(
        &mut s,
        Op::Unlink {
            parent: ROOT_INO,
            name: b"f".to_vec(),
            guard: Some(0),
        },
    )
    .expect("unlink");
    assert!(s.orphans.contains(&f.ino));
    assert!(!s.gc_queue.contains(&f.ino));
    assert_eq!(s.lookup(ROOT_INO, b"f"), Err(libc::ENOENT));
    assert_eq!(s.getattr(f.ino).expect("orphan").nlink, 0);
    run(
        &mut s,
        Op::CommitWrite {
            ino: f.ino,
            size: 10,
        },
    )
    .expect("write");
    assert_eq!(link(&mut s, f.ino, ROOT_INO, "again"), Err(libc::ENOENT));
    // Guard allows deleting exactly that inode.
    run(
        &mut s,
        Op::Rename {
            parent: ROOT_INO,
            name: b"g".to_vec(),
            new_parent: ROOT_INO,
            new_name: b"h".to_vec(),
            flags: 0,
            guard: Some(h.ino),
        },
    )
    .expect("rename");
    assert!(s.gc_queue.contains(&h.ino));
    assert!(!s.orphans.contains(&h.ino));
    // Reclaim: orphan deleted, data queued; non-orphans untouched.
    run(
        &mut s,
        Op::ReclaimOrphans {
            inos: vec![f.ino, g.ino],
        },
    )
    .expect("reclaim");
    assert!(s.orphans.is_empty());
    assert_eq!(s.getattr(f.ino), Err(libc::ENOENT));
    assert!(s.gc_queue.contains(&f.ino));
    assert_eq!(s.getattr(g.ino).expect("g").nlink, 1);
}

#[test]
fn append_write_reserves_disjoint_ranges_at_the_end() {
    let mut s = State::new();
    let f = mknod(&mut s, ROOT_INO, "log", true).expect("create");
    let append = |s: &mut State, len| attr(run(s, Op::AppendWrite { ino: f.ino, len }));
    // Each reply's size is the end of the range it reserved.
    assert_eq!(append(&mut s, 100).expect("append").size, 100);
    assert_eq!(append(&mut s, 7).expect("append").size, 107);
    // A size committed by a writer moves the end on.
    run(
        &mut s,
        Op::CommitWrite {
            ino: f.ino,
            size: 1000,
        },
    )
    .expect("commit");
    let a = append(&mut s, 24).expect("append");
    assert_eq!((a.size, a.mtime_ns), (1024, T0));
    assert_eq!(append(&mut s, u64::MAX), Err(libc::EFBIG));
    assert_eq!(
        attr(run(
            &mut s,
            Op::AppendWrite {
                ino: ROOT_INO,
                len: 1
            }
        )),
        Err(libc::EISDIR)
    );
}

#[test]
fn a_conditional_commit_applies_only_on_the_size_it_expects() {
    let mut s = State::new();
    let f = mknod(&mut s, ROOT_INO, "log", true).expect("create");
    let commit_if = |s: &mut State, size, expect| {
        attr(run(
            s,
            Op::CommitWriteIf {
                ino: f.ino,
                size,
                expect,
            },
        ))
    };
    // The appender's view of the end still holds: its appends commit.
    assert_eq!(commit_if(&mut s, 30, 0).expect("commit").size, 30);
    // Another session reserved a range meanwhile: refused, size kept.
    attr(run(
        &mut s,
        Op::AppendWrite {
            ino: f.ino,
            len: 15,
        },
    ))
    .expect("append");
    assert_eq!(commit_if(&mut s, 60, 30), Err(libc::ESTALE));
    assert_eq!(s.getattr(f.ino).expect("f").size, 45);
    assert_eq!(commit_if(&mut s, 60, 45).expect("commit").size, 60);
}

#[test]
fn open_directories_are_kept_as_orphans() {
    let mut s = State::new();
    let d = mkdir(&mut s, ROOT_INO, "d").expect("d");
    let sub = mkdir(&mut s, d.ino, "sub").expect("sub");
    assert_eq!(s.dir_info(sub.ino), Ok((d.ino, FIRST_COOKIE)));
    assert_eq!(s.dir_info(ROOT_INO).map(|i| i.0), Ok(ROOT_INO));
    // The guard says someone has it open: kept with nlink 0.
    run(
        &mut s,
        Op::RmdirGuarded {
            parent: d.ino,
            name: b"sub".to_vec(),
            guard: Some(0),
        },
    )
    .expect("rmdir");
    assert!(s.orphans.contains(&sub.ino));
    assert_eq!(s.getattr(sub.ino).expect("orphan").nlink, 0);
    assert_eq!(s.getattr(d.ino).expect("d").nlink, 2);
    assert_eq!(s.lookup(d.ino, b"sub"), Err(libc::ENOENT));
    // Nothing new goes into a removed directory.
    assert_eq!(mknod(&mut s, sub.ino, "f", true), Err(libc::ENOENT));
    assert_eq!(mkdir(&mut s, sub.ino, "x"), Err(libc::ENOENT));
    let f = mknod(&mut s, d.ino, "f", true).expect("f");
    assert_eq!(
        rename(&mut s, d.ino, "f", sub.ino, "f", 0),
        Err(libc::ENOENT)
    );
    assert_eq!(s.readdir(sub.ino, 0, 10, false), Ok((vec![], true)));
    // A rename over an open empty directory keeps it too; the guard that
    // names it lets it go.
    let e = mkdir(&mut s, ROOT_INO, "e").expect("e");
    let e2 = mkdir(&mut s, ROOT_INO, "e2").expect("e2");
    run(
        &mut s,
        Op::Rename {
            parent: ROOT_INO,
            name: b"e".to_vec(),
            new_parent: ROOT_INO,
            new_name: b"d".to_vec(),
            flags: 0,
            guard: Some(0),
        },
    )
    .expect_err("d is not empty");
    run(
        &mut s,
        Op::Rename {
            parent: ROOT_INO,
            name: b"e".to_vec(),
            new_parent: ROOT_INO,
            new_name: b"e2".to_vec(),
            flags: 0,
            guard: Some(0),
        },
    )
    .expect("rename over e2");
    assert!(s.orphans.contains(&e2.ino));
    assert_eq!(s.lookup(ROOT_INO, b"e2").expect("e2").ino, e.ino);
    // Reclaimed: gone, and no data to collect for a directory.
    run(
        &mut s,
        Op::ReclaimOrphans {
            inos: vec![sub.ino, e2.ino, f.ino],
        },
    )
    .expect("reclaim");
    assert!(s.orphans.is_empty());
    assert_eq!(s.getattr(sub.ino), Err(libc::ENOENT));
    assert_eq!(s.getattr(e2.ino), Err(libc::ENOENT));
    assert!(s.gc_queue.is_empty());
    // Without an open, rmdir removes at once.
    mkdir(&mut s, ROOT_INO, "g").expect("g");
    let g = s.lookup(ROOT_INO, b"g").expect("g");
    run(
        &mut s,
        Op::RmdirGuarded {
            parent: ROOT_INO,
            name: b"g".to_vec(),
            guard: Some(g.ino),
        },
    )
    .expect("rmdir g");
    assert_eq!(s.getattr(g.ino), Err(libc::ENOENT));
    assert!(s.orphans.is_empty());
}

#[test]
fn touch_changes_atime_only() {
    let mut s = State::new();
    let f = mknod(&mut s, ROOT_INO, "f", true).expect("f");
    let later = MetaCommand {
        now_ns: T0 + 500,
        session_id: 0,
        request_id: 0,
        op: Op::Touch {
            ino: f.ino,
            atime: TimeSpec::Now,
        },
    };
    let a = attr(s.apply(&later).0).expect("touch");
    assert_eq!(a.atime_ns, T0 + 500);
    assert_eq!((a.mtime_ns, a.ctime_ns), (f.mtime_ns, f.ctime_ns));
    let t = Op::Touch {
        ino: 9999,
        atime: TimeSpec::Ns(1),
    };
    assert_eq!(run(&mut s, t), Err(libc::ENOENT));
}

/// Write grants (`grants.rs`): recorded with a commit for a live session
/// only, grown never shrunk, kept across the session's expiry (for
/// recovery), and a recovery grows the size, moves the times, drops the
/// grants it lists and the session; the state round-trips with them.
#[test]
fn write_grants_are_recorded_kept_and_recovered() {
    let mut s = State::new();
    let sid = register(&mut s, 1);
    let f = mknod(&mut s, ROOT_INO, "f", true).expect("mknod").ino;
    let g = mknod(&mut s, ROOT_INO, "g", true).expect("mknod").ino;
    let grant = |s: &mut State, ino, size, session, max_size| match run(
        s,
        Op::CommitWriteGrant {
            ino,
            size,
            commit: true,
            session,
            max_size,
        },
    ) {
        Ok(Reply::Granted(a, m)) => (a.size, m),
        other => panic!("grant: {other:?}"),
    };
    assert_eq!(grant(&mut s, f, 100, sid, 5000), (100, 5000));
    assert_eq!(
        grant(&mut s, f, 200, sid, 3000),
        (200, 5000),
        "never shrinks"
    );
    assert_eq!(grant(&mut s, g, 10, sid, 900), (10, 900));
    assert_eq!(grant(&mut s, g, 10, 0, 0), (10, 0), "release of nobody's");
    assert_eq!(grant(&mut s, f, 50, sid + 7, 900), (200, 0), "no session");
    assert_eq!(s.grants.len(), 2);
    let bytes = postcard::to_allocvec(&s).expect("serialize");
    let back: State = postcard::from_bytes(&bytes).expect("deserialize");
    assert_eq!(back, s);
    // Expiry keeps the grants: the leader recovers them.
    run(&mut s, Op::ExpireSession { session_id: sid }).expect("expire");
    assert_eq!(s.grants.len(), 2);
    let mut later = cmd(Op::RecoverGrants {
        session: sid,
        sizes: vec![(f, 4000), (g, 5)],
        keep_session: false,
    });
    later.now_ns = T0 + 50;
    assert_eq!(s.apply(&later).0, Ok(Reply::None));
    assert!(s.grants.is_empty());
    let af = s.getattr(f).expect("f");
    assert_eq!(
        (af.size, af.mtime_ns, af.ctime_ns),
        (4000, T0 + 50, T0 + 50)
    );
    assert_eq!(
        s.getattr(g).expect("g").size,
        10,
        "never below the committed size"
    );
    // A release drops the grant with the commit.
    let sid2 = register(&mut s, 2);
    grant(&mut s, f, 4000, sid2, 9000);
    assert_eq!(grant(&mut s, f, 4100, sid2, 0), (4100, 0));
    assert!(s.grants.is_empty());
    assert_eq!(crate::grants::max_size_for(0), 4 << 20);
    assert_eq!(crate::grants::max_size_for(80 << 20), 90 << 20);
}
