//! The durability contract: what fsync and fsyncdir returned for survives
//! kill -9 of every MDS at once, and of every daemon at once; the mounted
//! client carries on afterwards.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

fn write_synced(dir: &std::path::Path, n: usize, seed: u64) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for i in 0..n {
        let name = format!("f{seed}-{i}");
        let d = data(1000 + i * 7919, seed * 1000 + i as u64);
        let mut f = std::fs::File::create(dir.join(&name)).unwrap();
        f.write_all(&d).unwrap();
        f.sync_all().unwrap();
        out.insert(name, sha(&d));
    }
    // A rename is durable once fsyncdir returns (acknowledged means held
    // in memory by a majority; fsyncdir waits for their disks).
    std::fs::rename(
        dir.join(format!("f{seed}-0")),
        dir.join(format!("r{seed}-0")),
    )
    .unwrap();
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
    let d0 = out.remove(&format!("f{seed}-0")).unwrap();
    out.insert(format!("r{seed}-0"), d0);
    out
}

fn check(dir: &std::path::Path, want: &BTreeMap<String, Vec<u8>>) {
    for (name, dg) in want {
        assert_eq!(&sha_file(&dir.join(name)), dg, "{name}");
    }
}

#[test]
fn fsynced_data_survives_kill_9_of_every_mds_and_then_every_daemon() {
    let mut t = TestCluster::start(3, 3);
    let mnt = t.mnt();
    let dir = mnt.join("d");
    std::fs::create_dir(&dir).unwrap();
    let mut want = write_synced(&dir, 20, 1);

    // Every MDS at once.
    let c = t.c();
    let before = c.pids();
    for id in c.mds_ids() {
        c.kill_mds(id);
    }
    assert!(
        c.pids().iter().all(|(name, _)| !name.starts_with("mds")),
        "MDS processes gone"
    );
    c.restart_stopped().expect("restart MDS nodes");
    let after = c.pids();
    for (name, pid) in before.iter().filter(|(n, _)| n.starts_with("mds")) {
        assert!(
            after.iter().any(|(n, p)| n == name && p != pid),
            "{name} restarted with a new pid"
        );
    }
    c.wait_healthy(Duration::from_secs(120))
        .expect("healthy after MDS restart");
    // The mount rides through the outage (the client retries while no
    // leader answers) and still sees everything.
    check(&dir, &want);
    want.extend(write_synced(&dir, 10, 2));

    // Every daemon at once: MDS and OSDs.
    let c = t.c();
    for id in c.mds_ids() {
        c.kill_mds(id);
    }
    for n in 1..=3 {
        c.kill_osd(n);
    }
    c.restart_stopped().expect("restart all daemons");
    c.wait_healthy(Duration::from_secs(120))
        .expect("healthy after full restart");
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
    check(&dir, &want);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), want.len(), "{names:?}");
}
