//! The client's session with the metadata service: the leader-following
//! MDS connection, the session id and request ids, and the state of the
//! recall stream (open or not, which generation, how far its recalls are
//! applied). The bottom layer of the client: it uses no other part of it.

use crate::error::Result;
use avalon_proto::mds_conn::MdsConn;
use avalon_proto::pb::{self, ClusterMap, RequestHeader};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// A registered session and its recall stream.
pub struct Session {
    /// Leader-following connection to the MDS.
    pub mds: MdsConn,
    id: u64,
    next_request: AtomicU64,
    /// The recall stream is open: shared-write demands reach this client.
    /// Until then every write goes through (see `Client::stream_opened`).
    stream_up: AtomicBool,
    /// Woken when the recall stream opens (see [`Session::wait_stream`]).
    stream_ready: Notify,
    /// How many times the recall stream opened: names the one open now.
    stream_gen: AtomicU64,
    /// The stream the leader said it does not have (see
    /// [`Session::stream_gone`]).
    lost_gen: AtomicU64,
    /// Woken when `lost_gen` is set.
    stream_lost: Notify,
    /// The recalls of the open stream applied so far (by their sequence
    /// numbers; replies' recall marks count the same way).
    recalls_applied: AtomicU64,
    /// Woken when `recalls_applied` grows.
    recalls_moved: Notify,
}

/// What registering a session returns besides the session.
pub struct Registered {
    /// The session.
    pub session: Session,
    /// MDS inode that the mount's root stands for.
    pub root_ino: u64,
    /// The cluster map at registration.
    pub map: ClusterMap,
}

impl Session {
    /// Registers with the MDS (trying for at most `budget`) for the
    /// subdirectory `subdir` mounted at `mountpoint`, and loads the
    /// cluster map.
    pub async fn register(
        mds_addrs: Vec<String>,
        subdir: &[u8],
        mountpoint: &[u8],
        budget: Duration,
        tls: avalon_proto::tls::ClientTls,
    ) -> Result<Registered> {
        let mut mds = MdsConn::new(mds_addrs, tls);
        mds.retry_for = budget;
        let hostname = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let req = pb::RegisterClientRequest {
            header: None,
            hostname,
            mountpoint: Bytes::copy_from_slice(mountpoint),
            pid: std::process::id(),
            subdir: Bytes::copy_from_slice(subdir),
            version: Some(avalon_proto::version::local()),
        };
        let reg = mds
            .request(req, |mut c, r| async move { c.register_client(r).await })
            .await?;
        avalon_proto::version::check("this client", "the MDS", reg.version.as_ref())?;
        let map = mds
            .call(|mut c| async move { c.get_cluster_map(pb::Empty {}).await })
            .await?;
        // After the mount is up, failovers may take longer than the mount's
        // own connect budget.
        mds.retry_for = Duration::from_secs(60);
        let session = Session {
            mds,
            id: reg.session_id,
            next_request: AtomicU64::new(1),
            stream_up: Default::default(),
            stream_ready: Notify::new(),
            stream_gen: Default::default(),
            lost_gen: Default::default(),
            stream_lost: Notify::new(),
            recalls_applied: Default::default(),
            recalls_moved: Notify::new(),
        };
        Ok(Registered {
            session,
            root_ino: reg.root_ino,
            map,
        })
    }

    /// This client's session id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// A request header with a fresh request id.
    pub fn header(&self) -> Option<RequestHeader> {
        // The process the operation serves, whose permissions the MDS
        // checks (none: the client's own work, limited by its key only).
        let caller = avalon_proto::caller::current();
        Some(RequestHeader {
            session_id: self.id,
            request_id: self.next_request.fetch_add(1, Ordering::Relaxed),
            credential: Bytes::new(),
            // The FUSE operation this request serves (0: none).
            trace_id: avalon_proto::request_id::current().unwrap_or(0),
            caller_uid: caller.map_or(0, |c| c.uid),
            caller_gid: caller.map_or(0, |c| c.gid),
            has_caller: caller.is_some(),
        })
    }

    /// A request header carrying `cap` (a chunk capability) as its
    /// credential.
    pub fn header_with(&self, cap: Bytes) -> Option<RequestHeader> {
        let mut h = self.header();
        if let Some(h) = h.as_mut() {
            h.credential = cap;
        }
        h
    }

    /// The recall stream opened: returns its generation (see
    /// [`Session::stream_gone`]).
    pub fn stream_opened(&self) -> u64 {
        let generation = self.stream_gen.fetch_add(1, Ordering::AcqRel) + 1;
        // Counted anew from the stream's first event.
        self.recalls_applied.store(0, Ordering::Release);
        self.stream_up.store(true, Ordering::Release);
        self.stream_ready.notify_waiters();
        generation
    }

    /// The generation of the open recall stream, if one is open.
    pub fn open_stream(&self) -> Option<u64> {
        self.stream_up
            .load(Ordering::Acquire)
            .then(|| self.stream_gen.load(Ordering::Acquire))
    }

    /// The leader said it has no recall stream of this session although
    /// stream `generation` was open when the heartbeat left: if it still
    /// is, it is closed and [`Session::stream_gone`] returns.
    pub fn stream_missing(&self, generation: u64) {
        if self.open_stream() == Some(generation) {
            tracing::info!("the leader has no recall stream of this session: reopening it");
            self.stream_closed();
            self.lost_gen.store(generation, Ordering::Release);
            self.stream_lost.notify_waiters();
        }
    }

    /// Returns once the leader said it has no recall stream of this
    /// session although stream `generation` is open: that stream went to
    /// a former leader (a paused one keeps the connection, so it never
    /// breaks by itself) and demands no longer reach us through it.
    pub async fn stream_gone(&self, generation: u64) {
        loop {
            let lost = self.stream_lost.notified();
            tokio::pin!(lost);
            lost.as_mut().enable();
            if self.lost_gen.load(Ordering::Acquire) == generation {
                return;
            }
            lost.await;
        }
    }

    /// Waits up to `within` for the recall stream to open; true if it is.
    /// A mount serves no file before it: one opened for writing while the
    /// stream is down stays in (slow, unbuffered) shared-write mode.
    pub async fn wait_stream(&self, within: Duration) -> bool {
        let ready = self.stream_ready.notified();
        if self.stream_up.load(Ordering::Acquire) {
            return true;
        }
        tokio::time::timeout(within, ready).await.is_ok()
    }

    /// True while the recall stream is open.
    pub fn stream_is_up(&self) -> bool {
        self.stream_up.load(Ordering::Acquire)
    }

    /// The recall stream broke: demands may be lost from now on.
    pub fn stream_closed(&self) {
        self.stream_up.store(false, Ordering::Release);
    }

    /// The recall stream's events up to `seq` are applied.
    pub fn recalls_applied(&self, seq: u64) {
        self.recalls_applied.store(seq, Ordering::Release);
        self.recalls_moved.notify_waiters();
    }

    /// Waits up to `within` until the recalls up to `mark` are applied;
    /// true if they are.
    pub async fn wait_recalls(&self, mark: u64, within: Duration) -> bool {
        let wait = async {
            loop {
                let moved = self.recalls_moved.notified();
                tokio::pin!(moved);
                moved.as_mut().enable();
                if self.recalls_applied.load(Ordering::Acquire) >= mark {
                    return;
                }
                moved.await;
            }
        };
        tokio::time::timeout(within, wait).await.is_ok()
    }

    /// True if the recalls up to `mark` are applied.
    pub fn recalls_done(&self, mark: u64) -> bool {
        self.recalls_applied.load(Ordering::Acquire) >= mark
    }
}
