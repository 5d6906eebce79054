//! Raft durability with real `avalon-mds` processes: both followers die
//! at a fail point of their log flush (before the fsync, or after it but
//! before raft hears of it), the leader is killed too, and the followers
//! restart first and elect a leader between themselves. Every create the
//! old leader acknowledged must be there: a node only acknowledges entries
//! that are on its disk, so a committed entry is durable on a majority.
//! A build that acknowledged before the fsync loses creates here.
#![cfg(feature = "failpoints")]

use avalon_proto::limits::ROOT_INO;
use avalon_proto::pb::{self, meta_client::MetaClient};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Rounds of the test (AVALON_RAFT_ROUNDS overrides, for longer runs by hand).
fn rounds() -> usize {
    std::env::var("AVALON_RAFT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// Quicker elections than the defaults: a round waits for two of them.
const TIMING: &str = "heartbeat_ms = 100\nelection_min_ms = 500\nelection_max_ms = 1000\n";

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Three MDS processes on loopback; killed when dropped.
struct Cluster {
    dir: PathBuf,
    addrs: Vec<String>,
    procs: Vec<Option<Child>>,
}

impl Cluster {
    fn new(dir: &Path) -> Cluster {
        let addrs = (0..3)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        Cluster {
            dir: dir.to_path_buf(),
            addrs,
            procs: vec![None, None, None],
        }
    }

    /// Starts node `id` (1-based), with `failpoints` armed if given.
    fn start(&mut self, id: u64, failpoints: Option<&str>) {
        let i = (id - 1) as usize;
        let peers: Vec<String> = self
            .addrs
            .iter()
            .enumerate()
            .map(|(k, a)| format!("{}={a}", k + 1))
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("mds{id}.log")))
            .expect("log file");
        let conf = self.dir.join("timing.toml");
        std::fs::write(&conf, TIMING).expect("config file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_avalon-mds"));
        cmd.arg("--config")
            .arg(&conf)
            .arg("--id")
            .arg(id.to_string())
            .arg("--listen")
            .arg(&self.addrs[i])
            .arg("--data-dir")
            .arg(self.dir.join(format!("mds{id}")))
            .arg("--peers")
            .arg(peers.join(","))
            .arg("--log-level")
            .arg("warn")
            .arg("--insecure")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        match failpoints {
            Some(f) => cmd.env("FAILPOINTS", f),
            None => cmd.env_remove("FAILPOINTS"),
        };
        self.procs[i] = Some(cmd.spawn().expect("spawn avalon-mds"));
    }

    fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.procs[(id - 1) as usize].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits (bounded) until node `id` has exited by itself; kills it
    /// otherwise. True if it exited on its own.
    fn wait_exit(&mut self, id: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let Some(c) = self.procs[(id - 1) as usize].as_mut() else {
            return true;
        };
        loop {
            if let Ok(Some(_)) = c.try_wait() {
                self.procs[(id - 1) as usize] = None;
                return true;
            }
            if Instant::now() >= deadline {
                self.kill(id);
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of every node's log, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        for id in 1..=3 {
            let text =
                std::fs::read_to_string(self.dir.join(format!("mds{id}.log"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- mds{id}\n"));
            for l in &lines[lines.len().saturating_sub(15)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    fn addr(&self, id: u64) -> &str {
        &self.addrs[(id - 1) as usize]
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in 1..=3 {
            self.kill(id);
        }
    }
}

async fn client(addr: &str) -> Option<MetaClient<tonic::transport::Channel>> {
    let ch = avalon_proto::tls::ClientTls::plaintext()
        .channel(
            addr,
            avalon_proto::tls::Dial::Mds,
            Duration::from_millis(500),
        )
        .ok()?;
    Some(MetaClient::new(ch))
}

/// The leader among `ids`, as it says itself.
async fn leader_among(c: &Cluster, ids: &[u64], limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        for &id in ids {
            if let Some(mut m) = client(c.addr(id)).await {
                if let Ok(Ok(s)) =
                    tokio::time::timeout(Duration::from_secs(2), m.status(pb::Empty {})).await
                {
                    if s.get_ref().self_.as_ref().map(|n| n.role.as_str()) == Some("leader") {
                        return id;
                    }
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no leader among {ids:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn create(m: &mut MetaClient<tonic::transport::Channel>, name: &str) -> bool {
    let req = pb::MknodRequest {
        header: None,
        parent: ROOT_INO,
        name: name.as_bytes().to_vec().into(),
        mode: libc::S_IFREG | 0o644,
        rdev: 0,
        uid: 0,
        gid: 0,
        exclusive: true,
        open_flags: 0,
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), m.mknod(req)).await,
        Ok(Ok(_))
    )
}

/// The names of `names` that node `id` does not have (each looked up,
/// retried while the node is not ready to answer).
async fn missing(c: &Cluster, id: u64, names: &[String]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut m = None;
    let mut out = Vec::new();
    for name in names {
        loop {
            if m.is_none() {
                m = client(c.addr(id)).await;
            }
            if let Some(mc) = m.as_mut() {
                let req = pb::LookupRequest {
                    header: None,
                    parent: ROOT_INO,
                    name: name.as_bytes().to_vec().into(),
                };
                match tokio::time::timeout(Duration::from_secs(2), mc.lookup(req)).await {
                    Ok(Ok(_)) => break,
                    Ok(Err(s)) if avalon_proto::errno::errno_of(&s) == libc::ENOENT => {
                        out.push(name.clone());
                        break;
                    }
                    _ => m = None,
                }
            }
            assert!(Instant::now() < deadline, "lookup of {name} never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_killed_at_the_log_flush_lose_no_acknowledged_create() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = Cluster::new(dir.path());
    for id in 1..=3 {
        c.start(id, None);
    }
    let mut acked: Vec<String> = Vec::new();
    let mut crashes = 0;
    // Deterministic variety: the point and how many flushes pass first.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let rounds = rounds();
    for round in 0..rounds {
        let leader = leader_among(&c, &[1, 2, 3], Duration::from_secs(60)).await;
        let followers: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let point = if round % 2 == 0 {
            "mds-log-after-fsync"
        } else {
            "mds-log-before-fsync"
        };
        // The followers crash at their (skip+1)-th flush after restart.
        let skip = 2 + x % 12;
        let fp = format!("{point}={skip}*off->return(crash)");
        for &f in &followers {
            c.kill(f);
            c.start(f, Some(&fp));
        }
        // Create through the leader until both followers are gone.
        let mut m = client(c.addr(leader)).await.expect("leader channel");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut i = 0;
        loop {
            let name = format!("r{round}-{i}");
            i += 1;
            if create(&mut m, &name).await {
                acked.push(name);
            }
            let gone = followers.iter().all(|&f| {
                c.procs[(f - 1) as usize]
                    .as_mut()
                    .map(|p| matches!(p.try_wait(), Ok(Some(_))))
                    .unwrap_or(true)
            });
            if gone || Instant::now() > deadline {
                break;
            }
        }
        for &f in &followers {
            if c.wait_exit(f, Duration::from_secs(1)) {
                crashes += 1;
            }
        }
        // The leader goes too; the followers come back first and elect one
        // of themselves, which must hold every acknowledged create.
        c.kill(leader);
        for &f in &followers {
            c.start(f, None);
        }
        let new_leader = leader_among(&c, &followers, Duration::from_secs(60)).await;
        let recent = &acked[acked.len().saturating_sub(64)..];
        let lost = missing(&c, new_leader, recent).await;
        assert!(
            lost.is_empty(),
            "round {round} ({fp}): acknowledged creates lost: {lost:?}"
        );
        c.start(leader, None);
    }
    // Everything, once more, from the final leader.
    let l = leader_among(&c, &[1, 2, 3], Duration::from_secs(60)).await;
    let lost = missing(&c, l, &acked).await;
    assert!(lost.is_empty(), "acknowledged creates lost: {lost:?}");
    assert!(
        crashes >= rounds,
        "the fail points crashed followers only {crashes} times in {rounds} rounds"
    );
    eprintln!(
        "{rounds} rounds, {} acknowledged creates, {crashes} follower crashes",
        acked.len()
    );
}

/// Waits (bounded) for node `id` to exit by itself; its exit status.
fn exit_status(c: &mut Cluster, id: u64, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        let p = c.procs[(id - 1) as usize].as_mut()?;
        if let Ok(Some(st)) = p.try_wait() {
            c.procs[(id - 1) as usize] = None;
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_write_error_ends_the_node_and_the_others_serve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = Cluster::new(dir.path());
    for id in 1..=3 {
        c.start(id, None);
    }
    let leader = leader_among(&c, &[1, 2, 3], Duration::from_secs(60)).await;
    let followers: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    // One follower's fsync fails (EIO), the other's append finds its disk
    // full (ENOSPC), each after a few writes went through.
    let faults = [
        "mds-log-before-fsync=3*off->return(eio)",
        "mds-log-append=3*off->return(enospc)",
    ];
    for (f, fp) in followers.iter().zip(faults) {
        c.kill(*f);
        c.start(*f, Some(fp));
    }
    let mut m = client(c.addr(leader)).await.expect("leader channel");
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    // Until both followers are gone (the leader then stops committing).
    while followers.iter().any(|&f| {
        c.procs[(f - 1) as usize]
            .as_mut()
            .is_some_and(|p| matches!(p.try_wait(), Ok(None)))
    }) {
        assert!(
            Instant::now() < deadline,
            "the failing followers never stopped\n{}",
            c.logs()
        );
        let name = format!("e{i}");
        i += 1;
        if create(&mut m, &name).await {
            acked.push(name);
        }
    }
    for (&f, fp) in followers.iter().zip(faults) {
        let st = exit_status(&mut c, f, Duration::from_secs(10));
        assert!(
            st.is_some_and(|s| !s.success()),
            "mds{f} ({fp}) exit status {st:?}\n{}",
            c.logs()
        );
    }
    let logs = c.logs();
    assert!(logs.contains("raft log flush failed"), "{logs}");
    assert!(logs.contains("No space left on device"), "{logs}");
    // Restarted (a supervisor's job), they recover from their disks and
    // every acknowledged create is there.
    for &f in &followers {
        c.start(f, None);
    }
    c.kill(leader);
    let l = leader_among(&c, &followers, Duration::from_secs(60)).await;
    let lost = missing(&c, l, &acked).await;
    assert!(lost.is_empty(), "acknowledged creates lost: {lost:?}");
    c.start(leader, None);
    let mut m = client(c.addr(l)).await.expect("leader channel");
    let deadline = Instant::now() + Duration::from_secs(60);
    // A new name each try: one that timed out may still have been applied.
    let mut k = 0;
    while !create(&mut m, &format!("after-{k}")).await {
        k += 1;
        assert!(
            Instant::now() < deadline,
            "no create after the restart\n{}",
            c.logs()
        );
        m = client(c.addr(leader_among(&c, &[1, 2, 3], Duration::from_secs(60)).await))
            .await
            .expect("leader channel");
    }
}
