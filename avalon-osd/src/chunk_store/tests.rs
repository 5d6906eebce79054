//! Unit tests of the chunk store.

use super::layout::META_SUFFIX;
use super::open_cache::open_chunk_budget;
use super::sidecar::{blocks_for, ChunkMeta, META_MAGIC, V1_BLOCK_SIZE};
use super::*;
use crate::direct_io;
use proptest::prelude::*;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;

pub(super) const CS: u32 = 256 * 1024;
pub(super) const B: usize = BLOCK_SIZE as usize;

pub(super) fn store() -> (tempfile::TempDir, ChunkStore) {
    let d = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open(d.path().join("chunks")).expect("open");
    (d, s)
}

pub(super) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn w(s: &ChunkStore, ino: u64, idx: u64, off: u32, data: &[u8]) -> u64 {
    s.write(ino, idx, off, data, CS, VersionMode::Next, false)
        .expect("write")
        .version
}

/// Cuts object `ino` to `size` bytes as a client's truncate does: a cut
/// of every stored chunk at or past `size`, each as its primary would.
fn truncate_object(s: &ChunkStore, ino: u64, size: u64, chunk_size: u32) -> Result<()> {
    let cs = u64::from(effective_chunk_size(chunk_size)?);
    for index in s.indexes(ino)? {
        let keep = match index.checked_mul(cs) {
            Some(start) => size.saturating_sub(start).min(cs),
            None => 0,
        };
        if keep < cs {
            s.apply(
                ino,
                index,
                keep as u32,
                Payload::Cut,
                chunk_size,
                VersionMode::Next,
                true,
            )?;
        }
    }
    Ok(())
}

fn r(s: &ChunkStore, ino: u64, idx: u64, off: u32, len: u32) -> Vec<u8> {
    s.read(ino, idx, off, len).expect("read").0
}

/// A format-1 sidecar (crcs over 64 KiB blocks) for `data`.
fn v1_sidecar(version: u64, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(META_MAGIC);
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&(data.len() as u64).to_le_bytes());
    let crcs: Vec<u32> = data
        .chunks(V1_BLOCK_SIZE as usize)
        .map(crc32c::crc32c)
        .collect();
    b.extend_from_slice(&(crcs.len() as u32).to_le_bytes());
    for c in crcs {
        b.extend_from_slice(&c.to_le_bytes());
    }
    let own = crc32c::crc32c(&b);
    b.extend_from_slice(&own.to_le_bytes());
    b
}

#[test]
fn format_1_sidecars_are_converted_once_verified() {
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path().join("chunks");
    let data = pattern(3 * V1_BLOCK_SIZE as usize + 1000, 7);
    {
        let s = ChunkStore::open(&root).expect("open");
        w(&s, 51, 0, 0, &data);
        w(&s, 52, 0, 0, &data);
        // As an older OSD left them.
        fs::write(s.meta_path(51, 0), v1_sidecar(1, &data)).expect("meta");
        fs::write(s.meta_path(52, 0), v1_sidecar(1, &data)).expect("meta");
        let mut bad = data.clone();
        bad[70_000] ^= 1;
        fs::write(s.data_path(52, 0), &bad).expect("data");
    }
    let s = ChunkStore::open(&root).expect("restart");
    assert_eq!(s.meta_version(51, 0), Some(1));
    assert_eq!(r(&s, 51, 0, 0, data.len() as u32), data);
    let raw = fs::read(s.meta_path(51, 0)).expect("meta");
    let m = ChunkMeta::decode(&raw).expect("current format on disk");
    assert_eq!(m.crcs.len(), blocks_for(data.len() as u64));
    assert_eq!(m.version, 1);
    // A copy that does not match its old checksums is corrupt, not
    // blessed with new ones.
    assert!(matches!(
        s.read(52, 0, 0, 10),
        Err(StoreError::Corruption { .. })
    ));
}

#[test]
fn missing_chunk_is_a_hole() {
    let (_d, s) = store();
    assert_eq!(s.read(5, 0, 0, 100).expect("read"), (vec![], 0));
    assert_eq!(s.version(5, 0).expect("version"), 0);
}

#[test]
fn block_boundaries() {
    let (_d, s) = store();
    let a = pattern(B, 1);
    assert_eq!(w(&s, 1, 0, 0, &a), 1);
    assert_eq!(r(&s, 1, 0, 0, CS), a);
    // Exactly the next block.
    let b = pattern(B, 2);
    assert_eq!(w(&s, 1, 0, B as u32, &b), 2);
    let mut want = a.clone();
    want.extend_from_slice(&b);
    assert_eq!(r(&s, 1, 0, 0, CS), want);
    // Straddling a boundary.
    let c = pattern(100, 3);
    w(&s, 1, 0, (B - 50) as u32, &c);
    want[B - 50..B + 50].copy_from_slice(&c);
    assert_eq!(r(&s, 1, 0, 0, CS), want);
    assert_eq!(r(&s, 1, 0, (B - 10) as u32, 20), want[B - 10..B + 10]);
    // Up to the end of the chunk.
    let d = pattern(10, 4);
    w(&s, 1, 0, CS - 10, &d);
    want.resize(CS as usize, 0);
    want[CS as usize - 10..].copy_from_slice(&d);
    assert_eq!(r(&s, 1, 0, 0, CS), want);
    assert_eq!(s.used_bytes(), u64::from(CS));
    assert_eq!(s.chunk_count(), 1);
}

#[test]
fn zero_length_write_and_read() {
    let (_d, s) = store();
    assert_eq!(w(&s, 2, 3, 100, &[]), 1);
    assert_eq!(s.read(2, 3, 0, 10).expect("read"), (vec![], 1));
    assert_eq!(s.chunk_count(), 1);
    assert_eq!(s.used_bytes(), 0);
    w(&s, 2, 3, 0, b"hello");
    assert_eq!(s.read(2, 3, 0, 0).expect("read"), (vec![], 2));
    assert_eq!(r(&s, 2, 3, 1, 3), b"ell");
}

