//! End-to-end tests of the metadata service with real processes: leader
//! failover during creates and renames through the mount, MDS membership
//! changes while a client works, hostile gRPC requests, and open-unlinked
//! files.
//!
//! Run with: cargo build --workspace && AVALON_BIN_DIR=target/debug \
//!   cargo test -p avalonctl --test e2e_mds -- --test-threads=1

mod common;

use avalon_proto::errno::errno_of;
use avalon_proto::limits::ROOT_INO;
use avalon_proto::mds_conn::MdsConn;
use avalon_proto::pb;
use avalonctl::local_cluster::{LocalCluster, Options};
use avalonctl::mds_admin;
use common::{leader, rt, wait_converged, wait_until, TestCluster};
use std::collections::BTreeSet;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The names in `dir`, failing on duplicates.
fn names(dir: &Path) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for e in std::fs::read_dir(dir).expect("readdir") {
        let n = e.expect("entry").file_name().to_string_lossy().into_owned();
        assert!(set.insert(n.clone()), "{n} listed twice");
    }
    set
}

struct Workload {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    handle: std::thread::JoinHandle<(Vec<String>, Vec<String>, Duration)>,
}

/// A thread doing up to `n` ops (create `tmp-i`, rename to `f-i`) in `dir`
/// until stopped; returns (acknowledged names, failed ops, longest op).
fn workload(dir: PathBuf, n: usize, limit: Duration) -> Workload {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let (s, d) = (stop.clone(), done.clone());
    let handle = std::thread::spawn(move || {
        let start = Instant::now();
        let mut acked = Vec::new();
        let mut failed = Vec::new();
        let mut worst = Duration::ZERO;
        for i in 0..n {
            if s.load(Ordering::SeqCst) || start.elapsed() > limit {
                break;
            }
            let t = Instant::now();
            let tmp = dir.join(format!("tmp-{i}"));
            let fin = dir.join(format!("f-{i}"));
            let r = std::fs::write(&tmp, format!("file {i}\n"))
                .and_then(|_| std::fs::rename(&tmp, &fin));
            worst = worst.max(t.elapsed());
            match r {
                Ok(()) => acked.push(format!("f-{i}")),
                Err(e) => failed.push(format!("op {i}: {e}")),
            }
            d.fetch_add(1, Ordering::SeqCst);
        }
        (acked, failed, worst)
    });
    Workload { stop, done, handle }
}

fn wait_ops(w: &Workload, n: usize) {
    assert!(
        wait_until(Duration::from_secs(180), || w.done.load(Ordering::SeqCst)
            >= n
            || w.handle.is_finished()),
        "workload stalled at {} ops",
        w.done.load(Ordering::SeqCst)
    );
}

#[test]
fn kill_leader_during_creates_and_renames() {
    let mut tc = TestCluster::start(3, 3);
    let dir = tc.mnt().join("churn");
    std::fs::create_dir(&dir).expect("mkdir");
    let w = workload(dir.clone(), 400, Duration::from_secs(400));
    wait_ops(&w, 100);
    let victim = leader(tc.c());
    let killed_at = Instant::now();
    tc.c().kill_mds(victim);
    eprintln!("killed leader mds{victim}");
    let new_leader = leader(tc.c());
    eprintln!("new leader mds{new_leader} after {:?}", killed_at.elapsed());
    assert_ne!(new_leader, victim);
    let (acked, failed, worst) = w.handle.join().expect("workload thread");
    eprintln!(
        "{} ops acknowledged, {} failed, longest op (stall) {:?}",
        acked.len(),
        failed.len(),
        worst
    );
    println!("LONGEST STALL: {worst:?}");
    assert!(failed.is_empty(), "failed ops: {failed:?}");
    assert_eq!(acked.len(), 400, "the loop went on after the election");
    let listed = names(&dir);
    for n in &acked {
        assert!(listed.contains(n), "acknowledged {n} missing");
        let i = n.trim_start_matches("f-");
        assert!(!listed.contains(&format!("tmp-{i}")), "tmp-{i} still there");
    }
    assert_eq!(listed.len(), acked.len(), "unexpected extra entries");
    for n in acked.iter().step_by(37) {
        let s = std::fs::read_to_string(dir.join(n)).expect("read");
        assert_eq!(s, format!("file {}\n", n.trim_start_matches("f-")));
    }

    tc.c().restart_mds(victim).expect("restart killed MDS");
    let (idx, dig) = wait_converged(tc.c(), Duration::from_secs(120));
    eprintln!("all MDS at last_applied {idx}, digest {dig:016x}");
}

