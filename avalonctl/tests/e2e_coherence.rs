//! Two mounts of one cluster, each caching under its metadata lease: what
//! one changes is seen by the other's next operation, with no sleep in
//! between (the MDS recalls the other's cached entries before it
//! acknowledges the change), and a client killed with -9 holds nobody up
//! for longer than its lease.

mod common;

use common::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

fn absent(p: &Path) -> bool {
    matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

#[test]
fn names_and_attributes_changed_on_one_mount_are_seen_by_the_other_at_once() {
    let mut tc = TestCluster::start(3, 3);
    let b_path = tc.dir.path().join("mnt-b");
    let b = SecondMount::new(tc.c(), b_path);
    let a_dir = tc.mnt().join("shared");
    std::fs::create_dir(&a_dir).unwrap();
    let b_dir = b.path.join("shared");
    for i in 0..20 {
        let (fa, fb) = (a_dir.join(format!("f{i}")), b_dir.join(format!("f{i}")));
        let (ga, gb) = (a_dir.join(format!("g{i}")), b_dir.join(format!("g{i}")));
        // B caches a negative entry, A creates the name.
        assert!(absent(&fb));
        std::fs::write(&fa, b"x").unwrap();
        assert!(!absent(&fb), "round {i}: B does not see A's create");
        // The creator caches its new file's attributes: B's change to
        // them reaches A too.
        let (ha, hb) = (a_dir.join(format!("h{i}")), b_dir.join(format!("h{i}")));
        drop(std::fs::File::create(&ha).unwrap());
        assert_eq!(std::fs::metadata(&ha).unwrap().mode() & 0o777, 0o644);
        std::fs::set_permissions(&hb, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(
            std::fs::metadata(&ha).unwrap().mode() & 0o777,
            0o640,
            "round {i}: the creator sees a stale mode"
        );
        std::fs::remove_file(&hb).unwrap();
        assert!(
            absent(&ha),
            "round {i}: the creator still sees a removed file"
        );
        // B caches attributes, A changes them.
        assert_eq!(
            std::fs::metadata(&fb).unwrap().permissions().mode() & 0o777,
            0o644
        );
        std::fs::set_permissions(&fa, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            std::fs::metadata(&fb).unwrap().permissions().mode() & 0o777,
            0o600,
            "round {i}: B sees a stale mode"
        );
        // B caches both names, A renames one onto the other's place.
        assert!(absent(&gb));
        std::fs::rename(&fa, &ga).unwrap();
        assert!(absent(&fb), "round {i}: B still sees the old name");
        assert!(!absent(&gb), "round {i}: B does not see the new name");
        // A hard link changes the link count B sees.
        let la = a_dir.join(format!("l{i}"));
        std::fs::hard_link(&ga, &la).unwrap();
        assert_eq!(
            std::fs::metadata(&gb).unwrap().nlink(),
            2,
            "round {i}: nlink"
        );
        std::fs::remove_file(&la).unwrap();
        assert_eq!(
            std::fs::metadata(&gb).unwrap().nlink(),
            1,
            "round {i}: nlink"
        );
        // A removes it.
        std::fs::remove_file(&ga).unwrap();
        assert!(absent(&gb), "round {i}: B still sees an unlinked file");
    }
    // Extended attributes (cached with their inode) follow too.
    let (xa, xb) = (a_dir.join("x"), b_dir.join("x"));
    std::fs::write(&xa, b"x").unwrap();
    assert_eq!(getxattr(&xb, "user.k"), None);
    for v in ["one", "two"] {
        setxattr(&xa, "user.k", v);
        assert_eq!(
            getxattr(&xb, "user.k").as_deref(),
            Some(v),
            "B sees a stale xattr"
        );
    }
    removexattr(&xa, "user.k");
    assert_eq!(
        getxattr(&xb, "user.k"),
        None,
        "B still sees a removed xattr"
    );
    std::fs::remove_file(&xa).unwrap();
    // A listing tells B which files have no xattrs at all (ls -l's
    // security.selinux per file); A's setxattr still reaches B.
    let (ya, yb) = (a_dir.join("y"), b_dir.join("y"));
    std::fs::write(&ya, b"y").unwrap();
    for e in std::fs::read_dir(&b_dir).unwrap() {
        e.unwrap().metadata().unwrap();
    }
    assert_eq!(getxattr(&yb, "user.k"), None);
    setxattr(&ya, "user.k", "set");
    assert_eq!(
        getxattr(&yb, "user.k").as_deref(),
        Some("set"),
        "B's listing hid A's xattr"
    );
    std::fs::remove_file(&ya).unwrap();
    // Directory listings follow too.
    let listed = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert!(listed(&b_dir).is_empty());
    std::fs::create_dir(a_dir.join("sub")).unwrap();
    std::fs::write(a_dir.join("sub/x"), b"1").unwrap();
    assert_eq!(listed(&b_dir), ["sub"]);
    assert_eq!(listed(&b_dir.join("sub")), ["x"]);
    std::fs::remove_file(a_dir.join("sub/x")).unwrap();
    std::fs::remove_dir(a_dir.join("sub")).unwrap();
    assert!(listed(&b_dir).is_empty());
    assert!(absent(&b_dir.join("sub")));
}

fn cpath(p: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn getxattr(p: &Path, name: &str) -> Option<String> {
    match getxattr_errno(p, name) {
        Ok(v) => Some(String::from_utf8_lossy(&v).into_owned()),
        Err(e) => {
            assert_eq!(e, libc::ENODATA, "getxattr: errno {e}");
            None
        }
    }
}

/// getxattr: the value, or the errno.
fn getxattr_errno(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let (path, name) = (cpath(p), std::ffi::CString::new(name).unwrap());
    let mut buf = [0u8; 256];
    // SAFETY: valid C strings and a buffer of the length given.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    Ok(buf[..n as usize].to_vec())
}

fn setxattr(p: &Path, name: &str, value: &str) {
    let (path, name) = (cpath(p), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid C strings and a value of the length given.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
}

fn removexattr(p: &Path, name: &str) {
    let (path, name) = (cpath(p), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid C strings.
    let r = unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) };
    assert_eq!(r, 0, "removexattr: {}", std::io::Error::last_os_error());
}

#[test]
fn data_written_and_closed_on_one_mount_is_read_by_the_other_at_once() {
    let mut tc = TestCluster::start(3, 3);
    let b_path = tc.dir.path().join("mnt-b");
    let b = SecondMount::new(tc.c(), b_path);
    let (pa, pb) = (tc.mnt().join("data"), b.path.join("data"));
    for i in 0..10u64 {
        let body = data(1000 + 40_000 * i as usize, i);
        std::fs::write(&pa, &body).unwrap();
        let seen = std::fs::read(&pb).unwrap();
        assert_eq!(seen.len(), body.len(), "round {i}: size seen by B");
        assert!(seen == body, "round {i}: B reads other bytes than A wrote");
    }
    // Same size, other bytes: B's reopen must not keep its cached pages
    // (FOPEN_KEEP_CACHE only at an unchanged version).
    for i in 0..5u64 {
        let body = data(64 * 1024, 100 + i);
        let mut f = std::fs::OpenOptions::new().write(true).open(&pa).unwrap();
        f.write_all(&body).unwrap();
        drop(f);
        let seen = std::fs::read(&pb).unwrap();
        assert!(
            seen[..body.len()] == body[..],
            "round {i}: B reads its cached pages of an overwritten file"
        );
        // Unchanged, B's pages are kept and still right.
        assert!(std::fs::read(&pb).unwrap()[..body.len()] == body[..]);
    }

    // A file B holds open (and has read, so cached) is invalidated when A
    // writes to it and closes.
    let mut held = std::fs::File::open(&pb).unwrap();
    let mut before = Vec::new();
    held.read_to_end(&mut before).unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&pa).unwrap();
    f.write_all(b"appended by A").unwrap();
    drop(f);
    held.seek(SeekFrom::Start(0)).unwrap();
    let mut after = Vec::new();
    held.read_to_end(&mut after).unwrap();
    assert_eq!(after.len(), before.len() + 13, "B's open file did not grow");
    assert!(after.ends_with(b"appended by A"));
    // Overwritten in place while B holds it open and cached.
    let mut f = std::fs::OpenOptions::new().write(true).open(&pa).unwrap();
    f.write_all(b"OVERWRITTEN").unwrap();
    drop(f);
    held.seek(SeekFrom::Start(0)).unwrap();
    let mut head = [0u8; 11];
    held.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"OVERWRITTEN", "B's open file kept stale pages");
}

/// Drops the kernel's page, dentry and inode caches (not the client's).
fn drop_kernel_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// Small files a mount wrote whole are read back from its own cache, and
/// that cache never hides what the other mount wrote after it, nor a
/// later partial write of its own.
#[test]
fn files_a_mount_wrote_whole_and_keeps_never_hide_later_writes() {
    let mut tc = TestCluster::start(3, 3);
    let b_path = tc.dir.path().join("mnt-b");
    let b = SecondMount::new(tc.c(), b_path);
    for round in 0..6u64 {
        let name = format!("small{round}");
        let (pa, pb) = (tc.mnt().join(&name), b.path.join(&name));
        let mine = data(4096 + round as usize * 1000, round);
        std::fs::write(&pa, &mine).unwrap();
        assert!(
            std::fs::read(&pa).unwrap() == mine,
            "round {round}: A's own"
        );
        // Stored, then read back with the kernel's caches gone.
        std::thread::sleep(Duration::from_millis(300));
        drop_kernel_caches();
        assert!(
            std::fs::read(&pa).unwrap() == mine,
            "round {round}: A after drop"
        );
        // A partial overwrite of its own.
        let mut f = std::fs::OpenOptions::new().write(true).open(&pa).unwrap();
        f.seek(SeekFrom::Start(100)).unwrap();
        f.write_all(b"PATCH").unwrap();
        drop(f);
        let mut want = mine.clone();
        want[100..105].copy_from_slice(b"PATCH");
        drop_kernel_caches();
        assert!(
            std::fs::read(&pa).unwrap() == want,
            "round {round}: A's patch"
        );
        // B rewrites it (same size, other bytes, and a shorter file).
        let theirs = data(want.len(), 100 + round);
        let mut f = std::fs::OpenOptions::new().write(true).open(&pb).unwrap();
        f.write_all(&theirs).unwrap();
        drop(f);
        assert!(
            std::fs::read(&pa).unwrap() == theirs,
            "round {round}: A sees B's"
        );
        drop_kernel_caches();
        assert!(
            std::fs::read(&pa).unwrap() == theirs,
            "round {round}: after drop"
        );
        std::fs::write(&pb, b"short").unwrap();
        assert_eq!(std::fs::read(&pa).unwrap(), b"short", "round {round}");
    }
}

#[test]
fn a_client_killed_with_sigkill_holds_nobody_up_past_its_lease() {
    let mut tc = TestCluster::start(3, 3);
    let b_path = tc.dir.path().join("mnt-b");
    let b = SecondMount::new(tc.c(), b_path);
    let a_dir = tc.mnt().join("d");
    std::fs::create_dir(&a_dir).unwrap();
    for i in 0..50 {
        std::fs::write(a_dir.join(format!("f{i}")), b"x").unwrap();
    }
    // B caches every entry and attribute of the directory, then dies.
    for i in 0..50 {
        assert!(!absent(&b.path.join(format!("d/f{i}"))));
    }
    let pid = b.pid();
    run(std::process::Command::new("kill").args(["-9", &pid.to_string()]));
    let start = Instant::now();
    for i in 0..50 {
        std::fs::rename(a_dir.join(format!("f{i}")), a_dir.join(format!("g{i}"))).unwrap();
    }
    let took = start.elapsed();
    eprintln!("50 renames over a dead client's leases took {took:?}");
    // One lease (1 s) for the first recall to go unanswered, then nothing
    // waits on the dead session any more.
    assert!(took < Duration::from_secs(20), "renames took {took:?}");
    let start = Instant::now();
    for i in 0..50 {
        std::fs::remove_file(a_dir.join(format!("g{i}"))).unwrap();
    }
    assert!(start.elapsed() < Duration::from_secs(20));
}

/// Record `i` of writer `who`: fixed size, distinct, self-checking; 100
/// bytes, so that some records cross a page boundary.
fn record(who: u8, i: usize) -> Vec<u8> {
    const LEN: usize = 100;
    let mut r = format!("{}{i:06}:", who as char).into_bytes();
    while r.len() < LEN - 1 {
        r.push(b'a' + ((i + r.len() + who as usize) % 26) as u8);
    }
    r.push(b'\n');
    r
}

#[test]
fn appends_from_both_mounts_with_o_append_interleave_without_loss() {
    // A writes 20 records alone (buffered) before B opens the file.
    appends_from_both_mounts(false, 120, 20);
}

#[test]
fn appends_through_o_creat_from_both_mounts_interleave_without_loss() {
    // `>>` on a file nobody created yet: both open with O_CREAT at once.
    appends_from_both_mounts(true, 60, 0);
}

/// Two threads, one per mount, each append `n` records to one file with
/// O_APPEND, one write(2) per record (B opens once A wrote `alone`);
/// afterwards both mounts read every record once, intact, each writer's
/// in its order. `create`: both open with O_CREAT, the file not existing.
fn appends_from_both_mounts(create: bool, n: usize, alone: usize) {
    let mut tc = TestCluster::start(3, 3);
    let b_path = tc.dir.path().join("mnt-b");
    let b = SecondMount::new(tc.c(), b_path);
    let (pa, pb) = (tc.mnt().join("log"), b.path.join("log"));
    if !create {
        std::fs::write(&pa, b"").unwrap();
    }
    let append = move |p: &Path| {
        std::fs::OpenOptions::new()
            .append(true)
            .create(create)
            .open(p)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
    };
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let a = {
        let (pa, barrier) = (pa.clone(), barrier.clone());
        std::thread::spawn(move || {
            if create {
                barrier.wait();
            }
            let mut f = append(&pa);
            for i in 0..n {
                if i == alone {
                    started_tx.send(()).unwrap();
                }
                // One write(2) per record.
                let w = f.write(&record(b'A', i)).unwrap();
                assert_eq!(w, 100, "short append on A");
            }
        })
    };
    if !create {
        started_rx.recv().unwrap();
    }
    let bt = {
        let pb = pb.clone();
        std::thread::spawn(move || {
            if create {
                barrier.wait();
            }
            let mut f = append(&pb);
            for i in 0..n {
                let w = f.write(&record(b'B', i)).unwrap();
                assert_eq!(w, 100, "short append on B");
            }
        })
    };
    a.join().unwrap();
    bt.join().unwrap();
    let bodies = [std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap()];
    for (side, body) in [("A", &bodies[0]), ("B", &bodies[1])] {
        if body.len() != 2 * n * 100 {
            // Which records are missing tells a lost write from a short size.
            let heads: Vec<String> = body
                .chunks(100)
                .map(|r| String::from_utf8_lossy(&r[..r.len().min(7)]).into_owned())
                .collect();
            let other = &bodies[usize::from(side == "A")];
            panic!(
                "{side} reads {} bytes, want {} (the other mount {}); records: {}",
                body.len(),
                2 * n * 100,
                other.len(),
                heads.join(" ")
            );
        }
        let mut seen = std::collections::HashSet::new();
        let mut next = [0usize; 2];
        for (k, r) in body.chunks(100).enumerate() {
            let who = r[0];
            let i: usize = std::str::from_utf8(&r[1..7])
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| {
                    panic!(
                        "{side}: record {k} is torn: {:?}",
                        String::from_utf8_lossy(r)
                    )
                });
            assert!(who == b'A' || who == b'B', "{side}: record {k} is torn");
            assert!(
                r == &record(who, i)[..],
                "{side}: record {k} is torn: {:?}",
                String::from_utf8_lossy(r)
            );
            // Each writer's records stay in its own order.
            let w = usize::from(who == b'B');
            assert_eq!(i, next[w], "{side}: record {k} out of order");
            next[w] += 1;
            assert!(seen.insert((who, i)), "{side}: record {k} twice");
        }
        assert_eq!(seen.len(), 2 * n, "{side}: records lost");
    }
}

