//! Test harness shared by the multi-OSD tests: a minimal fake MDS and
//! in-process OSDs on 127.0.0.1.
#![allow(dead_code)] // each test binary uses a part

use avalon_osd::Config;
use avalon_proto::pb::meta_server::{Meta, MetaServer};
use avalon_proto::pb::osd_client::OsdClient;
use avalon_proto::pb::{self as pb, ChunkId, ClusterMap, OsdInfo, OsdState};
pub use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

pub struct FakeMds {
    pub map: Mutex<ClusterMap>,
    pub registered: watch::Sender<usize>,
}

/// Implements `Meta` for FakeMds: the listed methods answer Unimplemented,
/// the rest are given verbatim. (async_trait must see the expanded methods,
/// so the macro produces the whole impl.)
macro_rules! fake_meta {
    ({$($name:ident($req:ty) -> $rep:ty;)*} $($rest:tt)*) => {
        #[tonic::async_trait]
        impl Meta for FakeMds {
            $(
                async fn $name(&self, _r: Request<$req>) -> Result<Response<$rep>, Status> {
                    Err(Status::unimplemented(stringify!($name)))
                }
            )*
            $($rest)*
        }
    };
}

fake_meta! {
    {
        lookup(pb::LookupRequest) -> pb::EntryReply;
        get_attr(pb::GetAttrRequest) -> pb::AttrReply;
        set_attr(pb::SetAttrRequest) -> pb::AttrReply;
        mknod(pb::MknodRequest) -> pb::EntryReply;
        mkdir(pb::MkdirRequest) -> pb::EntryReply;
        symlink(pb::SymlinkRequest) -> pb::EntryReply;
        unlink(pb::UnlinkRequest) -> pb::DirChangeReply;
        rmdir(pb::UnlinkRequest) -> pb::DirChangeReply;
        readlink(pb::GetAttrRequest) -> pb::ReadlinkReply;
        link(pb::LinkRequest) -> pb::EntryReply;
        rename(pb::RenameRequest) -> pb::DirChangeReply;
        read_dir(pb::ReadDirRequest) -> pb::ReadDirReply;
        stat_fs(pb::GetAttrRequest) -> pb::StatFsReply;
        set_xattr(pb::SetXattrRequest) -> pb::Empty;
        get_xattr(pb::XattrRequest) -> pb::XattrReply;
        list_xattr(pb::GetAttrRequest) -> pb::ListXattrReply;
        remove_xattr(pb::XattrRequest) -> pb::Empty;
        commit_write(pb::CommitWriteRequest) -> pb::AttrReply;
        append_write(pb::AppendWriteRequest) -> pb::AttrReply;
        open(pb::OpenRequest) -> pb::AttrReply;
        release(pb::ReleaseRequest) -> pb::Empty;
        sync_meta(pb::SyncMetaRequest) -> pb::Empty;
        delegate(pb::DelegateRequest) -> pb::DelegateReply;
        apply(pb::ApplyRequest) -> pb::ApplyReply;
        register_client(pb::RegisterClientRequest) -> pb::RegisterClientReply;
        client_heartbeat(pb::ClientHeartbeatRequest) -> pb::ClientHeartbeatReply;
        ack_recall(pb::AckRecallRequest) -> pb::Empty;
        status(pb::Empty) -> pb::StatusReply;
        check_inodes(pb::CheckInodesRequest) -> pb::CheckInodesReply;
        set_osd_state(pb::SetOsdStateRequest) -> pb::Empty;
        get_lock(pb::LockRequest) -> pb::LockReply;
        set_lock(pb::LockRequest) -> pb::SetLockReply;
        release_locks(pb::ReleaseLocksRequest) -> pb::Empty;
        reclaim_locks(pb::ReclaimLocksRequest) -> pb::ReclaimLocksReply;
        get_settings(pb::Empty) -> pb::ClusterSettings;
        set_replicas(pb::SetReplicasRequest) -> pb::ClusterSettings;
        set_client_caps(pb::SetClientCapsRequest) -> pb::Empty;
        list_client_caps(pb::Empty) -> pb::ClientCapsList;
        get_chunk_cap(pb::ChunkCapRequest) -> pb::ChunkCapReply;
        trash_list(pb::TrashListRequest) -> pb::TrashListReply;
        trash_restore(pb::TrashRestoreRequest) -> pb::TrashRestoreReply;
        trash_purge(pb::TrashPurgeRequest) -> pb::TrashPurgeReply;
        snapshot_create(pb::SnapshotCreateRequest) -> pb::SnapshotInfo;
        snapshot_remove(pb::SnapshotCreateRequest) -> pb::Empty;
        snapshot_list(pb::SnapshotListRequest) -> pb::SnapshotListReply;
        snapshot_lookup(pb::SnapshotLookupRequest) -> pb::AttrReply;
        snapshot_read_dir(pb::SnapshotReadDirRequest) -> pb::ReadDirReply;
        snapshot_readlink(pb::SnapshotLookupRequest) -> pb::ReadlinkReply;
        snapshot_xattr(pb::SnapshotXattrRequest) -> pb::SnapshotXattrReply;
    }

    type SessionStream = tokio_stream::wrappers::ReceiverStream<Result<pb::SessionEvent, Status>>;

    async fn session(&self, _r: Request<pb::SessionRequest>) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented("session"))
    }

    async fn get_cluster_map(&self, _r: Request<pb::Empty>) -> Result<Response<ClusterMap>, Status> {
        Ok(Response::new(self.map.lock().expect("lock").clone()))
    }

    async fn register_osd(
        &self,
        r: Request<pb::RegisterOsdRequest>,
    ) -> Result<Response<pb::RegisterOsdReply>, Status> {
        let r = r.into_inner();
        let mut m = self.map.lock().expect("lock");
        let id = match m.osds.iter_mut().find(|o| r.osd_id != 0 && o.id == r.osd_id) {
            Some(o) => {
                o.addr = r.addr.clone();
                o.state = OsdState::Up as i32;
                o.id
            }
            None => {
                let id = m.osds.iter().map(|o| o.id).max().unwrap_or(0) + 1;
                m.osds.push(OsdInfo {
                    id,
                    addr: r.addr.clone(),
                    state: OsdState::Up as i32,
                    capacity_bytes: r.capacity_bytes,
                    used_bytes: r.used_bytes,
                    failure_domain: r.failure_domain.clone(),
                    pid: r.pid,
                    last_seen_ms: 0,
                    ..Default::default()
                });
                id
            }
        };
        m.epoch += 1;
        let reply = pb::RegisterOsdReply {
            osd_id: id,
            map: Some(m.clone()),
            version: None,
        };
        let n = m.osds.len();
        drop(m);
        self.registered.send_replace(n);
        Ok(Response::new(reply))
    }

    async fn osd_heartbeat(
        &self,
        r: Request<pb::OsdHeartbeatRequest>,
    ) -> Result<Response<pb::OsdHeartbeatReply>, Status> {
        let r = r.into_inner();
        let m = self.map.lock().expect("lock");
        if !m.osds.iter().any(|o| o.id == r.osd_id) {
            return Err(Status::not_found("unknown OSD"));
        }
        Ok(Response::new(pb::OsdHeartbeatReply {
            map_epoch: m.epoch,
            full_osds: Vec::new(),
        }))
    }
}

