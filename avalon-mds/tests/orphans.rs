//! Open-unlinked files (orphans) and session expiry on an in-process,
//! single-node MDS with short timeouts.

use avalon_mds::config::Config;
use avalon_proto::errno::errno_of;
use avalon_proto::limits::ROOT_INO;
use avalon_proto::pb::{self, meta_client::MetaClient};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn hdr(sid: u64) -> Option<pb::RequestHeader> {
    Some(pb::RequestHeader {
        session_id: sid,
        request_id: 0,
        credential: Default::default(),
        trace_id: 0,
        ..Default::default()
    })
}

async fn wait_until<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn client(addr: &str) -> MetaClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(ch) = avalon_proto::tls::ClientTls::plaintext().channel(
            addr,
            avalon_proto::tls::Dial::Mds,
            Duration::from_secs(1),
        ) {
            let mut c = MetaClient::new(ch);
            if let Ok(s) = c.status(pb::Empty {}).await {
                if s.into_inner().self_.is_some_and(|m| m.role == "leader") {
                    return c;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn register(c: &mut MetaClient<Channel>) -> u64 {
    c.register_client(pb::RegisterClientRequest {
        header: None,
        hostname: "test".into(),
        mountpoint: b"/mnt".to_vec().into(),
        pid: 1,
        subdir: Default::default(),
        version: None,
    })
    .await
    .expect("register")
    .into_inner()
    .session_id
}

async fn create(c: &mut MetaClient<Channel>, sid: u64, name: &str) -> u64 {
    c.mknod(pb::MknodRequest {
        header: hdr(sid),
        parent: ROOT_INO,
        name: name.as_bytes().to_vec().into(),
        mode: libc::S_IFREG | 0o644,
        rdev: 0,
        uid: 0,
        gid: 0,
        exclusive: true,
        open_flags: 0,
    })
    .await
    .expect("mknod")
    .into_inner()
    .attr
    .expect("attr")
    .ino
}

async fn unlink(c: &mut MetaClient<Channel>, sid: u64, name: &str) {
    c.unlink(pb::UnlinkRequest {
        header: hdr(sid),
        parent: ROOT_INO,
        name: name.as_bytes().to_vec().into(),
    })
    .await
    .expect("unlink");
}

async fn getattr(c: &mut MetaClient<Channel>, ino: u64) -> Result<pb::Attr, i32> {
    c.get_attr(pb::GetAttrRequest { header: None, ino })
        .await
        .map(|r| r.into_inner().attr.unwrap_or_default())
        .map_err(|e| errno_of(&e))
}

async fn open(c: &mut MetaClient<Channel>, sid: u64, ino: u64) -> Result<pb::Attr, i32> {
    c.open(pb::OpenRequest {
        header: hdr(sid),
        ino,
        flags: libc::O_RDWR as u32,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().attr.unwrap_or_default())
    .map_err(|e| errno_of(&e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_unlinked_files_and_session_expiry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = format!("127.0.0.1:{}", free_port());
    let cfg = Config {
        id: 1,
        listen: addr.clone(),
        data_dir: dir.path().join("mds1"),
        orphan_grace_ms: 400,
        session_timeout_ms: 2000,
        gc_interval_ms: 100_000,
        security: avalon_proto::tls::SecurityConfig {
            keyfile: None,
            insecure: true,
        },
        ..Config::default()
    };
    let token = CancellationToken::new();
    let task = tokio::spawn(avalon_mds::run(cfg, token.clone()));
    let mut c = client(&addr).await;

    let a = register(&mut c).await;
    let b = register(&mut c).await;
    // Session a heartbeats with its open inodes; b does not and expires.
    let hb_stop = CancellationToken::new();
    let a_opens = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let hb = {
        let mut c = c.clone();
        let stop = hb_stop.clone();
        let a_opens = a_opens.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let open_inos = a_opens.lock().expect("lock").clone();
                let _ = c
                    .client_heartbeat(pb::ClientHeartbeatRequest {
                        header: hdr(a),
                        open_inos,
                        dropped_cache: false,
                        write_inos: Vec::new(),
                        version: None,
                        totals: None,
                    })
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let f = create(&mut c, a, "f").await;
    let g = create(&mut c, a, "g").await;
    let h = create(&mut c, b, "h").await;
    assert_eq!(open(&mut c, a, 9999).await, Err(libc::ENOENT));
    open(&mut c, a, f).await.expect("open f");
    a_opens.lock().expect("lock").push(f);
    open(&mut c, b, h).await.expect("open h");
    // Past the creates' grace period (and the new leader's).
    tokio::time::sleep(Duration::from_millis(900)).await;

    // Unlinked while open: an orphan that still works by inode.
    unlink(&mut c, a, "f").await;
    let at = getattr(&mut c, f).await.expect("orphan getattr");
    assert_eq!(at.nlink, 0);
    let w = c
        .commit_write(pb::CommitWriteRequest {
            header: hdr(a),
            ino: f,
            size: 4096,
            ..Default::default()
        })
        .await
        .expect("commit write to orphan")
        .into_inner();
    assert_eq!(w.attr.expect("attr").size, 4096);
    open(&mut c, a, f).await.expect("reopen orphan by ino");
    // Not open: deleted at once.
    unlink(&mut c, a, "g").await;
    assert_eq!(getattr(&mut c, g).await, Err(libc::ENOENT));

    // First release: still open once; second: reclaimed.
    c.release(pb::ReleaseRequest {
        header: hdr(a),
        ino: f,
        flags: 0,
    })
    .await
    .expect("release");
    assert_eq!(getattr(&mut c, f).await.expect("still open").nlink, 0);
    a_opens.lock().expect("lock").clear();
    c.release(pb::ReleaseRequest {
        header: hdr(a),
        ino: f,
        flags: 0,
    })
    .await
    .expect("release");
    wait_until(Duration::from_secs(20), "orphan f reclaimed", || {
        let mut c = c.clone();
        async move { getattr(&mut c, f).await == Err(libc::ENOENT) }
    })
    .await;

    // h is open by session b, which never heartbeats: expiry reclaims it.
    unlink(&mut c, a, "h").await;
    assert_eq!(getattr(&mut c, h).await.expect("orphan h").nlink, 0);
    wait_until(Duration::from_secs(30), "session b expired", || {
        let mut c = c.clone();
        async move {
            let s = c.status(pb::Empty {}).await.expect("status").into_inner();
            !s.clients.iter().any(|x| x.session_id == b)
                && s.clients.iter().any(|x| x.session_id == a)
        }
    })
    .await;
    wait_until(Duration::from_secs(20), "orphan h reclaimed", || {
        let mut c = c.clone();
        async move { getattr(&mut c, h).await == Err(libc::ENOENT) }
    })
    .await;

    let s = c.status(pb::Empty {}).await.expect("status").into_inner();
    assert_ne!(s.self_.expect("self").state_digest, 0);

    hb_stop.cancel();
    let _ = hb.await;
    token.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("stops")
        .expect("join")
        .expect("clean exit");
}