#[test]
fn two_writers_see_each_others_writes_while_both_hold_the_file_open() {
    use std::os::unix::fs::FileExt;
    let mut tc = TestCluster::start(3, 3);
    let b_path = tc.dir.path().join("mnt-b");
    let b = SecondMount::new(tc.c(), b_path);
    let (pa, pb) = (tc.mnt().join("shared"), b.path.join("shared"));
    let rw = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .unwrap()
    };
    let fa = rw(&pa);
    // Alone, A's writes are buffered; B's open for writing makes A store
    // them before it returns.
    fa.write_all_at(b"a0", 0).unwrap();
    let fb = rw(&pb);
    let mut buf = [0u8; 2];
    fb.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"a0", "B does not see what A wrote before B opened");
    // From then on every write goes through, in both directions, with no
    // close or fsync in between.
    for i in 0..20u64 {
        let (wa, wb) = (format!("a{i:03}"), format!("b{i:03}"));
        fa.write_all_at(wa.as_bytes(), 100 + 8 * i).unwrap();
        let mut got = [0u8; 4];
        fb.read_exact_at(&mut got, 100 + 8 * i)
            .unwrap_or_else(|e| panic!("round {i}: B reads A's write: {e}"));
        assert_eq!(&got, wa.as_bytes(), "round {i}: B reads stale data");
        fb.write_all_at(wb.as_bytes(), 104 + 8 * i).unwrap();
        fa.read_exact_at(&mut got, 104 + 8 * i)
            .unwrap_or_else(|e| panic!("round {i}: A reads B's write: {e}"));
        assert_eq!(&got, wb.as_bytes(), "round {i}: A reads stale data");
        assert_eq!(
            fa.metadata().unwrap().len(),
            108 + 8 * i,
            "round {i}: A's size"
        );
        assert_eq!(
            fb.metadata().unwrap().len(),
            108 + 8 * i,
            "round {i}: B's size"
        );
    }
}