pub struct Mds {
    pub addr: String,
    pub map: std::sync::Arc<FakeMds>,
    pub registered: watch::Receiver<usize>,
    pub token: CancellationToken,
}

pub async fn start_mds() -> Mds {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (tx, rx) = watch::channel(0);
    let fake = std::sync::Arc::new(FakeMds {
        map: Mutex::new(ClusterMap {
            epoch: 0,
            pg_count: 16,
            replicas: 3,
            write_quorum: 2,
            osds: vec![],
        }),
        registered: tx,
    });
    let token = CancellationToken::new();
    let svc = MetaServer::from_arc(fake.clone());
    let t = token.clone();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                t.cancelled_owned(),
            )
            .await;
    });
    Mds {
        addr,
        map: fake,
        registered: rx,
        token,
    }
}

pub struct TestOsd {
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub token: CancellationToken,
    pub task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestOsd {
    pub async fn stop(&mut self) {
        self.token.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("OSD stops in time")
                .expect("join")
                .expect("OSD exits cleanly");
        }
    }
}

pub async fn start_osd(mds: &str) -> TestOsd {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let cfg = Config {
        listen: addr.clone(),
        data_dir: dir.path().to_path_buf(),
        mds: vec![mds.to_string()],
        capacity: 1 << 30,
        heartbeat_ms: 100,
        forward_timeout_ms: 5_000,
        reorder_wait_ms: 2_000,
        security: avalon_proto::tls::SecurityConfig {
            keyfile: None,
            insecure: true,
        },
        ..Config::default()
    };
    let token = CancellationToken::new();
    let task = tokio::spawn(avalon_osd::run_with_listener(cfg, listener, token.clone()));
    TestOsd {
        dir,
        addr,
        token,
        task: Some(task),
    }
}

