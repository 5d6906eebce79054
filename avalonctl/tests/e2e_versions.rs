//! Protocol versions (avalon_proto::version): `avalonctl status` shows each
//! node's version, and an OSD or client too old for the cluster is refused
//! with a message naming both versions, stops, and the cluster serves on.
//! The too-old peers are played with `AVALON_TEST_PROTOCOL_VERSION` (read
//! only by binaries built with `failpoints`, as `./dev test` builds them).

mod common;

use avalon_proto::version::{MIN_PEER_VERSION, PROTOCOL_VERSION};
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A protocol version every node of this build refuses.
const TOO_OLD: u32 = MIN_PEER_VERSION - 1;

fn bin(name: &str) -> std::path::PathBuf {
    avalonctl::local_cluster::default_bin_dir().join(name)
}

/// Runs `cmd` to its end (at most `limit`), returning its exit code and
/// everything it wrote.
fn run_to_end(mut cmd: Command, out: &std::path::Path, limit: Duration) -> (Option<i32>, String) {
    let f = std::fs::File::create(out).expect("output file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("dup"))
        .stderr(f)
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still runs after {limit:?}:\n{}",
                std::fs::read_to_string(out).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (
        status.code(),
        std::fs::read_to_string(out).unwrap_or_default(),
    )
}

#[test]
fn status_shows_versions_and_too_old_peers_are_refused_while_the_cluster_serves() {
    let mut t = TestCluster::start(1, 3);
    let ours = format!("{PROTOCOL_VERSION} ({})", avalon_proto::version::RELEASE);
    let mnt = t.mnt();
    std::fs::write(mnt.join("before"), b"served").expect("write before");

    // Status (the --json the scripts read) names every node's version.
    let dir = t.dir.path().to_path_buf();
    let status = |json: bool| {
        let mut cmd = Command::new(bin("avalonctl"));
        cmd.arg("status").arg(&dir);
        if json {
            cmd.arg("--json");
        }
        run(&mut cmd)
    };
    assert!(
        wait_until(Duration::from_secs(60), || {
            let s: serde_json::Value = serde_json::from_str(&status(true)).expect("json");
            let all = |k: &str| {
                s[k].as_array()
                    .is_some_and(|v| !v.is_empty() && v.iter().all(|n| n["version"] == ours))
            };
            all("mds") && all("osds") && all("clients")
        }),
        "status --json lacks the versions:\n{}",
        status(true)
    );
    assert!(status(false).contains(&ours), "{}", status(false));

    // OSD 3 restarted as a too-old release: refused at registration, it
    // says so and exits.
    t.c().kill_osd(3);
    let spec = t.c().layout.osds[2].clone();
    let args = avalonctl::local_cluster::osd_args(&dir, &t.c().layout, &spec);
    let mut osd = Command::new(bin("avalon-osd"));
    osd.args(&args)
        .env("AVALON_TEST_PROTOCOL_VERSION", TOO_OLD.to_string());
    let (code, out) = run_to_end(osd, &dir.join("old-osd.out"), Duration::from_secs(90));
    assert_eq!(code, Some(2), "the too-old OSD should exit 2:\n{out}");
    let said = format!(
        "OSD (3) speaks protocol version {TOO_OLD} ({}), this MDS speaks {PROTOCOL_VERSION}",
        avalon_proto::version::RELEASE
    );
    assert!(
        out.contains("avalon protocol version mismatch") && out.contains(&said),
        "the OSD's output should name both versions ({said}):\n{out}"
    );

    // A too-old client: the mount fails with the MDS's reason.
    let old_mnt = dir.join("old-client");
    std::fs::create_dir_all(&old_mnt).expect("mkdir");
    let key = avalonctl::local_cluster::mount_key_option(&dir, &t.c().layout);
    let mut client = Command::new(bin("avalon-fuse"));
    client
        .arg(t.c().layout.source())
        .arg(&old_mnt)
        .arg("-o")
        .arg(format!(
            "{key},connect_timeout=30,log={}",
            dir.join("old-client.log").display()
        ))
        .env("AVALON_TEST_PROTOCOL_VERSION", TOO_OLD.to_string());
    let (code, out) = run_to_end(client, &dir.join("old-client.out"), Duration::from_secs(90));
    assert_ne!(code, Some(0), "the too-old client mounted:\n{out}");
    assert!(
        out.contains("refused this client")
            && out.contains(&format!("the client speaks protocol version {TOO_OLD}")),
        "the mount should fail naming both versions:\n{out}"
    );
    assert!(!avalonctl::local_cluster::is_mounted(&old_mnt));

    // The cluster served on: the mount reads and writes.
    std::fs::write(mnt.join("after"), b"still served").expect("write after");
    assert_eq!(std::fs::read(mnt.join("before")).expect("read"), b"served");
    assert_eq!(
        std::fs::read(mnt.join("after")).expect("read"),
        b"still served"
    );
}
