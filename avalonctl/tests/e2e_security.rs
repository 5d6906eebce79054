//! Mutual TLS and role checks on every surface of a real cluster: the MDS
//! client port, Raft, admin calls, OSD registration, OSD gRPC and the OSD
//! data port refuse callers without a certificate, with one from another
//! cluster's CA, and clients calling what only daemons or admins may; the
//! cluster map is unchanged afterwards. A mount with its own client key
//! works; one with a foreign key fails with a clear message.

mod common;

use avalon_proto::data_conn::DataConns;
use avalon_proto::pb::{
    self, meta_client::MetaClient, osd_client::OsdClient, raft_client::RaftClient,
};
use avalon_proto::tls::{ClientTls, Dial};
use avalonctl::keys;
use common::TestCluster;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tonic::Code;

fn key(dir: &Path, name: &str) -> ClientTls {
    keys::ensure(dir, &[name.to_string()]).expect("key");
    ClientTls::from_keyfile(&keys::keyfile(dir, name)).expect("load key")
}

#[test]
fn every_surface_refuses_strangers_and_wrong_roles() {
    let mut t = TestCluster::start(3, 3);
    let dir = std::fs::canonicalize(t.dir.path()).expect("dir");
    let keys_dir = avalonctl::local_cluster::keys_dir(&dir);
    let client = key(&keys_dir, "client.x");
    let osd1 = key(&keys_dir, "osd.1");
    let foreign_dir = tempfile::tempdir().expect("tmp");
    keys::init(foreign_dir.path(), None).expect("other CA");
    let foreign_admin = key(foreign_dir.path(), "client.admin");
    let mds = t.c().layout.mds_addrs();
    let osd_addr = t.c().layout.osds[0].addr.clone();
    let before = common::cluster_map(t.c());
    let rt = common::rt();
    let t5 = Duration::from_secs(5);

    let status = |tls: &ClientTls, addr: &str| {
        rt.block_on(async {
            let ch = tls.channel(addr, Dial::Mds, t5).expect("channel");
            tokio::time::timeout(t5, MetaClient::new(ch).status(pb::Empty {}))
                .await
                .map_err(|_| tonic::Status::deadline_exceeded("timeout"))
                .and_then(|r| r)
        })
    };
    // MDS client port: the cluster's client key works, strangers do not.
    status(&client, &mds[0]).expect("a client of this cluster is served");
    for (who, tls) in [
        ("no certificate", ClientTls::plaintext()),
        ("another CA", foreign_admin.clone()),
    ] {
        let e = status(&tls, &mds[0]).expect_err(who);
        eprintln!("MDS client port, {who}: {:?} {}", e.code(), e.message());
    }

    // Raft and membership: only MDS (and admins for membership).
    let raft = |tls: &ClientTls| {
        rt.block_on(async {
            let ch = tls.channel(&mds[0], Dial::Mds, t5).expect("channel");
            let mut c = RaftClient::new(ch);
            let v = c.vote(pb::RaftMessage::default()).await.map(|_| ());
            let a = c
                .add_mds(pb::AddMdsRequest {
                    id: 9,
                    addr: "127.0.0.1:1".into(),
                })
                .await
                .map(|_| ());
            (v, a)
        })
    };
    let (vote, add) = raft(&client);
    assert_eq!(
        vote.expect_err("client vote").code(),
        Code::PermissionDenied
    );
    let add = add.expect_err("client AddMds");
    assert_eq!(add.code(), Code::PermissionDenied, "{}", add.message());
    assert!(add.message().contains("client.x"), "{}", add.message());
    let (vote, _) = raft(&ClientTls::plaintext());
    assert!(vote.is_err(), "raft without a certificate");
    let (vote, _) = raft(&foreign_admin);
    assert!(vote.is_err(), "raft with another CA's key");

    // Admin calls and OSD registration.
    rt.block_on(async {
        let ch = client.channel(&mds[0], Dial::Mds, t5).expect("channel");
        let mut c = MetaClient::new(ch);
        let e = c
            .set_osd_state(pb::SetOsdStateRequest {
                header: None,
                osd_id: 1,
                state: "out".into(),
            })
            .await
            .expect_err("client sets an OSD out");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        let e = c
            .register_osd(pb::RegisterOsdRequest {
                osd_id: 2,
                addr: "127.0.0.1:1".into(),
                ..Default::default()
            })
            .await
            .expect_err("client registers an OSD");
        assert_eq!(e.code(), Code::PermissionDenied);
        let ch = osd1.channel(&mds[0], Dial::Mds, t5).expect("channel");
        let e = MetaClient::new(ch)
            .register_osd(pb::RegisterOsdRequest {
                osd_id: 2,
                addr: "127.0.0.1:1".into(),
                ..Default::default()
            })
            .await
            .expect_err("osd.1 takes over OSD 2");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        assert!(e.message().contains("OSD id 2"), "{}", e.message());
    });

    // OSD gRPC: deletes only from the MDS or an admin; strangers nothing.
    rt.block_on(async {
        let del = pb::DeleteObjectsRequest {
            header: None,
            inos: vec![1, 2, 3],
            snap_seq: 0,
        };
        let ch = client.channel(&osd_addr, Dial::Osd, t5).expect("channel");
        let e = OsdClient::new(ch)
            .delete_objects(del.clone())
            .await
            .expect_err("client deletes objects");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        for tls in [ClientTls::plaintext(), foreign_admin.clone()] {
            let ch = tls.channel(&osd_addr, Dial::Osd, t5).expect("channel");
            let r = tokio::time::timeout(t5, OsdClient::new(ch).delete_objects(del.clone())).await;
            assert!(!matches!(r, Ok(Ok(_))), "OSD gRPC served a stranger");
        }
    });

    // OSD data port: strangers cannot connect; a client may not forward.
    rt.block_on(async {
        let w = pb::WriteChunkRequest {
            chunk: Some(pb::ChunkId { ino: 99, index: 0 }),
            data: vec![7u8; 16].into(),
            forwarded: true,
            version: 5,
            chunk_size: 4 << 20,
            ..Default::default()
        };
        let e = DataConns::new(client.clone())
            .write_chunk(&osd_addr, &w, t5)
            .await
            .expect_err("client sends a forwarded write");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        for tls in [ClientTls::plaintext(), foreign_admin.clone()] {
            let mut plain = w.clone();
            plain.forwarded = false;
            plain.version = 0;
            let r = DataConns::new(tls).write_chunk(&osd_addr, &plain, t5).await;
            assert!(r.is_err(), "data port served a stranger");
        }
    });

    // Nothing changed: same OSDs at the same addresses, in the same states.
    let after = common::cluster_map(t.c());
    let osds = |m: &pb::ClusterMap| {
        m.osds
            .iter()
            .map(|o| (o.id, o.addr.clone(), o.state))
            .collect::<Vec<_>>()
    };
    assert_eq!(osds(&before), osds(&after));
    assert_eq!(t.c().status().mds.len(), 3, "no MDS was added by a client");

    // A mount with its own client key works.
    let mnt = dir.join("mnt-x");
    let opts = format!(
        "name=client.x,keyfile={}",
        keys::keyfile(&keys_dir, "client.x").display()
    );
    let m = common::SecondMount::with_options(t.c(), mnt.clone(), &opts);
    std::fs::write(m.path.join("by-x"), b"x").expect("write through client.x");
    assert_eq!(std::fs::read(t.mnt().join("by-x")).expect("read"), b"x");
    drop(m);

    // One with a key from another CA fails and says why.
    let bad = dir.join("mnt-foreign");
    std::fs::create_dir_all(&bad).expect("mkdir");
    let out = Command::new(avalonctl::local_cluster::default_bin_dir().join("avalon-fuse"))
        .arg(t.c().layout.source())
        .arg(&bad)
        .arg("-o")
        .arg(format!(
            "connect_timeout=5,keyfile={}",
            keys::keyfile(foreign_dir.path(), "client.admin").display()
        ))
        .output()
        .expect("run avalon-fuse");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "foreign key mounted");
    assert!(
        !avalonctl::local_cluster::is_mounted(&bad),
        "foreign key mounted"
    );
    assert!(
        err.contains("certificate") || err.contains("TLS"),
        "unclear error: {err}"
    );
}
