//! End-to-end tests of node management and self-healing through real
//! processes and a real mount: an OSD killed for good is marked out and its
//! data re-replicated on the survivors; it comes back and takes data again;
//! an OSD added under a write load takes its share; the scrubber repairs a
//! corrupted copy; space of deleted files returns on every OSD, also on one
//! that was down during the delete.
//!
//! Run with `cargo build --workspace && AVALON_BIN_DIR=target/debug cargo
//! test -p avalonctl --test e2e_nodes -- --test-threads=1` (root, FUSE).

mod common;

use avalon_osd::chunk_store::sidecar_content;
use avalon_proto::pb::{ClusterMap, OsdState};
use avalon_proto::placement::chunk_members;
use avalonctl::local_cluster::{LocalCluster, Options};
use common::{cluster_map, data, sha, wait_until};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHUNK: u64 = 4 << 20;

struct Cluster {
    _dir: tempfile::TempDir,
    c: Option<LocalCluster>,
}

impl Cluster {
    fn start(osds: usize, out_after_ms: u64) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("avalon-nodes-")
            .tempdir()
            .expect("temp dir");
        let mut o = Options::new();
        o.mds = 1;
        o.osds = osds;
        o.log_level = "info".into();
        o.mds_flags = vec![
            "--osd-down-after-ms".into(),
            "2000".into(),
            "--osd-out-after-ms".into(),
            out_after_ms.to_string(),
        ];
        o.osd_flags = vec![
            "--heartbeat-ms".into(),
            "300".into(),
            "--gc-interval-ms".into(),
            "1000".into(),
            "--scrub-interval-ms".into(),
            "1500".into(),
        ];
        let c = LocalCluster::start(dir.path(), o).expect("cluster starts");
        Cluster {
            _dir: dir,
            c: Some(c),
        }
    }

    fn c(&mut self) -> &mut LocalCluster {
        self.c.as_mut().expect("running")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut c) = self.c.take() {
            c.stop();
        }
    }
}

/// Layout ordinal of the OSD with cluster id `id`.
fn ordinal(c: &LocalCluster, map: &ClusterMap, id: u64) -> u64 {
    let addr = &map.osds.iter().find(|o| o.id == id).expect("osd").addr;
    c.layout
        .osds
        .iter()
        .find(|n| &n.addr == addr)
        .expect("in layout")
        .id
}

/// Cluster id of the OSD with layout ordinal `n`.
fn osd_id(c: &LocalCluster, map: &ClusterMap, n: u64) -> u64 {
    let addr = &c.layout.osds.iter().find(|o| o.id == n).expect("ord").addr;
    map.osds.iter().find(|o| &o.addr == addr).expect("osd").id
}

fn chunk_path(c: &LocalCluster, n: u64, ino: u64, index: u64) -> PathBuf {
    avalon_osd::chunk_store::chunk_file(&c.dir.join(format!("osd{n}/chunks")), ino, index)
}

/// (ino, chunk count, content digest) of every file.
struct Files {
    files: Vec<(PathBuf, u64, u64, Vec<u8>)>,
}

fn write_files(dir: &Path, n: usize, seed: u64) -> Files {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut files = Vec::new();
    for i in 0..n {
        let len = 1000 + (i * 7919 % 300_000);
        let bytes = data(len, seed + i as u64);
        let p = dir.join(format!("f{i:03}"));
        let mut f = std::fs::File::create(&p).expect("create");
        f.write_all(&bytes).expect("write");
        f.sync_all().expect("fsync");
        let ino = f.metadata().expect("stat").ino();
        files.push((p, ino, (len as u64).div_ceil(CHUNK), sha(&bytes)));
    }
    Files { files }
}

fn check_files(f: &Files) {
    for (p, _, _, digest) in &f.files {
        let got = std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        assert_eq!(&sha(&got), digest, "{}", p.display());
    }
}

/// Every chunk of `files` is held by each of its members under `map`
/// (identical data and metadata files), none of which is out. Returns
/// the first problem.
fn placement_problem(c: &LocalCluster, map: &ClusterMap, files: &Files) -> Option<String> {
    for (p, ino, chunks, _) in &files.files {
        for index in 0..*chunks {
            let members = chunk_members(map, *ino, index);
            if members.len() < map.replicas as usize {
                return Some(format!("{}: only {} members", p.display(), members.len()));
            }
            let mut seen = None;
            for m in members {
                if m.state != OsdState::Up as i32 {
                    return Some(format!("member {} of {} not up", m.id, p.display()));
                }
                let n = ordinal(c, map, m.id);
                let d = chunk_path(c, n, *ino, index);
                let mut meta = d.clone().into_os_string();
                meta.push(".meta");
                let (Ok(db), Ok(mb)) = (std::fs::read(&d), std::fs::read(&meta)) else {
                    return Some(format!("osd{n} lacks {}", d.display()));
                };
                // Flags aside: each replica clears its dirty flag lazily.
                let got = (sha(&db), sidecar_content(&mb));
                match &seen {
                    None => seen = Some(got),
                    Some(s) if *s != got => {
                        return Some(format!("osd{n} differs at {}", d.display()))
                    }
                    _ => {}
                }
            }
        }
    }
    None
}

