//! Per-operation latency histograms with pre-registered handles: one
//! `Histogram` per operation kind, registered once with a static label, so
//! timing an operation allocates nothing and touches only atomics.

use metrics::Histogram;
use std::time::Instant;

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

/// One histogram per operation kind, labelled `label="<name>"`.
pub struct OpHistograms {
    hists: Vec<Histogram>,
}

impl OpHistograms {
    /// Registers `metric{label=n}` for every `n` in `names`.
    pub fn register(metric: &'static str, label: &'static str, names: &[&'static str]) -> Self {
        OpHistograms {
            hists: names
                .iter()
                .map(|n| metrics::histogram!(metric, label => *n))
                .collect(),
        }
    }

    /// Starts timing operation `i`; recorded when the timer drops.
    pub fn start(&self, i: usize) -> OpTimer<'_> {
        OpTimer(self.hists.get(i).map(|h| (h, Instant::now())))
    }

    /// Records a duration measured elsewhere for operation `i`.
    pub fn record(&self, i: usize, seconds: f64) {
        if let Some(h) = self.hists.get(i) {
            h.record(seconds);
        }
    }
}

/// Times one operation; records its duration when dropped. Inert when
/// metrics are off.
#[must_use = "the operation is timed until this drops"]
pub struct OpTimer<'a>(Option<(&'a Histogram, Instant)>);

impl OpTimer<'_> {
    /// A timer that records nothing (metrics off).
    pub const fn off() -> OpTimer<'static> {
        OpTimer(None)
    }
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        if let Some((h, t)) = self.0.take() {
            h.record(t.elapsed().as_secs_f64());
        }
    }
}
