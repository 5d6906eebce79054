//! The chunk store under injected disk faults (the `failpoints` feature):
//! EIO and ENOSPC at each named point of a write, a torn data write, failed
//! fsyncs and failed reads. Fail points are process-wide, so every test
//! holds a `FailScenario` (which serializes them) and this file has its
//! own test binary.
#![cfg(feature = "failpoints")]

use avalon_osd::chunk_store::faults;
use avalon_osd::chunk_store::{ChunkStore, StoreError, VersionMode};
use fail::FailScenario;

const CS: u32 = 256 * 1024;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect()
}

fn write(s: &ChunkStore, ino: u64, off: u32, data: &[u8], sync: bool) -> Result<u64, StoreError> {
    s.write(ino, 0, off, data, CS, VersionMode::Next, sync)
        .map(|o| o.version)
}

fn errno(e: &StoreError) -> Option<i32> {
    match e {
        StoreError::Io { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

/// A store with chunk `(7, 0)` holding `old` at version 1, fsynced.
fn synced_store(dir: &std::path::Path, old: &[u8]) -> ChunkStore {
    let s = ChunkStore::open(dir).expect("open");
    assert_eq!(write(&s, 7, 0, old, true).expect("first write"), 1);
    s
}

/// A write that fails at `point` armed with `action` leaves the chunk
/// readable (its old content, or the new where the data got there) at a
/// version that does not claim the failed write, in this process and
/// after a restart.
fn write_fails_cleanly(point: &str, action: &str, want_errno: i32) {
    let d = tempfile::tempdir().expect("tempdir");
    let old = pattern(40_000, 1);
    let new = pattern(40_000, 2);
    let s = synced_store(d.path(), &old);
    fail::cfg(point, action).expect("arm");
    let e = write(&s, 7, 0, &new, false).expect_err("injected failure");
    assert_eq!(errno(&e), Some(want_errno), "{point}={action}: {e}");
    fail::remove(point);
    let check = |s: &ChunkStore| {
        let (got, v) = s.read(7, 0, 0, CS).expect("read after a failed write");
        assert_eq!(got.len(), old.len());
        assert!(v <= 1, "a failed write must not claim a version: {v}");
        assert!(got == old, "{point}={action}: old content expected");
    };
    check(&s);
    drop(s);
    check(&ChunkStore::open(d.path()).expect("reopen"));
    // And the chunk takes writes again.
    let s = ChunkStore::open(d.path()).expect("reopen");
    assert_eq!(write(&s, 7, 0, &new, true).expect("write"), 2);
    assert_eq!(s.read(7, 0, 0, CS).expect("read").0, new);
}

#[test]
fn eio_and_enospc_before_and_at_the_data_write() {
    let _f = FailScenario::setup();
    for point in [faults::BEFORE_WRITE, faults::WRITE] {
        write_fails_cleanly(point, "return(EIO)", libc::EIO);
        write_fails_cleanly(point, "return(ENOSPC)", libc::ENOSPC);
    }
}

/// A lost copy: reads answer corruption (DataLoss: another replica
/// serves), listings report it corrupt (peering replaces it), writes and
/// syncs fail with EIO, until an install from a replica repairs it.
fn assert_lost_until_installed(s: &ChunkStore, what: &str) {
    assert!(s.is_lost(7, 0), "{what}");
    assert!(
        matches!(s.read(7, 0, 0, 10), Err(StoreError::Corruption { .. })),
        "{what}"
    );
    if let Some(r) = s.try_read_cached(7, 0, 0, 10) {
        assert!(matches!(r, Err(StoreError::Corruption { .. })), "{what}");
    }
    assert_eq!(s.list(|_, _| true).expect("list")[0].state, None, "{what}");
    let e = s.sync_objects(&[7]).expect_err("sync of a lost copy");
    assert_eq!(errno(&e), Some(libc::EIO), "{what}");
    let e = write(s, 7, 0, b"more", false).expect_err("write to a lost copy");
    assert_eq!(errno(&e), Some(libc::EIO), "{what}");
    // Repair, as recovery does, with whatever version the replicas hold.
    assert!(s.install(7, 0, b"repaired", 1, true).expect("install"));
    assert!(!s.is_lost(7, 0));
    assert_eq!(s.read(7, 0, 0, 100).expect("read").0, b"repaired");
    s.sync_objects(&[7]).expect("sync after repair");
    assert_eq!(write(s, 7, 0, b"R", true).expect("write after repair"), 2);
}

/// A failed fsync is final: never retried as if it might succeed.
#[test]
fn failed_fsync_is_final() {
    let _f = FailScenario::setup();
    for point in [faults::BEFORE_FSYNC, faults::FSYNC] {
        // Through a client's sync.
        let d = tempfile::tempdir().expect("tempdir");
        let s = synced_store(d.path(), b"old");
        write(&s, 7, 0, b"new", false).expect("write");
        fail::cfg(point, "return(EIO)").expect("arm");
        let e = s.sync_objects(&[7]).expect_err("sync must fail");
        assert_eq!(errno(&e), Some(libc::EIO));
        fail::remove(point);
        // The disk works again; the sync still fails: the bytes it was
        // to make durable may be gone.
        assert_lost_until_installed(&s, point);
        // Through an O_SYNC write.
        let d2 = tempfile::tempdir().expect("tempdir");
        let s = synced_store(d2.path(), b"old");
        fail::cfg(point, "return(EIO)").expect("arm");
        let e = write(&s, 7, 0, b"sync", true).expect_err("O_SYNC write must fail");
        assert_eq!(errno(&e), Some(libc::EIO));
        fail::remove(point);
        assert_lost_until_installed(&s, point);
    }
}

/// A disk read error loses the copy: DataLoss, repaired from a replica.
#[test]
fn read_error_loses_the_copy() {
    let _f = FailScenario::setup();
    let d = tempfile::tempdir().expect("tempdir");
    let s = synced_store(d.path(), &pattern(5000, 3));
    fail::cfg(faults::READ, "return(EIO)").expect("arm");
    if let Some(r) = s.try_read_cached(7, 0, 0, 100) {
        assert!(r.is_err());
    }
    assert!(matches!(
        s.read(7, 0, 0, 100),
        Err(StoreError::Corruption { .. })
    ));
    fail::remove(faults::READ);
    assert_lost_until_installed(&s, faults::READ);
}

/// A write that stops midway (a torn data write, or data written and the
/// sidecar not) leaves a chunk that reads, in this process and after a
/// restart, as old or new content per 4 KiB page, never as corrupt.
#[test]
fn torn_writes_read_as_old_or_new() {
    let _f = FailScenario::setup();
    for (point, action) in [
        (faults::WRITE, "return(torn)"),
        (faults::AFTER_DATA_WRITE, "return(EIO)"),
        (faults::AFTER_DATA_WRITE, "return(ENOSPC)"),
    ] {
        let d = tempfile::tempdir().expect("tempdir");
        let old = pattern(40_000, 1);
        let new = pattern(60_000, 2);
        let s = synced_store(d.path(), &old);
        fail::cfg(point, action).expect("arm");
        write(&s, 7, 0, &new, false).expect_err("injected failure");
        fail::remove(point);
        let check = |s: &ChunkStore| {
            let (got, _) = s.read(7, 0, 0, CS).expect("a torn write is not corruption");
            assert!(got.len() == old.len() || got.len() == new.len());
            for (p, page) in got.chunks(4096).enumerate() {
                let at = |b: &[u8], i: usize| b.get(p * 4096 + i).copied().unwrap_or(0);
                let is = |b: &[u8]| (0..page.len()).all(|i| page[i] == at(b, i));
                assert!(is(&old) || is(&new), "{point}={action}: page {p} torn");
            }
            got
        };
        let here = check(&s);
        drop(s);
        let s = ChunkStore::open(d.path()).expect("restart");
        assert_eq!(check(&s), here);
        // Listed as corrupt, so that peering replaces it by a replica's.
        let l = s.list(|_, _| true).expect("list");
        assert_eq!(l[0].state, None, "{point}={action}");
    }
}
