//! Per-operation latency histograms with pre-registered handles: one
//! `Histogram` per operation kind, registered once with a static label, so
//! timing an operation allocates nothing and touches only atomics.

use crate::pb;
use metrics::Histogram;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Defines an operation enum and its Prometheus label values together.
#[macro_export]
macro_rules! op_kinds {
    ($(#[$m:meta])* $name:ident { $($v:ident = $s:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $(#[doc = $s] $v),* }
        impl $name {
            /// Label values, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($s),*];
            /// Index into [`Self::NAMES`].
            pub const fn index(self) -> usize { self as usize }
        }
    };
}

/// Totals since start that a process reports over RPC (heartbeats,
/// status) so rates can be computed without scraping: operations, their
/// summed durations, and data bytes.
#[derive(Default)]
pub struct Totals {
    ops: AtomicU64,
    micros: AtomicU64,
    read: AtomicU64,
    written: AtomicU64,
}

impl Totals {
    /// Counts one operation that took `d`.
    pub fn op(&self, d: Duration) {
        self.ops.fetch_add(1, Relaxed);
        self.micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Counts `n` data bytes read.
    pub fn read(&self, n: u64) {
        self.read.fetch_add(n, Relaxed);
    }

    /// Counts `n` data bytes written.
    pub fn written(&self, n: u64) {
        self.written.fetch_add(n, Relaxed);
    }

    /// The totals as sent on the wire.
    pub fn get(&self) -> pb::OpTotals {
        pb::OpTotals {
            ops: self.ops.load(Relaxed),
            op_micros: self.micros.load(Relaxed),
            read_bytes: self.read.load(Relaxed),
            written_bytes: self.written.load(Relaxed),
        }
    }
}

/// One histogram per operation kind, labelled `label="<name>"`, and the
/// totals over all kinds.
pub struct OpHistograms {
    hists: Vec<Histogram>,
    /// Every operation recorded here, counted together.
    pub totals: Totals,
}

impl OpHistograms {
    /// Registers `metric{label=n}` for every `n` in `names`.
    pub fn register(metric: &'static str, label: &'static str, names: &[&'static str]) -> Self {
        OpHistograms {
            hists: names
                .iter()
                .map(|n| metrics::histogram!(metric, label => *n))
                .collect(),
            totals: Totals::default(),
        }
    }

    /// Starts timing operation `i`; recorded when the timer drops.
    pub fn start(&self, i: usize) -> OpTimer<'_> {
        OpTimer(self.hists.get(i).map(|h| (h, &self.totals, Instant::now())))
    }

    /// Records a duration measured elsewhere for operation `i`.
    pub fn record(&self, i: usize, seconds: f64) {
        if let Some(h) = self.hists.get(i) {
            h.record(seconds);
            self.totals.op(Duration::from_secs_f64(seconds.max(0.0)));
        }
    }
}

/// Times one operation; records its duration when dropped. Inert when
/// metrics are off.
#[must_use = "the operation is timed until this drops"]
pub struct OpTimer<'a>(Option<(&'a Histogram, &'a Totals, Instant)>);

impl OpTimer<'_> {
    /// A timer that records nothing (metrics off).
    pub const fn off() -> OpTimer<'static> {
        OpTimer(None)
    }
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        if let Some((h, totals, t)) = self.0.take() {
            let d = t.elapsed();
            h.record(d.as_secs_f64());
            totals.op(d);
        }
    }
}
