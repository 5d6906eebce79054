//! The mount helper and the CLI: `mount -t fuse.avalon`, findmnt's source,
//! umount, a bad source failing fast and cleanly, `avalonctl up/status/down`.

mod common;

use avalonctl::local_cluster::{is_mounted, LocalCluster};
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin(name: &str) -> std::path::PathBuf {
    avalonctl::local_cluster::default_bin_dir().join(name)
}

#[test]
fn mount_helper_mounts_with_exact_source_and_umount_stops_it() {
    let dir = tempfile::Builder::new()
        .prefix("avalon-e2e-")
        .tempdir()
        .unwrap();
    let mut o = opts(1, 3);
    o.mount = false;
    let cluster = LocalCluster::start(dir.path(), o).expect("cluster");
    let source = cluster.layout.source();
    let mnt = dir.path().join("by-hand");
    std::fs::create_dir_all(&mnt).unwrap();

    // Prefer mount(8) with the installed helper; the helper binary takes the
    // same arguments when run directly.
    // No log= option: the detached client logs to its default file, and
    // must survive its parent's pipes closing (a tracing write to a dead
    // stderr used to abort it).
    let log = default_client_log(&mnt);
    // The cluster's client key, as a user passes it.
    let key = avalonctl::local_cluster::mount_key_option(dir.path(), &cluster.layout);
    let helper_installed = std::path::Path::new("/sbin/mount.fuse.avalon").exists();
    if helper_installed {
        run(Command::new("mount")
            .args(["-t", "fuse.avalon"])
            .arg(&source)
            .arg(&mnt)
            .args(["-o", &key]));
    } else {
        eprintln!("note: /sbin/mount.fuse.avalon not installed (./dev setup does it); running the helper directly");
        run(Command::new(bin("avalon-fuse"))
            .arg(&source)
            .arg(&mnt)
            .args(["-o", &key]));
    }
    let guard = UnmountOnDrop(mnt.clone());
    assert!(is_mounted(&mnt));
    let found = run(Command::new("findmnt")
        .args(["-n", "-o", "SOURCE,FSTYPE"])
        .arg(&mnt));
    let mut it = found.split_whitespace();
    assert_eq!(it.next(), Some(source.as_str()), "findmnt: {found}");
    assert_eq!(it.next(), Some("fuse.avalon"), "findmnt: {found}");

    let io =
        std::fs::write(mnt.join("hello"), b"world").and_then(|()| std::fs::read(mnt.join("hello")));
    match io {
        Ok(got) => assert_eq!(got, b"world"),
        Err(e) => panic!(
            "I/O on the mount failed: {e}\nclient log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ),
    }

    // The detached client runs until unmounted, then exits.
    let client = format!("avalon-fuse --foreground {source} {}", mnt.display());
    let running = || {
        Command::new("pgrep")
            .args(["-f", &client])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false)
    };
    assert!(running(), "no process matches {client:?}");
    run(Command::new("umount").arg(&mnt));
    assert!(!is_mounted(&mnt));
    std::mem::forget(guard);
    let gone = wait_until(Duration::from_secs(15), || !running());
    assert!(gone, "client still running after umount");
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("mounted"), "default client log: {logged}");
    let _ = std::fs::remove_file(&log);
    drop(cluster);
}

/// Where a detached client without `log=` writes its log.
fn default_client_log(mnt: &std::path::Path) -> std::path::PathBuf {
    let real = std::fs::canonicalize(mnt).unwrap();
    let name = real.to_string_lossy().trim_matches('/').replace('/', "-");
    std::path::Path::new("/var/log/avalon").join(format!("{name}.log"))
}

struct UnmountOnDrop(std::path::PathBuf);
impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        avalonctl::local_cluster::unmount(&self.0);
    }
}

#[test]
fn unreachable_source_fails_fast_and_leaves_nothing_mounted() {
    let dir = tempfile::tempdir().unwrap();
    let port = avalonctl::local_cluster::free_port().unwrap();
    let t0 = Instant::now();
    let out = Command::new(bin("avalon-fuse"))
        .arg(format!("127.0.0.1:{port}:/"))
        .arg(dir.path())
        // Plaintext: this is about an address nobody answers at, not keys.
        .args(["-o", "connect_timeout=3,insecure"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = t0.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the Avalon metadata service"),
        "stderr: {err}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(!is_mounted(dir.path()));
    let _ = std::fs::remove_file(default_client_log(dir.path()));
    // The directory is an ordinary, usable directory.
    std::fs::write(dir.path().join("x"), b"1").unwrap();

    // Malformed sources are refused with a message, before any network.
    for bad in [
        "",
        "nohost",
        "127.0.0.1:notaport:/",
        "127.0.0.1:7100:/../etc",
    ] {
        let out = Command::new(bin("avalon-fuse"))
            .arg(bad)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());
        assert!(!is_mounted(dir.path()));
    }
}

#[test]
fn avalonctl_up_status_down() {
    let dir = tempfile::Builder::new()
        .prefix("avalon-e2e-")
        .tempdir()
        .unwrap();
    let mut up = Command::new(bin("avalonctl"))
        .arg("up")
        .arg(dir.path())
        .args(["--mds", "3", "--osds", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mnt = dir.path().join("mnt");
    let mounted = wait_until(Duration::from_secs(120), || {
        is_mounted(&mnt) || matches!(up.try_wait(), Ok(Some(_)))
    });
    assert!(
        mounted && is_mounted(&mnt),
        "avalonctl up did not mount (exit: {:?})",
        up.try_wait()
    );
    std::fs::write(mnt.join("f"), b"data").unwrap();

    let json = run(Command::new(bin("avalonctl"))
        .arg("status")
        .arg(dir.path())
        .arg("--json"));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mds = v["mds"].as_array().unwrap();
    assert_eq!(mds.len(), 3, "{json}");
    assert_eq!(
        mds.iter().filter(|m| m["role"] == "leader").count(),
        1,
        "{json}"
    );
    assert!(mds.iter().all(|m| m["pid"].as_u64().unwrap() > 0));
    assert_eq!(v["osds"].as_array().unwrap().len(), 3);
    assert!(v["osds"]
        .as_array()
        .unwrap()
        .iter()
        .all(|o| o["state"] == "up"));
    assert_eq!(v["clients"].as_array().unwrap().len(), 1, "{json}");
    let table = run(Command::new(bin("avalonctl")).arg("status").arg(dir.path()));
    assert!(table.contains("leader") && table.contains("OSD"), "{table}");

    run(Command::new(bin("avalonctl")).arg("down").arg(dir.path()));
    let st = up.wait().unwrap();
    assert!(st.success(), "up exited with {st}");
    assert!(!is_mounted(&mnt));

    // Up again on the same directory: same files.
    let mut up = Command::new(bin("avalonctl"))
        .arg("up")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mounted = wait_until(Duration::from_secs(120), || {
        is_mounted(&mnt) || matches!(up.try_wait(), Ok(Some(_)))
    });
    assert!(mounted && is_mounted(&mnt));
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"data");
    run(Command::new(bin("avalonctl")).arg("down").arg(dir.path()));
    assert!(up.wait().unwrap().success());
    assert!(!is_mounted(&mnt));
}
