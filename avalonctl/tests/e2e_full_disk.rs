//! End-to-end tests of full disks, with real processes and the OSDs' (or
//! the MDS's) data directories on small tmpfs filesystems of their own:
//! a writer through the mount gets ENOSPC (never EIO), `avalonctl status`
//! names the full OSD, existing files read back intact, truncate and `rm`
//! work at full, writes work again once the GC freed the space, and no
//! chunk is reported corrupt; the MDS refuses creates under its reserve
//! but still serves deletes.
//!
//! Run as root (FUSE, tmpfs mounts) with the binaries built:
//! `AVALON_BIN_DIR=target/release cargo test --release -p avalonctl --test
//! e2e_full_disk -- --test-threads=1`.

mod common;

use avalonctl::local_cluster::{LocalCluster, Options};
use common::{data, sha, sha_file, wait_until, SecondMount};
use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A size-limited tmpfs mounted at a directory, unmounted on drop (also
/// when the test fails).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size_mb: u64) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m,mode=0755")])
            .arg("tmpfs")
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs on {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds it (a daemon that did not exit yet):
            // detach it now, the kernel frees it when the last user goes.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// A cluster whose daemons' data dirs are tmpfs mounts. Fields drop in
/// order: the cluster stops first, then the filesystems are unmounted,
/// then the temp dir goes.
struct Setup {
    cluster: Option<LocalCluster>,
    _disks: Vec<Tmpfs>,
    dir: tempfile::TempDir,
}

impl Setup {
    /// `disks`: (data dir name, tmpfs size in MiB), mounted before start.
    fn start(disks: &[(&str, u64)], opts: Options) -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("avalon-e2e-full-")
            .tempdir()
            .expect("temp dir");
        let mounts = disks
            .iter()
            .map(|(name, mb)| Tmpfs::mount(&dir.path().join(name), *mb))
            .collect();
        let mut s = Setup {
            cluster: None,
            _disks: mounts,
            dir,
        };
        s.cluster = Some(LocalCluster::start(s.dir.path(), opts).expect("cluster starts"));
        s
    }

    fn c(&mut self) -> &mut LocalCluster {
        self.cluster.as_mut().expect("cluster running")
    }

    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// Every daemon log line that mentions corruption.
    fn corruption_in_logs(&self) -> Vec<String> {
        let mut found = Vec::new();
        let logs = self.dir.path().join("logs");
        for e in std::fs::read_dir(&logs).expect("logs").flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            found.extend(
                text.lines()
                    .filter(|l| {
                        let l = l.to_ascii_lowercase();
                        l.contains("corrupt") || l.contains("checksum mismatch")
                    })
                    .map(|l| format!("{}: {l}", e.file_name().to_string_lossy())),
            );
        }
        found
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut c) = self.cluster.take() {
            c.stop();
        }
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Writes `total` bytes to a new file at `path` in 1 MiB writes with an
/// fsync every 8 MiB, until it is done or a call fails. Returns the bytes
/// made durable by the last successful fsync and the error, if any.
fn fill(path: &Path, total: usize, seed: u64) -> (usize, Option<std::io::Error>) {
    let mut f = match OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => return (0, Some(e)),
    };
    let block = 1 << 20;
    let mut durable = 0;
    let mut written = 0;
    while written < total {
        if let Err(e) = f.write_all(&data(block, seed + written as u64)) {
            return (durable, Some(e));
        }
        written += block;
        if written % (8 << 20) == 0 {
            if let Err(e) = f.sync_all() {
                return (durable, Some(e));
            }
            durable = written;
        }
    }
    match f.sync_all() {
        Ok(()) => (written, None),
        Err(e) => (durable, Some(e)),
    }
}

/// What `fill` wrote: its first `len` bytes.
fn fill_content(len: usize, seed: u64) -> Vec<u8> {
    let block = 1 << 20;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        v.extend_from_slice(&data(block, seed + v.len() as u64));
    }
    v.truncate(len);
    v
}

/// Full OSDs as the status shows them, and the rendered status.
fn full_osds(c: &LocalCluster) -> (Vec<u64>, String) {
    let st = c.status();
    let full = st
        .osds
        .iter()
        .filter(|o| o.disk_fill == "full")
        .map(|o| o.id)
        .collect();
    (full, avalonctl::status::render(&st))
}

