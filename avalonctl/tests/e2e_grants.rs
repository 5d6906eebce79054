//! Write grants (#20): a session that recorded a grant and stored data
//! on the OSDs past the size it committed, then was lost, gets its size
//! recovered from the OSDs by the MDS leader (also by a new leader after
//! the old one was killed); other mounts then see the size, an mtime at
//! least the write's, and the bytes.

mod common;
#[path = "common/prom.rs"]
mod prom;

use avalon_proto::data_conn::DataConns;
use avalon_proto::pb::{self, meta_client::MetaClient, ChunkId};
use avalon_proto::placement::chunk_members;
use avalon_proto::tls::{ClientTls, Dial};
use avalonctl::keys;
use avalonctl::local_cluster::LocalCluster;
use common::{SecondMount, TestCluster};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Session timeout the MDS runs with: short, so a lost session is
/// recovered within the test.
const TIMEOUT_MS: u64 = 3000;

/// A session timeout no step of a test waits for: what another mount
/// sees after a writer's death comes from the demand's recovery, not
/// from the session's expiry.
const LONG_TIMEOUT_MS: u64 = 60_000;

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
        let sid = common::register_session(&mut m, "lost").await;
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
/// Once the MDS recovered the grant: `p` holds `head` then `tail`, with
/// an mtime no older than `before` (the write's time).
fn expect_recovered(p: &Path, head: &[u8], tail: &[u8], before: i64) {
    let m = wait_size(p, (head.len() + tail.len()) as u64);
    let mtime = m.mtime() * 1_000_000_000 + m.mtime_nsec();
    assert!(
        mtime >= before,
        "mtime {mtime} before the write at {before}"
    );
    let back = std::fs::read(p).expect("read back");
    assert!(back[..head.len()] == head[..] && back[head.len()..] == tail[..]);
}

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

/// 3 MDS and 3 OSDs whose client sessions expire after `ms` unheard.
fn cluster_with_session_timeout(ms: u64) -> TestCluster {
    let dir = tempfile::Builder::new()
        .prefix("avalon-e2e-")
        .tempdir()
        .expect("temp dir");
    let mut o = common::opts(3, 3);
    o.mds_flags = vec!["--session-timeout-ms".into(), ms.to_string()];
    let cluster = LocalCluster::start(dir.path(), o).expect("cluster starts");
    TestCluster {
        dir,
        cluster: Some(cluster),
    }
}

#[test]
fn lost_writers_sizes_are_recovered_from_the_osds() {
    let mut t = cluster_with_session_timeout(TIMEOUT_MS);
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
    expect_recovered(&root.join("a"), &head, &tail, before);

    // 2. The same with the leader killed after the write: the new leader
    // recovers the grant (Raft state) once the session times out.
    let head = common::data(5_000, 3);
    let ino = write_synced(&root.join("b"), &head);
    let tail = common::data(70_000, 4);
    let before = now_ns();
    write_under_grant(&mut t, &x, ino, head.len() as u64, head.len() as u32, &tail);
    let victim = common::leader(t.c());
    t.c().kill_mds(victim);
    expect_recovered(&root.join("b"), &head, &tail, before);
}

/// CommitWrite requests the MDS nodes served (leader and followers).
fn commits(t: &mut TestCluster) -> f64 {
    t.c()
        .layout
        .metrics_addrs()
        .iter()
        .filter(|(n, _)| n.starts_with("mds"))
        .filter_map(|(_, a)| prom::http_get(a, "/metrics").ok())
        .filter_map(|(_, body)| prom::parse(&body).ok())
        .map(|s| {
            s.sum(
                "avalon_mds_op_duration_seconds_count",
                &[("op", "commit_write")],
            )
        })
        .sum()
}

