//! What the MDS's own permission check (issue 19) adds to a request: the
//! caller taken from the header and metadata (`Cred::of`, groups absent
//! as on almost every request), and the check itself on a state of
//! `FILES` files: search permission on the parent (every lookup, under
//! the lookup's own state lock), read on an open (its own read lock
//! here, as the handler takes it), a create's search+write on the parent
//! with the name looked up, and a file with an access ACL. Compare with a
//! request's round trip (bench.py) — tens of microseconds.
//!
//! `cargo run --release -p avalon-mds --example permission_cost [OPS]`

use avalon_mds::caps::{ClientCaps, IdMap, IdRange};
use avalon_mds::command::Attr;
use avalon_mds::namespace::{Dentry, Inode, State};
use avalon_mds::permission::{self, Cred};
use avalon_proto::pb;
use std::hint::black_box;
use std::sync::RwLock;
use std::time::Instant;

const FILES: u64 = 100_000;
const DIR: u64 = 2;

fn inode(mode: u32, uid: u32, gid: u32) -> Inode {
    Inode {
        attr: Attr {
            mode,
            uid,
            gid,
            ..Default::default()
        },
        parent: DIR,
        next_cookie: 0,
        symlink: None,
        xattrs: Default::default(),
    }
}

fn state() -> State {
    let mut s = State::default();
    s.inodes.insert(DIR, inode(libc::S_IFDIR | 0o755, 0, 0));
    for i in 0..FILES {
        let ino = 100 + i;
        s.inodes.insert(
            ino,
            inode(libc::S_IFREG | 0o644, 1000 + (i % 7) as u32, 100),
        );
        s.dentries.insert(
            (DIR, format!("f{i}").into_bytes()),
            Dentry { ino, cookie: i + 3 },
        );
    }
    // One file with an access ACL (named user 2000 rw, mask rw).
    let mut a = inode(libc::S_IFREG | 0o660, 1000, 100);
    let acl = [
        (avalon_mds::acl::USER_OBJ, 6, u32::MAX),
        (avalon_mds::acl::USER, 6, 2000),
        (avalon_mds::acl::GROUP_OBJ, 4, u32::MAX),
        (avalon_mds::acl::MASK, 6, u32::MAX),
        (avalon_mds::acl::OTHER, 0, u32::MAX),
    ];
    a.xattrs.insert(
        avalon_mds::acl::ACCESS.to_vec(),
        avalon_mds::acl::encode(&acl),
    );
    s.inodes.insert(50, a);
    s
}

/// `n` runs of `f`; ns per run.
fn time(n: u64, mut f: impl FnMut(u64)) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        f(i);
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let ops: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let s = RwLock::new(state());
    let hdr = pb::RequestHeader {
        session_id: 7,
        caller_uid: 2000,
        caller_gid: 2000,
        has_caller: true,
        ..Default::default()
    };
    let md = tonic::metadata::MetadataMap::new();
    let cred = Cred::of(Some(&hdr), None, None, false).expect("checked");
    let names: Vec<Vec<u8>> = (0..1024).map(|i| format!("new{i}").into_bytes()).collect();

    let caller = time(ops, |_| {
        let groups = avalon_proto::caller::groups_of(black_box(&md));
        black_box(Cred::of(black_box(Some(&hdr)), groups, None, false));
    });
    let g = s.read().expect("lock");
    let lookup = time(ops, |_| {
        black_box(permission::may_lookup(&g, black_box(&cred), DIR)).expect("x");
    });
    drop(g);
    let open = time(ops, |i| {
        let ino = 100 + i % FILES;
        let g = s.read().expect("lock");
        black_box(permission::may_open(&g, black_box(&cred), ino, 0)).expect("r");
    });
    let root = Cred::of(
        Some(&pb::RequestHeader {
            caller_uid: 0,
            ..hdr.clone()
        }),
        None,
        None,
        false,
    )
    .expect("root");
    let g = s.read().expect("lock");
    let create = time(ops, |i| {
        let name = &names[(i % 1024) as usize];
        black_box(permission::may_create(&g, black_box(&root), DIR, name)).expect("wx");
    });
    let acl = time(ops, |_| {
        black_box(permission::may_open(&g, black_box(&cred), 50, 2)).expect("rw");
    });
    drop(g);
    let range = |client, cluster, count| IdRange {
        client,
        cluster,
        count,
    };
    let plain = ClientCaps::from_pb(&pb::ClientCaps {
        root_squash: true,
        path: "/projects/x".into(),
        ..Default::default()
    });
    let mut caps = plain.clone();
    caps.ids = IdMap {
        uids: vec![range(0, 0, 1), range(1000, 50_000, 1000)],
        gids: vec![range(0, 0, 1), range(1000, 50_000, 1000)],
    };
    let mhdr = pb::RequestHeader {
        caller_uid: 1500,
        caller_gid: 1500,
        ..hdr.clone()
    };
    let mapped_in = time(ops, |_| {
        let groups = avalon_proto::caller::groups_of(black_box(&md));
        black_box(Cred::of(black_box(Some(&mhdr)), groups, Some(&caps), false));
    });
    let squashed_in = time(ops, |_| {
        let groups = avalon_proto::caller::groups_of(black_box(&md));
        black_box(Cred::of(
            black_box(Some(&mhdr)),
            groups,
            Some(&plain),
            false,
        ));
    });
    let mut attr = pb::Attr {
        uid: 51_500,
        gid: 51_500,
        ..Default::default()
    };
    let mapped_out = time(ops, |_| {
        let c = black_box(&caps);
        attr.uid = c.uid_out(black_box(attr.uid));
        attr.gid = c.gid_out(black_box(attr.gid));
        attr.uid = c.uid(attr.uid);
        attr.gid = c.gid(attr.gid);
    });
    black_box(&attr);
    let copy_plain = time(ops, |_| {
        black_box(black_box(&plain).clone());
    });
    let copy_mapped = time(ops, |_| {
        black_box(black_box(&caps).clone());
    });
    let unnamed = time(ops, |_| {
        black_box(Cred::of(black_box(None), None, Some(&plain), false));
    });
    println!("caller from header (no groups): {caller:.0} ns");
    println!("lookup: search on the parent: {lookup:.0} ns");
    println!("open: read lock + read permission: {open:.0} ns");
    println!("create: search, name lookup, write (root): {create:.0} ns");
    println!("open of a file with an access ACL: {acl:.0} ns");
    println!("caller of a root_squash key (unmapped): {squashed_in:.0} ns");
    println!("caller of a mapped key (2+2 ranges): {mapped_in:.0} ns");
    println!("attr uid/gid mapped back and in again: {mapped_out:.0} ns");
    println!("the key's caps copied per request: {copy_plain:.0} ns");
    println!("the same with its mapping: {copy_mapped:.0} ns");
    println!("caller of a limited key naming none: {unnamed:.0} ns");
}
