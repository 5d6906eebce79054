//! The OSD's Prometheus metrics (issue 22): every metric it exports is
//! defined here; the service calls these with one line each. Handles are
//! registered once, after the recorder is installed ([`init`]); until then
//! (or with metrics off) every hook is a no-op.

use avalon_proto::op_kinds;
use avalon_proto::op_metrics::OpHistograms;
use avalon_proto::pb::{DiskFill, OsdReport};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

op_kinds! {
    /// The OSD's operations, as `op` label values. A write forwarded by
    /// a primary is `replica_write`.
    Op {
        Write = "write", ReplicaWrite = "replica_write", Read = "read",
        Delete = "delete", Sync = "sync", List = "list", Extents = "extents",
    }
}

struct Metrics {
    ops: OpHistograms,
    in_flight: Gauge,
    written: [Counter; 2],
    read: Counter,
    fsync: Histogram,
    pgs: Gauge,
    pgs_peering: Gauge,
    recovery_chunks: Gauge,
    recovery_bytes: Gauge,
    recovered: Counter,
    scrubbed: Counter,
    scrub_errors: Counter,
    repaired: Counter,
    removed: Counter,
    disk_total: Gauge,
    disk_free: Gauge,
    disk_used: Gauge,
    fill_ratio: Gauge,
    fill_state: Gauge,
    map_epoch: Gauge,
}

static M: OnceLock<Metrics> = OnceLock::new();

/// Registers the OSD's metrics (after `metrics_http::install`).
pub fn init() {
    M.get_or_init(|| Metrics {
        ops: OpHistograms::register("avalon_osd_op_duration_seconds", "op", Op::NAMES),
        in_flight: gauge!("avalon_osd_requests_in_flight"),
        written: [
            counter!("avalon_osd_written_bytes_total", "role" => "primary"),
            counter!("avalon_osd_written_bytes_total", "role" => "replica"),
        ],
        read: counter!("avalon_osd_read_bytes_total"),
        fsync: histogram!("avalon_osd_fsync_duration_seconds"),
        pgs: gauge!("avalon_osd_pgs"),
        pgs_peering: gauge!("avalon_osd_pgs_peering"),
        recovery_chunks: gauge!("avalon_osd_recovery_remaining_chunks"),
        recovery_bytes: gauge!("avalon_osd_recovery_remaining_bytes"),
        recovered: counter!("avalon_osd_recovered_chunks_total"),
        scrubbed: counter!("avalon_osd_scrubbed_chunks_total"),
        scrub_errors: counter!("avalon_osd_scrub_errors_total"),
        repaired: counter!("avalon_osd_repaired_chunks_total"),
        removed: counter!("avalon_osd_removed_chunks_total"),
        disk_total: gauge!("avalon_osd_disk_total_bytes"),
        disk_free: gauge!("avalon_osd_disk_free_bytes"),
        disk_used: gauge!("avalon_osd_disk_used_bytes"),
        fill_ratio: gauge!("avalon_osd_disk_fill_ratio"),
        fill_state: gauge!("avalon_osd_disk_full_state"),
        map_epoch: gauge!("avalon_osd_map_epoch"),
    });
}

/// One operation in progress: counted in flight, timed until dropped.
#[must_use = "the operation is timed until this drops"]
pub struct InFlight(Option<(&'static Metrics, usize, Instant)>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some((m, i, t)) = self.0.take() {
            m.in_flight.decrement(1.0);
            m.ops.record(i, t.elapsed().as_secs_f64());
        }
    }
}

/// Starts one operation.
pub fn op(op: Op) -> InFlight {
    InFlight(M.get().map(|m| {
        m.in_flight.increment(1.0);
        (m, op.index(), Instant::now())
    }))
}

/// A write (or its forwarded copy, `replica`) of `bytes` of data arrived.
pub fn written(bytes: usize, replica: bool) {
    if let Some(m) = M.get() {
        m.written[usize::from(replica)].increment(bytes as u64);
        if !replica {
            m.ops.totals.written(bytes as u64);
        }
    }
}

/// A read returned `bytes`.
pub fn read(bytes: usize) {
    if let Some(m) = M.get() {
        m.read.increment(bytes as u64);
        m.ops.totals.read(bytes as u64);
    }
}

/// The OSD's operation totals for its heartbeat report (none with
/// metrics off).
pub fn totals() -> Option<avalon_proto::pb::OpTotals> {
    M.get().map(|m| m.ops.totals.get())
}

/// Times one fsync of a chunk file until dropped.
pub struct FsyncTimer(Option<(&'static Histogram, Instant)>);

impl Drop for FsyncTimer {
    fn drop(&mut self) {
        if let Some((h, t)) = self.0.take() {
            h.record(t.elapsed().as_secs_f64());
        }
    }
}

/// Starts timing an fsync.
pub fn fsync() -> FsyncTimer {
    FsyncTimer(M.get().map(|m| (&m.fsync, Instant::now())))
}

/// The scrape-time refresh: recovery, scrub and disk figures from the
/// same report the OSD heartbeats to the MDS.
pub fn refresh(
    report: Arc<dyn Fn() -> OsdReport + Send + Sync>,
) -> avalon_proto::metrics_http::Refresh {
    Arc::new(move || {
        let Some(m) = M.get() else { return };
        let r = report();
        m.pgs.set(r.pgs as f64);
        m.pgs_peering.set(r.pgs_peering as f64);
        m.recovery_chunks.set(r.recovery_chunks as f64);
        m.recovery_bytes.set(r.recovery_bytes as f64);
        m.recovered.absolute(r.recovered_chunks);
        m.scrubbed.absolute(r.scrubbed_chunks);
        m.scrub_errors.absolute(r.scrub_errors);
        m.repaired.absolute(r.repaired_chunks);
        m.removed.absolute(r.removed_chunks);
        m.disk_total.set(r.disk_total_bytes as f64);
        m.disk_free.set(r.disk_free_bytes as f64);
        m.disk_used.set(r.disk_used_bytes as f64);
        let seen = r.disk_used_bytes + r.disk_free_bytes;
        if seen > 0 {
            m.fill_ratio.set(r.disk_used_bytes as f64 / seen as f64);
        }
        let state = match r.disk_fill() {
            DiskFill::Ok => 0.0,
            DiskFill::NearFull => 1.0,
            DiskFill::Full => 2.0,
        };
        m.fill_state.set(state);
        m.map_epoch.set(r.map_epoch as f64);
    })
}