#[test]
fn add_and_remove_mds_while_client_works() {
    let mut tc = TestCluster::start(3, 3);
    let dir = tc.mnt().join("members");
    std::fs::create_dir(&dir).expect("mkdir");
    let w = workload(dir.clone(), 100_000, Duration::from_secs(400));
    wait_ops(&w, 30);
    let added = tc.c().add_mds().expect("add MDS");
    eprintln!("added mds{} at {}", added.id, added.addr);
    let at = w.done.load(Ordering::SeqCst);
    wait_ops(&w, at + 30);
    let victim = leader(tc.c());
    tc.c().remove_mds(victim).expect("remove MDS");
    eprintln!("removed mds{victim} (the leader)");
    assert!(!tc.c().mds_ids().contains(&victim));
    let at = w.done.load(Ordering::SeqCst);
    wait_ops(&w, at + 30);
    w.stop.store(true, Ordering::SeqCst);
    let (acked, failed, worst) = w.handle.join().expect("workload thread");
    eprintln!(
        "{} ops acknowledged, {} failed, longest op {:?}",
        acked.len(),
        failed.len(),
        worst
    );
    assert!(failed.is_empty(), "failed ops: {failed:?}");
    let listed = names(&dir);
    for n in &acked {
        assert!(listed.contains(n), "acknowledged {n} missing");
    }
    // The new member is a voter with the same state as the others.
    let (idx, dig) = wait_converged(tc.c(), Duration::from_secs(120));
    eprintln!("members {:?} at {idx}, digest {dig:016x}", tc.c().mds_ids());
    let st = rt()
        .block_on(mds_admin::status_of(
            tc.c().tls(),
            &added.addr,
            Duration::from_secs(2),
        ))
        .expect("new MDS answers");
    let voters: Vec<u64> = st.members.iter().map(|m| m.id).collect();
    assert!(
        voters.contains(&added.id) && !voters.contains(&victim),
        "{voters:?}"
    );
    // A restart of the whole cluster brings back the new layout.
    tc.restart();
    let listed = names(&dir);
    for n in &acked {
        assert!(listed.contains(n), "acknowledged {n} missing after restart");
    }
}

