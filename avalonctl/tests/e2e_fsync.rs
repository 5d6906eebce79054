//! What fsync, fdatasync and O_DSYNC promise on the short path (#20):
//! an overwrite's mtime is committed to the MDS while its data goes to
//! the OSDs, and both survive a kill -9 of the client right after fsync
//! returned; a grown size survives fdatasync and O_DSYNC writes.

mod common;

use common::*;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Kills the mount's client with SIGKILL and mounts again.
fn kill_client_and_remount(tc: &mut TestCluster) {
    let c = tc.c();
    let (_, pid) = c
        .pids()
        .into_iter()
        .find(|(n, _)| n == "client")
        .expect("client pid");
    run(std::process::Command::new("kill").args(["-9", &pid.to_string()]));
    c.unmount();
    c.mount().expect("remount");
}

fn now_ns() -> i128 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    d.as_nanos() as i128
}

fn mtime_ns(p: &Path) -> i128 {
    let m = std::fs::metadata(p).expect("stat");
    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
}

#[test]
fn fsync_of_overwrites_keeps_data_and_mtime_across_a_client_kill() {
    let mut tc = TestCluster::start(3, 3);
    let path = tc.mnt().join("overwritten");
    let first = data(64 << 10, 1);
    std::fs::write(&path, &first).expect("create");
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    let mut want = first.clone();
    // A loop of overwrites within the size, each fsynced: the last
    // fsync's bytes and the mtime that write moved must survive.
    let mut last_write = 0;
    for i in 0..20u64 {
        let piece = data(4096, 100 + i);
        let off = (i % 16) * 4096;
        // The MDS stamps times from this machine's clock too.
        last_write = now_ns();
        f.write_all_at(&piece, off).expect("overwrite");
        f.sync_all().expect("fsync");
        want[off as usize..off as usize + 4096].copy_from_slice(&piece);
    }
    // No close: the client dies with the file open.
    kill_client_and_remount(&mut tc);
    drop(f);
    let got = std::fs::read(&path).expect("read after remount");
    assert_eq!(got.len(), want.len(), "size after the kill");
    assert!(got == want, "fsynced overwrites lost");
    let mtime = mtime_ns(&path);
    assert!(
        mtime >= last_write,
        "mtime of the last fsynced overwrite lost: {mtime} is before that write ({last_write})"
    );
}

#[test]
fn fdatasync_and_o_dsync_keep_a_grown_size_across_a_client_kill() {
    let mut tc = TestCluster::start(3, 3);
    let mnt = tc.mnt();
    let a = mnt.join("appended");
    let b = mnt.join("dsync");
    let mut want_a = Vec::new();
    let mut want_b = Vec::new();
    let fa = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&a)
        .expect("create a");
    let fb = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(&b)
        .expect("create b");
    for i in 0..12u64 {
        let piece = data(4096, 200 + i);
        fa.write_all_at(&piece, want_a.len() as u64)
            .expect("append a");
        fa.sync_data().expect("fdatasync");
        want_a.extend_from_slice(&piece);
        // Overwrite the first block now and then: nothing to commit.
        let off = if i % 3 == 2 { 0 } else { want_b.len() };
        fb.write_all_at(&piece, off as u64).expect("write b");
        if off == want_b.len() {
            want_b.extend_from_slice(&piece);
        } else {
            want_b[..4096].copy_from_slice(&piece);
        }
    }
    kill_client_and_remount(&mut tc);
    drop((fa, fb));
    let got = std::fs::read(&a).expect("read a");
    assert_eq!(got.len(), want_a.len(), "fdatasync'ed size lost");
    assert!(got == want_a, "fdatasync'ed bytes lost");
    let got = std::fs::read(&b).expect("read b");
    assert_eq!(got.len(), want_b.len(), "O_DSYNC size lost");
    assert!(got == want_b, "O_DSYNC bytes lost");
}
