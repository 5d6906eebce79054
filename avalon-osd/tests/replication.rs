//! Three in-process OSDs and a minimal fake MDS on 127.0.0.1: replication,
//! degraded writes and quorum failure.

mod common;

use avalon_osd::chunk_store::chunk_file;
use avalon_osd::chunk_version::{counter_of, epoch_of};
use avalon_osd::Config;
use avalon_proto::pb::{self as pb, ChunkId};
use avalon_proto::placement::chunk_members;
use common::*;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_degrade_and_fail() {
    let (mds, mut osds, map) = start_three().await;
    let ino = 42;
    let members = member_addrs(&map, ino, 0);
    assert_eq!(members.len(), 3);
    let addrs: Vec<String> = osds.iter().map(|o| o.addr.clone()).collect();
    let by_addr = |a: &str| addrs.iter().position(|o| o == a).expect("member is ours");
    let primary = members[0].clone();

    // A write through the primary lands on all three (once it has peered).
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let r = eventually("primary peered and writes", || async {
        client(&primary)
            .await
            .write_chunk(write_req(ino, 1000, data.clone(), map.epoch))
            .await
            .ok()
            .map(|r| r.into_inner())
    })
    .await;
    assert_eq!(counter_of(r.version), 1);
    assert!(r.acks >= 2, "acks {}", r.acks);
    for m in &members {
        let got = eventually("replica holds the write", || async {
            read(m, ino, 1000, 100_000)
                .await
                .ok()
                .filter(|(d, v)| counter_of(*v) == 1 && d.len() == data.len())
        })
        .await;
        assert_eq!(got.0, data);
        let path = chunk_file(&osds[by_addr(m)].dir.path().join("chunks"), ino, 0);
        assert_eq!(std::fs::metadata(&path).expect("chunk file").len(), 101_000);
    }
    // The hole before the data reads as zeros; past the end is short.
    let (hole, _) = read(&primary, ino, 0, 1000).await.expect("read hole");
    assert_eq!(hole, vec![0u8; 1000]);
    let (tail, _) = read(&primary, ino, 100_990, 100).await.expect("read tail");
    assert_eq!(tail.len(), 10);

    // Garbage is refused.
    let mut bad = write_req(0, 0, vec![1], map.epoch);
    let e = client(&primary)
        .await
        .write_chunk(bad.clone())
        .await
        .expect_err("ino 0");
    assert_eq!(e.code(), Code::InvalidArgument);
    bad.chunk = Some(ChunkId { ino, index: 0 });
    bad.offset = u32::MAX;
    let e = client(&primary)
        .await
        .write_chunk(bad)
        .await
        .expect_err("offset");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = read(&primary, ino, u32::MAX, u32::MAX)
        .await
        .expect_err("read range");
    assert_eq!(e.code(), Code::InvalidArgument);

    // A truncate is a versioned write through the primary: every member
    // holds the cut at the next version; a repeated cut takes none.
    for _ in 0..2 {
        let r = client(&primary)
            .await
            .write_chunk(cut_req(ino, 50_000, map.epoch))
            .await
            .expect("cut")
            .into_inner();
        assert_eq!(counter_of(r.version), 2);
        assert!(r.acks >= 2, "acks {}", r.acks);
    }
    for m in &members {
        let got = eventually("replica holds the cut", || async {
            read(m, ino, 1000, 100_000)
                .await
                .ok()
                .filter(|(_, v)| counter_of(*v) == 2)
        })
        .await;
        assert_eq!(got.0, data[..49_000]);
        let path = chunk_file(&osds[by_addr(m)].dir.path().join("chunks"), ino, 0);
        assert_eq!(std::fs::metadata(&path).expect("chunk file").len(), 50_000);
    }

    // A flipped byte on a replica's disk is reported as DataLoss.
    let victim = members[2].clone();
    let path = chunk_file(&osds[by_addr(&victim)].dir.path().join("chunks"), ino, 0);
    let mut raw = std::fs::read(&path).expect("raw");
    raw[5000] ^= 0xff;
    std::fs::write(&path, &raw).expect("flip");
    let e = read(&victim, ino, 4000, 2000).await.expect_err("corrupt");
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");

    // One replica down: the write still reaches the quorum of 2.
    let id_file = osds[by_addr(&victim)].dir.path().join("osd_id");
    assert!(
        std::fs::read_to_string(&id_file)
            .expect("osd_id")
            .trim()
            .parse::<u64>()
            .expect("id")
            > 0
    );
    let vi = by_addr(&victim);
    osds[vi].stop().await;
    let r = client(&primary)
        .await
        .write_chunk(write_req(ino, 0, vec![7u8; 500], map.epoch))
        .await
        .expect("degraded write")
        .into_inner();
    assert_eq!(counter_of(r.version), 3);
    assert_eq!(r.acks, 2);
    let (got, v) = read(&members[1], ino, 0, 500).await.expect("read replica");
    assert_eq!((got, counter_of(v)), (vec![7u8; 500], 3));

    // Two replicas down: the write fails with Unavailable, in bounded time.
    let si = by_addr(&members[1]);
    osds[si].stop().await;
    let started = Instant::now();
    let e = tokio::time::timeout(
        Duration::from_secs(20),
        client(&primary)
            .await
            .write_chunk(write_req(ino, 0, vec![9u8; 10], map.epoch)),
    )
    .await
    .expect("bounded time")
    .expect_err("no quorum");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("quorum"), "{}", e.message());
    assert!(started.elapsed() < Duration::from_secs(20));

    for o in &mut osds {
        o.stop().await;
    }
    mds.token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_id_and_data() {
    let mds = start_mds().await;
    let mut osd = start_osd(&mds.addr).await;
    let addr = osd.addr.clone();
    let first = eventually("OSD ready", || {
        let addr = addr.clone();
        async move {
            let s = client(&addr)
                .await
                .status(pb::Empty {})
                .await
                .ok()?
                .into_inner();
            (s.osd_id != 0).then_some(s)
        }
    })
    .await;
    // A single-OSD cluster: quorum is min(2, 1) = 1.
    let epoch = mds.map.map.lock().expect("lock").epoch;
    wait_serving(&addr, 5, epoch).await;
    let r = client(&addr)
        .await
        .write_chunk(write_req(5, 0, b"hello".to_vec(), epoch))
        .await
        .expect("write")
        .into_inner();
    assert_eq!((counter_of(r.version), r.acks), (1, 1));
    // A cut on a lone OSD.
    client(&addr)
        .await
        .write_chunk(cut_req(5, 2, epoch))
        .await
        .expect("truncate");
    assert_eq!(read(&addr, 5, 0, 100).await.expect("read").0, b"he");
    osd.stop().await;

    // Restart on a new port with the same data dir.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr2 = listener.local_addr().expect("addr").to_string();
    let token = CancellationToken::new();
    let cfg = Config {
        listen: addr2.clone(),
        data_dir: osd.dir.path().to_path_buf(),
        mds: vec![mds.addr.clone()],
        heartbeat_ms: 100,
        security: avalon_proto::tls::SecurityConfig {
            keyfile: None,
            insecure: true,
        },
        ..Config::default()
    };
    let task = tokio::spawn(avalon_osd::run_with_listener(cfg, listener, token.clone()));
    let again = eventually("OSD ready again", || {
        let addr2 = addr2.clone();
        async move {
            let s = client(&addr2)
                .await
                .status(pb::Empty {})
                .await
                .ok()?
                .into_inner();
            (s.osd_id != 0).then_some(s)
        }
    })
    .await;
    assert_eq!(again.osd_id, first.osd_id);
    assert_eq!(again.chunks, 1);
    assert_eq!(again.used_bytes, 2);
    assert_eq!(read(&addr2, 5, 0, 100).await.expect("read").0, b"he");
    client(&addr2)
        .await
        .delete_objects(pb::DeleteObjectsRequest {
            header: None,
            inos: vec![5],
            snap_seq: 0,
        })
        .await
        .expect("delete");
    assert_eq!(read(&addr2, 5, 0, 100).await.expect("read"), (vec![], 0));
    token.cancel();
    task.await.expect("join").expect("clean exit");
    mds.token.cancel();
}

