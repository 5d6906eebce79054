//! In-process MDS clusters on 127.0.0.1: election, failover, restart,
//! snapshot install for a lagging node.

use avalon_mds::config::Config;
use avalon_proto::limits::ROOT_INO;
use avalon_proto::mds_conn::MdsConn;
use avalon_proto::pb::{self, meta_client::MetaClient};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Node {
    cfg: Config,
    token: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn config(id: u64, addrs: &[String], dir: &Path) -> Config {
    Config {
        id,
        listen: addrs[(id - 1) as usize].clone(),
        data_dir: dir.join(format!("mds{id}")),
        peers: addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect(),
        snapshot_logs: 30,
        gc_interval_ms: 200,
        security: avalon_proto::tls::SecurityConfig {
            keyfile: None,
            insecure: true,
        },
        ..Config::default()
    }
}

fn start(cfg: Config) -> Node {
    let token = CancellationToken::new();
    let run = avalon_mds::run(cfg.clone(), token.clone());
    let task = tokio::spawn(async move {
        let r = run.await;
        if let Err(e) = &r {
            eprintln!("MDS node stopped: {e:#}");
        }
        r
    });
    Node { cfg, token, task }
}

async fn stop(n: Node) {
    n.token.cancel();
    let r = tokio::time::timeout(Duration::from_secs(20), n.task)
        .await
        .expect("node stops in time")
        .expect("join");
    r.expect("node exits cleanly");
}

async fn status(addr: &str) -> Option<pb::StatusReply> {
    let ch = avalon_proto::tls::ClientTls::plaintext()
        .channel(
            addr,
            avalon_proto::tls::Dial::Mds,
            Duration::from_millis(500),
        )
        .ok()?;
    let mut c = MetaClient::new(ch);
    tokio::time::timeout(Duration::from_secs(2), c.status(pb::Empty {}))
        .await
        .ok()?
        .ok()
        .map(|r| r.into_inner())
}

/// Polls `f` until it yields a value, for at most `limit`.
async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn leader_of(addrs: &[String]) -> u64 {
    wait_for(Duration::from_secs(60), "a leader", || async {
        for a in addrs {
            if let Some(s) = status(a).await {
                let me = s.self_?;
                if me.role == "leader" {
                    return Some(me.id);
                }
            }
        }
        None
    })
    .await
}

async fn create(conn: &MdsConn, name: &str, req_id: u64) -> pb::Attr {
    let name = name.as_bytes().to_vec();
    conn.call(|mut c| {
        let name = name.clone();
        async move {
            c.mknod(pb::MknodRequest {
                header: Some(pb::RequestHeader {
                    session_id: if req_id == 0 { 0 } else { 9 },
                    request_id: req_id,
                    credential: Default::default(),
                    trace_id: 0,
                    ..Default::default()
                }),
                parent: ROOT_INO,
                name: name.into(),
                mode: libc::S_IFREG | 0o644,
                rdev: 0,
                uid: 0,
                gid: 0,
                exclusive: true,
                open_flags: 0,
            })
            .await
        }
    })
    .await
    .expect("mknod")
    .attr
    .expect("attr")
}

async fn lookup(conn: &MdsConn, name: &str) -> Result<pb::Attr, tonic::Status> {
    let name = name.as_bytes().to_vec();
    conn.call(|mut c| {
        let name = name.clone();
        async move {
            c.lookup(pb::LookupRequest {
                header: None,
                parent: ROOT_INO,
                name: name.into(),
            })
            .await
        }
    })
    .await
    .map(|r| r.attr.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_failover_restart_and_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let mut nodes: Vec<Option<Node>> = (1..=3)
        .map(|id| Some(start(config(id, &addrs, dir.path()))))
        .collect();

    let leader = leader_of(&addrs).await;
    let conn = MdsConn::new(addrs.clone(), avalon_proto::tls::ClientTls::plaintext());
    let mut created = Vec::new();
    for i in 0..10 {
        let name = format!("before-{i}");
        let a = create(&conn, &name, 0).await;
        assert!(a.ino > ROOT_INO);
        created.push(name);
    }
    // Errno travels back.
    let e = conn
        .call(|mut c| async move {
            c.mkdir(pb::MkdirRequest {
                header: None,
                parent: ROOT_INO,
                name: b"before-0".to_vec().into(),
                mode: 0o755,
                uid: 0,
                gid: 0,
            })
            .await
        })
        .await
        .expect_err("EEXIST");
    assert_eq!(avalon_proto::errno::errno_of(&e), libc::EEXIST);

    // A follower refuses with a leader hint.
    let follower = (1..=3u64).find(|i| *i != leader).unwrap_or(1);
    let faddr = addrs[(follower - 1) as usize].clone();
    let hint = wait_for(
        Duration::from_secs(30),
        "a leader hint from a follower",
        || {
            let faddr = faddr.clone();
            async move {
                let ch = avalon_proto::tls::ClientTls::plaintext()
                    .channel(&faddr, avalon_proto::tls::Dial::Mds, Duration::from_secs(1))
                    .ok()?;
                let err = MetaClient::new(ch)
                    .get_attr(pb::GetAttrRequest {
                        header: None,
                        ino: ROOT_INO,
                    })
                    .await
                    .err()?;
                assert_eq!(err.code(), tonic::Code::Unavailable);
                avalon_proto::errno::leader_hint(&err)
            }
        },
    )
    .await;
    assert_eq!(hint, addrs[(leader - 1) as usize]);

    // Kill the leader; a new one serves everything acknowledged.
    let old = nodes[(leader - 1) as usize].take().expect("leader node");
    let old_cfg = old.cfg.clone();
    stop(old).await;
    let rest: Vec<String> = addrs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u64 + 1 != leader)
        .map(|(_, a)| a.clone())
        .collect();
    let new_leader = leader_of(&rest).await;
    assert_ne!(new_leader, leader);
    for name in &created {
        lookup(&conn, name)
            .await
            .expect("acknowledged create survives");
    }
    // Enough writes to snapshot and purge the log past what the stopped
    // node has, so it must catch up by snapshot install.
    for i in 0..80 {
        let name = format!("after-{i}");
        create(&conn, &name, 0).await;
        created.push(name);
    }
    let want_inodes = 1 + created.len() as u64;

    // Restart the old leader on its data dir: it rejoins with all state.
    let restarted = start(old_cfg.clone());
    wait_for(
        Duration::from_secs(60),
        "restarted node to catch up",
        || async {
            let s = status(&old_cfg.listen).await?;
            (s.inodes == want_inodes).then_some(())
        },
    )
    .await;
    nodes[(leader - 1) as usize] = Some(restarted);

    // Status from any node.
    let s = status(&addrs[0]).await.expect("status");
    assert_eq!(s.members.len(), 3);
    assert!(s.self_.is_some());

    for n in nodes.into_iter().flatten() {
        stop(n).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_restart_keeps_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addrs = vec![format!("127.0.0.1:{}", free_port())];
    let cfg = config(1, &addrs, dir.path());
    let n = start(cfg.clone());
    leader_of(&addrs).await;
    let conn = MdsConn::new(addrs.clone(), avalon_proto::tls::ClientTls::plaintext());
    // Dedup: the same session/request id applies once.
    let a = create(&conn, "f", 77).await;
    let b = create(&conn, "f", 77).await;
    assert_eq!(a.ino, b.ino);
    for i in 0..40 {
        create(&conn, &format!("g{i}"), 0).await;
    }
    // OSD registration and the cluster map.
    let reg = conn
        .call(|mut c| async move {
            c.register_osd(pb::RegisterOsdRequest {
                header: None,
                osd_id: 0,
                addr: "127.0.0.1:1".into(),
                capacity_bytes: 3 << 30,
                used_bytes: 0,
                failure_domain: "host-a".into(),
                pid: 1,
                version: None,
            })
            .await
        })
        .await
        .expect("register osd");
    assert_eq!(reg.osd_id, 1);
    let map = reg.map.expect("map");
    assert_eq!(map.osds.len(), 1);
    let fs = conn
        .call(|mut c| async move {
            c.stat_fs(pb::GetAttrRequest {
                header: None,
                ino: ROOT_INO,
            })
            .await
        })
        .await
        .expect("statfs");
    assert_eq!(fs.total_bytes, 1 << 30);
    stop(n).await;

    let n = start(cfg.clone());
    leader_of(&addrs).await;
    lookup(&conn, "f").await.expect("state after restart");
    lookup(&conn, "g39").await.expect("state after restart");
    let s = status(&addrs[0]).await.expect("status");
    assert_eq!(s.inodes, 42);
    assert_eq!(s.map.map(|m| m.osds.len()), Some(1));
    stop(n).await;
}