#[test]
fn a_reader_sees_each_write_of_a_file_another_mount_holds_open() {
    use std::os::unix::fs::FileExt;
    let mut tc = TestCluster::start(3, 3);
    let b_path = tc.dir.path().join("mnt-b");
    let b = SecondMount::new(tc.c(), b_path);
    let read_all = |f: &mut std::fs::File| {
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    };
    let open_w = |p: &Path| std::fs::OpenOptions::new().write(true).open(p).unwrap();

    // B reads (and caches) the file, then A opens it for writing: every
    // write of A is in B's next read, with no close or fsync on A.
    let (pa, pb) = (tc.mnt().join("log"), b.path.join("log"));
    std::fs::write(&pa, b"old contents").unwrap();
    let mut rb = std::fs::File::open(&pb).unwrap();
    assert_eq!(read_all(&mut rb), b"old contents");
    let wa = open_w(&pa);
    let mut model = b"old contents".to_vec();
    for i in 0..20usize {
        let rec = format!("line {i:02}\n");
        wa.write_all_at(rec.as_bytes(), model.len() as u64).unwrap();
        model.extend_from_slice(rec.as_bytes());
        let head = format!("{i:03}");
        wa.write_all_at(head.as_bytes(), 0).unwrap();
        model[..3].copy_from_slice(head.as_bytes());
        assert!(
            read_all(&mut rb) == model,
            "round {i}: B reads {:?}",
            String::from_utf8_lossy(&read_all(&mut rb))
        );
    }
    drop((wa, rb));

    // In-place overwrites of the same length (the size never moves), with
    // B's lease in place by now (its cache, recalls) and without.
    for (round, name) in ["same-size", "same-size-later"].iter().enumerate() {
        if round == 1 {
            std::thread::sleep(Duration::from_secs(3));
        }
        let (pa, pb) = (tc.mnt().join(name), b.path.join(name));
        let mut model = data(20_000, round as u64);
        std::fs::write(&pa, &model).unwrap();
        let mut rb = std::fs::File::open(&pb).unwrap();
        assert!(read_all(&mut rb) == model);
        let wa = open_w(&pa);
        for i in 0..12usize {
            let at = (i * 1_531) % 19_000;
            let patch = format!("<{round}:{i:02}>");
            wa.write_all_at(patch.as_bytes(), at as u64).unwrap();
            model[at..at + patch.len()].copy_from_slice(patch.as_bytes());
            assert!(
                read_all(&mut rb) == model,
                "{name} round {i}: B misses the write at {at}"
            );
        }
    }

    // A writes alone (buffered), then B opens the file for reading: A
    // stores what it buffered before B's open returns, and writes through
    // from then on.
    let (pa, pb) = (tc.mnt().join("later"), b.path.join("later"));
    std::fs::write(&pa, b"").unwrap();
    let wa = open_w(&pa);
    wa.write_all_at(b"buffered on A", 0).unwrap();
    let mut rb = std::fs::File::open(&pb).unwrap();
    assert_eq!(
        read_all(&mut rb),
        b"buffered on A",
        "B does not see what A wrote before B opened"
    );
    wa.write_all_at(b"; then more", 13).unwrap();
    assert_eq!(read_all(&mut rb), b"buffered on A; then more");
}