/// Many overlapping writes to one chunk, all at once: the replicas apply
/// them in the primary's version order and end identical to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_converge() {
    let (mds, mut osds, map) = start_three().await;
    let ino = 77;
    let members = member_addrs(&map, ino, 0);
    let primary = members[0].clone();
    for m in &members {
        wait_serving(m, ino, map.epoch).await;
    }
    const N: u64 = 24;
    let mut tasks = Vec::new();
    for i in 0..N {
        let p = primary.clone();
        let epoch = map.epoch;
        tasks.push(tokio::spawn(async move {
            let off = (i as u32 * 7919) % 100_000;
            let mut req = write_req(ino, off, vec![i as u8 + 1; 70_000], epoch);
            req.sync = false;
            client(&p).await.write_chunk(req).await
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(counter_of(
            t.await.expect("join").expect("write").into_inner().version,
        ));
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=N).collect::<Vec<_>>());
    let (want, v) = read(&primary, ino, 0, 256 * 1024)
        .await
        .expect("read primary");
    assert_eq!(counter_of(v), N);
    for m in &members[1..] {
        eventually("replica converged", || async {
            read(m, ino, 0, 256 * 1024)
                .await
                .ok()
                .filter(|(d, v)| counter_of(*v) == N && *d == want)
        })
        .await;
    }
    for o in &mut osds {
        o.stop().await;
    }
    mds.token.cancel();
}

/// One exchange on a data-port connection: a request frame out, the reply
/// frame back, decoded.
async fn data_port_call(
    conn: &mut tokio::net::TcpStream,
    frame: &[u8],
) -> std::io::Result<Result<(u64, bytes::Bytes), Status>> {
    use avalon_proto::data_wire;
    use tokio::io::AsyncWriteExt;
    conn.write_all(frame).await?;
    let (kind, payload) = data_wire::read_frame(conn, 8 << 20).await?;
    Ok(data_wire::decode_read_reply(kind, payload))
}

/// The data port answers chunk reads on the gRPC port, keeps a connection
/// across a refused request, and refuses malformed frames with a status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_port_serves_reads_beside_grpc() {
    use avalon_proto::data_wire::{self, MAGIC, READ_CHUNK};
    use tokio::io::AsyncWriteExt;
    let (mds, mut osds, map) = start_three().await;
    let ino = 91;
    let primary = chunk_members(&map, ino, 0)[0].addr.clone();
    wait_serving(&primary, ino, map.epoch).await;
    let body: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    client(&primary)
        .await
        .write_chunk(write_req(ino, 0, body.clone(), map.epoch))
        .await
        .expect("write");

    let req = |offset: u32, length: u32| {
        data_wire::encode_request(
            READ_CHUNK,
            &pb::ReadChunkRequest {
                header: None,
                chunk: Some(ChunkId { ino, index: 0 }),
                offset,
                length,
                map_epoch: map.epoch,
                snap_id: 0,
            },
        )
    };
    let mut conn = tokio::net::TcpStream::connect(&primary)
        .await
        .expect("connect");
    conn.write_all(MAGIC).await.expect("magic");
    let (version, data) = data_port_call(&mut conn, &req(1000, 5000))
        .await
        .expect("io")
        .expect("read");
    assert_eq!((counter_of(version), &data[..]), (1, &body[1000..6000]));
    // A range past the chunk size is refused; the connection goes on.
    let e = data_port_call(&mut conn, &req(u32::MAX - 10, 100))
        .await
        .expect("io")
        .expect_err("out of range");
    assert_eq!(avalon_proto::errno::errno_of(&e), libc::EINVAL, "{e:?}");
    let (_, data) = data_port_call(&mut conn, &req(99_990, 100))
        .await
        .expect("io")
        .expect("read at the end");
    assert_eq!(&data[..], &body[99_990..]);
    // An unknown request kind, then an oversized frame: each gets a status
    // and the connection is closed.
    let mut odd = req(0, 10);
    odd[4] = 9;
    let e = data_port_call(&mut conn, &odd)
        .await
        .expect("io")
        .expect_err("unknown kind");
    assert_eq!(e.code(), Code::Unimplemented);
    let mut conn = tokio::net::TcpStream::connect(&primary)
        .await
        .expect("connect");
    conn.write_all(MAGIC).await.expect("magic");
    let mut huge = (u32::MAX).to_le_bytes().to_vec();
    huge.push(READ_CHUNK);
    let e = data_port_call(&mut conn, &huge)
        .await
        .expect("io")
        .expect_err("oversized");
    assert_eq!(e.code(), Code::InvalidArgument);
    // gRPC on the same port is unaffected.
    client(&primary)
        .await
        .status(pb::Empty {})
        .await
        .expect("gRPC status");
    for o in &mut osds {
        o.stop().await;
    }
    mds.token.cancel();
}

