//! Disk errors on one replica of three in-process OSDs (the `failpoints`
//! feature; fail points armed for one OSD's data directory): a read error
//! answers DataLoss so the client reads another replica, and the copy is
//! rebuilt from the others; a failed fsync fails that OSD's sync for good
//! (never retried into a success) until the copy is rebuilt; a write
//! error (EIO, or a torn write) on one replica still reaches the write
//! quorum, and that replica's copy is rebuilt without a further write.
#![cfg(feature = "failpoints")]

mod common;

use avalon_osd::chunk_store::{data_digest, faults};
use avalon_proto::pb::{self as pb};
use avalon_proto::placement::chunk_members;
use common::*;
use fail::FailScenario;
use tonic::Code;

/// `point` armed with `err` for the OSD whose data directory is `dir`.
fn arm_for(point: &str, err: &str, dir: &std::path::Path) {
    let action = format!("return({err}@{})", dir.display());
    fail::cfg(point, &action).expect("arm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_error_is_data_loss_and_the_copy_is_rebuilt() {
    let _f = FailScenario::setup();
    let (mds, mut osds, map) = start_three().await;
    let ino = 77;
    let data: Vec<u8> = (0..50_000u32).map(|i| (i * 13) as u8).collect();
    let primary = chunk_members(&map, ino, 0)[0].addr.clone();
    wait_serving(&primary, ino, map.epoch).await;
    client(&primary)
        .await
        .write_chunk(write_req(ino, 0, data.clone(), map.epoch))
        .await
        .expect("write");
    let victim = osds
        .iter()
        .position(|o| o.addr == primary)
        .expect("primary");
    for o in &osds {
        eventually("replicated", || async {
            read(&o.addr, ino, 0, 10).await.ok()
        })
        .await;
    }
    // The primary's disk fails to read the chunk once.
    arm_for(faults::READ, "EIO", osds[victim].dir.path());
    let e = read(&primary, ino, 0, 100).await.expect_err("read error");
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    fail::remove(faults::READ);
    // The others serve it.
    for (i, o) in osds.iter().enumerate() {
        if i != victim {
            assert_eq!(
                read(&o.addr, ino, 0, 100).await.expect("replica").0,
                data[..100]
            );
        }
    }
    // The bad copy is rebuilt from them.
    eventually("copy rebuilt", || async {
        read(&primary, ino, 0, 50_000)
            .await
            .ok()
            .filter(|(d, _)| *d == data)
    })
    .await;
    for o in &mut osds {
        o.stop().await;
    }
    mds.token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_fsync_fails_the_sync_until_rebuilt() {
    let _f = FailScenario::setup();
    let (mds, mut osds, map) = start_three().await;
    let ino = 78;
    let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7) as u8).collect();
    let primary = chunk_members(&map, ino, 0)[0].addr.clone();
    wait_serving(&primary, ino, map.epoch).await;
    let mut req = write_req(ino, 0, data.clone(), map.epoch);
    req.sync = false;
    client(&primary)
        .await
        .write_chunk(req)
        .await
        .expect("write");
    for o in &osds {
        eventually("replicated", || async {
            read(&o.addr, ino, 0, 10).await.ok()
        })
        .await;
    }
    let victim = osds
        .iter()
        .position(|o| o.addr != primary)
        .expect("a replica");
    let sync = |addr: String| async move {
        client(&addr)
            .await
            .sync_objects(pb::SyncObjectsRequest {
                header: None,
                inos: vec![ino],
            })
            .await
    };
    arm_for(faults::FSYNC, "EIO", osds[victim].dir.path());
    let e = sync(osds[victim].addr.clone())
        .await
        .expect_err("fsync failed");
    assert_ne!(e.code(), Code::Ok);
    fail::remove(faults::FSYNC);
    // Not retried into a success: the disk may have dropped the pages.
    sync(osds[victim].addr.clone())
        .await
        .expect_err("a failed fsync is final");
    // The other replicas' syncs succeed (the client's fsync holds with the
    // write quorum of 2 of 3).
    for (i, o) in osds.iter().enumerate() {
        if i != victim {
            sync(o.addr.clone()).await.expect("sync");
        }
    }
    // The victim's copy is rebuilt from them; then its syncs succeed.
    let addr = osds[victim].addr.clone();
    eventually("copy rebuilt", || async {
        let ok = read(&addr, ino, 0, 20_000)
            .await
            .ok()
            .filter(|(d, _)| *d == data);
        match ok {
            Some(_) => sync(addr.clone()).await.ok(),
            None => None,
        }
    })
    .await;
    for o in &mut osds {
        o.stop().await;
    }
    mds.token.cancel();
}

