//! Snapshot clones on three in-process OSDs: a write carrying a newer
//! snapshot id keeps the old content on every replica, snapshot reads
//! serve it, a delete under a snapshot keeps the chunk, and a trim frees
//! what no live snapshot needs.

mod common;

use avalon_proto::pb::{self as pb, ChunkId};
use common::*;
use tonic::Request;

/// This OSD's own copy of chunk 0 of `ino` as snapshot `snap` saw it.
async fn read_snap(addr: &str, ino: u64, snap: u64) -> Option<Vec<u8>> {
    let mut r = Request::new(pb::ReadChunkRequest {
        header: None,
        chunk: Some(ChunkId { ino, index: 0 }),
        offset: 0,
        length: 256 * 1024,
        map_epoch: 0,
        snap_id: snap,
    });
    r.metadata_mut().insert(
        avalon_osd::recovery::INTERNAL_KEY,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    let r = client(addr).await.read_chunk(r).await.ok()?.into_inner();
    Some(r.data.to_vec())
}

/// Sends `req` to `addr` until that OSD has peered and takes it.
async fn write_when_peered(addr: &str, req: pb::WriteChunkRequest) {
    eventually("the primary peered and took the write", || async {
        client(addr).await.write_chunk(req.clone()).await.ok()
    })
    .await;
}

async fn clones(addr: &str) -> u64 {
    let s = client(addr)
        .await
        .status(pb::Empty {})
        .await
        .expect("status");
    s.into_inner().clones
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_on_every_replica_and_trim() {
    let (mds, mut osds, map) = start_three().await;
    let ino = 77;
    let members = member_addrs(&map, ino, 0);
    let primary = members[0].clone();
    let old: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    write_when_peered(&primary, write_req(ino, 0, old.clone(), map.epoch)).await;
    // Snapshot 3 was taken; the next write carries it.
    let req = pb::WriteChunkRequest {
        snap_seq: 3,
        ..write_req(ino, 100, vec![9; 1000], map.epoch)
    };
    let r = client(&primary)
        .await
        .write_chunk(req)
        .await
        .expect("write under snapshot 3")
        .into_inner();
    assert!(r.acks >= 2, "acks {}", r.acks);
    let mut new = old.clone();
    new[100..1100].copy_from_slice(&[9; 1000]);
    for m in &members {
        eventually("the replica applied the write", || async {
            read_snap(m, ino, 0).await.filter(|d| *d == new)
        })
        .await;
        assert_eq!(read_snap(m, ino, 3).await.as_ref(), Some(&old), "{m}");
        assert_eq!(read_snap(m, ino, 4).await.as_ref(), Some(&new), "{m}");
        assert_eq!(clones(m).await, 1, "{m}");
    }

    // Deleted while snapshot 5 covers the file: the content stays for it.
    for o in &osds {
        client(&o.addr)
            .await
            .delete_objects(pb::DeleteObjectsRequest {
                header: None,
                inos: vec![ino],
                snap_seq: 5,
            })
            .await
            .expect("delete");
    }
    for m in &members {
        assert_eq!(read_snap(m, ino, 0).await, Some(vec![]), "{m}");
        assert_eq!(read_snap(m, ino, 5).await.as_ref(), Some(&new), "{m}");
        assert_eq!(read_snap(m, ino, 2).await.as_ref(), Some(&old), "{m}");
        assert_eq!(clones(m).await, 2, "{m}");
    }

    // Snapshot 3 removed: its clone goes, 5's stays.
    for m in &members {
        let t = client(m)
            .await
            .trim_snapshots(pb::TrimSnapshotsRequest {
                header: None,
                live: vec![5],
                newest: 5,
            })
            .await
            .expect("trim")
            .into_inner();
        assert_eq!((t.clones, t.bytes), (1, old.len() as u64), "{m}");
        assert_eq!(read_snap(m, ino, 5).await.as_ref(), Some(&new), "{m}");
    }
    // No snapshot left: the space is back.
    for m in &members {
        let t = client(m)
            .await
            .trim_snapshots(pb::TrimSnapshotsRequest {
                header: None,
                live: vec![],
                newest: 5,
            })
            .await
            .expect("trim")
            .into_inner();
        assert_eq!(t.clones, 1, "{m}");
        let s = client(m).await.status(pb::Empty {}).await.expect("status");
        let s = s.into_inner();
        assert_eq!((s.clones, s.clone_bytes), (0, 0), "{m}");
        assert_eq!(read_snap(m, ino, 5).await, Some(vec![]), "{m}");
    }
    for o in &mut osds {
        o.stop().await;
    }
    mds.token.cancel();
}

/// A replica that lost a chunk, its clone and another chunk created under
/// a snapshot (a replaced disk) gets all of them back from its peers when
/// it peers again: snapshot reads on it return what they did before, and
/// the chunk born under snapshot 5 is still a hole to snapshot 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peering_copies_clones_and_stamps() {
    let (mds, mut osds, map) = start_three().await;
    let (ino, born) = (77, 78);
    let members = member_addrs(&map, ino, 0);
    let primary = members[0].clone();
    let old: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    write_when_peered(&primary, write_req(ino, 0, old.clone(), map.epoch)).await;
    let under = |ino, offset, data, snap_seq| pb::WriteChunkRequest {
        snap_seq,
        ..write_req(ino, offset, data, map.epoch)
    };
    client(&primary)
        .await
        .write_chunk(under(ino, 0, vec![7; 500], 3))
        .await
        .expect("write under snapshot 3");
    let mut new = old.clone();
    new[..500].copy_from_slice(&[7; 500]);
    // A chunk created after snapshot 5: snapshot 5 sees a hole there.
    let born_primary = member_addrs(&map, born, 0)[0].clone();
    write_when_peered(&born_primary, under(born, 0, vec![5; 300], 5)).await;
    let victim = members[2].clone();
    eventually("every replica holds the clone", || async {
        for m in &members {
            (read_snap(m, ino, 0).await? == new && clones(m).await == 1).then_some(())?;
        }
        Some(())
    })
    .await;

    // The victim loses its copies of both chunks and every clone.
    let v = osds.iter().position(|o| o.addr == victim).expect("victim");
    osds[v].stop().await;
    let root = osds[v].dir.path().join("chunks");
    for i in [ino, born] {
        for f in avalon_osd::chunk_store::files_of(&root, i).expect("list") {
            std::fs::remove_file(&f).expect("remove chunk file");
        }
    }
    std::fs::remove_dir_all(root.join("snaps")).expect("remove clones");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let token = tokio_util::sync::CancellationToken::new();
    let cfg = avalon_osd::config::Config {
        listen: addr.clone(),
        data_dir: osds[v].dir.path().to_path_buf(),
        mds: vec![mds.addr.clone()],
        heartbeat_ms: 100,
        security: avalon_proto::tls::SecurityConfig {
            keyfile: None,
            insecure: true,
        },
        ..Default::default()
    };
    let task = tokio::spawn(avalon_osd::run_with_listener(cfg, listener, token.clone()));
    let epoch = eventually("the victim's new address in the map", || async {
        let m = mds.map.map.lock().expect("lock").clone();
        m.osds.iter().any(|o| o.addr == addr).then_some(m.epoch)
    })
    .await;
    wait_serving(&addr, ino, epoch).await;
    wait_serving(&addr, born, epoch).await;
    // (Contents compared without printing them: they are 40 KB.)
    assert!(read_snap(&addr, ino, 0).await == Some(new), "live chunk");
    assert!(
        read_snap(&addr, ino, 3).await == Some(old),
        "snapshot 3 reads the copied clone"
    );
    assert_eq!(clones(&addr).await, 1);
    // Three OSDs, three replicas: the victim holds every chunk.
    assert!(read_snap(&addr, born, 0).await == Some(vec![5; 300]));
    assert_eq!(
        read_snap(&addr, born, 5).await.map(|d| d.len()),
        Some(0),
        "a hole to the snapshot it was born under"
    );
    token.cancel();
    task.await.expect("join").expect("clean exit");
    for o in &mut osds {
        o.stop().await;
    }
    mds.token.cancel();
}