/// Chunk capabilities come from the leader alone: a follower (which may
/// not have applied a new session yet, and refused it: the client's
/// buffered writes then failed for good and a close committed their size
/// over no data, CI of session 23) sends the caller to the leader.
#[test]
fn chunk_capabilities_come_from_the_leader() {
    let mut o = common::opts(3, 1);
    o.mount = false;
    let mut tc = TestCluster::start_with(o);
    let c = tc.c();
    let conn = MdsConn::new(c.layout.mds_addrs(), c.tls().clone());
    let rt = rt();
    // Channels are made inside the runtime.
    let _in_rt = rt.enter();
    let reg = pb::RegisterClientRequest {
        hostname: "caps-test".into(),
        ..Default::default()
    };
    let sid = rt
        .block_on(conn.call(|mut m| {
            let r = reg.clone();
            async move { m.register_client(r).await }
        }))
        .expect("register a session")
        .session_id;
    let (lead, lead_addr) = rt
        .block_on(mds_admin::find_leader(c.tls(), &c.layout.mds_addrs()))
        .expect("a leader");
    for (id, addr) in c.layout.mds.iter().map(|n| (n.id, n.addr.clone())) {
        let ch = c
            .tls()
            .channel(&addr, avalon_proto::tls::Dial::Mds, Duration::from_secs(5))
            .expect("channel");
        let mut m = pb::meta_client::MetaClient::new(ch);
        let req = pb::ChunkCapRequest {
            header: Some(pb::RequestHeader {
                session_id: sid,
                ..Default::default()
            }),
            ino: ROOT_INO,
            write: false,
        };
        if id == lead {
            let r = rt.block_on(m.get_chunk_cap(req));
            let cap = r.expect("the leader gives a capability").into_inner().cap;
            assert!(!cap.is_empty(), "a TLS cluster signs capabilities");
            continue;
        }
        // A follower that has not heard from the leader yet names none.
        let mut last = None;
        let named = wait_until(Duration::from_secs(30), || {
            let r = rt.block_on(m.get_chunk_cap(req.clone()));
            let e = r.expect_err("a follower refers the caller to the leader");
            assert_eq!(e.code(), tonic::Code::Unavailable, "mds{id}: {e:?}");
            let named = e.message().contains(&lead_addr);
            last = Some(e);
            named
        });
        assert!(named, "mds{id} never named the leader: {last:?}");
    }
}

fn hdr() -> Option<pb::RequestHeader> {
    None
}

/// Asserts that `r` failed with one of `want` (InvalidArgument counts as
/// EINVAL).
fn expect_err<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>, want: &[i32]) {
    match r {
        Ok(v) => panic!("{what}: expected errno {want:?}, got Ok({v:?})"),
        Err(s) => {
            let e = errno_of(&s);
            assert!(
                want.contains(&e),
                "{what}: expected errno {want:?}, got {e} ({s:?})"
            );
        }
    }
}