/// A tree made on A under a write delegation of its directory (creates,
/// writes, chmod, utimes, renames, unlinks, symlinks, subdirectories,
/// all answered by A's client and sent to the MDS later) is seen whole and
/// exact by B's very next look, with no sleep or sync in between; and
/// after B looked, A's further changes there are seen too.
#[test]
fn a_tree_made_under_a_delegation_is_seen_whole_by_the_other_mount() {
    use std::os::unix::fs::symlink;
    let mut tc = TestCluster::start(3, 3);
    let b_path = tc.dir.path().join("mnt-b");
    let b = SecondMount::new(tc.c(), b_path);
    for round in 0..3 {
        let (a_dir, b_dir) = (
            tc.mnt().join(format!("tree{round}")),
            b.path.join(format!("tree{round}")),
        );
        std::fs::create_dir(&a_dir).unwrap();
        std::fs::create_dir(a_dir.join("sub")).unwrap();
        let mtime = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        for i in 0..60u64 {
            let p = a_dir.join(format!("f{i}"));
            std::fs::write(&p, data(i as usize * 37, i)).unwrap();
            if i % 3 == 0 {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
            if i % 4 == 0 {
                let f = std::fs::File::options().write(true).open(&p).unwrap();
                f.set_modified(mtime).unwrap();
            }
            std::fs::write(a_dir.join("sub").join(format!("s{i}")), b"sub").unwrap();
        }
        for i in 0..10 {
            std::fs::rename(a_dir.join(format!("f{i}")), a_dir.join(format!("r{i}"))).unwrap();
            std::fs::remove_file(a_dir.join(format!("f{}", 10 + i))).unwrap();
        }
        // Over an existing file, and a symlink.
        std::fs::rename(a_dir.join("f20"), a_dir.join("f21")).unwrap();
        symlink("f22", a_dir.join("link")).unwrap();

        // B looks right away.
        let mut names: Vec<String> = std::fs::read_dir(&b_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut want: Vec<String> = (0..10)
            .map(|i| format!("r{i}"))
            .chain((21..60).map(|i| format!("f{i}")))
            .chain(["link".to_string(), "sub".to_string()])
            .collect();
        want.sort();
        assert_eq!(names, want, "round {round}: B's listing");
        for i in (0..10).chain(21..60) {
            let name = if i < 10 {
                format!("r{i}")
            } else {
                format!("f{i}")
            };
            let src = if i == 21 { 20 } else { i };
            let p = b_dir.join(&name);
            let m = std::fs::metadata(&p).unwrap();
            assert_eq!(
                std::fs::read(&p).unwrap(),
                data(src as usize * 37, src),
                "round {round}: {name}"
            );
            let mode = if src % 3 == 0 { 0o600 } else { 0o644 };
            assert_eq!(m.mode() & 0o777, mode, "round {round}: mode of {name}");
            if src % 4 == 0 {
                assert_eq!(
                    m.modified().unwrap(),
                    mtime,
                    "round {round}: mtime of {name}"
                );
            }
            assert_eq!(
                m.ino(),
                std::fs::metadata(tc.mnt().join(format!("tree{round}")).join(&name))
                    .unwrap()
                    .ino()
            );
        }
        assert_eq!(
            std::fs::read_link(b_dir.join("link")).unwrap(),
            Path::new("f22")
        );
        assert_eq!(std::fs::read_dir(b_dir.join("sub")).unwrap().count(), 60);
        // B holds the directory now: A's next changes there go to the MDS
        // at once, and B sees them too.
        std::fs::write(a_dir.join("late"), b"late").unwrap();
        std::fs::remove_file(a_dir.join("r0")).unwrap();
        assert_eq!(std::fs::read(b_dir.join("late")).unwrap(), b"late");
        assert!(absent(&b_dir.join("r0")), "round {round}: B still sees r0");
    }
}

fn sorted_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Directories made and emptied under a delegation are removed there too
/// (rm -rf of a tree this mount made): the other mount sees them gone at
/// once, a directory with entries still refuses with ENOTEMPTY, a removed
/// name can be made again, and the parent's link count follows.
#[test]
fn directories_removed_under_a_delegation_are_gone_for_the_other_mount() {
    let mut tc = TestCluster::start(3, 3);
    let b_path = tc.dir.path().join("mnt-b");
    let b = SecondMount::new(tc.c(), b_path);
    for round in 0..2 {
        let top = format!("rmt{round}");
        let (a, bp) = (tc.mnt().join(&top), b.path.join(&top));
        for d in 0..4 {
            for e in 0..3 {
                let dir = a.join(format!("d{d}/e{e}"));
                std::fs::create_dir_all(&dir).unwrap();
                for f in 0..4 {
                    std::fs::write(dir.join(format!("f{f}")), b"x").unwrap();
                }
            }
        }
        let err = std::fs::remove_dir(a.join("d0")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY), "round {round}");
        let err = std::fs::remove_dir(a.join("d0/e0")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY), "round {round}");
        std::fs::remove_dir_all(a.join("d1")).unwrap();
        for f in 0..4 {
            std::fs::remove_file(a.join(format!("d2/e0/f{f}"))).unwrap();
        }
        std::fs::remove_dir(a.join("d2/e0")).unwrap();
        std::fs::create_dir(a.join("d2/e0")).unwrap();
        std::fs::write(a.join("d2/e0/again"), b"again").unwrap();
        // Emptied by a rename out of it.
        std::fs::rename(a.join("d3/e1/f0"), a.join("d3/moved")).unwrap();
        for f in 1..4 {
            std::fs::remove_file(a.join(format!("d3/e1/f{f}"))).unwrap();
        }
        std::fs::remove_dir(a.join("d3/e1")).unwrap();
        assert_eq!(
            std::fs::metadata(&a).unwrap().nlink(),
            2 + 3,
            "round {round}: d0, d2, d3 left"
        );

        assert!(absent(&bp.join("d1")), "round {round}: B still sees d1");
        assert!(
            absent(&bp.join("d3/e1")),
            "round {round}: B still sees d3/e1"
        );
        assert_eq!(sorted_names(&bp), ["d0", "d2", "d3"], "round {round}");
        assert_eq!(sorted_names(&bp.join("d2/e0")), ["again"], "round {round}");
        assert_eq!(std::fs::read(bp.join("d2/e0/again")).unwrap(), b"again");
        assert_eq!(sorted_names(&bp.join("d0/e2")).len(), 4, "round {round}");
        assert_eq!(std::fs::metadata(&bp).unwrap().nlink(), 5, "round {round}");

        std::fs::remove_dir_all(&a).unwrap();
        assert!(absent(&bp), "round {round}: B still sees the tree");
    }
}

