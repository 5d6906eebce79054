use super::*;
use crate::command::{Layout, Op, Reply};
use crate::namespace::S_IFREG;
use crate::rstats::tests::run_at;
use avalon_proto::limits::ROOT_INO;

const SEC: i64 = 1_000_000_000;

fn ino(r: Result<Reply, i32>) -> u64 {
    match r {
        Ok(Reply::Attr(a)) => a.ino,
        other => panic!("expected attributes, got {other:?}"),
    }
}

fn mkdir(s: &mut State, parent: u64, name: &str) -> u64 {
    ino(run_at(
        s,
        SEC,
        Op::Mkdir {
            parent,
            name: name.into(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        },
    ))
}

fn file(s: &mut State, parent: u64, name: &str, size: u64) -> u64 {
    let f = ino(run_at(
        s,
        SEC,
        Op::Mknod {
            parent,
            name: name.into(),
            mode: S_IFREG | 0o644,
            rdev: 0,
            uid: 0,
            gid: 0,
            exclusive: true,
            layout: Layout::default(),
        },
    ));
    run_at(s, SEC, Op::CommitWrite { ino: f, size }).expect("write");
    f
}

fn snap(s: &mut State, dir: u64, name: &str) -> Result<Reply, i32> {
    let id = s.snapshots.last_id + 1;
    run_at(
        s,
        2 * SEC,
        Op::SnapCreate {
            id,
            dir,
            name: name.into(),
        },
    )
}

/// A directory `d` with a file `f` (10 bytes) and a subdirectory `sub`
/// holding `g` (20 bytes).
fn tree(s: &mut State) -> (u64, u64, u64, u64) {
    let d = mkdir(s, ROOT_INO, "d");
    let f = file(s, d, "f", 10);
    let sub = mkdir(s, d, "sub");
    let g = file(s, sub, "g", 20);
    (d, f, sub, g)
}

#[test]
fn a_snapshot_keeps_the_subtree_as_it_was() {
    let mut s = State::new();
    let (d, f, sub, g) = tree(&mut s);
    let outside = file(&mut s, ROOT_INO, "o", 5);
    assert_eq!(snap(&mut s, d, "one"), Ok(Reply::Count(1)));
    let sn = get(&s, 1).expect("snapshot").clone();
    assert_eq!(sn.inodes.len(), 4, "d, f, sub and g");
    assert!(!sn.inodes.contains_key(&outside));

    // The live tree changes: overwrite (size), unlink, rename, new file.
    run_at(&mut s, 3 * SEC, Op::CommitWrite { ino: f, size: 99 }).expect("grow");
    run_at(
        &mut s,
        3 * SEC,
        Op::Unlink {
            parent: sub,
            name: b"g".to_vec(),
            guard: None,
        },
    )
    .expect("unlink");
    run_at(
        &mut s,
        3 * SEC,
        Op::Rename {
            parent: d,
            name: b"f".to_vec(),
            new_parent: ROOT_INO,
            new_name: b"moved".to_vec(),
            flags: 0,
            guard: None,
        },
    )
    .expect("rename");
    let h = file(&mut s, d, "h", 1);

    let sn = get(&s, 1).expect("snapshot");
    assert_eq!(sn.lookup(d, b"f").map(|a| (a.ino, a.size)), Ok((f, 10)));
    assert_eq!(sn.lookup(sub, b"g").map(|a| a.size), Ok(20));
    assert_eq!(sn.lookup(d, b"h"), Err(libc::ENOENT));
    let (names, eof) = sn.readdir(d, 0, 100, true).expect("readdir");
    assert!(eof);
    let names: Vec<&[u8]> = names.iter().map(|e| e.name.as_slice()).collect();
    assert_eq!(names, vec![b"f".as_slice(), b"sub".as_slice()]);
    assert_eq!(sn.parent_of(sub), d);
    assert_eq!(sn.parent_of(d), d);

    // The newest snapshot holding an inode is what its writes carry.
    assert_eq!(seq_of(&s, f), 1);
    assert_eq!(seq_of(&s, g), 1, "removed, still held");
    assert_eq!(seq_of(&s, h), 0, "created after");
    assert_eq!(seq_of(&s, outside), 0);
    assert_eq!(snap(&mut s, ROOT_INO, "all"), Ok(Reply::Count(2)));
    assert_eq!(seq_of(&s, f), 2);
    assert_eq!(seq_of(&s, g), 1, "not in the second");
}

#[test]
fn names_ids_and_removal() {
    let mut s = State::new();
    let (d, f, _, _) = tree(&mut s);
    assert_eq!(snap(&mut s, d, "a"), Ok(Reply::Count(1)));
    assert_eq!(snap(&mut s, d, "a"), Err(libc::EEXIST));
    assert_eq!(snap(&mut s, d, ".."), Err(libc::EINVAL));
    assert_eq!(snap(&mut s, f, "x"), Err(libc::ENOTDIR));
    // An id other than the next one: a create that raced with another.
    let stale = Op::SnapCreate {
        id: 1,
        dir: d,
        name: b"b".to_vec(),
    };
    assert_eq!(run_at(&mut s, SEC, stale), Err(libc::EAGAIN));
    assert_eq!(snap(&mut s, d, "b"), Ok(Reply::Count(2)));
    assert_eq!(list(&s, Some(d)).len(), 2);
    assert!(list(&s, Some(ROOT_INO)).is_empty());

    // A directory with snapshots is not empty: not removed, not replaced.
    let rm = |s: &mut State| {
        run_at(
            s,
            SEC,
            Op::Rmdir {
                parent: ROOT_INO,
                name: b"d".to_vec(),
            },
        )
    };
    assert_eq!(rm(&mut s), Err(libc::ENOTEMPTY));

    assert!(!trim_due(&s));
    let remove = |s: &mut State, name: &str| {
        run_at(
            s,
            SEC,
            Op::SnapRemove {
                dir: d,
                name: name.into(),
            },
        )
    };
    assert_eq!(remove(&mut s, "a"), Ok(Reply::Count(1)));
    assert_eq!(remove(&mut s, "a"), Err(libc::ENOENT));
    assert!(trim_due(&s));
    assert_eq!(seq_of(&s, f), 2);
    run_at(&mut s, SEC, Op::SnapTrimmed { removals: 1 }).expect("trimmed");
    assert!(!trim_due(&s));
    assert_eq!(remove(&mut s, "b"), Ok(Reply::Count(2)));
    assert_eq!(seq_of(&s, f), 0);
    assert!(!holds(&s, f));
    // Ids are never reused.
    assert_eq!(snap(&mut s, d, "a"), Ok(Reply::Count(3)));
}

#[test]
fn survives_a_raft_snapshot_and_an_old_one_loads() {
    let mut s = State::new();
    let (d, _, _, _) = tree(&mut s);
    snap(&mut s, d, "one").expect("snapshot");
    let bytes = postcard::to_allocvec(&s).expect("encode");
    let back: State = postcard::from_bytes(&bytes).expect("decode");
    assert_eq!(back, s);
    assert_eq!(back.snapshots.by_id[&1].inodes.len(), 4);

    // A Raft snapshot from before snapshots ends before their field.
    let tail = postcard::to_allocvec(&s.snapshots)
        .expect("snapshots")
        .len();
    let old: State = postcard::from_bytes(&bytes[..bytes.len() - tail]).expect("old");
    assert_eq!(old.snapshots, Snapshots::default());
    assert_eq!(old.inodes, s.inodes);
}
