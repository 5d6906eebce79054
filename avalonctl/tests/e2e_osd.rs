//! End-to-end tests of the OSD data path through a real mount: replication
//! on disk, an OSD killed during a write and a read, catch-up after a
//! restart, two OSDs of three down, repair of a corrupted copy, and a
//! replica that missed a truncate converging.
//!
//! Run with `cargo build --workspace && AVALON_BIN_DIR=target/debug cargo
//! test -p avalonctl --test e2e_osd -- --test-threads=1` (root, FUSE).

mod common;

use avalon_osd::chunk_store::sidecar_content;
use avalon_proto::pb::OsdState;
use avalon_proto::placement::chunk_members;
use avalonctl::local_cluster::LocalCluster;
use common::{cluster_map, data, opts, sha, sha_file, wait_until, TestCluster};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const CHUNK: usize = 4 * MIB;

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Prints the warnings and errors of every daemon log (for failures).
fn dump_logs(c: &LocalCluster) {
    let Ok(rd) = std::fs::read_dir(c.dir.join("logs")) else {
        return;
    };
    for e in rd.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        eprintln!("==== {} ({} warnings)", e.path().display(), lines.len());
        for l in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{l}");
        }
    }
}

/// Whether some MDS log has a line containing `text`.
fn mds_logged(c: &LocalCluster, text: &str) -> bool {
    let Ok(rd) = std::fs::read_dir(c.dir.join("logs")) else {
        return false;
    };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("mds"))
        .any(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .contains(text)
        })
}

fn osd_chunks_dir(c: &LocalCluster, n: u64) -> PathBuf {
    c.dir.join(format!("osd{n}")).join("chunks")
}

/// Digest of every chunk file (data, and metadata by content) of `ino` on OSD `n`,
/// keyed by file name.
fn chunk_files(c: &LocalCluster, n: u64, ino: u64) -> BTreeMap<String, Vec<u8>> {
    let files = avalon_osd::chunk_store::files_of(&osd_chunks_dir(c, n), ino);
    let mut out = BTreeMap::new();
    for p in files.unwrap_or_default() {
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".tmp") {
            continue;
        }
        if let Ok(b) = std::fs::read(&p) {
            // A sidecar by what it says, flags aside: each replica clears
            // its dirty flag lazily.
            let d = if name.ends_with(".meta") {
                sha(format!("{:?}", sidecar_content(&b)).as_bytes())
            } else {
                sha(&b)
            };
            out.insert(name, d);
        }
    }
    out
}

fn data_chunk_count(files: &BTreeMap<String, Vec<u8>>) -> usize {
    files.keys().filter(|k| !k.ends_with(".meta")).count()
}

/// True when all three OSDs hold identical chunk files for `ino`, with
/// `chunks` data chunks each.
fn replicas_identical(c: &LocalCluster, ino: u64, chunks: usize) -> bool {
    let a = chunk_files(c, 1, ino);
    data_chunk_count(&a) == chunks && (2..=3).all(|n| chunk_files(c, n, ino) == a)
}

/// Layout ordinal of the OSD a whole-chunk read of `index` goes to first:
/// the up members in placement order, rotated by the chunk index.
fn whole_chunk_reader(c: &LocalCluster, ino: u64, index: u64) -> u64 {
    let map = cluster_map(c);
    let up: Vec<String> = chunk_members(&map, ino, index)
        .into_iter()
        .filter(|o| o.state == OsdState::Up as i32)
        .map(|o| o.addr.clone())
        .collect();
    let addr = &up[(index % up.len() as u64) as usize];
    c.layout
        .osds
        .iter()
        .find(|n| &n.addr == addr)
        .expect("reader is in the layout")
        .id
}

fn write_file(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).expect("create");
    for piece in bytes.chunks(MIB) {
        f.write_all(piece).expect("write");
    }
    f.sync_all().expect("fsync");
}

fn ino_of(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").ino()
}