#[test]
fn hostile_requests_get_errnos() {
    let dir = tempfile::Builder::new()
        .prefix("avalon-e2e-")
        .tempdir()
        .expect("tempdir");
    let mut o = Options::new();
    o.mds = 1;
    o.osds = 1;
    o.mount = false;
    let c = LocalCluster::start(dir.path(), o).expect("cluster");
    let conn = MdsConn::new(c.layout.mds_addrs(), c.tls().clone());
    let rt = rt();
    macro_rules! call {
        ($method:ident, $req:expr) => {{
            let req = $req;
            rt.block_on(conn.call(|mut c| {
                let r = req.clone();
                async move { c.$method(r).await }
            }))
        }};
    }
    let mknod = |name: Vec<u8>, mode: u32| pb::MknodRequest {
        header: hdr(),
        parent: ROOT_INO,
        name: name.into(),
        mode,
        rdev: 0,
        uid: 0,
        gid: 0,
        exclusive: true,
        open_flags: 0,
    };
    let mkdir = |parent: u64, name: &str| pb::MkdirRequest {
        header: hdr(),
        parent,
        name: name.as_bytes().to_vec().into(),
        mode: 0o755,
        uid: 0,
        gid: 0,
    };
    let getattr = |ino: u64| pb::GetAttrRequest { header: hdr(), ino };
    let reg = libc::S_IFREG | 0o644;

    expect_err(
        "getattr unknown",
        call!(get_attr, getattr(1 << 40)),
        &[libc::ENOENT],
    );
    expect_err(
        "getattr ino 0",
        call!(get_attr, getattr(0)),
        &[libc::EINVAL],
    );
    expect_err(
        "open unknown",
        call!(
            open,
            pb::OpenRequest {
                header: hdr(),
                ino: 777_777,
                flags: 0,
                ..Default::default()
            }
        ),
        &[libc::ENOENT],
    );
    expect_err(
        "lookup in unknown dir",
        call!(
            lookup,
            pb::LookupRequest {
                header: hdr(),
                parent: 424_242,
                name: b"x".to_vec().into()
            }
        ),
        &[libc::ENOENT],
    );
    expect_err(
        "name of 256 bytes",
        call!(mknod, mknod(vec![b'n'; 256], reg)),
        &[libc::ENAMETOOLONG],
    );
    expect_err(
        "name with /",
        call!(mknod, mknod(b"a/b".to_vec(), reg)),
        &[libc::EINVAL],
    );
    expect_err(
        "name with NUL",
        call!(mknod, mknod(b"a\0b".to_vec(), reg)),
        &[libc::EINVAL],
    );
    expect_err(
        "empty name",
        call!(mknod, mknod(Vec::new(), reg)),
        &[libc::EINVAL],
    );
    expect_err(
        "name ..",
        call!(mknod, mknod(b"..".to_vec(), reg)),
        &[libc::EINVAL],
    );
    expect_err(
        "mknod of a directory type",
        call!(mknod, mknod(b"d".to_vec(), libc::S_IFDIR | 0o755)),
        &[libc::EINVAL],
    );
    expect_err(
        "mknod in a missing dir",
        call!(
            mknod,
            pb::MknodRequest {
                parent: 999_999,
                ..mknod(b"x".to_vec(), reg)
            }
        ),
        &[libc::ENOENT],
    );

    // A directory into its own subtree.
    let a = call!(mkdir, mkdir(ROOT_INO, "a"))
        .expect("mkdir a")
        .attr
        .expect("attr");
    let b = call!(mkdir, mkdir(a.ino, "b"))
        .expect("mkdir b")
        .attr
        .expect("attr");
    let rename = |parent: u64, name: &str, new_parent: u64, new_name: &str| pb::RenameRequest {
        header: hdr(),
        parent,
        name: name.as_bytes().to_vec().into(),
        new_parent,
        new_name: new_name.as_bytes().to_vec().into(),
        flags: 0,
    };
    expect_err(
        "rename dir into its subtree",
        call!(rename, rename(ROOT_INO, "a", b.ino, "x")),
        &[libc::EINVAL],
    );
    expect_err(
        "rename dir into itself",
        call!(rename, rename(ROOT_INO, "a", a.ino, "x")),
        &[libc::EINVAL],
    );
    expect_err(
        "rename with bad flags",
        call!(
            rename,
            pb::RenameRequest {
                flags: 0xffff,
                ..rename(ROOT_INO, "a", ROOT_INO, "z")
            }
        ),
        &[libc::EINVAL],
    );
    expect_err(
        "readdir of unknown",
        call!(
            read_dir,
            pb::ReadDirRequest {
                header: hdr(),
                ino: 55_555,
                cookie: 0,
                max_entries: u32::MAX,
                plus: true
            }
        ),
        &[libc::ENOENT],
    );

    // Huge sizes.
    let f = call!(mknod, mknod(b"f".to_vec(), reg))
        .expect("mknod f")
        .attr
        .expect("attr");
    for size in [1u64 << 63, u64::MAX] {
        expect_err(
            "setattr huge size",
            call!(
                set_attr,
                pb::SetAttrRequest {
                    header: hdr(),
                    ino: f.ino,
                    size: Some(size),
                    ..Default::default()
                }
            ),
            &[libc::EFBIG, libc::EINVAL],
        );
        expect_err(
            "commit write huge size",
            call!(
                commit_write,
                pb::CommitWriteRequest {
                    header: hdr(),
                    ino: f.ino,
                    size,
                    ..Default::default()
                }
            ),
            &[libc::EFBIG, libc::EINVAL],
        );
    }
    expect_err(
        "truncate a directory",
        call!(
            set_attr,
            pb::SetAttrRequest {
                header: hdr(),
                ino: a.ino,
                size: Some(0),
                ..Default::default()
            }
        ),
        &[libc::EISDIR],
    );
    // Xattrs.
    let setx = |name: &[u8], len: usize| pb::SetXattrRequest {
        header: hdr(),
        ino: f.ino,
        name: name.to_vec().into(),
        value: vec![7u8; len].into(),
        flags: 0,
        ..Default::default()
    };
    expect_err(
        "xattr value > 64 KiB",
        call!(set_xattr, setx(b"user.big", 65 * 1024)),
        &[libc::E2BIG],
    );
    expect_err(
        "xattr name > 255",
        call!(set_xattr, setx(&[b'x'; 300], 1)),
        &[libc::ERANGE],
    );
    expect_err(
        "xattr empty name",
        call!(set_xattr, setx(b"", 1)),
        &[libc::EINVAL],
    );
    call!(set_xattr, setx(b"user.max", 64 * 1024)).expect("64 KiB xattr");
    expect_err(
        "symlink target > PATH_MAX",
        call!(
            symlink,
            pb::SymlinkRequest {
                header: hdr(),
                parent: ROOT_INO,
                name: b"s".to_vec().into(),
                target: vec![b't'; 5000].into(),
                uid: 0,
                gid: 0
            }
        ),
        &[libc::ENAMETOOLONG],
    );
    expect_err(
        "link a directory",
        call!(
            link,
            pb::LinkRequest {
                header: hdr(),
                ino: a.ino,
                new_parent: ROOT_INO,
                new_name: b"l".to_vec().into()
            }
        ),
        &[libc::EPERM],
    );

    // Still serving, and the same process.
    let pid = c.mds_pid(1).expect("mds pid");
    let st = rt
        .block_on(mds_admin::status_of(
            c.tls(),
            &c.layout.mds_addrs()[0],
            Duration::from_secs(5),
        ))
        .expect("status");
    assert_eq!(st.self_.expect("self").pid, pid);
    call!(mknod, mknod(b"after".to_vec(), reg)).expect("create after abuse");
}