pub async fn client(addr: &str) -> OsdClient<Channel> {
    let ch = avalon_proto::tls::ClientTls::plaintext()
        .channel(addr, avalon_proto::tls::Dial::Osd, Duration::from_secs(2))
        .expect("channel");
    OsdClient::new(ch)
}

/// Polls `f` until it yields a value; fails after 30 s.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the OSD at `addr` serves client requests for chunk 0 of
/// `ino` (registered and peered).
pub async fn wait_serving(addr: &str, ino: u64, epoch: u64) {
    eventually("OSD peered", || async {
        client(addr)
            .await
            .read_chunk(pb::ReadChunkRequest {
                header: None,
                chunk: Some(ChunkId { ino, index: 0 }),
                offset: 0,
                length: 0,
                map_epoch: epoch,
                snap_id: 0,
            })
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

/// Waits until every OSD is registered and has a map.
pub async fn wait_ready(osds: &[TestOsd]) {
    for o in osds {
        let addr = o.addr.clone();
        eventually("OSD ready", || {
            let addr = addr.clone();
            async move {
                let s = client(&addr).await.status(pb::Empty {}).await.ok()?;
                let s = s.into_inner();
                (s.osd_id != 0 && s.map_epoch > 0).then_some(())
            }
        })
        .await;
    }
}

/// A fake MDS and three OSDs, all registered and holding a map; the map.
pub async fn start_three() -> (Mds, Vec<TestOsd>, ClusterMap) {
    let mut mds = start_mds().await;
    let mut osds = Vec::new();
    for _ in 0..3 {
        osds.push(start_osd(&mds.addr).await);
    }
    mds.registered
        .wait_for(|n| *n == 3)
        .await
        .expect("all registered");
    wait_ready(&osds).await;
    let map = mds.map.map.lock().expect("lock").clone();
    (mds, osds, map)
}

/// Addresses of the members of chunk `index` of `ino`'s PG, primary first.
pub fn member_addrs(map: &ClusterMap, ino: u64, index: u64) -> Vec<String> {
    avalon_proto::placement::chunk_members(map, ino, index)
        .iter()
        .map(|o| o.addr.clone())
        .collect()
}

pub fn write_req(ino: u64, offset: u32, data: Vec<u8>, epoch: u64) -> pb::WriteChunkRequest {
    pb::WriteChunkRequest {
        header: None,
        chunk: Some(ChunkId { ino, index: 0 }),
        offset,
        data: data.into(),
        sync: true,
        map_epoch: epoch,
        forwarded: false,
        version: 0,
        chunk_size: 256 * 1024,
        zero_length: 0,
        extents: vec![],
        truncate_to: None,
        snap_seq: 0,
        prev_version: None,
        primary_osd: 0,
    }
}

/// A client's cut of chunk 0 of `ino` to `keep` bytes (a truncate).
pub fn cut_req(ino: u64, keep: u32, epoch: u64) -> pb::WriteChunkRequest {
    pb::WriteChunkRequest {
        offset: u32::MAX,
        truncate_to: Some(keep),
        ..write_req(ino, 0, vec![], epoch)
    }
}

pub async fn read(
    addr: &str,
    ino: u64,
    offset: u32,
    length: u32,
) -> Result<(Vec<u8>, u64), Status> {
    let r = client(addr)
        .await
        .read_chunk({
            // Read this OSD's own copy, past its peering gate.
            let mut r = Request::new(pb::ReadChunkRequest {
                header: None,
                chunk: Some(ChunkId { ino, index: 0 }),
                offset,
                length,
                map_epoch: 0,
                snap_id: 0,
            });
            r.metadata_mut().insert(
                avalon_osd::recovery::INTERNAL_KEY,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            r
        })
        .await?
        .into_inner();
    Ok((r.data.to_vec(), r.version))
}
