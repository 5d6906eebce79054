//! The Prometheus endpoint of every Avalon process (issue 22): installs the
//! process-wide `metrics` recorder and serves `GET /metrics` over HTTP
//! (axum), beside whatever routes the process adds (the MDS status page).
//!
//! Metric handles taken before [`install`] are no-ops for good, so each
//! component registers its handles only after it (see its `metrics.rs`);
//! a process that never installs pays one `OnceLock` check per hook.

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms: 50 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The recorder could not be built or installed.
    #[error("cannot install the metrics recorder: {0}")]
    Install(String),
    /// The listen address is not host:port.
    #[error("bad metrics address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    /// The listener could not bind.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Brings gauges that are read from state (counts, raft indexes, disk
/// fill) up to date; called before each scrape renders.
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process (later calls return
/// the same handle). Every `*_seconds` histogram gets [`LATENCY_BUCKETS`].
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| MetricsError::Install(e.to_string()))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| MetricsError::Install(e.to_string()))?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// The handle of the installed recorder, if any.
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE.get().cloned()
}

/// Binds `addr` and serves `/metrics` (rendered after `refresh`) and the
/// routes of `extra` until `shutdown` resolves. Returns the bound address
/// (port 0 picks one). [`install`] must have run.
pub async fn serve(
    addr: &str,
    refresh: Refresh,
    extra: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<SocketAddr, MetricsError> {
    let handle = install()?;
    let sock: SocketAddr = addr.parse().map_err(|e| MetricsError::Address {
        addr: addr.to_string(),
        reason: format!("{e}"),
    })?;
    let listener = tokio::net::TcpListener::bind(sock)
        .await
        .map_err(|source| MetricsError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| MetricsError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    let h = handle.clone();
    let app = extra.route(
        "/metrics",
        get(move || {
            let (h, refresh) = (h.clone(), refresh.clone());
            async move {
                refresh();
                (
                    [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                    h.render(),
                )
            }
        }),
    );
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "metrics listener failed");
        }
    });
    // Histograms keep their samples in lock-free buckets that upkeep
    // drains; without it they would grow between scrapes.
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        while !server.is_finished() {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
    tracing::info!(%bound, "serving Prometheus metrics on /metrics");
    Ok(bound)
}
