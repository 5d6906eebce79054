//! End-to-end tests of the client's write-back buffer through a real
//! mount: many small overlapping writes read back exactly (before and
//! after close, and after the caches are dropped), and a buffered write
//! that cannot reach the OSDs fails the next fsync instead of vanishing.
//!
//! Run with `cargo build --workspace && AVALON_BIN_DIR=target/debug cargo
//! test -p avalonctl --test e2e_writeback -- --test-threads=1` (root, FUSE).

mod common;

use common::{data, TestCluster};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

#[test]
fn small_overlapping_writes_read_back_exactly() {
    let mut t = TestCluster::start(1, 3);
    t.c().mount().expect("mount");
    let path = t.mnt().join("overlap");
    const SIZE: usize = 9 << 20; // three chunks
    let mut model = vec![0u8; SIZE];
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .expect("create");
    // Pseudo-random small writes, many overlapping, some across chunks.
    let mut end = 0usize;
    let mut x: u64 = 0x1234_5678;
    for i in 0..3000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (SIZE as u64 - 70_000)) as usize;
        let len = 1 + (x >> 40) as usize % 65_536;
        let d = data(len, i);
        f.write_all_at(&d, off as u64).expect("write");
        model[off..off + len].copy_from_slice(&d);
        end = end.max(off + len);
        if i % 500 == 0 {
            // Reads of ranges with buffered writes see them.
            let mut got = vec![0u8; 10_000];
            f.read_exact_at(&mut got, off as u64).expect("read");
            assert_eq!(got[..len.min(10_000)], model[off..off + len.min(10_000)]);
        }
    }
    // Overwrite across the chunk boundary one last time.
    let d = data(100_000, 99);
    let off = (4 << 20) - 50_000;
    f.write_all_at(&d, off as u64).expect("write");
    model[off..off + d.len()].copy_from_slice(&d);
    let len = end.max(off + d.len());
    let mut got = vec![0u8; len];
    f.read_exact_at(&mut got, 0).expect("read back open");
    assert!(got == model[..len], "read back before close differs");
    // Without the kernel's pages every read reaches the client, which
    // answers a range its buffer holds whole from there and flushes for
    // the others; small reads land on either kind.
    let fresh = data(20_000, 7);
    let off = 5 << 20;
    f.write_all_at(&fresh, off as u64).expect("write");
    model[off..off + fresh.len()].copy_from_slice(&fresh);
    for (from, n) in [
        (off + 100, 5_000),
        (off - 3_000, 10_000),
        (off + 19_000, 4_000),
        (17, 300),
    ] {
        use std::os::unix::io::AsRawFd;
        // SAFETY: a valid descriptor; only a hint.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let mut got = vec![0u8; n];
        f.read_exact_at(&mut got, from as u64)
            .expect("read uncached");
        assert!(
            got == model[from..from + n],
            "uncached read of {n} at {from} differs"
        );
    }
    drop(f);
    // From the OSDs, with nothing cached in the kernel.
    drop_caches();
    let got = std::fs::read(&path).expect("read back");
    assert_eq!(got.len(), len);
    assert!(got == model[..len], "read back after close differs");
    // And from a fresh mount (another client).
    t.c().unmount();
    t.c().mount().expect("remount");
    let got = std::fs::read(&path).expect("read back remounted");
    assert!(got == model[..len], "read back from a new mount differs");
}

#[test]
fn failed_buffered_write_fails_fsync() {
    let mut t = TestCluster::start(1, 3);
    t.c().mount().expect("mount");
    let path = t.mnt().join("doomed");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .expect("create");
    f.write_all_at(&data(8192, 1), 0).expect("write");
    f.sync_all().expect("fsync while the OSDs are up");
    // With two OSDs of three gone, no write can reach its quorum (m=2).
    t.c().kill_osd(1);
    t.c().kill_osd(2);
    let start = Instant::now();
    f.write_all_at(&data(4096, 2), 4096)
        .expect("buffered write is accepted");
    let r = f.sync_all();
    assert!(
        r.is_err(),
        "fsync must report the lost write (took {:?})",
        start.elapsed()
    );
    assert!(start.elapsed() < Duration::from_secs(120));
    drop(f);
    t.c().restart_stopped().expect("restart");
}

#[test]
fn overwriting_in_place_moves_mtime_and_reopens_read_the_new_bytes() {
    use std::os::unix::fs::MetadataExt;
    let mut t = TestCluster::start(1, 3);
    t.c().mount().expect("mount");
    let path = t.mnt().join("inplace");
    std::fs::write(&path, data(100_000, 1)).unwrap();
    let before = std::fs::metadata(&path).unwrap();
    // Read once, so the kernel and the client cache the pages.
    assert_eq!(std::fs::read(&path).unwrap(), data(100_000, 1));
    std::thread::sleep(Duration::from_millis(20));
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"new bytes", 500).unwrap();
    drop(f);
    let after = std::fs::metadata(&path).unwrap();
    assert_eq!(after.len(), 100_000);
    assert!(
        (after.mtime(), after.mtime_nsec()) > (before.mtime(), before.mtime_nsec()),
        "an overwrite within the file left mtime as it was"
    );
    assert!((after.ctime(), after.ctime_nsec()) > (before.ctime(), before.ctime_nsec()));
    let mut want = data(100_000, 1);
    want[500..509].copy_from_slice(b"new bytes");
    assert!(
        std::fs::read(&path).unwrap() == want,
        "reopen read stale bytes"
    );
}
