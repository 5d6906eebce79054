//! Disk errors on one replica of three in-process OSDs (the `failpoints`
//! feature; fail points armed for one OSD's data directory): a read error
//! answers DataLoss so the client reads another replica, and the copy is
//! rebuilt from the others; a failed fsync fails that OSD's sync for good
//! (never retried into a success) until the copy is rebuilt.
#![cfg(feature = "failpoints")]

mod common;

use avalon_osd::chunk_store::faults;
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
