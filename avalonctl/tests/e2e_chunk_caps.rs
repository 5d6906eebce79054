//! Chunk capabilities through a real cluster (MDS signing them with a short
//! lifetime): a mount reads and writes, and a file kept open past several
//! lifetimes keeps working; a client key talking to the OSDs directly is
//! refused, over the data port and gRPC, without a capability, with a
//! forged one, another inode's, another identity's, a read capability for
//! a change, and an expired one (which says so); nothing changes on the
//! OSDs. The MDS gives a session of the key a capability that works; after
//! `auth rm` it gives none, and the one given stops working at its expiry.

mod common;

use avalon_proto::chunk_cap::{self, CapKey, ChunkCap, Rights, KEY_BYTES};
use avalon_proto::data_conn::DataConns;
use avalon_proto::pb::{self, meta_client::MetaClient, osd_client::OsdClient, ChunkId};
use avalon_proto::placement::chunk_members;
use avalon_proto::tls::{ClientTls, Dial, KeyFile};
use avalonctl::keys;
use avalonctl::local_cluster::LocalCluster;
use bytes::Bytes;
use common::{admin_ctl, TestCluster};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;
use tonic::Code;

/// Capability lifetime the MDS is started with: short, so that the test
/// outlives several.
const CAP_SECS: u64 = 3;

fn header(cap: &Bytes) -> Option<pb::RequestHeader> {
    Some(pb::RequestHeader {
        session_id: 0,
        request_id: 0,
        credential: cap.clone(),
        trace_id: 0,
        ..Default::default()
    })
}

fn write_req(ino: u64, cap: &Bytes) -> pb::WriteChunkRequest {
    pb::WriteChunkRequest {
        header: header(cap),
        chunk: Some(ChunkId { ino, index: 0 }),
        data: vec![0xeeu8; 4096].into(),
        chunk_size: avalon_proto::limits::DEFAULT_CHUNK_SIZE,
        ..Default::default()
    }
}

fn cut_req(ino: u64, cap: &Bytes) -> pb::WriteChunkRequest {
    pb::WriteChunkRequest {
        header: header(cap),
        chunk: Some(ChunkId { ino, index: 0 }),
        offset: u32::MAX,
        truncate_to: Some(0),
        chunk_size: avalon_proto::limits::DEFAULT_CHUNK_SIZE,
        ..Default::default()
    }
}

fn read_req(ino: u64, len: u32, cap: &Bytes) -> pb::ReadChunkRequest {
    pb::ReadChunkRequest {
        header: header(cap),
        chunk: Some(ChunkId { ino, index: 0 }),
        offset: 0,
        length: len,
        map_epoch: 0,
        snap_id: 0,
    }
}

