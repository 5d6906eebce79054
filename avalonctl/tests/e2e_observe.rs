//! End-to-end test of what shows a running cluster (issue 22), on one
//! local cluster (3 MDS, 3 OSDs, a mount, metrics listeners):
//! - the MDS status page in a real browser: loaded in headless Chromium
//!   (`--dump-dom`), its DOM must have the health line and a row per MDS,
//!   OSD and client, each with this build's version; after an OSD is killed it must come to show it down;
//! - `avalonctl top` in a tmux pane must show non-zero ops during a
//!   workload on the mount, and quit on `q`.
//!
//! Run with `cargo build --release --workspace && cargo test --release -p
//! avalonctl --test e2e_observe` (root, FUSE, `chromium` and `tmux`:
//! `./dev setup`).

mod common;
#[path = "common/prom.rs"]
mod prom;

use common::{wait_until, TestCluster};
use prom::http_get;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A tmux server of this test's own (its socket name), killed on drop.
struct Tmux(String);

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.0]);
        c
    }

    fn capture(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "top"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn alive(&self) -> bool {
        self.cmd()
            .args(["has-session", "-t", "top"])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
    }
}

/// The figures of top's "ops/s: mds X  osd Y  clients Z" line.
fn top_ops(screen: &str) -> Option<(f64, f64, f64)> {
    let line = screen
        .lines()
        .find(|l| l.trim_start().starts_with("ops/s:"))?;
    let w: Vec<&str> = line.split_whitespace().collect();
    let num = |k: &str| {
        let i = w.iter().position(|x| *x == k)?;
        w.get(i + 1)?.parse::<f64>().ok()
    };
    Some((num("mds")?, num("osd")?, num("clients")?))
}

/// Runs `avalonctl top` in a tmux pane during a workload on the mount:
/// it must show operations on the MDS, the OSDs and the client, then
/// quit on `q`.
fn top_shows_the_workload(t: &TestCluster) {
    let tmux = Tmux(format!("avalon-e2e-top-{}", std::process::id()));
    let top = format!(
        "{} top {}",
        avalonctl::local_cluster::default_bin_dir()
            .join("avalonctl")
            .display(),
        t.dir.path().display()
    );
    let started = tmux
        .cmd()
        .args([
            "new-session",
            "-d",
            "-x",
            "160",
            "-y",
            "50",
            "-s",
            "top",
            &top,
        ])
        .status()
        .expect("run tmux (./dev setup installs it)");
    assert!(started.success(), "tmux new-session");

    let stop = Arc::new(AtomicBool::new(false));
    let work = {
        let (stop, dir) = (stop.clone(), t.mnt().join("top-load"));
        std::fs::create_dir(&dir).expect("mkdir");
        std::thread::spawn(move || {
            let block = vec![7u8; 256 << 10];
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let p = dir.join(format!("f{}", i % 50));
                std::fs::write(&p, &block).expect("write on the mount");
                std::fs::read(&p).expect("read on the mount");
                i += 1;
            }
        })
    };
    let mut screen = String::new();
    let busy = wait_until(Duration::from_secs(120), || {
        screen = tmux.capture();
        top_ops(&screen).is_some_and(|(m, o, c)| m > 0.0 && o > 0.0 && c > 0.0)
    });
    stop.store(true, Ordering::Relaxed);
    work.join().expect("workload");
    assert!(busy, "top shows no ops during the workload:\n{screen}");
    assert!(screen.contains("osd."), "daemon rows:\n{screen}");

    let sent = tmux.cmd().args(["send-keys", "-t", "top", "q"]).status();
    assert!(sent.is_ok_and(|s| s.success()), "tmux send-keys");
    assert!(
        wait_until(Duration::from_secs(30), || !tmux.alive()),
        "top did not quit on q:\n{}",
        tmux.capture()
    );
}

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
fn status_page_and_top_show_the_cluster() {
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
    // Every row has a version cell with this build's version.
    let ours = format!(
        "<td class=\"version\">{}</td>",
        avalon_proto::version::describe(&avalon_proto::version::local())
    );
    let complete = wait_until(Duration::from_secs(120), || {
        dom = dump_dom(&url, profile.path());
        rows(&dom, "mds") == 3
            && rows(&dom, "osd") == 3
            && rows(&dom, "client") >= 1
            && dom.matches(&ours).count() >= 7
    });
    assert!(complete, "page lacks rows or versions ({ours}):\n{dom}");
    assert!(
        dom.contains("<p id=\"health\" class=\"health ok\">HEALTH_OK</p>"),
        "health line:\n{dom}"
    );
    assert_eq!(dom.matches("data-state=\"up\"").count(), 3, "{dom}");
    assert!(dom.contains("role") && dom.contains(">leader<"), "{dom}");
    assert!(dom.contains("<svg"), "charts:\n{dom}");

    top_shows_the_workload(&t);

    t.c().kill_osd(1);
    let shown = wait_until(Duration::from_secs(180), || {
        dom = dump_dom(&url, profile.path());
        dom.matches("data-state=\"down\"").count() == 1
            && dom.matches("data-state=\"up\"").count() == 2
    });
    assert!(shown, "the killed OSD is not shown down:\n{dom}");
    assert!(dom.contains("id=\"health\""), "{dom}");
}