fn read_fresh(path: &Path) -> Vec<u8> {
    drop_caches();
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// (1) Data lands on all three OSDs; (4) a corrupted copy is read around
/// and repaired on disk.
#[test]
fn replicated_on_disk_and_corruption_repaired() {
    let mut t = TestCluster::start(1, 3);
    let path = t.mnt().join("four_chunks");
    let bytes = data(4 * CHUNK, 11);
    write_file(&path, &bytes);
    let ino = ino_of(&path);
    let c = t.c();
    assert!(
        wait_until(Duration::from_secs(30), || replicas_identical(c, ino, 4)),
        "chunks of ino {ino} not identical on 3 OSDs: {:?}",
        (1..=3).map(|n| chunk_files(c, n, ino)).collect::<Vec<_>>()
    );
    for n in 1..=3 {
        let total: u64 = (0..4u64)
            .map(|i| {
                std::fs::metadata(avalon_osd::chunk_store::chunk_file(
                    &osd_chunks_dir(c, n),
                    ino,
                    i,
                ))
                .expect("chunk file")
                .len()
            })
            .sum();
        assert_eq!(total, bytes.len() as u64, "osd{n} stores the whole file");
    }

    // Flip bytes in chunk 1's copy on the OSD that serves its reads: a
    // sequential read fetches whole chunks, starting at the up member
    // chosen by chunk index (reads spread over replicas).
    let victim = whole_chunk_reader(c, ino, 1);
    let file = avalon_osd::chunk_store::chunk_file(&osd_chunks_dir(c, victim), ino, 1);
    let good = std::fs::read(&file).expect("chunk");
    let mut bad = good.clone();
    for b in &mut bad[1000..1010] {
        *b ^= 0x5a;
    }
    std::fs::write(&file, &bad).expect("corrupt");
    assert_eq!(
        sha(&read_fresh(&path)),
        sha(&bytes),
        "read around the bad copy"
    );
    assert!(
        wait_until(Duration::from_secs(30), || std::fs::read(&file)
            .map(|b| b == good)
            .unwrap_or(false)),
        "osd{victim} did not repair its copy of chunk 1"
    );
    assert!(replicas_identical(c, ino, 4));
    assert_eq!(sha(&read_fresh(&path)), sha(&bytes));
}

/// Writes `bytes` to `path` in 1 MiB pieces on a thread, counting
/// progress; returns the open file (not fsynced).
fn spawn_writer(
    path: PathBuf,
    bytes: Arc<Vec<u8>>,
    progress: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<std::io::Result<std::fs::File>> {
    std::thread::spawn(move || {
        let mut f = std::fs::File::create(&path)?;
        for piece in bytes.chunks(MIB) {
            f.write_all(piece)?;
            progress.fetch_add(piece.len(), Ordering::SeqCst);
        }
        Ok(f)
    })
}

/// Waits until the MDS reports the OSD at layout ordinal `n` down.
fn wait_marked_down(c: &LocalCluster, n: u64) {
    let addr = c
        .layout
        .osds
        .iter()
        .find(|o| o.id == n)
        .expect("ordinal")
        .addr
        .clone();
    assert!(
        wait_until(Duration::from_secs(60), || c
            .status()
            .osds
            .iter()
            .any(|o| o.addr == addr && o.state != "up")),
        "osd{n} never marked down"
    );
}

/// Reads `path` in 1 MiB pieces on a thread (paced so that a kill lands in
/// the middle), counting progress.
fn spawn_reader(
    path: PathBuf,
    progress: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<std::io::Result<Vec<u8>>> {
    std::thread::spawn(move || {
        let mut f = std::fs::File::open(&path)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; MIB];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
            progress.fetch_add(n, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(15));
        }
    })
}

/// (2) kill -9 one OSD during a sequential write and during a read: both
/// complete, the data is right, and the restarted OSD catches up.
#[test]
fn osd_killed_during_write_and_read_then_catches_up() {
    let mut t = TestCluster::start(1, 3);
    let path = t.mnt().join("big");
    let bytes = Arc::new(data(64 * MIB, 22));
    let chunks = 64 * MIB / CHUNK;

    let progress = Arc::new(AtomicUsize::new(0));
    let writer = spawn_writer(path.clone(), Arc::clone(&bytes), Arc::clone(&progress));
    assert!(
        wait_until(Duration::from_secs(60), || progress.load(Ordering::SeqCst)
            >= 16 * MIB),
        "writer made no progress"
    );
    let started = Instant::now();
    t.c().kill_osd(2);
    let f = match writer.join().expect("writer thread") {
        Ok(f) => f,
        Err(e) => {
            dump_logs(t.c());
            panic!("write did not survive a killed OSD: {e}");
        }
    };
    eprintln!("writes finished {:?} after the kill", started.elapsed());
    // The client's fsync asks every OSD its map lists as up, so it fails
    // until the client's map (refreshed every 2 s) lists the dead one as
    // down (avalon-fuse sync_data); retry fsync, bounded, after that.
    wait_marked_down(t.c(), 2);
    let mut synced = Err(std::io::Error::other("not tried"));
    assert!(
        wait_until(Duration::from_secs(30), || {
            synced = f.sync_all();
            synced.is_ok()
        }),
        "fsync after a killed OSD: {synced:?}"
    );
    drop(f);
    eprintln!("write finished {:?} after the kill", started.elapsed());
    assert_eq!(sha(&read_fresh(&path)), sha(&bytes));
    let ino = ino_of(&path);

    // Back up: osd2 pulls what it missed.
    let started = Instant::now();
    t.c().restart_stopped().expect("restart osd2");
    let c = t.c();
    assert!(
        wait_until(Duration::from_secs(90), || replicas_identical(
            c, ino, chunks
        )),
        "osd2 did not catch up: {:?}",
        (1..=3)
            .map(|n| data_chunk_count(&chunk_files(c, n, ino)))
            .collect::<Vec<_>>()
    );
    eprintln!("osd2 caught up in {:?}", started.elapsed());

    // Kill another OSD in the middle of a read.
    drop_caches();
    let progress = Arc::new(AtomicUsize::new(0));
    let reader = spawn_reader(path.clone(), Arc::clone(&progress));
    assert!(
        wait_until(Duration::from_secs(60), || progress.load(Ordering::SeqCst)
            >= 8 * MIB),
        "reader made no progress"
    );
    t.c().kill_osd(1);
    let got = match reader.join().expect("reader thread") {
        Ok(g) => g,
        Err(e) => {
            dump_logs(t.c());
            panic!("read did not survive a killed OSD: {e}");
        }
    };
    assert_eq!(got.len(), bytes.len());
    assert_eq!(sha(&got), sha(&bytes));
    t.c().restart_stopped().expect("restart osd1");
    let c = t.c();
    assert!(
        wait_until(Duration::from_secs(90), || replicas_identical(
            c, ino, chunks
        )),
        "osd1 did not come back in step"
    );
    assert_eq!(sha_file(&path), sha(&bytes));
}

/// An OSD stopped with SIGTERM (a restart or an upgrade) tells the MDS,
/// which marks it down at once: with heartbeat detection set to ten minutes,
/// only that announcement can explain it. Writes and fsyncs meanwhile go to
/// the other replicas, and its registration marks it up again. A killed one
/// is found by the leader's connection probe.
#[test]
fn stopped_or_killed_osd_is_marked_down_without_waiting_for_heartbeats() {
    let mut o = opts(1, 3);
    o.mds_flags = vec!["--osd-down-after-ms".into(), "600000".into()];
    let mut t = TestCluster::start_with(o);
    let before = data(6 * MIB, 31);
    write_file(&t.mnt().join("before"), &before);

    t.c().stop_osd(3);
    wait_marked_down(t.c(), 3);
    assert!(
        mds_logged(t.c(), "OSD is stopping; marking down"),
        "osd3 was not marked down on its own announcement"
    );
    let during = data(6 * MIB, 32);
    write_file(&t.mnt().join("during"), &during);
    assert_eq!(sha(&read_fresh(&t.mnt().join("before"))), sha(&before));

    t.c().restart_stopped().expect("restart osd3");
    let addr = t
        .c()
        .layout
        .osds
        .iter()
        .find(|o| o.id == 3)
        .expect("osd3")
        .addr
        .clone();
    let c = t.c();
    assert!(
        wait_until(Duration::from_secs(60), || c
            .status()
            .osds
            .iter()
            .any(|o| o.addr == addr && o.state == "up")),
        "osd3 not marked up after it registered again"
    );
    let ino = ino_of(&t.mnt().join("during"));
    let c = t.c();
    assert!(
        wait_until(Duration::from_secs(90), || replicas_identical(c, ino, 2)),
        "osd3 did not catch up with what was written while it was stopped"
    );
    assert_eq!(sha(&read_fresh(&t.mnt().join("during"))), sha(&during));

    // A killed OSD cannot say so, but its port refuses connections: the
    // leader probes an OSD that missed heartbeats and marks it down too.
    t.c().kill_osd(2);
    wait_marked_down(t.c(), 2);
    assert!(
        mds_logged(t.c(), "port refuses connections; marking down"),
        "osd2 was not marked down by the probe"
    );
    write_file(&t.mnt().join("after"), &before);
    assert_eq!(sha(&read_fresh(&t.mnt().join("after"))), sha(&before));
    t.c().restart_stopped().expect("restart osd2");
}

/// (3) Two OSDs of three down: reads of current chunks succeed; a write
/// fails with EIO in bounded time.
#[test]
fn two_of_three_down_reads_work_writes_fail_fast() {
    let mut t = TestCluster::start(1, 3);
    let path = t.mnt().join("kept");
    let bytes = data(2 * CHUNK + 12345, 33);
    write_file(&path, &bytes);
    let ino = ino_of(&path);
    let c = t.c();
    assert!(
        wait_until(Duration::from_secs(30), || replicas_identical(c, ino, 3)),
        "not replicated"
    );
    c.kill_osd(2);
    c.kill_osd(3);

    let started = Instant::now();
    assert_eq!(
        sha(&read_fresh(&path)),
        sha(&bytes),
        "read with one OSD left"
    );
    eprintln!("read with two OSDs down took {:?}", started.elapsed());

    let started = Instant::now();
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(t.mnt().join("doomed"))?;
        f.write_all(&data(MIB, 44))?;
        f.sync_all()
    })();
    let took = started.elapsed();
    eprintln!("failed write took {took:?}: {res:?}");
    let e = res.expect_err("a write without a quorum must fail");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e:?}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