#[test]
fn write_past_end_leaves_zero_hole() {
    let (_d, s) = store();
    w(&s, 3, 0, 0, b"abc");
    w(&s, 3, 0, (2 * B + 7) as u32, b"xyz");
    let got = r(&s, 3, 0, 0, CS);
    assert_eq!(got.len(), 2 * B + 10);
    assert_eq!(&got[..3], b"abc");
    assert!(got[3..2 * B + 7].iter().all(|&b| b == 0));
    assert_eq!(&got[2 * B + 7..], b"xyz");
    // Short read past the end.
    assert_eq!(r(&s, 3, 0, (2 * B + 8) as u32, 100), b"yz");
    assert_eq!(r(&s, 3, 0, (2 * B + 20) as u32, 100), b"");
}

#[test]
fn overwrite_and_versions() {
    let (_d, s) = store();
    w(&s, 4, 1, 0, &pattern(1000, 1));
    w(&s, 4, 1, 0, &pattern(1000, 9));
    assert_eq!(r(&s, 4, 1, 0, 1000), pattern(1000, 9));
    assert_eq!(s.version(4, 1).expect("v"), 2);
    // Replicated writes.
    let ex = |v, force| VersionMode::Exact { version: v, force };
    let o = s
        .write(4, 1, 0, b"x", CS, ex(2, false), false)
        .expect("dup");
    assert!(o.duplicate);
    assert_eq!(o.version, 2);
    assert_eq!(r(&s, 4, 1, 0, 1), b"x");
    assert!(matches!(
        s.write(4, 1, 0, b"x", CS, ex(1, false), false),
        Err(StoreError::StaleVersion { .. })
    ));
    assert!(matches!(
        s.write(4, 1, 0, b"x", CS, ex(4, false), false),
        Err(StoreError::VersionGap { .. })
    ));
    assert_eq!(
        s.write(4, 1, 0, b"y", CS, ex(3, false), true)
            .expect("v3")
            .version,
        3
    );
    assert_eq!(
        s.write(4, 1, 0, b"z", CS, ex(9, true), true)
            .expect("v9")
            .version,
        9
    );
    assert_eq!(r(&s, 4, 1, 0, 2), vec![b'z', pattern(1000, 9)[1]]);
    s.sync_chunk(4, 1).expect("sync");
    s.sync_chunk(4, 77).expect("sync missing");
}

/// Versions stamped with map epochs, and replicas that apply a write only
/// on top of the version the primary held: a copy whose history diverged
/// (the same counter under another epoch) is never mixed with another's.
#[test]
fn epoch_versions_and_writes_after_a_named_version() {
    use crate::chunk_version::{epoch_of, next};
    let (_d, s) = store();
    let primary = |s: &ChunkStore, data: &[u8], epoch| {
        s.write(5, 0, 0, data, CS, VersionMode::NextIn { epoch }, false)
            .expect("primary write")
    };
    let a = primary(&s, b"a", 3);
    assert_eq!((a.previous, epoch_of(a.version)), (0, 3));
    let b = primary(&s, b"b", 3);
    assert_eq!((b.previous, b.version), (a.version, a.version + 1));
    // A newer map's write orders after everything of the older one.
    let c = primary(&s, b"c", 4);
    assert_eq!(epoch_of(c.version), 4);
    assert!(c.version > b.version);

    // A replica at version b.
    let (_d2, r2) = store();
    let after = |prev, version| VersionMode::After { prev, version };
    for (prev, v, data) in [(0, a.version, b"a"), (a.version, b.version, b"b")] {
        r2.write(5, 0, 0, data, CS, after(prev, v), false)
            .expect("in order");
    }
    // The same write again (a retried forward) is a duplicate.
    let o = r2
        .write(5, 0, 0, b"b", CS, after(a.version, b.version), false)
        .expect("duplicate");
    assert!(o.duplicate);
    // A primary of another history at the same counter (epoch 9 on top of
    // something this copy never held) is refused, not mixed in.
    let other = next(next(0, 9).unwrap(), 9).unwrap();
    assert!(matches!(
        r2.write(5, 0, 0, b"x", CS, after(next(0, 9).unwrap(), other), false),
        Err(StoreError::VersionGap { .. })
    ));
    // A version below the stored one is stale.
    assert!(matches!(
        r2.write(5, 0, 0, b"x", CS, after(0, a.version), false),
        Err(StoreError::StaleVersion { .. })
    ));
    assert_eq!(r(&r2, 5, 0, 0, 1), b"b");
    // The newer map's write lands on top of b.
    r2.write(5, 0, 0, b"c", CS, after(b.version, c.version), false)
        .expect("c on b");
    assert_eq!(r2.version(5, 0).expect("v"), c.version);
    assert_eq!(r(&r2, 5, 0, 0, 1), b"c");
}

#[test]
fn truncate_and_delete() {
    let (_d, s) = store();
    for i in 0..4 {
        w(&s, 7, i, 0, &pattern(CS as usize, i as u8));
    }
    assert_eq!(s.chunk_count(), 4);
    // Cut inside chunk 1, inside its second block.
    let size = u64::from(CS) + B as u64 + 123;
    truncate_object(&s, 7, size, CS).expect("truncate");
    // Emptied chunks stay as tombstones one version newer.
    assert_eq!(s.chunk_count(), 4);
    assert_eq!(s.used_bytes(), size);
    assert_eq!(r(&s, 7, 0, 0, CS), pattern(CS as usize, 0));
    assert_eq!(s.version(7, 0).expect("v"), 1);
    assert_eq!(r(&s, 7, 1, 0, CS), pattern(CS as usize, 1)[..B + 123]);
    assert_eq!(s.version(7, 1).expect("v"), 2);
    assert_eq!(s.read(7, 2, 0, 10).expect("read"), (vec![], 2));
    // A repeated truncate changes nothing.
    truncate_object(&s, 7, size, CS).expect("truncate again");
    assert_eq!(s.version(7, 1).expect("v"), 2);
    assert_eq!(s.version(7, 3).expect("v"), 2);
    // Growing again after a truncate keeps the tail checksums right.
    w(&s, 7, 1, (B + 200) as u32, b"q");
    let got = r(&s, 7, 1, 0, CS);
    assert_eq!(got.len(), B + 201);
    assert!(got[B + 123..B + 200].iter().all(|&b| b == 0));
    // Truncate at a chunk boundary empties the chunk.
    truncate_object(&s, 7, u64::from(CS), CS).expect("truncate");
    assert_eq!(s.chunk_count(), 4);
    assert_eq!(s.version(7, 1).expect("v"), 4);
    assert_eq!(s.used_bytes(), u64::from(CS));
    s.delete_object(7).expect("delete");
    assert_eq!(s.chunk_count(), 0);
    assert_eq!(s.used_bytes(), 0);
    assert_eq!(files_of(s.root(), 7).expect("list"), Vec::<PathBuf>::new());
    s.delete_object(7).expect("delete twice");
    truncate_object(&s, 7, 0, CS).expect("truncate missing");
}