fn chunk_count_on(c: &LocalCluster, n: u64) -> usize {
    let mut k = 0;
    let Ok(rd) = std::fs::read_dir(c.dir.join(format!("osd{n}")).join("chunks")) else {
        return 0;
    };
    // Bucket directories only (not the spare files beside them).
    for e in rd.flatten().filter(|e| e.file_name() != "spare") {
        if let Ok(r) = std::fs::read_dir(e.path()) {
            k += r
                .flatten()
                .filter(|f| {
                    let name = f.file_name();
                    let name = name.to_string_lossy();
                    !name.ends_with(".meta") && !name.ends_with(".tmp")
                })
                .count();
        }
    }
    k
}

fn wait_state(c: &LocalCluster, n: u64, state: &str, timeout: Duration) {
    let addr = c
        .layout
        .osds
        .iter()
        .find(|o| o.id == n)
        .expect("ord")
        .addr
        .clone();
    assert!(
        wait_until(timeout, || c
            .status()
            .osds
            .iter()
            .any(|o| o.addr == addr && o.state == state)),
        "osd{n} never {state}:\n{}",
        avalonctl::status::render(&c.status())
    );
}

/// Kill -9 one OSD of four: after the out timeout every chunk is back to
/// three identical copies on the survivors and every file reads back; the
/// OSD comes back, takes its PGs again and the temporary copies go away.
/// A corrupted copy is found and repaired by the scrubber.
#[test]
fn osd_out_rereplicates_then_returns_and_scrub_repairs() {
    let mut t = Cluster::start(4, 3000);
    let mnt = t.c().mountpoint();
    let files = write_files(&mnt.join("d"), 200, 100);
    let c = t.c();
    c.wait_pgs_healthy(Duration::from_secs(120))
        .expect("healthy at start");
    let map = cluster_map(c);
    assert_eq!(placement_problem(c, &map, &files), None);

    // Kill osd4 for good: down, then out, then re-replicated.
    let started = Instant::now();
    t.c().kill_osd(4);
    let c = t.c();
    wait_state(c, 4, "out", Duration::from_secs(60));
    eprintln!("osd4 out after {:?}", started.elapsed());
    c.wait_pgs_healthy(Duration::from_secs(180))
        .expect("healthy without osd4");
    let map = cluster_map(c);
    let gone = osd_id(c, &map, 4);
    assert!(map
        .osds
        .iter()
        .any(|o| o.id == gone && o.state == OsdState::Out as i32));
    assert!(
        wait_until(Duration::from_secs(60), || placement_problem(
            c, &map, &files
        )
        .is_none()),
        "not re-replicated: {:?}",
        placement_problem(c, &map, &files)
    );
    eprintln!("re-replicated {:?} after the kill", started.elapsed());
    check_files(&files);

    // osd4 comes back in and takes data again; strays disappear.
    let before = chunk_count_on(c, 4);
    t.c().restart_stopped().expect("restart osd4");
    let c = t.c();
    wait_state(c, 4, "up", Duration::from_secs(60));
    c.wait_pgs_healthy(Duration::from_secs(180))
        .expect("healthy with osd4 back");
    let map = cluster_map(c);
    assert!(
        wait_until(Duration::from_secs(60), || placement_problem(
            c, &map, &files
        )
        .is_none()),
        "osd4 did not take its data back: {:?}",
        placement_problem(c, &map, &files)
    );
    let total: usize = files.files.iter().map(|f| f.2 as usize).sum();
    assert!(
        wait_until(Duration::from_secs(60), || (1..=4)
            .map(|n| chunk_count_on(c, n))
            .sum::<usize>()
            == 3 * total),
        "stray copies stay: {:?} for {} chunks",
        (1..=4).map(|n| chunk_count_on(c, n)).collect::<Vec<_>>(),
        total
    );
    eprintln!(
        "osd4 back: {} chunks before, {} after",
        before,
        chunk_count_on(c, 4)
    );
    check_files(&files);

    // Corrupt one copy on disk: the scrubber finds and repairs it.
    let (_, ino, _, _) = &files.files[150];
    let members = chunk_members(&map, *ino, 0);
    let victim = ordinal(c, &map, members[1].id);
    let path = chunk_path(c, victim, *ino, 0);
    let good = std::fs::read(&path).expect("read chunk");
    let mut bad = good.clone();
    bad[100] ^= 0xff;
    std::fs::write(&path, &bad).expect("corrupt");
    assert!(
        wait_until(Duration::from_secs(60), || std::fs::read(&path).ok()
            == Some(good.clone())),
        "scrubber did not repair {}",
        path.display()
    );
    // Counted in the status (heartbeats carry the counters).
    assert!(
        wait_until(Duration::from_secs(10), || c.status().osds.iter().any(
            |o| o.id == members[1].id && o.scrub_errors >= 1 && o.repaired_chunks >= 1
        )),
        "scrub error and repair not counted:\n{}",
        avalonctl::status::render(&c.status())
    );
    eprintln!("{}", avalonctl::status::render(&c.status()));
}

