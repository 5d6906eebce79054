//! Avalon object storage daemon (OSD).
//!
//! Stores file chunks with per-block checksums ([`chunk_store`]), serves the
//! `Osd` gRPC service ([`osd_service`]), acts as primary for the chunks the
//! cluster map assigns it and replicates their writes ([`replication`]), and
//! keeps its identity and the cluster map in step with the MDS
//! ([`membership`]).

pub mod authz;
pub mod chunk_store;
pub mod chunk_version;
pub mod config;
pub mod data_port;
pub mod direct_io;
pub mod disk_space;
pub mod error;
pub mod maintenance;
pub mod membership;
pub mod metrics;
pub mod osd_service;
pub mod recovery;
pub mod replication;
pub mod spare_files;

pub use config::{Cli, Config};

use anyhow::Context;
use avalon_proto::limits::MAX_MESSAGE_BYTES;
use avalon_proto::mds_conn::MdsConn;
use avalon_proto::pb::osd_server::OsdServer;
use chunk_store::ChunkStore;
use membership::Membership;
use osd_service::OsdService;
use recovery::Recovery;
use replication::{Peers, Replicator};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Size in bytes of the filesystem holding `path` (statvfs).
pub fn filesystem_capacity(path: &Path) -> std::io::Result<u64> {
    Ok(avalon_proto::disk_usage::disk_usage(path)?.total)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Runs an OSD until `shutdown` fires: binds `cfg.listen`, then as
/// [`run_with_listener`].
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    run_with_listener(cfg, listener, shutdown).await
}