#[test]
fn a_full_cluster_refuses_writes_with_enospc_and_recovers_after_rm() {
    const DISK_MB: u64 = 96;
    let mut o = Options::new();
    o.mds = 1;
    o.osds = 3;
    o.log_level = "info".into();
    o.osd_flags = [
        "--heartbeat-ms",
        "200",
        "--nearfull-ratio",
        "0.3",
        "--full-ratio",
        "0.7",
        "--scrub-interval-ms",
        "1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut t = Setup::start(
        &[("osd1", DISK_MB), ("osd2", DISK_MB), ("osd3", DISK_MB)],
        o,
    );
    let mnt = t.mnt();

    // Every OSD reports its disk; nothing is near full yet.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let st = t.c().status();
            st.osds.len() == 3
                && st
                    .osds
                    .iter()
                    .all(|o| o.disk_total_bytes > 0 && o.disk_fill == "ok")
        }),
        "OSDs do not report their disks:\n{}",
        avalonctl::status::render(&t.c().status())
    );
    assert_eq!(t.c().status().health, "HEALTH_OK");

    // A file that must survive all that follows; it takes every disk
    // past the near-full ratio (36 of 96 MiB, 0.3): status warns, naming
    // each OSD and its fill, and writes go on.
    let keep = data(36 << 20, 1);
    std::fs::write(mnt.join("keep"), &keep).expect("write keep");
    let keep_sha = sha(&keep);
    assert!(
        wait_until(Duration::from_secs(20), || {
            let st = t.c().status();
            st.health == "HEALTH_WARN"
                && st.health_detail.len() == 3
                && st.health_detail.iter().all(|d| {
                    d.starts_with("osd.") && d.contains("is near full (") && d.contains("% used")
                })
        }),
        "no near-full warning:\n{}",
        avalonctl::status::render(&t.c().status())
    );
    let shown = avalonctl::status::render(&t.c().status());
    assert!(shown.contains("health: HEALTH_WARN"), "{shown}");

    // Fill the disks (three copies of everything, 96 MiB each) through
    // the mount: the writer must get ENOSPC, at a write or an fsync.
    let (durable, err) = fill(&mnt.join("fill"), 200 << 20, 100);
    let err = err.expect("200 MiB cannot fit on 96 MiB disks");
    assert_eq!(
        errno(&err),
        libc::ENOSPC,
        "a full cluster must fail writes with ENOSPC, got {err:?}"
    );
    assert!(durable >= 8 << 20, "writes stopped early: {durable} bytes");
    eprintln!("ENOSPC after {} MiB fsynced: {err}", durable >> 20);

    // Status names the full OSDs (health ERR).
    assert!(
        wait_until(Duration::from_secs(20), || !full_osds(t.c()).0.is_empty()),
        "no OSD reported full:\n{}",
        full_osds(t.c()).1
    );
    let st = t.c().status();
    assert_eq!(
        st.health,
        "HEALTH_ERR",
        "{}",
        avalonctl::status::render(&st)
    );
    assert!(
        st.health_detail
            .iter()
            .any(|d| d.starts_with("osd.") && d.contains("is full (")),
        "{:?}",
        st.health_detail
    );

    // A new file cannot take data either (once the other OSDs heard of
    // the full one, at their next heartbeat), and it is ENOSPC, not EIO.
    let mut n = 0;
    let mut last = None;
    let refused = wait_until(Duration::from_secs(20), || {
        n += 1;
        let (_, err) = fill(&mnt.join(format!("more{n}")), 1 << 20, 7);
        let Some(e) = err else { return false };
        assert_eq!(errno(&e), libc::ENOSPC, "{e:?}");
        last = Some(e);
        true
    });
    assert!(refused, "a full cluster takes new data ({n} files)");
    eprintln!("a new file refused after {n} attempt(s): {last:?}");

    // Reads work at full: what was there and what was fsynced.
    assert_eq!(sha_file(&mnt.join("keep")), keep_sha, "keep changed");
    let got = std::fs::read(mnt.join("fill")).expect("read fill");
    assert!(got.len() >= durable, "fill lost fsynced bytes");
    assert!(
        got[..durable] == fill_content(durable, 100)[..],
        "fsynced part of fill differs"
    );

    // Truncate works at full.
    let half = durable / 2;
    OpenOptions::new()
        .write(true)
        .open(mnt.join("fill"))
        .expect("open fill")
        .set_len(half as u64)
        .expect("truncate at full");
    let got = std::fs::read(mnt.join("fill")).expect("read truncated fill");
    assert!(got == fill_content(half, 100), "truncated fill differs");

    // rm frees the space (the MDS's GC deletes the chunks), and writes
    // work again once no OSD is full.
    std::fs::remove_file(mnt.join("fill")).expect("rm at full");
    for i in 1..=n {
        let _ = std::fs::remove_file(mnt.join(format!("more{i}")));
    }
    // Until the GC deleted the chunks only `keep` (36 of 96 MiB) is left.
    assert!(
        wait_until(Duration::from_secs(60), || {
            let st = t.c().status();
            st.osds.len() == 3 && st.osds.iter().all(|o| o.fill_ratio() < 0.5)
        }),
        "space not freed after rm:\n{}",
        full_osds(t.c()).1
    );
    // The OSDs hear that no disk is full with their next heartbeat reply.
    assert!(
        wait_until(Duration::from_secs(20), || fill(
            &mnt.join("probe"),
            1 << 20,
            3
        )
        .1
        .is_none()),
        "writes do not resume after rm:\n{}",
        full_osds(t.c()).1
    );
    std::fs::remove_file(mnt.join("probe")).expect("rm probe");
    let again = data(16 << 20, 2);
    let mut f = std::fs::File::create(mnt.join("again")).expect("create again");
    f.write_all(&again).expect("write after rm");
    f.sync_all().expect("fsync after rm");
    drop(f);
    assert_eq!(sha_file(&mnt.join("again")), sha(&again));
    assert_eq!(sha_file(&mnt.join("keep")), keep_sha, "keep changed");

    // No copy is corrupt: every OSD scrubs what it holds after all this,
    // and neither the scrubber nor any read reported a corrupt chunk.
    let scrubbed: Vec<u64> = t
        .c()
        .status()
        .osds
        .iter()
        .map(|o| o.scrubbed_chunks)
        .collect();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let st = t.c().status();
            st.osds.len() == scrubbed.len()
                && st
                    .osds
                    .iter()
                    .zip(&scrubbed)
                    .all(|(o, before)| o.scrubbed_chunks > *before)
        }),
        "OSDs did not scrub:\n{}",
        avalonctl::status::render(&t.c().status())
    );
    let st = t.c().status();
    for o in &st.osds {
        assert_eq!(o.scrub_errors, 0, "osd.{} found corrupt chunks", o.id);
    }
    let corrupt = t.corruption_in_logs();
    assert!(
        corrupt.is_empty(),
        "corruption reported:\n{}",
        corrupt.join("\n")
    );
    let gone = std::fs::metadata(mnt.join("fill")).expect_err("fill was removed");
    assert_eq!(gone.kind(), ErrorKind::NotFound);
}