#[test]
fn open_unlinked_file_lives_until_close_then_gc() {
    let mut tc = TestCluster::start(3, 3);
    let p = tc.mnt().join("orphan");
    let data = common::data(3 << 20, 11);
    std::fs::write(&p, &data).expect("write");
    let ino = std::fs::metadata(&p).expect("stat").ino();
    let root = tc.dir.path().to_path_buf();
    // The chunk files of the inode, on every OSD.
    let chunk_dirs = move || -> Vec<PathBuf> {
        (1..=3)
            .flat_map(|n| {
                avalon_osd::chunk_store::files_of(&root.join(format!("osd{n}/chunks")), ino)
                    .unwrap_or_default()
            })
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(30), || !chunk_dirs().is_empty()),
        "no chunk directory for inode {ino:016x}"
    );

    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .expect("open");
    std::fs::remove_file(&p).expect("unlink");
    assert!(!p.exists());
    assert!(!names(&tc.mnt()).contains("orphan"));
    // Reads and writes through the open descriptor still work.
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, 0).expect("read orphan");
    assert!(back == data, "orphan data differs");
    f.write_all_at(b"still here", 1 << 20)
        .expect("write orphan");
    f.sync_all().expect("fsync orphan");
    let mut buf = [0u8; 10];
    f.read_exact_at(&mut buf, 1 << 20).expect("read back");
    assert_eq!(&buf, b"still here");
    let md = f.metadata().expect("fstat");
    assert_eq!(md.nlink(), 0);
    assert_eq!(md.len(), data.len() as u64);
    // Survives a few client heartbeats and GC rounds.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(7) {
        f.read_exact_at(&mut buf, 1 << 20).expect("read while open");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(&buf, b"still here");
    assert!(!chunk_dirs().is_empty(), "data collected while open");
    drop(f);
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(90), || chunk_dirs().is_empty()),
        "data of inode {ino:016x} not collected: {:?}",
        chunk_dirs()
    );
    eprintln!("orphan data collected {:?} after close", t.elapsed());
    tc.c();
}
