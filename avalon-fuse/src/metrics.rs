//! The client's Prometheus metrics (issue 22; `-o metrics=HOST:PORT`):
//! every metric a mount exports is defined here; the FUSE handlers and
//! caches call these with one line each. Handles are registered once,
//! after the recorder is installed ([`serve`]); without the option every
//! hook is a no-op.
//!
//! A FUSE operation is timed from its handler's first line to its reply:
//! [`op`] notes the start on the FUSE thread, and [`AvalonFs`]'s `spawn`
//! carries it into the operation's future ([`take`]), so the handlers
//! keep their shape.
//!
//! [`AvalonFs`]: crate::fs::AvalonFs

use crate::client::Client;
use avalon_proto::op_kinds;
use avalon_proto::op_metrics::OpHistograms;
use metrics::{counter, gauge, Counter, Gauge};
use std::cell::Cell;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

op_kinds! {
    /// FUSE operations, as `op` label values.
    FuseOp {
        Lookup = "lookup", GetAttr = "getattr", SetAttr = "setattr", Readlink = "readlink",
        Mknod = "mknod", Mkdir = "mkdir", Unlink = "unlink", Rmdir = "rmdir",
        Symlink = "symlink", Rename = "rename", Link = "link", Open = "open",
        Create = "create", Read = "read", Write = "write", Flush = "flush",
        Release = "release", GetLk = "getlk", SetLk = "setlk", Fsync = "fsync",
        OpenDir = "opendir", ReleaseDir = "releasedir", ReadDir = "readdir",
        ReadDirPlus = "readdirplus", FsyncDir = "fsyncdir", StatFs = "statfs",
        SetXattr = "setxattr", GetXattr = "getxattr", ListXattr = "listxattr",
        RemoveXattr = "removexattr", Fallocate = "fallocate", Lseek = "lseek",
        CopyFileRange = "copy_file_range", Access = "access",
    }
}

op_kinds! {
    /// The client's caches, as `cache` label values.
    Cache { Attr = "attr", Entry = "entry", Chunk = "chunk" }
}

struct Metrics {
    ops: OpHistograms,
    hits: Vec<Counter>,
    misses: Vec<Counter>,
    written: Counter,
    read: Counter,
    osd_retries: Counter,
    wbuf_bytes: Gauge,
    wbuf_budget: Gauge,
}

static M: OnceLock<Metrics> = OnceLock::new();

fn init() {
    M.get_or_init(|| Metrics {
        ops: OpHistograms::register(
            "avalon_client_fuse_op_duration_seconds",
            "op",
            FuseOp::NAMES,
        ),
        hits: Cache::NAMES
            .iter()
            .map(|c| counter!("avalon_client_cache_hits_total", "cache" => *c))
            .collect(),
        misses: Cache::NAMES
            .iter()
            .map(|c| counter!("avalon_client_cache_misses_total", "cache" => *c))
            .collect(),
        written: counter!("avalon_client_written_bytes_total"),
        read: counter!("avalon_client_read_bytes_total"),
        osd_retries: counter!("avalon_client_osd_retries_total"),
        wbuf_bytes: gauge!("avalon_client_write_buffer_bytes"),
        wbuf_budget: gauge!("avalon_client_write_buffer_budget_bytes"),
    });
}

/// A started FUSE operation: recorded when dropped.
pub struct Timing(Option<(usize, Instant)>);

impl Timing {
    /// Records the operation now; one slower than the slow-request
    /// threshold is logged at info (inside the operation's
    /// request_id::scope: the line carries its id).
    pub fn done(mut self) {
        if let Some((i, t)) = self.0.take() {
            let took = t.elapsed();
            if let Some(m) = M.get() {
                m.ops.record(i, took.as_secs_f64());
            }
            if took >= avalon_proto::request_id::slow_threshold() {
                tracing::info!(
                    op = FuseOp::NAMES[i],
                    ms = took.as_millis() as u64,
                    "slow request"
                );
            }
        }
    }
}

impl Drop for Timing {
    fn drop(&mut self) {
        if let (Some((i, t)), Some(m)) = (self.0.take(), M.get()) {
            m.ops.record(i, t.elapsed().as_secs_f64());
        }
    }
}

thread_local! {
    /// The operation the current FUSE handler is running, until its
    /// future takes it (or the handler returns).
    static CURRENT: Cell<Option<(usize, Instant)>> = const { Cell::new(None) };
}

/// Notes the start of a FUSE operation on this thread; the guard records
/// it at the handler's end unless the handler's future took it. Noted
/// without metrics too: slow operations are logged.
pub fn op(op: FuseOp) -> OpGuard {
    CURRENT.with(|c| c.set(Some((op.index(), Instant::now()))));
    OpGuard
}

/// See [`op`].
#[must_use = "the operation is timed until this drops"]
pub struct OpGuard;

impl Drop for OpGuard {
    fn drop(&mut self) {
        drop(take());
    }
}

/// Takes this thread's current operation, to be recorded when the
/// returned timing drops (at the end of the operation's future).
pub fn take() -> Timing {
    Timing(CURRENT.with(Cell::take))
}

/// Counts a cache lookup of `cache` (a hit if `r` is some); returns `r`.
pub fn cached<T>(cache: Cache, r: Option<T>) -> Option<T> {
    if let Some(m) = M.get() {
        let c = if r.is_some() { &m.hits } else { &m.misses };
        c[cache.index()].increment(1);
    }
    r
}

/// Counts a cache lookup of `cache` that hit (`hit`) or missed.
pub fn cache_lookup(cache: Cache, hit: bool) {
    if let Some(m) = M.get() {
        let c = if hit { &m.hits } else { &m.misses };
        c[cache.index()].increment(1);
    }
}

/// Counts `n` bytes written through the mount.
pub fn written(n: usize) {
    if let Some(m) = M.get() {
        m.written.increment(n as u64);
        m.ops.totals.written(n as u64);
    }
}

/// Counts the bytes of a read's reply; returns them.
pub fn read(data: &[u8]) -> &[u8] {
    if let Some(m) = M.get() {
        m.read.increment(data.len() as u64);
        m.ops.totals.read(data.len() as u64);
    }
    data
}

/// The mount's operation totals for its heartbeat (none with metrics off).
pub fn totals() -> Option<avalon_proto::pb::OpTotals> {
    M.get().map(|m| m.ops.totals.get())
}

/// Counts one chunk read or write tried again after its OSDs failed.
pub fn osd_retry() {
    if let Some(m) = M.get() {
        m.osd_retries.increment(1);
    }
}

/// Starts serving `/metrics` on `addr` (the `metrics=` mount option) for
/// as long as the runtime runs. Returns the bound address.
pub async fn serve(addr: &str, client: Arc<Client>) -> anyhow::Result<std::net::SocketAddr> {
    avalon_proto::metrics_http::install()?;
    init();
    let refresh: avalon_proto::metrics_http::Refresh = Arc::new(move || {
        if let Some(m) = M.get() {
            m.wbuf_bytes.set(client.wbuf.bytes() as f64);
            m.wbuf_budget.set(client.wbuf.budget() as f64);
        }
    });
    let bound = avalon_proto::metrics_http::serve(
        addr,
        refresh,
        axum::Router::new(),
        std::future::pending(),
    )
    .await?;
    Ok(bound)
}
