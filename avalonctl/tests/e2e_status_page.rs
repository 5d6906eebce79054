//! End-to-end test of the MDS status page (issue 22), in a real browser:
//! a local cluster (3 MDS, 3 OSDs, a mount) with metrics listeners; the
//! page is loaded in headless Chromium (`--dump-dom`), its DOM must have
//! the health line and a row per MDS, OSD and client; then an OSD is
//! killed and the page must come to show it down.
//!
//! Run with `cargo build --release --workspace && cargo test --release -p
//! avalonctl --test e2e_status_page` (root, FUSE, `chromium`: `./dev setup`).

mod common;
#[path = "common/prom.rs"]
mod prom;

use common::{wait_until, TestCluster};
use prom::http_get;
use std::process::Command;
use std::time::Duration;

/// The DOM of `url` after Chromium loaded it (following redirects).
fn dump_dom(url: &str, profile: &std::path::Path) -> String {
    let out = Command::new("timeout")
        .args([
            "120",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .output()
        .expect("run chromium (./dev setup installs it)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How many `<tr class="CLASS"` rows the DOM has.
fn rows(dom: &str, class: &str) -> usize {
    dom.matches(&format!("<tr class=\"{class}\"")).count()
}

#[test]
fn status_page_shows_the_cluster_and_a_dead_osd() {
    let mut t = TestCluster::start(3, 3);
    std::fs::write(t.mnt().join("hello"), b"status page").expect("write on the mount");
    let endpoints = t.c().layout.metrics_addrs();
    let mds: Vec<&String> = endpoints
        .iter()
        .filter(|(n, _)| n.starts_with("mds"))
        .map(|(_, a)| a)
        .collect();
    assert_eq!(mds.len(), 3, "every MDS has a listener: {endpoints:?}");

    // Every MDS answers: the leader with the page, a follower with it or
    // a redirect to the leader's.
    for a in &mds {
        let (code, body) = http_get(a, "/status").expect("GET /status");
        assert!(
            code == 200 && body.contains("id=\"health\"") || code == 307,
            "{a}: HTTP {code}: {body}"
        );
    }

    let profile = tempfile::tempdir().expect("browser profile dir");
    let url = format!("http://{}/status", mds[0]);
    let mut dom = String::new();
    // The client's first heartbeat (with its row) may follow the mount.
    let complete = wait_until(Duration::from_secs(120), || {
        dom = dump_dom(&url, profile.path());
        rows(&dom, "mds") == 3 && rows(&dom, "osd") == 3 && rows(&dom, "client") >= 1
    });
    assert!(complete, "page lacks rows:\n{dom}");
    assert!(
        dom.contains("<p id=\"health\" class=\"health ok\">HEALTH_OK</p>"),
        "health line:\n{dom}"
    );
    assert_eq!(dom.matches("data-state=\"up\"").count(), 3, "{dom}");
    assert!(dom.contains("role") && dom.contains(">leader<"), "{dom}");
    assert!(dom.contains("<svg"), "charts:\n{dom}");

    t.c().kill_osd(1);
    let shown = wait_until(Duration::from_secs(180), || {
        dom = dump_dom(&url, profile.path());
        dom.matches("data-state=\"down\"").count() == 1
            && dom.matches("data-state=\"up\"").count() == 2
    });
    assert!(shown, "the killed OSD is not shown down:\n{dom}");
    assert!(dom.contains("id=\"health\""), "{dom}");
}