/// Listings read ahead for a tree walk never hide a change: one made on
/// the other mount after the read-ahead, nor one this mount made itself.
#[test]
fn listings_read_ahead_never_hide_changes() {
    let mut tc = TestCluster::start(3, 3);
    let b_path = tc.dir.path().join("mnt-b");
    let b = SecondMount::new(tc.c(), b_path);
    let (a, bp) = (tc.mnt().join("ra"), b.path.join("ra"));
    for s in 0..10 {
        std::fs::create_dir_all(a.join(format!("s{s}"))).unwrap();
        for f in 0..3 {
            std::fs::write(a.join(format!("s{s}/f{f}")), b"x").unwrap();
        }
    }
    for round in 0..3 {
        // B lists the top: its subdirectories are read ahead.
        assert_eq!(sorted_names(&bp).len(), 10, "round {round}");
        std::thread::sleep(Duration::from_millis(50));
        let made = format!("new{round}");
        std::fs::write(a.join("s5").join(&made), b"new").unwrap();
        std::fs::remove_file(a.join(format!("s6/f{round}"))).unwrap();
        let s5 = sorted_names(&bp.join("s5"));
        assert!(
            s5.contains(&made),
            "round {round}: B's s5 lacks {made}: {s5:?}"
        );
        let s6 = sorted_names(&bp.join("s6"));
        assert!(
            !s6.contains(&format!("f{round}")),
            "round {round}: B's s6 still has f{round}: {s6:?}"
        );

        // B's own changes after its read-ahead.
        assert_eq!(sorted_names(&bp).len(), 10, "round {round}");
        std::thread::sleep(Duration::from_millis(50));
        let mine = format!("mine{round}");
        std::fs::write(bp.join("s7").join(&mine), b"mine").unwrap();
        std::fs::rename(
            bp.join(format!("s8/f{round}")),
            bp.join(format!("s8/g{round}")),
        )
        .unwrap();
        let s7 = sorted_names(&bp.join("s7"));
        assert!(
            s7.contains(&mine),
            "round {round}: B's s7 lacks {mine}: {s7:?}"
        );
        let s8 = sorted_names(&bp.join("s8"));
        assert!(
            s8.contains(&format!("g{round}")) && !s8.contains(&format!("f{round}")),
            "round {round}: B's s8 after its rename: {s8:?}"
        );
        // And A sees B's.
        assert!(sorted_names(&a.join("s7")).contains(&mine), "round {round}");
    }
}

