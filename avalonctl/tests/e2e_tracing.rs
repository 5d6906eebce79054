//! End-to-end test of request tracing and JSON logs (issue 22): a local
//! cluster (3 MDS, 3 OSDs) whose daemons run with `--log-format json
//! --slow-request-ms 0`, and a real mount with
//! `-o log_format=json,slow_request_ms=0`, so that every request is logged
//! with its id on each side:
//! - every line of every log (client, MDS, OSD) parses as a JSON object;
//! - the request id of an `fsync` taken from the client's log is found in
//!   an MDS log (the size commit) and in the logs of at least two OSDs
//!   (the synced write's primary and the replicas it forwarded it to, or
//!   every OSD's sync);
//! - a failed operation's line in the client's log carries its request
//!   id, which the MDS that refused it logged too;
//! - the client's log file is reopened on SIGHUP (logrotate).
//!
//! Run with `cargo build --release --workspace && cargo test --release -p
//! avalonctl --test e2e_tracing` (root, FUSE).

mod common;

use common::{data, opts, wait_until, SecondMount, TestCluster};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The JSON objects of a log file, one per line; panics on a line that
/// is not one.
fn json_lines(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", path.display()));
            assert!(
                v.get("level").is_some() && v.get("fields").is_some(),
                "{}: not a log event: {l}",
                path.display()
            );
            v
        })
        .collect()
}

/// The daemon logs of the cluster in `dir` whose name starts with `kind`.
fn daemon_logs(dir: &Path, kind: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("logs"))
        .expect("logs dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(kind) && n.ends_with(".log"))
        })
        .collect();
    v.sort();
    v
}

/// The request id of the last line of the client's log whose fields
/// satisfy `is`, if logged yet. The client's lines carry it as if in a
/// span, like the servers'.
fn client_request_id(log: &Path, is: impl Fn(&Value) -> bool) -> Option<String> {
    json_lines(log)
        .into_iter()
        .filter(|v| is(&v["fields"]))
        .filter_map(|v| v["span"]["rid"].as_str().map(str::to_string))
        .next_back()
}

/// Whether any line of the logs names request `rid` (in its span or its
/// fields); every line must be JSON.
fn logs_name(logs: &[PathBuf], rid: &str) -> bool {
    logs.iter().any(|p| {
        json_lines(p).iter().any(|v| {
            v["span"]["rid"].as_str() == Some(rid) || v["fields"]["rid"].as_str() == Some(rid)
        })
    })
}

#[test]
fn one_fsync_is_followed_through_every_daemon_in_json_logs() {
    let mut o = opts(3, 3);
    let flags: Vec<String> = ["--log-format", "json", "--slow-request-ms", "0"]
        .map(String::from)
        .to_vec();
    o.mds_flags = flags.clone();
    o.osd_flags = flags;
    let mut t = TestCluster::start_with(o);
    let dir = t.dir.path().to_path_buf();

    // The file is made through the cluster's own mount: the traced mount
    // holds no delegation for it, so its fsync commits the size to the
    // MDS itself (a delegated commit may go out with the flusher's batch).
    std::fs::write(t.mnt().join("traced-file"), b"first").expect("create");
    let mnt = dir.join("traced");
    // Dropped (unmounted) before the cluster stops.
    let m = SecondMount::with_options(
        t.c(),
        mnt.clone(),
        "log_format=json,slow_request_ms=0,log_level=debug",
    );
    let client_log = mnt.with_extension("log");

    // The workload: 1 MiB appended, fsync (the data to the OSDs with a
    // sync, the new size to the MDS).
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(mnt.join("traced-file"))
            .expect("open");
        f.write_all(&data(1 << 20, 7)).expect("write");
        f.sync_all().expect("fsync");
    }
    // The client logs an operation just after its reply.
    let mut rid = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            rid = client_request_id(&client_log, |f| {
                f["message"] == "slow request" && f["op"] == "fsync"
            });
            rid.is_some()
        }),
        "no slow-request line for fsync in the client's log:\n{}",
        std::fs::read_to_string(&client_log).unwrap_or_default()
    );
    let rid = rid.expect("request id");
    assert_eq!(rid.len(), 16, "16 hex digits: {rid}");

    let mds = daemon_logs(&dir, "mds");
    let osd = daemon_logs(&dir, "osd");
    assert_eq!((mds.len(), osd.len()), (3, 3), "{mds:?} {osd:?}");
    assert!(
        wait_until(Duration::from_secs(30), || logs_name(&mds, &rid)),
        "request {rid} is in no MDS log"
    );
    // More than one OSD served it: the synced write's primary and the
    // replicas it forwarded the write to (the id goes with it), or every
    // OSD for the sync of data sent before.
    let osds_with_rid = || {
        osd.iter()
            .filter(|p| logs_name(std::slice::from_ref(*p), &rid))
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(30), || osds_with_rid() >= 2),
        "request {rid} is in {} OSD log(s)",
        osds_with_rid()
    );

    // A failed operation: the client's own line for it carries the id,
    // and the MDS that refused it logged the same one. The directory was
    // made through the other mount, so the traced one must ask the MDS.
    std::fs::create_dir(t.mnt().join("full-dir")).expect("mkdir");
    std::fs::write(t.mnt().join("full-dir/f"), b"x").expect("create");
    let e = std::fs::remove_dir(mnt.join("full-dir")).expect_err("rmdir of a non-empty directory");
    let enotempty = nix::errno::Errno::ENOTEMPTY as i32;
    assert_eq!(e.raw_os_error(), Some(enotempty), "{e}");
    let mut failed = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            failed = client_request_id(&client_log, |f| {
                f["message"] == "operation failed" && f["errno"] == enotempty
            });
            failed.is_some()
        }),
        "no line with a request id for the failed rmdir in the client's log"
    );
    let failed = failed.expect("request id");
    assert_ne!(failed, rid, "each operation has its own id");
    assert!(
        wait_until(Duration::from_secs(30), || logs_name(&mds, &failed)),
        "request {failed} (the failed rmdir) is in no MDS log"
    );

    // logrotate: the log is moved away, SIGHUP, and new lines go to a new
    // file at the old path.
    let rotated = mnt.with_extension("log.1");
    std::fs::rename(&client_log, &rotated).expect("rotate");
    let pid = m.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    assert!(
        wait_until(Duration::from_secs(30), || client_log.exists()),
        "the client did not reopen its log file at {}",
        client_log.display()
    );
    std::fs::write(mnt.join("after-rotation"), b"x").expect("write after rotation");
    let logged = |p: &Path| {
        p.exists()
            && json_lines(p)
                .iter()
                .any(|v| v["fields"]["message"] == "slow request")
    };
    assert!(
        wait_until(Duration::from_secs(30), || logged(&client_log)),
        "no new lines in the reopened log:\n{}",
        std::fs::read_to_string(&client_log).unwrap_or_default()
    );
    assert!(logged(&rotated), "the old lines stay in the moved file");
    assert_eq!(
        std::fs::read(mnt.join("after-rotation")).expect("read back"),
        b"x"
    );
    drop(m);
}
