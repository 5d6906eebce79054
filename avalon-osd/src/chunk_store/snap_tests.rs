//! Unit tests of the snapshot clones (`snaps`).

use super::sidecar::ChunkMeta;
use super::tests::{pattern, store, B, CS};
use super::*;
use std::fs;

/// A primary's write of `data` at `off` under snapshot id `snap`.
fn ws(s: &ChunkStore, ino: u64, idx: u64, off: u32, data: &[u8], snap: u64) -> u64 {
    s.apply_items_snap(
        ino,
        idx,
        &[(off, Payload::Data(data))],
        CS,
        VersionMode::Next,
        false,
        snap,
    )
    .expect("write")
    .version
}

fn rs(s: &ChunkStore, ino: u64, idx: u64, snap: u64) -> Vec<u8> {
    s.read_snap(ino, idx, 0, CS, snap).expect("read").0
}

#[test]
fn a_change_under_a_newer_snapshot_keeps_the_old_content() {
    let (_d, s) = store();
    let a = pattern(2 * B, 1);
    ws(&s, 5, 0, 0, &a, 0);
    assert!(s.clones_of(5, 0).unwrap().is_empty());
    // Snapshot 3 taken, then an overwrite: clone 3 holds a.
    let mut b = a.clone();
    b[10..20].copy_from_slice(&[7; 10]);
    ws(&s, 5, 0, 10, &[7; 10], 3);
    assert_eq!(s.clones_of(5, 0).unwrap(), vec![3]);
    assert_eq!(s.clone_count(), 1);
    assert_eq!(s.clone_bytes(), a.len() as u64);
    // Another change under the same snapshot: nothing more to keep.
    let mut c = b.clone();
    c.extend_from_slice(&[9; 100]);
    ws(&s, 5, 0, b.len() as u32, &[9; 100], 3);
    assert_eq!(s.clones_of(5, 0).unwrap(), vec![3]);
    // Snapshot 5 (4 was of another tree): clone 5 holds c.
    ws(&s, 5, 0, 0, &[1; 5], 5);
    let mut d = c.clone();
    d[..5].copy_from_slice(&[1; 5]);
    assert_eq!(s.clones_of(5, 0).unwrap(), vec![3, 5]);
    for (snap, want) in [(1, &a), (3, &a), (4, &c), (5, &c), (6, &d)] {
        assert_eq!(&rs(&s, 5, 0, snap), want, "snapshot {snap}");
    }
    assert_eq!(&rs(&s, 5, 0, 0), &d);
    // Partial reads of a clone.
    assert_eq!(s.read_snap(5, 0, 8, 4, 3).unwrap().0, a[8..12].to_vec());
}

#[test]
fn a_chunk_created_after_a_snapshot_is_a_hole_in_it() {
    let (_d, s) = store();
    ws(&s, 6, 1, 0, &pattern(B, 2), 4);
    for snap in [1, 4] {
        assert!(rs(&s, 6, 1, snap).is_empty(), "snapshot {snap}");
    }
    assert_eq!(rs(&s, 6, 1, 5), pattern(B, 2));
    // Changed under snapshot 7: clone 7 keeps the creation id.
    ws(&s, 6, 1, 0, &[3; 3], 7);
    assert!(rs(&s, 6, 1, 4).is_empty());
    assert_eq!(rs(&s, 6, 1, 5), pattern(B, 2));
    assert_eq!(rs(&s, 6, 1, 7), pattern(B, 2));
    assert_eq!(&rs(&s, 6, 1, 8)[..3], &[3; 3]);
    // Never written: a hole for every snapshot.
    assert!(rs(&s, 6, 2, 5).is_empty());
}

#[test]
fn a_cut_under_a_snapshot_keeps_the_whole_chunk() {
    let (_d, s) = store();
    let a = pattern(3 * B + 7, 3);
    ws(&s, 7, 0, 0, &a, 0);
    s.apply_items_snap(
        7,
        0,
        &[(B as u32, Payload::Cut)],
        CS,
        VersionMode::Next,
        true,
        2,
    )
    .expect("cut");
    assert_eq!(rs(&s, 7, 0, 0), a[..B].to_vec());
    assert_eq!(rs(&s, 7, 0, 2), a);
}