/// A directory stream through libc: opendir, readdir, telldir, seekdir.
struct Dir(*mut libc::DIR);

impl Dir {
    fn open(p: &Path) -> Dir {
        // SAFETY: a valid C string; the result is checked.
        let d = unsafe { libc::opendir(cpath(p).as_ptr()) };
        assert!(!d.is_null(), "opendir {}", p.display());
        Dir(d)
    }

    /// The next entry: (name, d_ino); None at the end.
    fn next(&mut self) -> Option<(String, u64)> {
        // SAFETY: an open stream; the entry is copied out before the next
        // call on it.
        let e = unsafe { libc::readdir(self.0) };
        if e.is_null() {
            return None;
        }
        // SAFETY: readdir returned a valid entry.
        let (name, ino) = unsafe {
            let name = std::ffi::CStr::from_ptr((*e).d_name.as_ptr());
            (name.to_string_lossy().into_owned(), (*e).d_ino)
        };
        Some((name, ino))
    }

    /// Up to `n` entries other than "." and "..".
    fn take(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next() {
                Some((name, _)) if name == "." || name == ".." => {}
                Some((name, _)) => out.push(name),
                None => break,
            }
        }
        out
    }

    fn tell(&mut self) -> libc::c_long {
        // SAFETY: an open stream.
        unsafe { libc::telldir(self.0) }
    }

    fn seek(&mut self, pos: libc::c_long) {
        // SAFETY: an open stream and a position telldir gave for it.
        unsafe { libc::seekdir(self.0, pos) }
    }

    fn rewind(&mut self) {
        // SAFETY: an open stream.
        unsafe { libc::rewinddir(self.0) }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        // SAFETY: opened by opendir, closed once.
        unsafe { libc::closedir(self.0) };
    }
}