/// A fifth OSD joins a cluster of four under a steady write load: it gets
/// PGs and data, no write fails, every file is right afterwards.
#[test]
fn osd_joins_under_write_load() {
    let mut t = Cluster::start(4, 60_000);
    let mnt = t.c().mountpoint();
    let files = write_files(&mnt.join("base"), 60, 7);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, written, dir) = (Arc::clone(&stop), Arc::clone(&written), mnt.join("load"));
        std::thread::spawn(move || -> Vec<(PathBuf, Vec<u8>)> {
            std::fs::create_dir_all(&dir).expect("mkdir");
            let mut out = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) || i < 20 {
                let bytes = data(50_000 + (i as usize * 3331) % 400_000, 1000 + i);
                let p = dir.join(format!("w{i:04}"));
                let mut f = std::fs::File::create(&p)
                    .unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
                f.write_all(&bytes)
                    .unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
                f.sync_all()
                    .unwrap_or_else(|e| panic!("fsync {}: {e}", p.display()));
                out.push((p, sha(&bytes)));
                written.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
            out
        })
    };
    assert!(wait_until(Duration::from_secs(60), || written
        .load(Ordering::SeqCst)
        >= 5));
    let spec = t.c().add_osd().expect("add osd5");
    assert_eq!(spec.id, 5);
    let c = t.c();
    assert!(
        wait_until(Duration::from_secs(120), || chunk_count_on(c, 5) >= 20),
        "osd5 got no data"
    );
    stop.store(true, Ordering::SeqCst);
    let loaded = load.join().expect("write load never fails");
    eprintln!("{} files written under load", loaded.len());
    c.wait_pgs_healthy(Duration::from_secs(180))
        .expect("healthy with osd5");
    let map = cluster_map(c);
    let new_id = osd_id(c, &map, 5);
    let pgs = (0..map.pg_count)
        .filter(|pg| {
            avalon_proto::placement::pg_members(&map, *pg)
                .iter()
                .any(|o| o.id == new_id)
        })
        .count();
    // About 3/5 of the PGs include the new OSD.
    assert!(pgs > map.pg_count as usize / 3, "osd5 is in only {pgs} PGs");
    assert!(
        wait_until(Duration::from_secs(60), || placement_problem(
            c, &map, &files
        )
        .is_none()),
        "{:?}",
        placement_problem(c, &map, &files)
    );
    check_files(&files);
    for (p, d) in &loaded {
        assert_eq!(&sha(&std::fs::read(p).expect("read")), d, "{}", p.display());
    }
    eprintln!(
        "osd5 in {pgs} of {} PGs, {} chunks",
        map.pg_count,
        chunk_count_on(c, 5)
    );
}

fn statfs_used(p: &Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().to_string_lossy().as_bytes()).expect("cstr");
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    (st.f_blocks - st.f_bfree) * st.f_frsize
}

/// Deleted files' space returns on every OSD, also on one that was down
/// during the delete; df shows it.
#[test]
fn deleted_space_returns_on_all_osds() {
    let mut t = Cluster::start(3, 0);
    let mnt = t.c().mountpoint();
    let dir = mnt.join("big");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut inos = BTreeMap::new();
    for i in 0..8u64 {
        let p = dir.join(format!("b{i}"));
        // 8 x 128 MiB: 1 GiB of file data (3 GiB stored).
        let bytes = data(128 << 20, 50 + i);
        let mut f = std::fs::File::create(&p).expect("create");
        f.write_all(&bytes).expect("write");
        f.sync_all().expect("fsync");
        inos.insert(p, f.metadata().expect("stat").ino());
    }
    let c = t.c();
    let used_before = statfs_used(&c.mountpoint());
    let holds = |c: &LocalCluster, n: u64| {
        inos.values().any(|ino| {
            let root = c.dir.join(format!("osd{n}/chunks"));
            !avalon_osd::chunk_store::files_of(&root, *ino)
                .unwrap_or_default()
                .is_empty()
        })
    };
    assert!((1..=3).all(|n| holds(c, n)));
    t.c().kill_osd(1);
    let c = t.c();
    wait_state(c, 1, "down", Duration::from_secs(60));
    for p in inos.keys() {
        std::fs::remove_file(p).expect("unlink");
    }
    assert!(
        wait_until(Duration::from_secs(60), || !holds(c, 2) && !holds(c, 3)),
        "GC did not free space on the up OSDs"
    );
    assert!(holds(c, 1), "the down OSD still has the data");
    t.c().restart_stopped().expect("restart osd1");
    let c = t.c();
    wait_state(c, 1, "up", Duration::from_secs(60));
    assert!(
        wait_until(Duration::from_secs(60), || !holds(c, 1)),
        "osd1 kept the chunks of deleted files"
    );
    // df: the MDS learns usage from heartbeats.
    assert!(
        wait_until(Duration::from_secs(60), || statfs_used(&c.mountpoint())
            + (512 << 20)
            < used_before),
        "df did not drop: before {used_before}, now {}",
        statfs_used(&c.mountpoint())
    );
}