/// (5) A replica down during a truncate catches up when it is back: every
/// copy holds the cut content at the same version, and once the file grows
/// again the cut-off range reads as zeros even from that replica alone.
#[test]
fn replica_down_during_truncate_converges() {
    let mut t = TestCluster::start(1, 3);
    let path = t.mnt().join("cut");
    let bytes = data(3 * CHUNK + 100_000, 55);
    write_file(&path, &bytes);
    let ino = ino_of(&path);
    let c = t.c();
    assert!(
        wait_until(Duration::from_secs(60), || replicas_identical(c, ino, 4)),
        "not replicated"
    );
    c.kill_osd(2);
    wait_marked_down(c, 2);
    let size = CHUNK + 5000;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.set_len(size as u64)
        .expect("truncate with a replica down");
    f.sync_all().expect("fsync");
    drop(f);
    assert_eq!(sha(&read_fresh(&path)), sha(&bytes[..size]));
    assert_ne!(
        chunk_files(c, 2, ino),
        chunk_files(c, 1, ino),
        "osd2 was down: it cannot hold the cut yet"
    );

    c.restart_stopped().expect("restart osd2");
    let c = t.c();
    // Chunks 2 and 3 stay as empty tombstones (versioned, like the cut).
    assert!(
        wait_until(Duration::from_secs(90), || replicas_identical(c, ino, 4)),
        "osd2 did not converge to the truncated content"
    );
    let lens: Vec<u64> = (0..4)
        .map(|index| {
            let p = avalon_osd::chunk_store::chunk_file(&osd_chunks_dir(c, 2), ino, index);
            std::fs::metadata(&p).expect("chunk file").len()
        })
        .collect();
    assert_eq!(lens, vec![CHUNK as u64, 5000, 0, 0]);

    // osd2 alone serves the file; grown again, the cut range is zeros.
    c.kill_osd(1);
    c.kill_osd(3);
    wait_marked_down(c, 1);
    wait_marked_down(c, 3);
    let grown = bytes.len() as u64;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.set_len(grown).expect("grow");
    drop(f);
    let got = read_fresh(&path);
    assert_eq!(got.len() as u64, grown);
    assert_eq!(sha(&got[..size]), sha(&bytes[..size]));
    assert!(
        got[size..].iter().all(|&b| b == 0),
        "bytes cut off came back"
    );
    c.restart_stopped().expect("restart");
}