#[test]
fn the_mds_refuses_creates_under_its_reserve_and_serves_deletes() {
    const DISK_MB: u64 = 64;
    const RESERVE_MB: u64 = 24;
    let mut o = Options::new();
    o.mds = 1;
    o.osds = 3;
    o.log_level = "info".into();
    o.mds_flags = vec!["--disk-reserve-mb".into(), RESERVE_MB.to_string()];
    let mut t = Setup::start(&[("mds1", DISK_MB)], o);
    let mnt = t.mnt();
    for i in 0..20 {
        std::fs::write(mnt.join(format!("f{i}")), data(1000, i)).expect("create");
    }
    std::fs::create_dir(mnt.join("d")).expect("mkdir");

    // Ballast on the MDS's own filesystem leaves it 8 MiB free.
    let md = t.dir.path().join("mds1");
    let u = avalon_proto::disk_usage::disk_usage(&md).expect("statvfs");
    let ballast = md.join("ballast");
    let size = u.free.saturating_sub(8 << 20);
    std::fs::write(&ballast, vec![0x5au8; size as usize]).expect("ballast");

    // A client without delegations (its creates go to the MDS) gets ENOSPC.
    let mnt2 = t.dir.path().join("mnt2");
    let other = SecondMount::new(t.c(), mnt2);
    let refused = |p: &Path| match std::fs::write(p, b"x") {
        Err(e) => errno(&e) == libc::ENOSPC,
        Ok(()) => {
            let _ = std::fs::remove_file(p);
            false
        }
    };
    assert!(
        wait_until(Duration::from_secs(20), || refused(&other.path.join("new"))),
        "create under the reserve not refused with ENOSPC"
    );
    let e = std::fs::create_dir(other.path.join("newdir")).expect_err("mkdir refused");
    assert_eq!(errno(&e), libc::ENOSPC, "{e:?}");
    let st = t.c().status();
    assert_eq!(
        st.health,
        "HEALTH_ERR",
        "{}",
        avalonctl::status::render(&st)
    );
    assert!(st.mds.iter().any(|m| m.disk_low), "{:?}", st.mds);

    // Deletes are served, through either mount.
    for i in 0..10 {
        std::fs::remove_file(other.path.join(format!("f{i}"))).expect("rm under the reserve");
    }
    for i in 10..20 {
        std::fs::remove_file(mnt.join(format!("f{i}"))).expect("rm under the reserve");
    }
    std::fs::remove_dir(other.path.join("d")).expect("rmdir under the reserve");
    let left: Vec<_> = std::fs::read_dir(&other.path)
        .expect("list")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left after rm: {left:?}");

    // Space back: creates work again.
    std::fs::remove_file(&ballast).expect("remove ballast");
    assert!(
        wait_until(Duration::from_secs(20), || std::fs::write(
            other.path.join("back"),
            b"back"
        )
        .is_ok()),
        "creates do not resume once the MDS has room"
    );
    assert_eq!(
        std::fs::read(other.path.join("back")).expect("read"),
        b"back"
    );
    drop(other);
}