#[test]
fn deletes_keep_what_snapshots_see_and_trim_frees_it() {
    let (_d, s) = store();
    let a = pattern(B, 4);
    ws(&s, 8, 0, 0, &a, 0);
    ws(&s, 8, 1, 0, &a, 2); // created after snapshot 2
    ws(&s, 8, 0, 0, &[5; 4], 2); // clone 2 of chunk 0
    let mut a2 = a.clone();
    a2[..4].copy_from_slice(&[5; 4]);
    // Deleted while snapshots up to 4 cover it.
    s.delete_object_snap(8, 4).expect("delete");
    assert!(s.indexes(8).unwrap().is_empty());
    assert_eq!(s.chunk_count(), 0);
    assert_eq!(s.clones_of(8, 0).unwrap(), vec![2, 4]);
    assert_eq!(s.clones_of(8, 1).unwrap(), vec![4]);
    assert!(rs(&s, 8, 0, 0).is_empty());
    assert_eq!(rs(&s, 8, 0, 2), a);
    assert_eq!(rs(&s, 8, 0, 3), a2);
    assert_eq!(rs(&s, 8, 1, 3), a);
    assert!(rs(&s, 8, 1, 2).is_empty());
    assert!(rs(&s, 8, 0, 5).is_empty());
    assert_eq!(s.clone_count(), 3);
    // Snapshot 2 removed: clone 2 goes; clone 4 stays for 3.
    let t = s.trim_clones(&[3].into(), 4).expect("trim");
    assert_eq!(
        t,
        Trimmed {
            clones: 1,
            bytes: B as u64
        }
    );
    assert_eq!(s.clones_of(8, 0).unwrap(), vec![4]);
    assert_eq!(rs(&s, 8, 0, 3), a2);
    // Snapshot 4 alone: chunk 1's clone 4 is still seen (born 2 < 4).
    assert_eq!(s.trim_clones(&[4].into(), 4).unwrap().clones, 0);
    // A clone newer than what the live set knows of is kept.
    ws(&s, 9, 0, 0, &a, 0);
    ws(&s, 9, 0, 0, &a2, 6);
    let t = s.trim_clones(&BTreeSet::new(), 5).expect("trim");
    assert_eq!(t.clones, 2);
    assert_eq!(s.clones_of(9, 0).unwrap(), vec![6]);
    assert_eq!(s.clone_count(), 1);
    // Deleted with no snapshot covering it: the head goes, the clones
    // wait for a trim.
    s.delete_object(9).expect("delete");
    assert!(rs(&s, 9, 0, 0).is_empty());
    assert_eq!(rs(&s, 9, 0, 6), a);
    assert_eq!(s.trim_clones(&BTreeSet::new(), 6).unwrap().clones, 1);
    assert_eq!((s.clone_count(), s.clone_bytes()), (0, 0));
    assert!(rs(&s, 9, 0, 6).is_empty());
}

#[test]
fn clones_and_stamps_survive_a_restart_and_old_sidecars_stay_format_3() {
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path().join("chunks");
    let s = ChunkStore::open(&root).expect("open");
    let a = pattern(B + 3, 5);
    ws(&s, 10, 0, 0, &a, 0);
    s.sync_objects(&[10]).expect("sync");
    let mpath = s.meta_path(10, 0);
    let raw = fs::read(&mpath).expect("sidecar");
    assert_eq!(&raw[4..8], &3u32.to_le_bytes(), "no snapshot: format 3");
    ws(&s, 10, 0, 0, &[1; 8], 3);
    s.sync_objects(&[10]).expect("sync");
    let raw = fs::read(&mpath).expect("sidecar");
    assert_eq!(&raw[4..8], &4u32.to_le_bytes());
    let (m, _) = ChunkMeta::decode_any(&raw).expect("decodes");
    assert_eq!((m.snap.seq, m.snap.born), (3, 0));
    drop(s);
    let s = ChunkStore::open(&root).expect("reopen");
    assert_eq!((s.clone_count(), s.clone_bytes()), (1, a.len() as u64));
    assert_eq!(rs(&s, 10, 0, 3), a);
    // The stamp was kept: no second clone for snapshot 3.
    ws(&s, 10, 0, 0, &[2; 8], 3);
    assert_eq!(s.clones_of(10, 0).unwrap(), vec![3]);
}