#[test]
fn flipped_byte_is_corruption() {
    let (_d, s) = store();
    let data = pattern(3 * B, 5);
    w(&s, 9, 2, 0, &data);
    let path = s.data_path(9, 2);
    let mut raw = fs::read(&path).expect("read raw");
    raw[B + 17] ^= 0x40;
    fs::write(&path, &raw).expect("write raw");
    // Untouched blocks still read fine.
    assert_eq!(r(&s, 9, 2, 0, B as u32), data[..B]);
    assert_eq!(r(&s, 9, 2, 2 * B as u32, B as u32), data[2 * B..]);
    match s.read(9, 2, (B + 10) as u32, 10) {
        Err(StoreError::Corruption { detail, .. }) => assert!(detail.contains("block 1")),
        other => panic!("expected corruption, got {other:?}"),
    }
    // A damaged sidecar is corruption too (once loaded: a running
    // store trusts the copy it verified and keeps writing).
    let mpath = s.meta_path(9, 2);
    let mut m = fs::read(&mpath).expect("meta");
    m[10] ^= 1;
    fs::write(&mpath, &m).expect("meta write");
    let s = ChunkStore::open(s.root()).expect("restart");
    assert!(matches!(
        s.read(9, 2, 0, 1),
        Err(StoreError::Corruption { .. })
    ));
    // A data file that lost its tail.
    w(&s, 9, 3, 0, &data);
    File::options()
        .write(true)
        .open(s.data_path(9, 3))
        .and_then(|f| f.set_len(10))
        .expect("cut");
    assert!(matches!(
        s.read(9, 3, 0, 1),
        Err(StoreError::Corruption { .. })
    ));
}