/// d_ino of ".." in a listing of `dir`.
fn dotdot_ino(dir: &Path) -> u64 {
    let mut d = Dir::open(dir);
    while let Some((name, ino)) = d.next() {
        if name == ".." {
            return ino;
        }
    }
    panic!("no .. in {}", dir.display())
}

/// Directories made on a mount are listed from its cache: each entry once
/// (also across telldir/seekdir, a rewind, and pages of a stream the other
/// mount changes the directory under), ".." names the parent (also after
/// a rename), and the other mount's changes show in the next listing.
#[test]
fn listings_of_directories_made_here_are_whole_and_follow_changes() {
    let mut tc = TestCluster::start(3, 3);
    // Made while A is the only client: under its delegation.
    let a = tc.mnt().join("big");
    std::fs::create_dir(&a).unwrap();
    let n = 700;
    let mut want: Vec<String> = (0..n).map(|i| format!("file-{i:04}")).collect();
    for name in &want {
        std::fs::write(a.join(name), b"x").unwrap();
    }
    std::fs::create_dir(a.join("sub")).unwrap();
    std::fs::create_dir(tc.mnt().join("other")).unwrap();
    want.push("sub".into());
    want.sort();
    assert_eq!(sorted_names(&a), want);

    // Across pages, a telldir/seekdir and a rewind.
    let mut d = Dir::open(&a);
    let mut seen = d.take(300);
    let pos = d.tell();
    let next = d.take(50);
    d.seek(pos);
    assert_eq!(d.take(50), next, "seekdir back gives the same entries");
    seen.extend(next);
    seen.extend(d.take(usize::MAX));
    seen.sort();
    assert_eq!(seen, want, "one stream gives each entry once");
    d.rewind();
    let mut again = d.take(usize::MAX);
    again.sort();
    assert_eq!(again, want, "after rewinddir");
    drop(d);

    let b_path = tc.dir.path().join("mnt-b");
    let b = SecondMount::new(tc.c(), b_path);
    let bp = b.path.join("big");
    assert_eq!(sorted_names(&bp), want, "B's listing");
    // The other mount changes the directory in the middle of a stream:
    // every entry it leaves alone is given exactly once.
    let mut d = Dir::open(&a);
    let mut seen = d.take(200);
    std::fs::write(bp.join("from-b"), b"b").unwrap();
    std::fs::remove_file(bp.join("file-0650")).unwrap();
    seen.extend(d.take(usize::MAX));
    drop(d);
    let mut counts = std::collections::HashMap::new();
    for name in &seen {
        *counts.entry(name.as_str()).or_insert(0) += 1;
    }
    for name in want.iter().filter(|n| *n != "file-0650") {
        assert_eq!(counts.get(name.as_str()), Some(&1), "{name} in the stream");
    }
    want.retain(|n| n != "file-0650");
    want.push("from-b".into());
    want.sort();
    assert_eq!(sorted_names(&a), want, "A's next listing has B's changes");

    // "..": the parent's inode, also once moved.
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    std::fs::create_dir(a.join("sub/inner")).unwrap();
    assert_eq!(dotdot_ino(&a.join("sub")), ino(&a));
    assert_eq!(dotdot_ino(&a.join("sub/inner")), ino(&a.join("sub")));
    std::fs::rename(a.join("sub"), tc.mnt().join("other/sub")).unwrap();
    assert_eq!(
        dotdot_ino(&tc.mnt().join("other/sub")),
        ino(&tc.mnt().join("other"))
    );
    assert_eq!(sorted_names(&tc.mnt().join("other/sub")), ["inner"]);
    assert_eq!(sorted_names(&b.path.join("other/sub")), ["inner"]);
}