#[test]
fn unfinished_clones_are_removed_when_the_store_opens() {
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path().join("chunks");
    let s = ChunkStore::open(&root).expect("open");
    ws(&s, 11, 0, 0, &pattern(B, 6), 0);
    ws(&s, 11, 0, 0, &[1], 2);
    drop(s);
    let dir = root.join("snaps").join(format!("{:03x}", 11));
    let whole = fs::read_dir(&dir).expect("clones").count();
    assert_eq!(whole, 2);
    let name = format!("{:016x}.{:016x}@{:016x}", 11, 1, 5);
    fs::write(dir.join(&name), b"data, no sidecar").unwrap();
    fs::write(dir.join(format!("{name}.meta.tmp")), b"half").unwrap();
    fs::write(dir.join(format!("{name}.tmp")), b"half").unwrap();
    let s = ChunkStore::open(&root).expect("reopen");
    assert_eq!(fs::read_dir(&dir).unwrap().count(), whole);
    assert_eq!(s.clone_count(), 1);
    assert!(s.clones_of(11, 1).unwrap().is_empty());
    assert_eq!(rs(&s, 11, 0, 2), pattern(B, 6));
}

/// A power loss at every point of a write that keeps a clone (the clone's
/// files, their fsyncs and renames, then the write itself): after it the
/// snapshot reads the old content exactly, whether or not the clone was
/// finished, and the live chunk holds, page by page, the old or the new.
#[test]
fn power_loss_while_a_clone_is_made() {
    let root = Path::new("/osd/chunks");
    let old = pattern(2 * B + 100, 7);
    let new = pattern(3 * B, 8);
    let mut completed = false;
    for budget in 0..200 {
        let disk = sim_disk::SimDisk::new(budget + 1);
        disk::Disk::create_dir_all(&disk, root).expect("root");
        disk::Disk::sync_dir(&disk, root).expect("root");
        let open = || ChunkStore::open_on(Arc::new(disk.clone()), root, 64).expect("open");
        let s = open();
        ws(&s, 12, 0, 0, &old, 0);
        s.sync_objects(&[12]).expect("sync");
        disk.fail_after(budget);
        let done = s
            .apply_items_snap(
                12,
                0,
                &[(0, Payload::Data(&new))],
                CS,
                VersionMode::Next,
                false,
                4,
            )
            .is_ok();
        drop(s);
        disk.crash();
        let s = open();
        assert_eq!(
            rs(&s, 12, 0, 4),
            old,
            "budget {budget}: the snapshot's content"
        );
        let live = rs(&s, 12, 0, 0);
        let page = sim_disk::PAGE as usize;
        let old_or_new = live.len() == old.len().max(new.len()) || live.len() == old.len();
        assert!(old_or_new, "budget {budget}: {} bytes", live.len());
        for (p, have) in live.chunks(page).enumerate() {
            let ok = [&old, &new].iter().any(|st| {
                (0..have.len()).all(|i| st.get(p * page + i).copied().unwrap_or(0) == have[i])
            });
            assert!(ok, "budget {budget}: page {p} is neither old nor new");
        }
        if done {
            assert_eq!(s.clones_of(12, 0).unwrap(), vec![4], "budget {budget}");
            // Every step of the clone (directories, files, writes, fsyncs,
            // renames) was interrupted once before.
            assert!(budget > 10, "only {budget} steps");
            completed = true;
            break;
        }
    }
    assert!(
        completed,
        "the write never completed within the budgets tried"
    );
}
