//! End-to-end test of the Prometheus metrics (issue 22): a local cluster
//! (3 MDS, 3 OSDs, every daemon with `--metrics-addr`) and a real mount
//! with `-o metrics=`; every endpoint is scraped before and after a
//! workload, each scrape must parse as Prometheus text format, and the
//! counters must move with what the workload did.
//!
//! Run with `cargo build --release --workspace && cargo test --release -p
//! avalonctl --test e2e_metrics` (root, FUSE).

mod common;
#[path = "common/prom.rs"]
mod prom;

use common::{data, wait_until, TestCluster};
use prom::{http_get, parse, Scrape};
use std::io::Write;
use std::time::Duration;

/// Files the workload creates, and the size of its big file.
const FILES: usize = 200;
const BIG: usize = 100 << 20;

/// Scrapes and parses every endpoint: (name, scrape), panicking on a
/// malformed one.
fn scrape_all(endpoints: &[(String, String)]) -> Vec<(String, Scrape)> {
    endpoints
        .iter()
        .map(|(name, addr)| {
            let (code, body) = http_get(addr, "/metrics")
                .unwrap_or_else(|e| panic!("scraping {name} at {addr}: {e}"));
            assert_eq!(code, 200, "{name}: HTTP {code}: {body}");
            let sc = parse(&body).unwrap_or_else(|e| panic!("{name}: not Prometheus text: {e}"));
            (name.clone(), sc)
        })
        .collect()
}

/// Sum of `metric{want}` over the endpoints whose name starts with `kind`.
fn total(scrapes: &[(String, Scrape)], kind: &str, metric: &str, want: &[(&str, &str)]) -> f64 {
    scrapes
        .iter()
        .filter(|(n, _)| n.starts_with(kind))
        .map(|(_, s)| s.sum(metric, want))
        .sum()
}

/// Creates at the MDS: `mknod` RPCs plus creates sent under a delegation.
fn mds_creates(s: &[(String, Scrape)]) -> f64 {
    total(
        s,
        "mds",
        "avalon_mds_op_duration_seconds_count",
        &[("op", "mknod")],
    ) + total(
        s,
        "mds",
        "avalon_mds_delegated_ops_total",
        &[("op", "create")],
    )
}