/// Writes through the data port reach every replica (the primary forwards
/// them over the data port too); a malformed or out-of-range write gets a
/// status and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_port_writes_replicate() {
    use avalon_proto::data_conn::DataConns;
    use avalon_proto::data_wire::{self, MAGIC, WRITE_CHUNK};
    use tokio::io::AsyncWriteExt;
    let (mds, mut osds, map) = start_three().await;
    let ino = 92;
    let members = chunk_members(&map, ino, 0);
    let primary = members[0].addr.clone();
    wait_serving(&primary, ino, map.epoch).await;
    let conns = DataConns::new(avalon_proto::tls::ClientTls::plaintext());
    let body: Vec<u8> = (0..200_000u32).map(|i| (i * 13) as u8).collect();
    let reply = conns
        .write_chunk(
            &primary,
            &write_req(ino, 0, body.clone(), map.epoch),
            Duration::from_secs(10),
        )
        .await
        .expect("write");
    assert_eq!(counter_of(reply.version), 1);
    assert!(reply.acks >= 2, "{reply:?}");
    for m in &members {
        let read = pb::ReadChunkRequest {
            header: None,
            chunk: Some(ChunkId { ino, index: 0 }),
            offset: 0,
            length: body.len() as u32,
            map_epoch: map.epoch,
            snap_id: 0,
        };
        let got = eventually("replica holds the write", || async {
            conns
                .read_chunk(&m.addr, &read)
                .await
                .ok()
                .filter(|(v, _)| counter_of(*v) == 1)
        })
        .await;
        assert!(got.1 == body[..], "osd {} holds other bytes", m.id);
    }

    let mut conn = tokio::net::TcpStream::connect(&primary)
        .await
        .expect("connect");
    conn.write_all(MAGIC).await.expect("magic");
    async fn call(
        conn: &mut tokio::net::TcpStream,
        frame: Vec<u8>,
    ) -> Result<pb::WriteChunkReply, Status> {
        conn.write_all(&frame).await.expect("send");
        let (kind, payload) = data_wire::read_frame(conn, 1 << 20).await.expect("reply");
        data_wire::decode_write_reply(kind, payload)
    }
    // Not a WriteChunkRequest: refused, the connection goes on.
    let mut garbled = 3u32.to_le_bytes().to_vec();
    garbled.extend_from_slice(&[WRITE_CHUNK, 0xff, 0xff]);
    let e = call(&mut conn, garbled).await.expect_err("garbled");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Past the chunk's end: EINVAL.
    let e = call(
        &mut conn,
        data_wire::encode_request(
            WRITE_CHUNK,
            &write_req(ino, u32::MAX - 10, vec![1; 100], map.epoch),
        ),
    )
    .await
    .expect_err("out of range");
    assert_eq!(avalon_proto::errno::errno_of(&e), libc::EINVAL, "{e:?}");
    let r = call(
        &mut conn,
        data_wire::encode_request(WRITE_CHUNK, &write_req(ino, 10, vec![9; 10], map.epoch)),
    )
    .await
    .expect("write after refusals");
    assert_eq!(counter_of(r.version), 2);
    for o in &mut osds {
        o.stop().await;
    }
    mds.token.cancel();
}