/// A real mount appends + fdatasyncs and overwrites + fsyncs under a
/// grant (no size commit per fsync), another mount's stat meanwhile sees
/// the written size, and after the writer is killed with SIGKILL the MDS
/// recovers size and mtime from the OSDs: the other mount sees them and
/// the bytes.
#[test]
fn fsync_under_a_grant_survives_a_killed_client() {
    let mut t = cluster_with_session_timeout(LONG_TIMEOUT_MS);
    let root = t.mnt();
    let wdir = t.dir.path().join("w");
    let writer = SecondMount::new(t.c(), wdir);
    let wp = writer.path.join("log");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&wp)
        .expect("create");
    let first = common::data(4096, 1);
    f.write_all(&first).expect("write");
    f.sync_all().expect("first fsync (asks for the grant)");
    let before = commits(&mut t);
    // sqlite's WAL commit and an overwrite loop: 20 of each.
    let mut want = first.clone();
    for i in 0..20u64 {
        let rec = common::data(4096, 100 + i);
        f.seek(SeekFrom::End(0)).expect("seek");
        f.write_all(&rec).expect("append");
        f.sync_data().expect("fdatasync");
        want.extend_from_slice(&rec);
        let patch = common::data(512, 200 + i);
        f.write_all_at(&patch, 0).expect("overwrite");
        f.sync_all().expect("fsync");
        want[..512].copy_from_slice(&patch);
    }
    let after = commits(&mut t);
    assert!(
        after - before < 10.0,
        "{} size commits for 40 fsyncs under a grant",
        after - before
    );
    // Another mount's stat while the writer lives: the written size (its
    // read demands the holder's commit).
    let m = std::fs::metadata(root.join("log")).expect("stat from another mount");
    assert_eq!(m.len(), want.len() as u64);
    // More under the grant (the demand put the writer in shared-write
    // mode: these commit through), then the kill.
    let last = common::data(3000, 999);
    let at_kill = now_ns();
    f.seek(SeekFrom::End(0)).expect("seek");
    f.write_all(&last).expect("append");
    f.sync_data().expect("fdatasync");
    want.extend_from_slice(&last);
    let pid = writer.pid();
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    drop(f);
    drop(writer);
    let m = wait_size(&root.join("log"), want.len() as u64);
    let mtime = m.mtime() * 1_000_000_000 + m.mtime_nsec();
    assert!(
        mtime >= at_kill,
        "mtime {mtime} before the last write at {at_kill}"
    );
    assert!(std::fs::read(root.join("log")).expect("read") == want);

    // The same without another mount looking before the kill: the size
    // and mtime are only on the OSDs until the MDS recovers them.
    let wdir = t.dir.path().join("w2");
    let writer = SecondMount::new(t.c(), wdir);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(writer.path.join("wal"))
        .expect("create");
    f.write_all(&first).expect("write");
    f.sync_all().expect("first fsync");
    let mut want = first.clone();
    let start = now_ns();
    for i in 0..5u64 {
        let rec = common::data(10_000, 300 + i);
        f.seek(SeekFrom::End(0)).expect("seek");
        f.write_all(&rec).expect("append");
        f.sync_data().expect("fdatasync");
        want.extend_from_slice(&rec);
    }
    let patch = common::data(100, 400);
    f.write_all_at(&patch, 10).expect("overwrite");
    f.sync_all().expect("fsync");
    want[10..110].copy_from_slice(&patch);
    let pid = writer.pid();
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    drop(f);
    drop(writer);
    // At once, not after the session's expiry: the holder does not answer
    // the stat's demand, so the MDS recovers the size first.
    let m = std::fs::metadata(root.join("wal")).expect("stat right after the kill");
    assert_eq!(
        m.len(),
        want.len() as u64,
        "a dead writer's fsynced size was hidden"
    );
    let mtime = m.mtime() * 1_000_000_000 + m.mtime_nsec();
    assert!(mtime >= start, "mtime {mtime} before the writes at {start}");
    // An append from this mount lands after the dead writer's records.
    let mut a = std::fs::OpenOptions::new()
        .append(true)
        .open(root.join("wal"))
        .expect("open for append");
    a.write_all(b"appended after the kill").expect("append");
    a.sync_all().expect("fsync");
    want.extend_from_slice(b"appended after the kill");
    drop(a);
    assert!(std::fs::read(root.join("wal")).expect("read") == want);
}