/// listxattr: the names.
fn listxattr(p: &Path) -> Vec<String> {
    let path = cpath(p);
    let mut buf = [0u8; 1024];
    // SAFETY: a valid C string and a buffer of the length given.
    let n = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "listxattr: {}", std::io::Error::last_os_error());
    buf[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

#[test]
fn selinux_labels_are_stored_only_with_the_selinux_option() {
    let tc = TestCluster::start(1, 3);
    let labelled = SecondMount::with_options(
        tc.cluster.as_ref().unwrap(),
        tc.dir.path().join("mnt-selinux"),
        "selinux",
    );
    let (pa, pb) = (tc.mnt().join("f"), labelled.path.join("f"));
    std::fs::write(&pa, b"x").unwrap();
    const LABEL: &str = "security.selinux";
    // Without the option the filesystem has no SELinux labels (ls -l
    // stops asking after one file) ...
    assert_eq!(getxattr_errno(&pa, LABEL), Err(libc::EOPNOTSUPP));
    let (path, name) = (cpath(&pa), std::ffi::CString::new(LABEL).unwrap());
    // SAFETY: valid C strings and a value of the length given.
    let r = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), b"l".as_ptr().cast(), 1, 0) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );
    // ... while other security attributes and user ones are stored.
    setxattr(&pa, "security.avalon-test", "s");
    setxattr(&pa, "user.note", "u");
    assert_eq!(getxattr(&pb, "security.avalon-test").as_deref(), Some("s"));
    // With it, labels are stored like any attribute.
    assert_eq!(getxattr_errno(&pb, LABEL), Err(libc::ENODATA));
    setxattr(&pb, LABEL, "system_u:object_r:avalon_t:s0");
    assert_eq!(
        getxattr(&pb, LABEL).as_deref(),
        Some("system_u:object_r:avalon_t:s0")
    );
    assert!(listxattr(&pb).contains(&LABEL.to_string()));
    // The mount without the option neither shows nor removes it.
    assert!(!listxattr(&pa).contains(&LABEL.to_string()));
    assert_eq!(getxattr_errno(&pa, LABEL), Err(libc::EOPNOTSUPP));
    removexattr(&pb, LABEL);
    assert_eq!(getxattr_errno(&pb, LABEL), Err(libc::ENODATA));
}
