//! End-to-end tests of the cluster-wide settings kept in the replicated MDS
//! state: every MDS restarted with a value that differs from the stored one
//! refuses to start; one MDS whose flags differ refuses while the other two
//! serve; `avalonctl pool set replicas` re-replicates the data.
//!
//! Run with `cargo build --release --workspace --bins &&
//! AVALON_BIN_DIR=$PWD/target/release cargo test --release -p avalonctl
//! --test e2e_settings -- --test-threads=1` (root, FUSE).

mod common;

use avalon_proto::pb;
use avalonctl::local_cluster::{mds_args, LocalCluster};
use common::{data, run, sha, sha_file, wait_until, TestCluster};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A daemon started by the test itself, killed on drop (also on panic).
struct Daemon(Option<Child>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A started `avalon-mds` and the file its stderr goes to.
struct Started {
    daemon: Daemon,
    err_path: PathBuf,
}

impl Started {
    /// Starts `avalon-mds` with `args`, stderr to `logs/{name}.log`.
    fn new(t: &TestCluster, name: &str, args: &[String]) -> Started {
        let dir = std::fs::canonicalize(t.dir.path()).expect("dir");
        let bin = avalonctl::local_cluster::default_bin_dir().join("avalon-mds");
        let err_path = dir.join("logs").join(format!("{name}.log"));
        let err = std::fs::File::create(&err_path).expect("stderr file");
        let child = Command::new(&bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        Started {
            daemon: Daemon(Some(child)),
            err_path,
        }
    }

    /// (exit status, stderr) once it exits, or None if it still runs
    /// after `limit` (it is killed when dropped).
    fn wait(&mut self, limit: Duration) -> Option<(std::process::ExitStatus, String)> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let c = self.daemon.0.as_mut()?;
            if let Ok(Some(status)) = c.try_wait() {
                self.daemon.0 = None;
                let err = std::fs::read_to_string(&self.err_path).unwrap_or_default();
                return Some((status, err));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// Runs MDS `id` of the cluster in `t` with its usual flags plus `extra`;
/// returns (exit status, stderr) once it exits, or None if it still runs
/// after `limit` (then it is killed).
fn run_mds(
    t: &TestCluster,
    layout: &avalonctl::local_cluster::Layout,
    id: u64,
    extra: &[&str],
    limit: Duration,
) -> Option<(std::process::ExitStatus, String)> {
    let n = layout
        .mds
        .iter()
        .find(|n| n.id == id)
        .expect("MDS in layout");
    let dir = std::fs::canonicalize(t.dir.path()).expect("dir");
    let mut args = mds_args(&dir, layout, n);
    args.extend(extra.iter().map(|s| s.to_string()));
    Started::new(t, &format!("mds{id}-refused"), &args).wait(limit)
}

/// Checks that a refusal names `key`, both values and `fix`.
fn assert_message(who: &str, stderr: &str, key: &str, stored: &str, local: &str, fix: &str) {
    for want in [
        format!("cluster setting `{key}` is {stored}"),
        format!("sets it to {local}"),
        fix.to_string(),
    ] {
        assert!(
            stderr.to_lowercase().contains(&want.to_lowercase()),
            "{who}: {want:?} missing in:\n{stderr}"
        );
    }
}

/// The fix that the message of a changeable or fixed setting gives.
const FIX: &str = "remove it from this node's config file and flags";

/// Asserts that MDS `id` refuses to start with `extra`, naming `key`, both
/// values and `fix`.
#[allow(clippy::too_many_arguments)]
fn assert_refuses(
    t: &TestCluster,
    layout: &avalonctl::local_cluster::Layout,
    id: u64,
    extra: &[&str],
    key: &str,
    stored: &str,
    local: &str,
    fix: &str,
) {
    let (status, stderr) = run_mds(t, layout, id, extra, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("MDS {id} with {extra:?} still runs after 60 s"));
    assert!(
        !status.success(),
        "MDS {id} exited with {status}:\n{stderr}"
    );
    assert_message(&format!("MDS {id}"), &stderr, key, stored, local, fix);
}

/// The leader's cluster settings.
fn settings(c: &LocalCluster) -> pb::ClusterSettings {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(avalonctl::pool::get(c.tls(), &c.layout.mds_addrs()))
        .expect("settings")
}

/// A cluster restarted with a changed explicit setting on every MDS: each
/// refuses to start; without the flag they start again and serve the data.
#[test]
fn every_mds_refuses_settings_that_differ_from_the_stored_ones() {
    let mut t = TestCluster::start(3, 1);
    let path = t.mnt().join("kept");
    let bytes = data(3 << 20, 7);
    std::fs::write(&path, &bytes).expect("write");
    let stored = settings(t.c());
    assert_eq!(stored.pg_count, avalon_proto::limits::DEFAULT_PG_COUNT);
    assert_eq!((stored.replicas, stored.write_quorum), (1, 1));
    assert_eq!(stored.cluster_id.len(), 32);
    let layout = t.c().layout.clone();
    // Every node must hold the settings before the cluster stops: a voter
    // that lagged behind the other two (the leader needs only one of them)
    // would start without them and rightly wait to learn them instead of
    // refusing.
    common::wait_converged(t.c(), Duration::from_secs(60));
    t.cluster.take().expect("cluster").stop();

    let other_pgs = (stored.pg_count * 2).to_string();
    for id in [1, 2, 3] {
        assert_refuses(
            &t,
            &layout,
            id,
            &["--pg-count", &other_pgs],
            "pg_count",
            &stored.pg_count.to_string(),
            &other_pgs,
            FIX,
        );
    }
    assert_refuses(
        &t,
        &layout,
        2,
        &["--cluster-id", "another-cluster"],
        "cluster_id",
        &format!("{:?}", stored.cluster_id),
        "\"another-cluster\"",
        "give the right data directory or cluster_id",
    );
    // The same value given explicitly is no disagreement: the node starts
    // (and is stopped when the limit passes).
    assert!(
        run_mds(
            &t,
            &layout,
            1,
            &["--pg-count", &stored.pg_count.to_string()],
            Duration::from_secs(3),
        )
        .is_none(),
        "MDS 1 with its own stored pg count did not keep running"
    );

    t.restart();
    assert_eq!(settings(t.c()), stored);
    assert_eq!(sha_file(&path), sha(&bytes));
}

/// One MDS whose flags set other replicas refuses to start; the other two
/// keep serving the mount and the cluster RPCs; without the flag it joins
/// again.
#[test]
fn one_mds_with_other_settings_refuses_the_others_serve() {
    let mut t = TestCluster::start(3, 3);
    let layout = t.c().layout.clone();
    let stored = settings(t.c());
    assert_eq!((stored.replicas, stored.write_quorum), (3, 2));
    t.c().kill_mds(3);
    assert_refuses(
        &t,
        &layout,
        3,
        &["--replicas", "2", "--write-quorum", "1"],
        "replicas",
        "3",
        "2",
        FIX,
    );
    // The two others serve: a write and a read through the mount, the map.
    let path = t.mnt().join("while-one-refuses");
    let bytes = data(5 << 20, 11);
    std::fs::write(&path, &bytes).expect("write with two MDS");
    assert_eq!(sha_file(&path), sha(&bytes));
    let map = common::cluster_map(t.c());
    assert_eq!(map.replicas, 3);
    assert!(t.c().status().leader_id.is_some_and(|l| l != 3));

    // Without the flag it starts and catches up.
    t.c().restart_mds(3).expect("restart mds3");
    let addr = layout.mds[2].addr.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let caught_up = wait_until(Duration::from_secs(60), || {
        let Some(s) = rt.block_on(avalonctl::mds_admin::status_of(
            t.c().tls(),
            &addr,
            Duration::from_secs(2),
        )) else {
            return false;
        };
        let Some(me) = s.self_ else { return false };
        me.role == "follower" && me.last_applied > 0
    });
    assert!(caught_up, "MDS 3 did not come back as a follower");
    assert!(t.c().mds_pid(3).is_some());

    // A brand-new node that joins with other replicas learns the cluster's
    // settings as it catches up, then stops; the others keep serving.
    let port = avalonctl::local_cluster::free_port().expect("port");
    let addr4 = format!("127.0.0.1:{port}");
    let dir = std::fs::canonicalize(t.dir.path()).expect("dir");
    let mut peers: Vec<String> = layout
        .mds
        .iter()
        .map(|n| format!("{}={}", n.id, n.addr))
        .collect();
    peers.push(format!("4={addr4}"));
    let mut args: Vec<String> = [
        "--id",
        "4",
        "--listen",
        &addr4,
        "--data-dir",
        &dir.join("mds4").to_string_lossy(),
        "--peers",
        &peers.join(","),
        "--join",
        "--replicas",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let keys =
        avalonctl::local_cluster::keys_dir(&std::fs::canonicalize(t.dir.path()).expect("dir"));
    avalonctl::keys::ensure(&keys, &["mds.4".to_string()]).expect("key of mds.4");
    args.extend([
        "--keyfile".to_string(),
        avalonctl::keys::keyfile(&keys, "mds.4")
            .to_string_lossy()
            .into_owned(),
    ]);
    let tls = t.c().tls().clone();
    let mut joiner = Started::new(&t, "mds4-joining", &args);
    // The leader adds it (learner, then voter); whether the add completes
    // before the node stops does not matter here: 3 of 4 voters are up.
    let addrs = layout.mds_addrs();
    let a4 = addr4.clone();
    let adder_tls = tls.clone();
    let adder = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(avalonctl::mds_admin::add_mds(
            &adder_tls,
            &addrs,
            4,
            &a4,
            Duration::from_secs(30),
        ))
    });
    let (status, stderr) = joiner
        .wait(Duration::from_secs(90))
        .expect("the joining MDS with other replicas did not stop");
    assert!(
        !status.success(),
        "joining MDS exited with {status}:\n{stderr}"
    );
    assert_message("joining MDS 4", &stderr, "replicas", "3", "2", FIX);
    let _ = adder.join();
    let path = t.mnt().join("after-joiner-stopped");
    std::fs::write(&path, b"still serving").expect("write after the joiner stopped");
    assert_eq!(std::fs::read(&path).expect("read"), b"still serving");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if rt
        .block_on(avalonctl::mds_admin::status_of(
            &tls,
            &layout.mds[0].addr,
            Duration::from_secs(2),
        ))
        .is_some_and(|s| s.members.iter().any(|m| m.id == 4))
    {
        rt.block_on(avalonctl::mds_admin::remove_mds(
            &tls,
            &layout.mds_addrs(),
            4,
            Duration::from_secs(60),
        ))
        .expect("remove the stopped MDS 4");
    }
}

/// (ino, index) -> number of OSDs holding a copy of a chunk of `ino`.
fn copies(c: &LocalCluster, ino: u64) -> BTreeMap<u64, usize> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut out = BTreeMap::new();
    for n in &c.layout.osds {
        let reply = rt.block_on(async {
            let ch = c
                .tls()
                .channel(
                    &n.addr,
                    avalon_proto::tls::Dial::Osd,
                    Duration::from_secs(5),
                )
                .ok()?;
            let mut osd = pb::osd_client::OsdClient::new(ch)
                .max_decoding_message_size(avalon_proto::limits::MAX_MESSAGE_BYTES);
            let req = pb::ListChunksRequest {
                header: None,
                pg: 0,
                pg_count: 0,
                all: true,
                map_epoch: 0,
            };
            tokio::time::timeout(Duration::from_secs(10), osd.list_chunks(req))
                .await
                .ok()?
                .ok()
        });
        let Some(reply) = reply else { continue };
        for ch in reply.into_inner().chunks {
            if let Some(id) = ch.chunk.filter(|id| id.ino == ino) {
                *out.entry(id.index).or_default() += 1;
            }
        }
    }
    out
}

fn avalonctl(args: &[&str]) -> String {
    run(Command::new(env!("CARGO_BIN_EXE_avalonctl")).args(args))
}

/// Replicas 2 -> 3 with `avalonctl pool set`: every chunk ends up on all
/// three OSDs, the data reads back, and the command reports progress.
#[test]
fn pool_set_replicas_rereplicates() {
    let mut t = TestCluster::start(1, 3);
    let dir = t.c().dir.to_string_lossy().into_owned();
    let out = avalonctl(&["pool", "set", &dir, "replicas", "2", "--no-wait"]);
    assert!(out.contains("replicas 3 -> 2"), "{out}");
    let s = settings(t.c());
    assert_eq!((s.replicas, s.write_quorum), (2, 2));
    // The leader's map has the new replicas.
    assert!(wait_until(Duration::from_secs(30), || common::cluster_map(
        t.c()
    )
    .replicas
        == 2));

    let path = t.mnt().join("grows");
    let bytes = data(24 << 20, 5);
    std::fs::write(&path, &bytes).expect("write");
    let f = std::fs::File::open(&path).expect("open");
    f.sync_all().expect("fsync");
    let ino = std::fs::metadata(&path).expect("stat").ino();
    let chunks = bytes.len().div_ceil(4 << 20);
    let two = wait_until(Duration::from_secs(120), || {
        let c = copies(t.c(), ino);
        c.len() == chunks && c.values().all(|n| *n == 2)
    });
    assert!(two, "not 2 copies of each chunk: {:?}", copies(t.c(), ino));

    let out = Command::new(env!("CARGO_BIN_EXE_avalonctl"))
        .args(["pool", "set", &dir, "replicas", "3", "--timeout", "300"])
        .output()
        .expect("avalonctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pool set failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("replicas 2 -> 3"), "{stdout}");
    assert!(stdout.contains("healthy"), "{stdout}");
    assert!(stderr.contains('%'), "no progress shown:\n{stderr}");
    let c = copies(t.c(), ino);
    assert_eq!(c.len(), chunks, "{c:?}");
    assert!(
        c.values().all(|n| *n == 3),
        "not 3 copies of each chunk: {c:?}\n{stdout}\n{stderr}"
    );
    let show = avalonctl(&["pool", "show", &dir]);
    assert!(show.contains("replicas:            3"), "{show}");
    assert_eq!(sha_file(&path), sha(&bytes));

    // Restarted without the creation flags, every node takes the stored
    // replicas (the local cluster passed --replicas 3 only at creation).
    t.restart();
    assert_eq!(settings(t.c()).replicas, 3);
    assert_eq!(sha_file(&path), sha(&bytes));
}