/// Runs an OSD on an already bound listener (tests bind port 0) until
/// `shutdown` fires.
pub async fn run_with_listener(
    cfg: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let tls = cfg.security.load("avalon-osd")?;
    let key_osd_id = match &tls.identity {
        None => None,
        Some(i) => Some(
            i.osd_id()
                .with_context(|| format!("the keyfile is for {}, not an OSD (osd.N)", i.name))?,
        ),
    };
    let local = listener.local_addr().context("listener address")?;
    let addr = if cfg.advertise.is_empty() {
        if local.ip().is_unspecified() {
            tracing::warn!(%local, "listening on a wildcard address; set `advertise` so peers can reach this OSD");
        }
        local.to_string()
    } else {
        cfg.advertise.clone()
    };
    // Connections to the MDS and the other OSDs leave from the address
    // this OSD listens on (a wildcard: the kernel's choice).
    let client_tls = tls.client.clone().with_source(Some(local.ip()));
    let data_dir = cfg.data_dir.clone();
    let (store, capacity) = tokio::task::spawn_blocking({
        let capacity = cfg.capacity;
        move || -> anyhow::Result<(ChunkStore, u64)> {
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
            // Before anything reads it: a directory a newer release wrote is refused.
            avalon_proto::data_format::check(
                &data_dir,
                "osd",
                avalon_proto::data_format::OSD_FORMAT,
            )?;
            let store = ChunkStore::open(data_dir.join("chunks"))?;
            let capacity = if capacity > 0 {
                capacity
            } else {
                filesystem_capacity(&data_dir)
                    .with_context(|| format!("statvfs {}", data_dir.display()))?
            };
            Ok((store, capacity))
        }
    })
    .await
    .context("startup task failed")??;
    let store = Arc::new(store);
    tracing::info!(
        %addr,
        data_dir = %cfg.data_dir.display(),
        chunks = store.chunk_count(),
        used = store.used_bytes(),
        capacity,
        "avalon-osd starting"
    );

    let failure_domain = if cfg.failure_domain.is_empty() {
        host_name()
    } else {
        cfg.failure_domain.clone()
    };
    let membership = Arc::new(Membership::new(
        MdsConn::new(cfg.mds.clone(), client_tls.clone()),
        addr,
        failure_domain,
        capacity,
        cfg.data_dir.clone(),
        key_osd_id,
    ));
    let peers = Arc::new(Peers::new(
        Duration::from_millis(cfg.forward_timeout_ms),
        client_tls.clone(),
    ));
    let recovery = Arc::new(Recovery::new(
        Arc::clone(&store),
        Arc::clone(&membership),
        Arc::clone(&peers),
        cfg.recovery_bytes_per_sec,
    ));
    let space = Arc::new(disk_space::DiskSpace::new(
        cfg.data_dir.clone(),
        cfg.nearfull_ratio,
        cfg.full_ratio,
    ));
    let replicator = Arc::new(Replicator {
        space: Arc::clone(&space),
        store: Arc::clone(&store),
        membership: Arc::clone(&membership),
        peers: Arc::clone(&peers),
        applied: Arc::new(tokio::sync::Notify::new()),
        reorder_wait: Duration::from_millis(cfg.reorder_wait_ms),
        recovery: Arc::clone(&recovery),
    });
    let svc = Arc::new(OsdService::new(
        Arc::clone(&store),
        Arc::clone(&membership),
        replicator,
        Arc::clone(&recovery),
        tls.chunk_cap_key.clone(),
    ));
    if tls.server.is_plaintext() {
        tracing::warn!("insecure: chunk capabilities are not checked; any caller may read, write and truncate any chunk");
    }

    // `shutdown` ends the heartbeats first; serving stops (`stop`) once the
    // MDS has been told, so requests in flight meanwhile are still answered.
    let stop = CancellationToken::new();
    let beats = shutdown.child_token();
    let server = tonic::transport::Server::builder()
        .http2_adaptive_window(Some(true))
        // Outermost: refusals, too, are logged with the request's id.
        .layer(avalon_proto::request_id::TraceLayer)
        .layer(avalon_proto::tls::AuthzLayer::new(authz::policy))
        .add_service(
            OsdServer::from_arc(Arc::clone(&svc))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            // Data-wire connections are served beside gRPC on this port.
            data_port::incoming(listener, tls.server.clone(), svc, stop.clone()),
            stop.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);
    // systemd (Type=notify): listening, store open. No-op without NOTIFY_SOCKET.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify failed");
    }

    let background = {
        let membership = Arc::clone(&membership);
        let store = Arc::clone(&store);
        let stop = stop.clone();
        let interval = Duration::from_millis(cfg.heartbeat_ms);
        let rec = Arc::clone(&recovery);
        let disk = Arc::clone(&space);
        let report: Arc<dyn Fn() -> avalon_proto::pb::OsdReport + Send + Sync> =
            Arc::new(move || {
                let mut r = rec.report();
                disk.report_into(&mut r);
                r
            });
        if let Some(addr) = &cfg.metrics_addr {
            metrics_endpoint(addr, report.clone(), &stop).await?;
        }
        let space = Arc::clone(&space);
        let beats = beats.clone();
        tokio::spawn(async move {
            if membership.register(&store, &beats).await.is_some() {
                membership
                    .heartbeat_loop(store, interval, report, space, beats)
                    .await;
            }
        })
    };
    let stopper = {
        let membership = Arc::clone(&membership);
        let store = Arc::clone(&store);
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = beats.cancelled() => {}
                // The server ended by itself: no announcement.
                _ = stop.cancelled() => {}
            }
            beats.cancel();
            let _ = background.await;
            if !stop.is_cancelled() {
                membership
                    .announce_stopping(store.used_bytes(), STOP_ANNOUNCE_BUDGET)
                    .await;
            }
            stop.cancel();
        })
    };

    let recovering = tokio::spawn(Arc::clone(&recovery).run(stop.clone()));
    let maintenance = Arc::new(maintenance::Maintenance {
        store: Arc::clone(&store),
        membership: Arc::clone(&membership),
        peers: Arc::clone(&peers),
        recovery: Arc::clone(&recovery),
        scrub_interval: Duration::from_millis(cfg.scrub_interval_ms),
        scrub_bytes_per_sec: cfg.scrub_bytes_per_sec,
        gc_interval: Duration::from_millis(cfg.gc_interval_ms),
        dead_since: Default::default(),
    });
    let maintaining = tokio::spawn(maintenance.run(stop.clone()));

    let served = server.await;
    stop.cancel();
    let _ = stopper.await;
    let _ = recovering.await;
    let _ = maintaining.await;
    served
        .context("server task failed")?
        .context("gRPC server failed")?;
    tracing::info!("avalon-osd stopped");
    Ok(())
}

/// How long a stopping OSD waits for the MDS to mark it down.
const STOP_ANNOUNCE_BUDGET: Duration = Duration::from_secs(2);

/// Starts serving `/metrics` on `addr` until `stop`.
async fn metrics_endpoint(
    addr: &str,
    report: Arc<dyn Fn() -> avalon_proto::pb::OsdReport + Send + Sync>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    avalon_proto::metrics_http::install()?;
    metrics::init();
    let stop = stop.clone();
    avalon_proto::metrics_http::serve(
        addr,
        metrics::refresh(report),
        axum::Router::new(),
        async move { stop.cancelled().await },
    )
    .await?;
    Ok(())
}