#[test]
fn bad_arguments_rejected() {
    let (_d, s) = store();
    let bad = |r: Result<WriteOutcome>| matches!(r, Err(StoreError::InvalidArgument(_)));
    assert!(bad(s.write(0, 0, 0, b"x", CS, VersionMode::Next, false)));
    assert!(bad(s.write(1, 0, CS, b"x", CS, VersionMode::Next, false)));
    assert!(bad(s.write(
        1,
        0,
        u32::MAX,
        b"x",
        CS,
        VersionMode::Next,
        false
    )));
    assert!(bad(s.write(1, 0, 0, b"x", 1, VersionMode::Next, false)));
    assert!(bad(s.write(
        1,
        0,
        0,
        b"x",
        u32::MAX,
        VersionMode::Next,
        false
    )));
    assert!(bad(s.write(
        1,
        0,
        0,
        b"x",
        CS,
        VersionMode::Exact {
            version: 0,
            force: false
        },
        false
    )));
    assert!(matches!(
        s.read(1, 0, u32::MAX, u32::MAX),
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        s.read(0, 0, 0, 1),
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(truncate_object(&s, 1, 0, 7).is_err());
    assert!(s.delete_object(0).is_err());
    // Index overflow in truncate is treated as "past the size".
    w(&s, 1, u64::MAX, 0, b"x");
    truncate_object(&s, 1, u64::MAX, CS).expect("truncate");
    assert_eq!(s.read(1, u64::MAX, 0, 10).expect("read"), (vec![], 2));
    assert_eq!(s.used_bytes(), 0);
    assert_eq!(
        effective_chunk_size(0).expect("default"),
        DEFAULT_CHUNK_SIZE
    );
    assert!(check_range(u64::MAX, 1, CS).is_err());
}

#[test]
fn extents_show_written_ranges_only() {
    let (_d, s) = store();
    // Chunk 0: data in its first block, then a never-written gap, then
    // data in block 3; chunk 2: data in block 1 only; chunk 1 absent.
    w(&s, 5, 0, 0, &pattern(B, 1));
    w(&s, 5, 0, (3 * B) as u32, &pattern(10, 2));
    w(&s, 5, 2, B as u32, &pattern(B, 3));
    let (all, more) = s.extents(5, 0, 10).expect("extents");
    assert!(!more);
    let idx: Vec<u64> = all.iter().map(|c| c.0).collect();
    assert_eq!(idx, vec![0, 2]);
    // The local filesystem may allocate more coarsely, never less.
    let covers = |r: &[(u64, u64)], a: u64, b: u64| r.iter().any(|x| x.0 <= a && b <= x.1);
    assert!(covers(&all[0].1, 0, B as u64));
    assert!(covers(&all[0].1, 3 * B as u64, 3 * B as u64 + 10));
    assert!(all[0].1.iter().all(|x| x.1 <= 3 * B as u64 + 10));
    assert!(covers(&all[1].1, B as u64, 2 * B as u64));
    // Version and stored length from the sidecars (what the MDS recovers
    // a lost writer's size from).
    assert_eq!(all[0].2.map(|v| v.1), Some(3 * B as u64 + 10));
    assert_eq!(all[1].2.map(|v| v.1), Some(2 * B as u64));
    assert!(all[0].2.is_some_and(|v| v.0 > 0));
    // A punched block becomes a hole where the filesystem can punch.
    s.apply(
        5,
        2,
        B as u32,
        Payload::Zero(B as u32),
        CS,
        VersionMode::Next,
        false,
    )
    .expect("zero");
    let (c2, _) = s.extents(5, 2, 10).expect("extents");
    assert_eq!(c2.len(), 1);
    // From an index on, and at most `max` chunks.
    let (first, more) = s.extents(5, 0, 1).expect("extents");
    assert_eq!((first.len(), first[0].0, more), (1, 0, true));
    assert!(s.extents(5, 3, 10).expect("extents").0.is_empty());
    assert!(s.extents(6, 0, 10).expect("extents").0.is_empty());
}

#[test]
fn zero_range_punches_and_versions() {
    let (_d, s) = store();
    let data = pattern(3 * B, 7);
    w(&s, 11, 0, 0, &data);
    let z = |off, len| {
        s.apply(11, 0, off, Payload::Zero(len), CS, VersionMode::Next, false)
            .expect("zero")
            .version
    };
    // Across a block boundary.
    assert_eq!(z((B - 10) as u32, 20), 2);
    let mut want = data.clone();
    want[B - 10..B + 10].fill(0);
    assert_eq!(r(&s, 11, 0, 0, CS), want);
    // Whole aligned block.
    z(2 * B as u32, B as u32);
    want[2 * B..].fill(0);
    assert_eq!(r(&s, 11, 0, 0, CS), want);
    // Past the stored end: extends nothing.
    z((3 * B + 5) as u32, 100);
    assert_eq!(r(&s, 11, 0, 0, CS).len(), 3 * B);
    // Straddling the end: zeros up to it, no growth.
    z((3 * B - 5) as u32, 100);
    want[3 * B - 5..].fill(0);
    assert_eq!(r(&s, 11, 0, 0, CS), want);
    assert_eq!(s.version(11, 0).expect("v"), 5);
    // Zero length: a version bump only.
    assert_eq!(z(0, 0), 6);
    assert!(s
        .apply(
            11,
            0,
            CS - 1,
            Payload::Zero(2),
            CS,
            VersionMode::Next,
            false
        )
        .is_err());
    // Survives a reopen (crcs right).
    let s2 = ChunkStore::open(s.root()).expect("reopen");
    assert_eq!(r(&s2, 11, 0, 0, CS), want);
    assert_eq!(s2.used_bytes(), 3 * B as u64);
}

#[test]
fn dirty_tracking_and_sync() {
    let (_d, s) = store();
    w(&s, 1, 0, 0, b"a");
    w(&s, 1, 1, 0, b"b");
    w(&s, 2, 0, 0, b"c");
    s.write(3, 0, 0, b"d", CS, VersionMode::Next, true)
        .expect("sync write");
    assert_eq!(s.dirty_count(), 3);
    s.sync_objects(&[1, 99]).expect("sync");
    assert_eq!(s.dirty_count(), 1);
    s.delete_object(2).expect("delete");
    assert_eq!(s.dirty_count(), 0);
    s.sync_objects(&[2]).expect("sync deleted");
}

#[test]
fn list_and_install() {
    let (_d, s) = store();
    w(&s, 5, 0, 0, b"old");
    w(&s, 5, 3, 0, b"x");
    let l = s.list(|_, _| true).expect("list");
    assert_eq!(
        l.iter()
            .map(|c| (c.ino, c.index, c.state))
            .collect::<Vec<_>>(),
        vec![(5, 0, Some((1, 3))), (5, 3, Some((1, 1)))]
    );
    assert_eq!(s.list(|_, i| i == 3).expect("list").len(), 1);
    // Newer copy replaces; older or equal does not (unless asked).
    let mut copy = pattern(2 * B + 3, 1);
    copy[B..2 * B].fill(0);
    assert!(s.install(5, 0, &copy, 4, false).expect("install"));
    assert_eq!(s.read(5, 0, 0, CS).expect("read"), (copy.clone(), 4));
    assert!(!s.install(5, 0, b"zz", 3, false).expect("older"));
    assert!(!s.install(5, 0, b"zz", 4, false).expect("equal"));
    assert!(s.install(5, 0, &copy, 4, true).expect("equal, forced"));
    assert_eq!(s.used_bytes(), copy.len() as u64 + 1);
    // Into a missing chunk and a corrupt one.
    assert!(s.install(6, 2, b"new", 9, false).expect("missing"));
    assert_eq!(s.read(6, 2, 0, 10).expect("read"), (b"new".to_vec(), 9));
    let path = s.data_path(5, 3);
    fs::write(&path, b"y").expect("flip");
    assert!(matches!(
        s.read(5, 3, 0, 1),
        Err(StoreError::Corruption { .. })
    ));
    assert_eq!(s.meta_version(5, 3), Some(1));
    assert!(s.install(5, 3, b"x", 1, true).expect("repair"));
    assert_eq!(s.read(5, 3, 0, 1).expect("read"), (b"x".to_vec(), 1));
    assert_eq!(s.chunk_count(), 3);
    let reopened = ChunkStore::open(s.root()).expect("reopen");
    assert_eq!(reopened.chunk_count(), 3);
    assert_eq!(reopened.used_bytes(), s.used_bytes());
    // Corrupt metadata is listed without a state (after a restart:
    // a running store lists the copy it verified).
    fs::write(s.meta_path(6, 2), b"junk").expect("junk");
    let s = ChunkStore::open(s.root()).expect("restart");
    let l = s.list(|i, _| i == 6).expect("list");
    assert_eq!(l[0].state, None);
    assert!(s.install(0, 0, b"", 1, false).is_err());
    assert!(s.install(1, 0, b"", 0, false).is_err());
}

#[test]
fn reopen_counts_usage() {
    let d = tempfile::tempdir().expect("tempdir");
    {
        let s = ChunkStore::open(d.path()).expect("open");
        w(&s, 1, 0, 0, &pattern(1000, 1));
        w(&s, 2, 5, 10, &pattern(20, 1));
    }
    let s = ChunkStore::open(d.path()).expect("reopen");
    assert_eq!(s.chunk_count(), 2);
    assert_eq!(s.used_bytes(), 1030);
}

#[test]
fn open_chunk_cache_is_bounded_and_follows_changes() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open_with_cache(d.path(), 2).expect("open");
    for i in 0..6u64 {
        w(&s, 21, i, 0, &pattern(3 * B + 5, i as u8));
        assert!(s.open_chunk_count() <= 2);
    }
    // Evicted chunks reopen from disk; every read still verifies.
    for i in 0..6u64 {
        assert_eq!(r(&s, 21, i, 0, CS), pattern(3 * B + 5, i as u8));
        assert_eq!(s.version(21, i).expect("v"), 1);
    }
    assert_eq!(s.open_chunk_count(), 2);
    // An install replaces the files under an open chunk.
    r(&s, 21, 5, 0, 1);
    assert!(s.install(21, 5, b"fresh", 7, false).expect("install"));
    assert_eq!(s.read(21, 5, 0, 100).expect("read"), (b"fresh".to_vec(), 7));
    w(&s, 21, 5, 5, b"!");
    assert_eq!(
        s.read(21, 5, 0, 100).expect("read"),
        (b"fresh!".to_vec(), 8)
    );
    // Truncate and delete work on the files; the open copies follow.
    truncate_object(&s, 21, u64::from(CS) * 5 + 2, CS).expect("truncate");
    assert_eq!(s.read(21, 5, 0, 100).expect("read"), (b"fr".to_vec(), 9));
    w(&s, 21, 5, 2, b"X");
    assert_eq!(r(&s, 21, 5, 0, 100), b"frX");
    assert!(s.remove_chunk(21, 4, u64::MAX).expect("remove"));
    assert_eq!(s.read(21, 4, 0, 10).expect("read"), (vec![], 0));
    s.delete_object(21).expect("delete");
    assert_eq!(s.read(21, 5, 0, 10).expect("read"), (vec![], 0));
    assert_eq!(s.chunk_count(), 0);
    // Under a small process file limit the budget shrinks, never to 0.
    assert!(open_chunk_budget() >= 16);
}

#[test]
fn nonblocking_reads_match_blocking_ones() {
    let (_d, s) = store();
    let data = pattern(3 * B + 77, 4);
    w(&s, 61, 0, 0, &data);
    for (off, len) in [
        (0u32, 10u32),
        (B as u32 - 3, 9),
        (0, CS),
        (3 * B as u32 + 70, 100),
    ] {
        if let Some(got) = s.try_read_cached(61, 0, off, len) {
            assert_eq!(got.expect("read"), s.read(61, 0, off, len).expect("read"));
        }
    }
    // Not open: the caller must use the blocking path.
    assert!(s.try_read_cached(61, 1, 0, 10).is_none());
    // Corruption is still detected.
    let path = s.data_path(61, 0);
    let mut raw = fs::read(&path).expect("raw");
    raw[3] ^= 1;
    fs::write(&path, &raw).expect("flip");
    if let Some(r) = s.try_read_cached(61, 0, 0, 10) {
        assert!(matches!(r, Err(StoreError::Corruption { .. })));
    }
}

#[test]
fn scrub_checks_data_and_sidecar() {
    let (_d, s) = store();
    w(&s, 51, 0, 0, &pattern(2 * B + 9, 1));
    assert_eq!(s.scrub_chunk(51, 0).expect("clean"), 2 * B as u64 + 9);
    assert_eq!(s.scrub_chunk(51, 9).expect("missing"), 0);
    // A damaged sidecar of an open chunk.
    let mpath = s.meta_path(51, 0);
    let mut m = fs::read(&mpath).expect("meta");
    m[12] ^= 1;
    fs::write(&mpath, &m).expect("damage");
    assert!(matches!(
        s.scrub_chunk(51, 0),
        Err(StoreError::Corruption { .. })
    ));
    // A damaged block of a chunk that is not open.
    let s2 = ChunkStore::open_with_cache(s.root(), 1).expect("reopen");
    w(&s2, 52, 0, 0, &pattern(B, 2));
    w(&s2, 52, 1, 0, &pattern(B, 3));
    // Synced: bit rot from here on is damage, not a torn write.
    s2.sync_objects(&[52]).expect("sync");
    let path = s2.data_path(52, 0);
    let mut raw = fs::read(&path).expect("raw");
    raw[5] ^= 1;
    fs::write(&path, &raw).expect("flip");
    assert!(matches!(
        s2.scrub_chunk(52, 0),
        Err(StoreError::Corruption { .. })
    ));
    assert_eq!(s2.open_chunk_count(), 1);
}

#[test]
fn large_writes_with_unaligned_edges_read_back_and_scrub_clean() {
    let (d, s) = store();
    // Chunks larger than the tests' usual, to hold large writes.
    let w = |s: &ChunkStore, ino, idx, off, data: &[u8]| {
        s.write(ino, idx, off, data, 4 << 20, VersionMode::Next, false)
            .expect("write")
    };
    let big = direct_io::MIN_DIRECT + 3 * direct_io::ALIGN + 123;
    // Buffered first, so the direct write lands over cached pages.
    w(&s, 41, 0, 0, &pattern(5000, 9));
    w(&s, 41, 0, 100, &pattern(big, 1));
    w(&s, 41, 0, 4090, b"small, buffered, across a page edge");
    let mut want = pattern(5000, 9);
    want.resize(100 + big, 0);
    want[100..].copy_from_slice(&pattern(big, 1));
    want[4090..4090 + 35].copy_from_slice(b"small, buffered, across a page edge");
    // An aligned write past the end over a hole, then one inside it.
    let far = 2 * direct_io::MIN_DIRECT;
    w(&s, 41, 0, far as u32, &pattern(direct_io::MIN_DIRECT, 3));
    w(
        &s,
        41,
        0,
        direct_io::ALIGN as u32,
        &pattern(direct_io::MIN_DIRECT, 5),
    );
    want.resize(far, 0);
    want.extend_from_slice(&pattern(direct_io::MIN_DIRECT, 3));
    want[direct_io::ALIGN..direct_io::ALIGN + direct_io::MIN_DIRECT]
        .copy_from_slice(&pattern(direct_io::MIN_DIRECT, 5));
    assert_eq!(r(&s, 41, 0, 0, want.len() as u32), want);
    s.scrub_chunk(41, 0).expect("scrub");
    // Unless this filesystem refuses O_DIRECT, that went direct.
    if direct_io::open(&s.data_path(41, 0)).is_ok() {
        assert!(s.direct_writes.load(Ordering::Relaxed));
    }
    // And from the disk, by a store that opens the files afresh.
    s.sync_objects(&[41]).expect("sync");
    drop(s);
    let s = ChunkStore::open(d.path().join("chunks")).expect("reopen");
    assert_eq!(r(&s, 41, 0, 0, want.len() as u32), want);
    s.scrub_chunk(41, 0).expect("scrub after reopen");
}

#[test]
fn vectored_write_is_one_version() {
    let (_d, s) = store();
    w(&s, 31, 0, 0, &pattern(2 * B, 1));
    let items = [
        (10u32, Payload::Data(b"aaaa")),
        (B as u32 - 2, Payload::Data(b"bbbb")),
        (12u32, Payload::Data(b"c")),
        (3 * B as u32, Payload::Data(b"tail")),
        (0u32, Payload::Zero(2)),
    ];
    let o = s
        .apply_items(31, 0, &items, CS, VersionMode::Next, false)
        .expect("vectored");
    assert_eq!(o.version, 2);
    let mut want = pattern(2 * B, 1);
    want[10..14].copy_from_slice(b"aaaa");
    want[B - 2..B + 2].copy_from_slice(b"bbbb");
    want[12] = b'c';
    want.resize(3 * B, 0);
    want.extend_from_slice(b"tail");
    want[..2].fill(0);
    assert_eq!(r(&s, 31, 0, 0, CS), want);
    // A replica applies the same items at the primary's version.
    let (_d2, s2) = store();
    w(&s2, 31, 0, 0, &pattern(2 * B, 1));
    let ex = VersionMode::Exact {
        version: 2,
        force: false,
    };
    s2.apply_items(31, 0, &items, CS, ex, false)
        .expect("replica");
    let (a, b) = (
        s.list(|_, _| true).expect("l"),
        s2.list(|_, _| true).expect("l"),
    );
    assert_eq!(a, b, "same version, length and digest");
    // Checksums hold after a restart (the sidecar on disk is current).
    let s3 = ChunkStore::open(s.root()).expect("reopen");
    assert_eq!(r(&s3, 31, 0, 0, CS), want);
    // A bad item refuses the whole write.
    assert!(s
        .apply_items(
            31,
            0,
            &[(0, Payload::Data(b"x")), (CS, Payload::Data(b"y"))],
            CS,
            VersionMode::Next,
            false
        )
        .is_err());
    assert_eq!(s.version(31, 0).expect("v"), 2);
}

/// What a kill -9 or a power loss can leave: the sidecar of an
/// acknowledged write is on disk (page cache) at once; a data file ahead
/// of its sidecar in a chunk changed since its last fsync is a torn write:
/// served as it is, listed as corrupt so that peering replaces it; a torn
/// sidecar of a synced chunk is damage, never served.
#[test]
fn torn_updates_are_detected() {
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path().join("chunks");
    {
        let s = ChunkStore::open(&root).expect("open");
        w(&s, 41, 0, 0, &pattern(2 * B, 1));
        w(&s, 41, 0, 100, b"second");
        // Without any sync, the sidecar on disk already says version 2
        // and matches the data (what a killed process leaves).
        let raw = fs::read(s.meta_path(41, 0)).expect("meta");
        let m = ChunkMeta::decode(&raw).expect("decode");
        assert_eq!(m.version, 2);
        assert_eq!(m.crcs.len(), 2);
        w(&s, 41, 1, 0, &pattern(B, 3));
        s.write(41, 2, 0, &pattern(B, 4), CS, VersionMode::Next, true)
            .expect("synced write");
        // The process dies here (no clean shutdown).
        std::mem::forget(s);
    }
    let s = ChunkStore::open(&root).expect("restart");
    let mut want = pattern(2 * B, 1);
    want[100..106].copy_from_slice(b"second");
    assert_eq!(s.read(41, 0, 0, CS).expect("read"), (want, 2));
    drop(s);
    // Data written, sidecar not (crash between the two writes).
    let f = OpenOptions::new()
        .write(true)
        .open(chunk_file(&root, 41, 1))
        .expect("data");
    f.write_all_at(b"new bytes", 7).expect("write");
    // Sidecar torn: the first half of a new sidecar over the old one.
    let mpath = s_meta_path(&root, 41, 2);
    let old = fs::read(&mpath).expect("meta");
    let newer = ChunkMeta {
        version: 9,
        len: 2 * B as u64,
        crcs: vec![1, 2],
        flags: 0,
        snap: Default::default(),
    }
    .encode();
    let mut torn = old.clone();
    torn[..newer.len() / 2].copy_from_slice(&newer[..newer.len() / 2]);
    fs::write(&mpath, &torn).expect("torn");
    let s = ChunkStore::open(&root).expect("restart");
    let mut torn_data = pattern(B, 3);
    torn_data[7..16].copy_from_slice(b"new bytes");
    assert_eq!(s.read(41, 1, 0, CS).expect("torn write"), (torn_data, 1));
    assert!(matches!(
        s.read(41, 2, 0, 10),
        Err(StoreError::Corruption { .. })
    ));
    let l = s.list(|_, _| true).expect("list");
    let state = |i: u64| l.iter().find(|c| c.index == i).map(|c| c.state);
    assert_eq!(state(1), Some(None), "torn: replaced from a peer");
    assert_eq!(state(2), Some(None), "corrupt: repaired from a peer");
    // Repair by install, as recovery does.
    assert!(s.install(41, 1, &pattern(B, 5), 1, false).expect("install"));
    assert!(s.install(41, 2, &pattern(B, 6), 1, true).expect("install"));
    assert_eq!(r(&s, 41, 1, 0, CS), pattern(B, 5));
    assert_eq!(r(&s, 41, 2, 0, CS), pattern(B, 6));
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        idx: u64,
        off: u32,
        len: u32,
        seed: u8,
    },
    Read {
        idx: u64,
        off: u32,
        len: u32,
    },
    Truncate {
        size: u64,
    },
    Zero {
        idx: u64,
        off: u32,
        len: u32,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let off = prop_oneof![
        0u32..CS,
        (0u32..4).prop_map(|b| b * BLOCK_SIZE as u32),
        (1u32..4).prop_map(|b| b * BLOCK_SIZE as u32 - 1),
    ];
    prop_oneof![
        4 => (0u64..3, off.clone(), 0u32..(150 * 1024), any::<u8>()).prop_map(|(idx, off, len, seed)| {
            Op::Write { idx, off, len: len.min(CS - off), seed }
        }),
        3 => (0u64..3, off, 0u32..CS).prop_map(|(idx, off, len)| Op::Read { idx, off, len }),
        1 => (0u64..(3 * u64::from(CS) + 10)).prop_map(|size| Op::Truncate { size }),
        2 => (0u64..3, 0u32..CS, 0u32..CS).prop_map(|(idx, off, len)| {
            Op::Zero { idx, off, len: len.min(CS - off) }
        }),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn matches_model(ops in proptest::collection::vec(op(), 1..25)) {
        let d = tempfile::tempdir().expect("tempdir");
        let mut s = ChunkStore::open(d.path()).expect("open");
        // Per chunk: stored bytes and version; None = absent.
        let mut model: Vec<Option<(Vec<u8>, u64)>> = vec![None; 3];
        for op in ops {
            match op {
                Op::Write { idx, off, len, seed } => {
                    let data = pattern(len as usize, seed);
                    let v = s.write(42, idx, off, &data, CS, VersionMode::Next, false).expect("write").version;
                    let (bytes, ver) = model[idx as usize].get_or_insert((Vec::new(), 0));
                    let end = off as usize + data.len();
                    if !data.is_empty() && bytes.len() < end {
                        bytes.resize(end, 0);
                    }
                    bytes[off as usize..end].copy_from_slice(&data);
                    *ver += 1;
                    prop_assert_eq!(v, *ver);
                }
                Op::Read { idx, off, len } => {
                    let (got, v) = s.read(42, idx, off, len).expect("read");
                    let (want, wv) = match &model[idx as usize] {
                        None => (Vec::new(), 0),
                        Some((b, v)) => {
                            let lo = (off as usize).min(b.len());
                            let hi = (off as usize + len as usize).min(b.len());
                            (b[lo..hi].to_vec(), *v)
                        }
                    };
                    prop_assert_eq!(got, want);
                    prop_assert_eq!(v, wv);
                }
                Op::Truncate { size } => {
                    truncate_object(&s, 42, size, CS).expect("truncate");
                    for (i, m) in model.iter_mut().enumerate() {
                        let start = i as u64 * u64::from(CS);
                        let keep = size.saturating_sub(start) as usize;
                        if let Some((b, v)) = m {
                            if keep < b.len() {
                                b.truncate(keep);
                                *v += 1;
                            }
                        }
                    }
                }
                Op::Zero { idx, off, len } => {
                    let v = s
                        .apply(42, idx, off, Payload::Zero(len), CS, VersionMode::Next, false)
                        .expect("zero")
                        .version;
                    let (bytes, ver) = model[idx as usize].get_or_insert((Vec::new(), 0));
                    let end = (off as usize + len as usize).min(bytes.len());
                    if (off as usize) < end {
                        bytes[off as usize..end].fill(0);
                    }
                    *ver += 1;
                    prop_assert_eq!(v, *ver);
                }
                Op::Reopen => {
                    s = ChunkStore::open(d.path()).expect("reopen");
                }
            }
            let used: u64 = model.iter().flatten().map(|(b, _)| b.len() as u64).sum();
            prop_assert_eq!(s.used_bytes(), used);
            prop_assert_eq!(s.chunk_count(), model.iter().flatten().count() as u64);
        }
    }
}

/// A chunk's sidecar path (the store is closed).
fn s_meta_path(root: &Path, ino: u64, index: u64) -> PathBuf {
    let mut p = chunk_file(root, ino, index).into_os_string();
    p.push(META_SUFFIX);
    PathBuf::from(p)
}

#[test]
fn a_store_with_a_directory_per_inode_is_moved_into_buckets() {
    let t = tempfile::tempdir().expect("tmp");
    let root = t.path().join("chunks");
    {
        let s = ChunkStore::open(&root).expect("open");
        w(&s, 0x1234, 0, 0, b"first chunk");
        w(&s, 0x1234, 3, 5, b"fourth");
        w(&s, 0x99, 0, 0, b"other");
    }
    // Rewrite the files as the older layout had them.
    for (ino, index) in [(0x1234u64, 0u64), (0x1234, 3), (0x99, 0)] {
        let old = root.join(format!("{ino:016x}"));
        fs::create_dir_all(&old).expect("dir");
        fs::rename(
            chunk_file(&root, ino, index),
            old.join(format!("{index:016x}")),
        )
        .expect("data");
        fs::rename(
            s_meta_path(&root, ino, index),
            old.join(format!("{index:016x}{META_SUFFIX}")),
        )
        .expect("meta");
    }
    fs::write(
        root.join(format!("{:016x}/{:016x}.tmp", 0x1234, 7)),
        b"junk",
    )
    .expect("tmp");
    let s = ChunkStore::open(&root).expect("reopen");
    assert_eq!(s.chunk_count(), 3);
    assert_eq!(r(&s, 0x1234, 0, 0, 11), b"first chunk");
    assert_eq!(r(&s, 0x1234, 3, 5, 6), b"fourth");
    assert_eq!(r(&s, 0x99, 0, 0, 5), b"other");
    assert!(!root.join(format!("{:016x}", 0x1234)).exists());
    assert_eq!(s.inos().expect("inos"), vec![0x99, 0x1234]);
    s.delete_object(0x1234).expect("delete");
    assert_eq!(
        files_of(&root, 0x1234).expect("files"),
        Vec::<PathBuf>::new()
    );
    assert_eq!(s.chunk_count(), 1);
}

/// A step of the power-loss test.
#[derive(Debug, Clone)]
enum PowerOp {
    Write {
        idx: u64,
        off: u32,
        len: u32,
        seed: u8,
    },
    Sync,
    /// A primary's half of a sync write: stored without sync, then
    /// `sync_write` (the write-intent flag stays set).
    SyncWrite {
        idx: u64,
        off: u32,
        len: u32,
        seed: u8,
    },
    Crash,
}

fn power_op() -> impl Strategy<Value = PowerOp> {
    let off = prop_oneof![
        0u32..CS,
        (0u32..16).prop_map(|p| p * 4096),
        (1u32..16).prop_map(|b| b * BLOCK_SIZE as u32 - 1),
    ];
    prop_oneof![
        6 => (0u64..2, off, 1u32..(70 * 1024), any::<u8>()).prop_map(|(idx, off, len, seed)| {
            PowerOp::Write { idx, off, len: len.min(CS - off), seed }
        }),
        2 => Just(PowerOp::Sync),
        3 => (0u64..2, (0u32..16).prop_map(|p| p * 4096), 1u32..8192, any::<u8>())
            .prop_map(|(idx, off, len, seed)| PowerOp::SyncWrite { idx, off, len, seed }),
        2 => Just(PowerOp::Crash),
    ]
}

/// Whether `got` (a chunk read after a crash) is, page by page, the
/// content of one of `states` (the synced one and each one written
/// since), bytes past a state's end reading as zeros, and as long as one
/// of them.
fn old_or_new_per_page(got: &[u8], states: &[Vec<u8>]) -> bool {
    if !states.iter().any(|s| s.len() == got.len()) {
        return false;
    }
    let page = sim_disk::PAGE as usize;
    got.chunks(page).enumerate().all(|(p, have)| {
        states
            .iter()
            .any(|s| (0..have.len()).all(|i| s.get(p * page + i).copied().unwrap_or(0) == have[i]))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    /// Power loss at random points of random writes and fsyncs: every
    /// fsynced byte survives unless overwritten later (then each page is
    /// old or new content), and no read reports corruption.
    #[test]
    fn power_loss_keeps_synced_bytes(
        ops in proptest::collection::vec(power_op(), 1..30),
        seed in any::<u64>(),
    ) {
        let disk = sim_disk::SimDisk::new(seed);
        let root = Path::new("/osd/chunks");
        // The OSD's directory exists (durably) before the store is made.
        disk::Disk::create_dir_all(&disk, root).expect("root");
        disk::Disk::sync_dir(&disk, root).expect("root");
        let open = || ChunkStore::open_on(Arc::new(disk.clone()), root, 64).expect("open");
        let mut s = open();
        // Per chunk: the content as of its last fsync, then every state
        // written since (the last one is what reads see).
        let mut states: Vec<Vec<Vec<u8>>> = vec![vec![Vec::new()]; 2];
        for op in ops {
            match op {
                PowerOp::Write { idx, off, len, seed } => {
                    let data = pattern(len as usize, seed);
                    s.write(9, idx, off, &data, CS, VersionMode::Next, false).expect("write");
                    let mut now = states[idx as usize].last().expect("state").clone();
                    let end = off as usize + data.len();
                    if now.len() < end {
                        now.resize(end, 0);
                    }
                    now[off as usize..end].copy_from_slice(&data);
                    states[idx as usize].push(now);
                }
                PowerOp::SyncWrite { idx, off, len, seed } => {
                    let data = pattern(len as usize, seed);
                    s.write(9, idx, off, &data, CS, VersionMode::Next, false).expect("write");
                    s.sync_write(9, idx).expect("sync write");
                    let st = &mut states[idx as usize];
                    let mut now = st.last().expect("state").clone();
                    let end = off as usize + data.len();
                    if now.len() < end {
                        now.resize(end, 0);
                    }
                    now[off as usize..end].copy_from_slice(&data);
                    // Durable now: this chunk's earlier states cannot come back.
                    *st = vec![now];
                }
                PowerOp::Sync => {
                    s.sync_objects(&[9]).expect("sync");
                    for st in &mut states {
                        let last = st.pop().expect("state");
                        *st = vec![last];
                    }
                }
                PowerOp::Crash => {
                    drop(s);
                    disk.crash();
                    s = open();
                    for (idx, st) in states.iter_mut().enumerate() {
                        let (got, _) = s.read(9, idx as u64, 0, CS).expect("no corruption after a crash");
                        prop_assert!(
                            old_or_new_per_page(&got, st),
                            "chunk {} after a crash: {} bytes, not old-or-new per page",
                            idx,
                            got.len()
                        );
                        // What it holds now is durable (settled when opened).
                        *st = vec![got];
                    }
                }
            }
            for (idx, st) in states.iter().enumerate() {
                let (got, _) = s.read(9, idx as u64, 0, CS).expect("read");
                prop_assert_eq!(&got, st.last().expect("state"));
            }
        }
    }
}

/// Torn blocks are accepted only where a crash or a failed write may have
/// torn them: a chunk this process wrote and evicted is held to its crcs.
#[test]
fn evicted_dirty_chunk_is_still_verified() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open_with_cache(d.path(), 1).expect("open");
    w(&s, 71, 0, 0, &pattern(2 * B, 1));
    w(&s, 71, 1, 0, &pattern(B, 2)); // evicts chunk 0, still dirty
    let path = s.data_path(71, 0);
    let mut raw = fs::read(&path).expect("raw");
    raw[B + 5] ^= 1;
    fs::write(&path, &raw).expect("flip");
    assert!(matches!(
        s.read(71, 0, 0, CS),
        Err(StoreError::Corruption { .. })
    ));
    // The same files after a crash: a torn write, kept and listed corrupt.
    drop(s);
    let s = ChunkStore::open(d.path()).expect("restart");
    assert_eq!(s.read(71, 0, 0, CS).expect("after a crash").0, raw);
    let l = s.list(|_, i| i == 0).expect("list");
    assert_eq!(l[0].state, None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// A sidecar of random bytes, or a real one with bytes changed, cut
    /// short or extended, decodes to an error or a sidecar: never a panic.
    #[test]
    fn sidecar_decoding_never_panics(
        noise in proptest::collection::vec(any::<u8>(), 0..300),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in 0usize..64,
        magic in any::<bool>(),
    ) {
        let d = tempfile::tempdir().expect("tempdir");
        let _ = ChunkMeta::decode_checked(&noise);
        let mut b = noise.clone();
        if magic && b.len() >= 4 {
            b[..4].copy_from_slice(META_MAGIC);
            let _ = ChunkMeta::decode_checked(&b);
        }
        // Mutations of a real sidecar reach past the header checks.
        let s = ChunkStore::open(d.path().join("chunks")).expect("open");
        w(&s, 9, 0, 0, &pattern(2 * B + 100, 5));
        let mut raw = fs::read(s.meta_path(9, 0)).expect("meta");
        for (i, v) in edits {
            let n = raw.len();
            raw[i % n] = v;
        }
        raw.truncate(raw.len().saturating_sub(cut));
        raw.extend_from_slice(&noise[..noise.len().min(8)]);
        let _ = ChunkMeta::decode_checked(&raw);
    }
}