#[test]
fn every_endpoint_parses_and_counts_the_workload() {
    let mut t = TestCluster::start(3, 3);
    let endpoints = t.c().layout.metrics_addrs();
    let names: Vec<&str> = endpoints.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["mds1", "mds2", "mds3", "osd1", "osd2", "osd3", "client"],
        "one endpoint per process"
    );
    let before = scrape_all(&endpoints);

    // The workload: FILES small files in a new directory, then BIG bytes
    // into one file, fsynced.
    let dir = t.mnt().join("many");
    std::fs::create_dir(&dir).expect("mkdir");
    for i in 0..FILES {
        std::fs::write(dir.join(format!("f{i}")), b"x").expect("small file");
    }
    let big = data(BIG, 7);
    {
        let mut f = std::fs::File::create(t.mnt().join("big")).expect("create big");
        for piece in big.chunks(1 << 20) {
            f.write_all(piece).expect("write");
        }
        f.sync_all().expect("fsync");
    }
    assert_eq!(
        std::fs::read_dir(&dir).expect("readdir").count(),
        FILES,
        "every file listed"
    );
    // Creates made under a delegation reach the MDS in the background:
    // wait (bounded) until they are counted.
    let want_creates = mds_creates(&before) + (FILES + 1) as f64;
    let mut after = scrape_all(&endpoints);
    wait_until(Duration::from_secs(120), || {
        after = scrape_all(&endpoints);
        mds_creates(&after) >= want_creates
            && after
                .iter()
                .filter(|(n, _)| n.starts_with("mds"))
                .all(|(_, s)| s.sum("avalon_mds_inodes", &[]) >= (FILES + 3) as f64)
    });

    // MDS: creates counted once each (files and the big file; the
    // directory too when it was delegated), not for other operations.
    let creates = mds_creates(&after) - mds_creates(&before);
    assert!(
        creates >= (FILES + 1) as f64 && creates <= (FILES + 12) as f64,
        "MDS creates moved by {creates}, workload created {} files",
        FILES + 1
    );
    let leaders = total(&after, "mds", "avalon_mds_raft_is_leader", &[]);
    assert_eq!(leaders, 1.0, "exactly one MDS reports itself leader");
    for (name, s) in after.iter().filter(|(n, _)| n.starts_with("mds")) {
        assert!(
            s.sum("avalon_mds_raft_term", &[]) >= 1.0,
            "{name}: raft term"
        );
        assert!(
            s.sum("avalon_mds_inodes", &[]) >= (FILES + 3) as f64,
            "{name}: inode count {}",
            s.sum("avalon_mds_inodes", &[])
        );
        assert!(s.sum("avalon_mds_directories", &[]) >= 2.0, "{name}: dirs");
        assert!(
            s.has("avalon_mds_raft_apply_duration_seconds_count"),
            "{name}: apply latency"
        );
    }
    let commits = |s: &[(String, Scrape)]| {
        total(
            s,
            "mds",
            "avalon_mds_raft_commit_duration_seconds_count",
            &[],
        )
    };
    assert!(commits(&after) > commits(&before), "commits counted");
    assert!(
        total(&after, "mds", "avalon_mds_sessions", &[]) >= 3.0,
        "the mount's session, seen by every MDS"
    );

    // OSDs: the primaries received at least the file's bytes, the
    // replicas their copies; writes and fsyncs timed.
    let moved = |metric: &str, want: &[(&str, &str)]| {
        total(&after, "osd", metric, want) - total(&before, "osd", metric, want)
    };
    let primary = moved("avalon_osd_written_bytes_total", &[("role", "primary")]);
    assert!(
        primary >= BIG as f64,
        "OSD primaries received {primary} bytes for a {BIG}-byte file"
    );
    let replica = moved("avalon_osd_written_bytes_total", &[("role", "replica")]);
    assert!(replica >= BIG as f64, "replicas received {replica} bytes");
    assert!(
        moved("avalon_osd_op_duration_seconds_count", &[("op", "write")]) >= 25.0,
        "at least one write per 4 MiB chunk"
    );
    assert!(
        moved("avalon_osd_fsync_duration_seconds_count", &[]) >= 1.0,
        "fsyncs timed"
    );
    for (name, s) in after.iter().filter(|(n, _)| n.starts_with("osd")) {
        assert!(
            s.sum("avalon_osd_disk_total_bytes", &[]) > 0.0,
            "{name}: capacity"
        );
        let fill = s.sum("avalon_osd_disk_fill_ratio", &[]);
        assert!((0.0..=1.0).contains(&fill), "{name}: fill ratio {fill}");
        assert!(s.sum("avalon_osd_pgs", &[]) > 0.0, "{name}: PGs");
    }

    // The client: FUSE operations by opcode, bytes, caches.
    let client =
        |s: &[(String, Scrape)], m: &str, want: &[(&str, &str)]| total(s, "client", m, want);
    let op_count = "avalon_client_fuse_op_duration_seconds_count";
    let created = client(&after, op_count, &[("op", "create")])
        - client(&before, op_count, &[("op", "create")]);
    assert!(
        created >= (FILES + 1) as f64,
        "client create ops moved by {created}"
    );
    let writes = client(&after, op_count, &[("op", "write")])
        - client(&before, op_count, &[("op", "write")]);
    assert!(writes >= 100.0, "client write ops moved by {writes}");
    let written = client(&after, "avalon_client_written_bytes_total", &[])
        - client(&before, "avalon_client_written_bytes_total", &[]);
    assert!(
        written >= (BIG + FILES) as f64,
        "client wrote {written} bytes"
    );
    let lookups = client(&after, "avalon_client_cache_hits_total", &[])
        + client(&after, "avalon_client_cache_misses_total", &[]);
    assert!(lookups > 0.0, "cache lookups counted");
    assert!(
        client(&after, "avalon_client_write_buffer_budget_bytes", &[]) > 0.0,
        "write-back buffer budget"
    );

    // Reading the file back (past the kernel's page cache) moves the
    // read counters.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
    let read = std::fs::read(t.mnt().join("big")).expect("read back");
    assert!(read == big, "data read back");
    let again = scrape_all(&endpoints);
    let read_bytes = client(&again, "avalon_client_read_bytes_total", &[])
        - client(&after, "avalon_client_read_bytes_total", &[]);
    assert!(read_bytes >= BIG as f64, "client read {read_bytes} bytes");
}