#[test]
fn chunk_capabilities_guard_every_chunk_access() {
    let dir = tempfile::Builder::new()
        .prefix("avalon-e2e-")
        .tempdir()
        .expect("temp dir");
    let mut o = common::opts(1, 3);
    o.mds_flags = vec!["--chunk-cap-secs".into(), CAP_SECS.to_string()];
    let cluster = LocalCluster::start(dir.path(), o).expect("cluster starts");
    let mut t = TestCluster {
        dir,
        cluster: Some(cluster),
    };
    let root = t.mnt();
    let kd = avalonctl::local_cluster::keys_dir(&std::fs::canonicalize(t.dir.path()).expect("dir"));
    let kds = kd.to_str().expect("utf8").to_string();
    let mds = t.c().layout.mds_addrs();

    // A mount reads and writes.
    let data_a = common::data(300_000, 1);
    std::fs::write(root.join("a"), &data_a).expect("write a");
    std::fs::write(root.join("b"), b"bee").expect("write b");
    assert_eq!(std::fs::read(root.join("a")).expect("read a"), data_a);
    let ino_a = std::fs::metadata(root.join("a")).expect("stat").ino();
    let ino_b = std::fs::metadata(root.join("b")).expect("stat").ino();

    // A file open across several capability lifetimes keeps working.
    let first = common::data(100_000, 2);
    let second = common::data(70_000, 3);
    let mut long = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(root.join("long"))
        .expect("open long");
    long.write_all(&first).expect("write before expiry");
    long.sync_all().expect("fsync before expiry");
    std::thread::sleep(Duration::from_secs(2 * CAP_SECS + 2));
    long.write_all(&second).expect("write after expiry");
    long.sync_all().expect("fsync after expiry");
    long.seek(SeekFrom::Start(0)).expect("seek");
    let mut back = Vec::new();
    long.read_to_end(&mut back).expect("read after expiry");
    assert_eq!(back.len(), first.len() + second.len());
    assert!(back[..first.len()] == first[..] && back[first.len()..] == second[..]);
    drop(long);

    // A client key at the OSDs directly.
    keys::ensure(&kd, &["client.x".to_string()]).expect("key");
    let x = ClientTls::from_keyfile(&keys::keyfile(&kd, "client.x")).expect("load key");
    let key = KeyFile::load(&keys::keyfile(&kd, "osd.1"))
        .expect("osd key")
        .chunk_cap_key()
        .cloned()
        .expect("OSD keyfiles carry the chunk-cap key");
    let other_key = CapKey::new(&[0x5au8; KEY_BYTES]).expect("key");
    let sign = |k: &CapKey, ino, rights, holder: &str, expires_ms| {
        k.sign(&ChunkCap {
            ino,
            rights,
            session_id: 0,
            holder: holder.into(),
            expires_ms,
        })
    };
    let later = chunk_cap::now_ms() + 600_000;
    let good_read = sign(&key, ino_a, Rights::Read, "client.x", later);
    let map = common::cluster_map(t.c());
    let osds: Vec<String> = chunk_members(&map, ino_a, 0)
        .iter()
        .map(|o| o.addr.clone())
        .collect();
    assert!(!osds.is_empty());
    let rt = common::rt();
    let t10 = Duration::from_secs(10);
    let dc = DataConns::new(x.clone());
    let len = data_a.len() as u32;

    // Each member's copy before: version and bytes (a valid capability
    // reads, which also shows the checks pass a good one).
    let copies = |cap: &Bytes| -> Vec<(u64, Bytes)> {
        rt.block_on(async {
            let mut v = Vec::new();
            for a in &osds {
                v.push(
                    dc.read_chunk(a, &read_req(ino_a, len, cap))
                        .await
                        .expect("read with a valid capability"),
                );
            }
            v
        })
    };
    let before = copies(&good_read);
    for (_, d) in &before {
        assert_eq!(&d[..], &data_a[..], "a valid capability reads the file");
    }

    let cases: Vec<(&str, Bytes, Code)> = vec![
        ("no capability", Bytes::new(), Code::PermissionDenied),
        (
            "a forged capability",
            sign(&other_key, ino_a, Rights::ReadWrite, "client.x", later),
            Code::PermissionDenied,
        ),
        (
            "another inode's capability",
            sign(&key, ino_b, Rights::ReadWrite, "client.x", later),
            Code::PermissionDenied,
        ),
        (
            "another identity's capability",
            sign(&key, ino_a, Rights::ReadWrite, "client.local", later),
            Code::PermissionDenied,
        ),
        (
            "a read capability",
            good_read.clone(),
            Code::PermissionDenied,
        ),
        (
            "an expired capability",
            sign(&key, ino_a, Rights::ReadWrite, "client.x", 1),
            Code::Unauthenticated,
        ),
    ];
    rt.block_on(async {
        for a in &osds {
            let ch = x.channel(a, Dial::Osd, t10).expect("channel");
            let mut grpc = OsdClient::new(ch);
            for (what, cap, code) in &cases {
                let check = |how: &str, r: Result<(), tonic::Status>| {
                    let e = r.expect_err(&format!("{how} with {what} at {a}"));
                    assert_eq!(e.code(), *code, "{how} with {what}: {}", e.message());
                    assert_eq!(
                        chunk_cap::is_expired(&e),
                        *code == Code::Unauthenticated,
                        "{how} with {what}: {}",
                        e.message()
                    );
                    eprintln!("{how} with {what}: {:?} {}", e.code(), e.message());
                };
                check(
                    "data-port write",
                    dc.write_chunk(a, &write_req(ino_a, cap), t10)
                        .await
                        .map(|_| ()),
                );
                check(
                    "data-port truncate",
                    dc.write_chunk(a, &cut_req(ino_a, cap), t10)
                        .await
                        .map(|_| ()),
                );
                check(
                    "gRPC write",
                    grpc.write_chunk(write_req(ino_a, cap)).await.map(|_| ()),
                );
                if *what != "a read capability" {
                    check(
                        "data-port read",
                        dc.read_chunk(a, &read_req(ino_a, len, cap))
                            .await
                            .map(|_| ()),
                    );
                    check(
                        "gRPC read",
                        grpc.read_chunk(read_req(ino_a, len, cap)).await.map(|_| ()),
                    );
                    check(
                        "gRPC extents",
                        grpc.object_extents(pb::ObjectExtentsRequest {
                            header: header(cap),
                            ino: ino_a,
                            from_index: 0,
                            max_chunks: 16,
                        })
                        .await
                        .map(|_| ()),
                    );
                }
            }
        }
    });
    // Nothing changed on any OSD, nor through the mount.
    assert_eq!(
        copies(&good_read),
        before,
        "a refused request changed a copy"
    );
    assert_eq!(std::fs::read(root.join("a")).expect("read a"), data_a);

    // The MDS signs capabilities for a session of the key's own.
    let session = rt.block_on(async {
        let ch = x.channel(&mds[0], Dial::Mds, t10).expect("channel");
        let mut m = MetaClient::new(ch);
        let sid = common::register_session(&mut m, "test").await;
        let cap = m
            .get_chunk_cap(pb::ChunkCapRequest {
                header: Some(pb::RequestHeader {
                    session_id: sid,
                    ..Default::default()
                }),
                ino: ino_a,
                write: false,
            })
            .await
            .expect("a capability for its own session")
            .into_inner()
            .cap;
        (m, sid, cap)
    });
    let (mut m, sid, cap) = session;
    let issued = chunk_cap::decode(&cap).expect("a capability");
    assert_eq!((issued.ino, issued.rights), (ino_a, Rights::Read));
    assert_eq!(issued.holder, "client.x");
    rt.block_on(async {
        let (_, d) = dc
            .read_chunk(&osds[0], &read_req(ino_a, len, &cap))
            .await
            .expect("the MDS's capability reads");
        assert_eq!(&d[..], &data_a[..]);
        let e = dc
            .write_chunk(&osds[0], &write_req(ino_a, &cap), t10)
            .await
            .expect_err("a read capability writes");
        assert_eq!(e.code(), Code::PermissionDenied);
    });

    // `auth rm`: no more capabilities, and the one held stops at expiry.
    admin_ctl(
        &kd,
        &[
            "auth",
            "rm",
            "client.x",
            "--dir",
            &kds,
            "--mds",
            &mds.join(","),
        ],
    );
    let refused = rt.block_on(async {
        m.get_chunk_cap(pb::ChunkCapRequest {
            header: Some(pb::RequestHeader {
                session_id: sid,
                ..Default::default()
            }),
            ino: ino_a,
            write: false,
        })
        .await
    });
    let e = refused.expect_err("a removed key gets capabilities");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    let mut last = None;
    let stopped = common::wait_until(Duration::from_secs(60), || {
        let r = rt.block_on(dc.read_chunk(&osds[0], &read_req(ino_a, len, &cap)));
        last = r.err();
        last.is_some()
    });
    assert!(stopped, "a removed key's capability kept working");
    let e = last.expect("refusal");
    assert!(chunk_cap::is_expired(&e), "{:?} {}", e.code(), e.message());
    assert_eq!(copies(&good_read), before);
}
