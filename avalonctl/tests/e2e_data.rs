//! Large files through the mount: 1 GiB written sequentially, a file
//! written at random offsets, a sparse file; all read back from the OSDs
//! (kernel caches dropped) and compared by sha256; every chunk is on n=3
//! OSDs.

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

const MIB: usize = 1 << 20;
const CHUNK: u64 = 4 << 20;

/// Makes the next reads go to the OSDs: the kernel page cache is dropped,
/// and a fresh open drops the client's chunk cache.
fn drop_caches() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "3\n");
}

fn sha_stream(path: &Path) -> Vec<u8> {
    let mut f = File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 * MIB];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_vec()
}

/// The chunk files of `ino` in every OSD data dir of the cluster.
fn chunk_copies(dir: &Path, ino: u64, index: u64) -> usize {
    (1..=3)
        .filter(|n| {
            avalon_osd::chunk_store::chunk_file(&dir.join(format!("osd{n}/chunks")), ino, index)
                .exists()
        })
        .count()
}

#[test]
fn one_gib_sequential_random_and_sparse_files_read_back_identical() {
    let t = TestCluster::start(1, 3);
    let mnt = t.mnt();

    // 1 GiB, sequential 1 MiB writes of pseudo-random data.
    let big = mnt.join("big");
    let mut h = Sha256::new();
    {
        let mut f = File::create(&big).unwrap();
        for i in 0..1024u64 {
            let block = data(MIB, 1000 + i);
            h.update(&block);
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
    }
    let want = h.finalize().to_vec();
    drop_caches();
    assert_eq!(fs::metadata(&big).unwrap().len(), 1 << 30);
    assert_eq!(sha_stream(&big), want, "1 GiB file read back");

    // Every chunk of it is stored on n=3 OSDs.
    let ino = fs::metadata(&big).unwrap().ino();
    for index in 0..(1u64 << 30) / CHUNK {
        assert_eq!(
            chunk_copies(t.dir.path(), ino, index),
            3,
            "chunk {index} of the 1 GiB file"
        );
    }

    // Random offsets (crossing chunk boundaries), mirrored in memory.
    let mut r = StdRng::seed_from_u64(7);
    let rnd = mnt.join("random");
    let mut model = vec![0u8; 48 * MIB];
    {
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&rnd)
            .unwrap();
        for _ in 0..300 {
            let len = r.gen_range(1..300_000);
            let off = r.gen_range(0..model.len() - len);
            let d = data(len, r.gen());
            f.write_all_at(&d, off as u64).unwrap();
            model[off..off + len].copy_from_slice(&d);
        }
        f.sync_all().unwrap();
    }
    let size = fs::metadata(&rnd).unwrap().len() as usize;
    drop_caches();
    assert_eq!(
        sha_stream(&rnd),
        sha(&model[..size]),
        "randomly written file"
    );

    // Sparse: a few blocks far apart; the holes read as zeros.
    let sparse = mnt.join("sparse");
    let offsets = [0u64, 5 * CHUNK + 123, 700 << 20, (1 << 30) - 10];
    {
        let f = File::create(&sparse).unwrap();
        for (i, &o) in offsets.iter().enumerate() {
            f.write_all_at(&data(10, i as u64), o).unwrap();
        }
        f.sync_all().unwrap();
    }
    drop_caches();
    let f = File::open(&sparse).unwrap();
    assert_eq!(f.metadata().unwrap().len(), (1 << 30) - 10 + 10);
    for (i, &o) in offsets.iter().enumerate() {
        let mut buf = [0u8; 10];
        f.read_exact_at(&mut buf, o).unwrap();
        assert_eq!(buf.to_vec(), data(10, i as u64), "block at {o}");
    }
    let mut hole = vec![1u8; MIB];
    f.read_exact_at(&mut hole, 300 << 20).unwrap();
    assert!(hole.iter().all(|&b| b == 0), "hole reads as zeros");
    // Nothing was stored for the chunks in the holes.
    let sino = f.metadata().unwrap().ino();
    assert_eq!(
        chunk_copies(t.dir.path(), sino, 50),
        0,
        "no chunk for a hole"
    );
    assert_eq!(chunk_copies(t.dir.path(), sino, 0), 3);
}
