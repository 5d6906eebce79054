//! Write grants (#20): a session that recorded a grant and stored data
//! on the OSDs past the size it committed, then was lost, gets its size
//! recovered from the OSDs by the MDS leader (also by a new leader after
//! the old one was killed); other mounts then see the size, an mtime at
//! least the write's, and the bytes.

mod common;

use avalon_proto::data_conn::DataConns;
use avalon_proto::pb::{self, meta_client::MetaClient, ChunkId};
use avalon_proto::placement::chunk_members;
use avalon_proto::tls::{ClientTls, Dial};
use avalonctl::keys;
use avalonctl::local_cluster::LocalCluster;
use common::TestCluster;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Session timeout the MDS runs with: short, so a lost session is
/// recovered within the test.
const TIMEOUT_MS: u64 = 3000;

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64
}

/// As a lost client would: registers a session, commits `size` of `ino`
/// asking for a grant, stores `data` at `at` on the chunk's primary with
/// sync (as an fsync answered from the grant), and never heartbeats.
/// Returns the granted size.
fn write_under_grant(
    t: &mut TestCluster,
    x: &ClientTls,
    ino: u64,
    size: u64,
    at: u32,
    data: &[u8],
) -> u64 {
    let mds = t.c().layout.mds_addrs();
    let leader = common::leader(t.c());
    let leader_addr = t
        .c()
        .layout
        .mds
        .iter()
        .find(|n| n.id == leader)
        .map(|n| n.addr.clone())
        .unwrap_or_else(|| mds[0].clone());
    let map = common::cluster_map(t.c());
    let primary = chunk_members(&map, ino, 0)
        .first()
        .map(|o| o.addr.clone())
        .expect("a primary");
    let rt = common::rt();
    let t10 = Duration::from_secs(10);
    rt.block_on(async {
        let ch = x.channel(&leader_addr, Dial::Mds, t10).expect("channel");
        let mut m = MetaClient::new(ch);
        let sid = m
            .register_client(pb::RegisterClientRequest {
                hostname: "lost".into(),
                mountpoint: "/none".into(),
                pid: std::process::id(),
                version: Some(avalon_proto::version::local()),
                ..Default::default()
            })
            .await
            .expect("register")
            .into_inner()
            .session_id;
        let hdr = Some(pb::RequestHeader {
            session_id: sid,
            ..Default::default()
        });
        let cap = m
            .get_chunk_cap(pb::ChunkCapRequest {
                header: hdr.clone(),
                ino,
                write: true,
            })
            .await
            .expect("a capability")
            .into_inner()
            .cap;
        let granted = m
            .commit_write(pb::CommitWriteRequest {
                header: hdr,
                ino,
                size,
                want_grant: size,
                ..Default::default()
            })
            .await
            .expect("commit with a grant")
            .into_inner()
            .grant_max_size;
        let dc = DataConns::new(x.clone());
        let req = pb::WriteChunkRequest {
            header: Some(pb::RequestHeader {
                session_id: sid,
                credential: cap,
                ..Default::default()
            }),
            chunk: Some(ChunkId { ino, index: 0 }),
            offset: at,
            data: data.to_vec().into(),
            chunk_size: avalon_proto::limits::DEFAULT_CHUNK_SIZE,
            sync: true,
            ..Default::default()
        };
        dc.write_chunk(&primary, &req, t10)
            .await
            .expect("the primary stores the write");
        granted
    })
}

/// Writes `data` to `p` and fsyncs it (the create reaches the MDS: a
/// mount may queue it under a delegation).
fn write_synced(p: &Path, data: &[u8]) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(p).expect("create");
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
    f.metadata().expect("stat").ino()
}

/// Waits until `p` (on another mount) shows `size` bytes.
fn wait_size(p: &Path, size: u64) -> std::fs::Metadata {
    let mut last = None;
    let ok = common::wait_until(Duration::from_secs(90), || {
        last = std::fs::metadata(p).ok();
        last.as_ref().is_some_and(|m| m.len() == size)
    });
    let m = last.expect("stat");
    assert!(ok, "size {} never became the recovered {size}", m.len());
    m
}

#[test]
fn lost_writers_sizes_are_recovered_from_the_osds() {
    let dir = tempfile::Builder::new()
        .prefix("avalon-e2e-")
        .tempdir()
        .expect("temp dir");
    let mut o = common::opts(3, 3);
    o.mds_flags = vec!["--session-timeout-ms".into(), TIMEOUT_MS.to_string()];
    let cluster = LocalCluster::start(dir.path(), o).expect("cluster starts");
    let mut t = TestCluster {
        dir,
        cluster: Some(cluster),
    };
    let root = t.mnt();
    let kd = avalonctl::local_cluster::keys_dir(&std::fs::canonicalize(t.dir.path()).expect("dir"));
    keys::ensure(&kd, &["client.x".to_string()]).expect("key");
    let x = ClientTls::from_keyfile(&keys::keyfile(&kd, "client.x")).expect("load key");

    // 1. A lost writer whose size grew past what it committed.
    let head = common::data(10_000, 1);
    let ino = write_synced(&root.join("a"), &head);
    let tail = common::data(6_000, 2);
    let before = now_ns();
    let granted = write_under_grant(&mut t, &x, ino, head.len() as u64, head.len() as u32, &tail);
    assert!(granted >= 10_000 + (4 << 20), "granted {granted}");
    let m = wait_size(&root.join("a"), 16_000);
    let mtime = m.mtime() * 1_000_000_000 + m.mtime_nsec();
    assert!(
        mtime >= before,
        "mtime {mtime} before the write at {before}"
    );
    let back = std::fs::read(root.join("a")).expect("read a");
    assert!(back[..10_000] == head[..] && back[10_000..] == tail[..]);

    // 2. The same with the leader killed after the write: the new leader
    // recovers the grant (Raft state) once the session times out.
    let head = common::data(5_000, 3);
    let ino = write_synced(&root.join("b"), &head);
    let tail = common::data(70_000, 4);
    let before = now_ns();
    write_under_grant(&mut t, &x, ino, head.len() as u64, head.len() as u32, &tail);
    let victim = common::leader(t.c());
    t.c().kill_mds(victim);
    let m = wait_size(&root.join("b"), 75_000);
    let mtime = m.mtime() * 1_000_000_000 + m.mtime_nsec();
    assert!(
        mtime >= before,
        "mtime {mtime} before the write at {before}"
    );
    let back = std::fs::read(root.join("b")).expect("read b");
    assert!(back[..5_000] == head[..] && back[5_000..] == tail[..]);
}