/// The copy of chunk 0 of `ino` that the OSD at `addr` lists: version and
/// digest; `None` when it lists none or reports it corrupt.
async fn listed(addr: &str, ino: u64) -> Option<(u64, u64)> {
    let reply = client(addr)
        .await
        .list_chunks(pb::ListChunksRequest {
            header: None,
            pg: 0,
            pg_count: 0,
            all: true,
            map_epoch: 0,
        })
        .await
        .ok()?
        .into_inner();
    reply
        .chunks
        .iter()
        .find(|c| {
            c.chunk
                .as_ref()
                .is_some_and(|id| id.ino == ino && id.index == 0)
        })
        .map(|c| (c.version, c.digest))
}

/// Waits until every OSD lists chunk 0 of `ino` at `version` with the
/// digest of `data` (none reports it corrupt) and reads `data` from it.
async fn converged(osds: &[TestOsd], ino: u64, version: u64, data: &[u8]) {
    let want = (version, data_digest(data));
    for o in osds {
        eventually("copy rebuilt", || async {
            (listed(&o.addr, ino).await == Some(want)).then_some(())
        })
        .await;
        let (got, v) = read(&o.addr, ino, 0, data.len() as u32)
            .await
            .expect("read the copy");
        assert_eq!(v, version, "{}", o.addr);
        assert!(got == data, "{} holds other bytes", o.addr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_error_on_a_replica_keeps_the_quorum_and_the_copy_is_rebuilt() {
    let _f = FailScenario::setup();
    let (mds, mut osds, map) = start_three().await;
    let ino = 79;
    let members = chunk_members(&map, ino, 0);
    let primary = members[0].addr.clone();
    let victim = osds
        .iter()
        .position(|o| o.addr == members[1].addr)
        .expect("a replica that is not the primary");
    wait_serving(&primary, ino, map.epoch).await;
    let mut data: Vec<u8> = (0..60_000u32).map(|i| (i * 11) as u8).collect();
    let first = client(&primary)
        .await
        .write_chunk(write_req(ino, 0, data.clone(), map.epoch))
        .await
        .expect("write")
        .into_inner();
    converged(&osds, ino, first.version, &data).await;

    // One replica's data writes fail: with EIO at once, then torn midway
    // (the first half of the range written, then EIO).
    let mut version = first.version;
    for (round, fault) in ["EIO", "torn"].into_iter().enumerate() {
        let offset = 4096 * (round as u32 + 1) + 100;
        let patch: Vec<u8> = (0..40_000u32)
            .map(|i| (i * 3 + 17 * round as u32 + 1) as u8)
            .collect();
        arm_for(faults::WRITE, fault, osds[victim].dir.path());
        let reply = client(&primary)
            .await
            .write_chunk(write_req(ino, offset, patch.clone(), map.epoch))
            .await
            .unwrap_or_else(|e| panic!("write with a failing replica ({fault}): {e:?}"))
            .into_inner();
        fail::remove(faults::WRITE);
        assert!(reply.acks >= 2, "{fault}: {} acks", reply.acks);
        assert!(
            reply.version > version,
            "{fault}: version {}",
            reply.version
        );
        version = reply.version;
        let end = offset as usize + patch.len();
        data.resize(data.len().max(end), 0);
        data[offset as usize..end].copy_from_slice(&patch);
        // No further write: the failed copy is rebuilt to the same version
        // and content as the others.
        converged(&osds, ino, version, &data).await;
    }
    for o in &mut osds {
        o.stop().await;
    }
    mds.token.cancel();
}