/// Only the acting primary takes a chunk's writes (a second writer under
/// one map would make two histories that versions cannot order), a
/// replica refuses a forward from an OSD that is not the primary, and
/// versions carry the map epoch they were written under.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_primary_per_chunk_and_map() {
    let (mds, mut osds, map) = start_three().await;
    let ino = 43;
    let members = member_addrs(&map, ino, 0);
    let id_of = |addr: &str| {
        map.osds
            .iter()
            .find(|o| o.addr == addr)
            .expect("member in map")
            .id
    };
    let r = eventually("primary peered and writes", || async {
        client(&members[0])
            .await
            .write_chunk(write_req(ino, 0, vec![1; 100], map.epoch))
            .await
            .ok()
            .map(|r| r.into_inner())
    })
    .await;
    assert_eq!((epoch_of(r.version), counter_of(r.version)), (map.epoch, 1));

    // A client's write sent to a replica is refused: nothing stored.
    let e = client(&members[1])
        .await
        .write_chunk(write_req(ino, 0, vec![2; 100], map.epoch))
        .await
        .expect_err("a replica is not the primary");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("not the primary"), "{e:?}");

    // A forward from an OSD that is not the primary is refused too.
    let fwd = pb::WriteChunkRequest {
        forwarded: true,
        version: r.version + 1,
        prev_version: Some(r.version),
        primary_osd: id_of(&members[1]),
        ..write_req(ino, 0, vec![3; 100], map.epoch)
    };
    let e = client(&members[2])
        .await
        .write_chunk(fwd)
        .await
        .expect_err("the sender is not the primary");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Every member still holds the primary's write, and only it.
    for m in &members {
        let got = eventually("member holds the first write", || async {
            read(m, ino, 0, 100)
                .await
                .ok()
                .filter(|(_, v)| *v == r.version)
        })
        .await;
        assert_eq!(got.0, vec![1; 100], "{m}");
    }
    for o in &mut osds {
        o.stop().await;
    }
    mds.token.cancel();
}
