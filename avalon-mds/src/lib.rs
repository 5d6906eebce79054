//! Avalon metadata service: the namespace, the cluster map and client
//! sessions, replicated over an openraft group.
//!
//! Layout: [`command`] (log entries), [`namespace`] (the pure state
//! machine), [`raft_store`] and [`raft_net`] (all openraft glue), [`node`]
//! (one running node and error mapping), [`meta_service`] (the `Meta` gRPC
//! service), [`gc`] (data garbage collection), [`config`].

pub mod acl;
pub mod authz;
pub mod caps;
pub mod chunk_caps;
pub mod command;
pub mod config;
pub mod delegation;
pub mod disk_reserve;
pub mod fresh_leader;
pub mod gc;
pub mod grants;
pub mod leases;
pub mod locks;
pub mod log_sync;
pub mod meta_service;
pub mod metrics;
pub mod namespace;
pub mod node;
pub mod osd_probe;
pub mod permission;
pub mod proposer;
pub mod quota;
pub mod raft_net;
pub mod raft_store;
pub mod read_lease;
pub mod ready;
pub mod rstats;
pub mod settings;
pub mod snapshots;
pub mod status_page;
pub mod trash;

use crate::config::Config;
use crate::meta_service::MetaService;
use crate::node::{Liveness, MdsNode};
use crate::raft_net::{NetworkFactory, RaftService};
use crate::raft_store::{LogStore, Raft, StateMachineStore};
use anyhow::Context;
use avalon_proto::limits::MAX_MESSAGE_BYTES;
use avalon_proto::pb::meta_server::MetaServer;
use avalon_proto::pb::raft_server::RaftServer;
use openraft::{BasicNode, RaftLogReader, SnapshotPolicy};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use config::Config as MdsConfig;

/// Builds the openraft configuration from ours.
fn raft_config(cfg: &Config) -> anyhow::Result<openraft::Config> {
    let c = openraft::Config {
        cluster_name: "avalon-mds".into(),
        heartbeat_interval: cfg.heartbeat_ms,
        election_timeout_min: cfg.election_min_ms,
        election_timeout_max: cfg.election_max_ms,
        install_snapshot_timeout: 10_000,
        // Snapshots are asked for by `raft_store::snapshot_pacer`.
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: (cfg.snapshot_logs / 5).min(1000),
        max_payload_entries: 1000,
        ..Default::default()
    };
    Ok(c.validate()?)
}

/// Resolves once raft has stopped with a fatal error (storage, panic).
async fn raft_fatal(
    metrics: &mut tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, BasicNode>>,
) -> String {
    loop {
        if let Err(e) = &metrics.borrow_and_update().running_state {
            return e.to_string();
        }
        if metrics.changed().await.is_err() {
            return "raft core ended".to_string();
        }
    }
}

/// Runs one MDS node until `shutdown` is cancelled. Fails at once if the
/// node's configuration disagrees with the cluster-wide settings it has
/// stored, or later when it learns them (joining, catching up).
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    cfg.validate()?;
    // Also cancelled by this node itself when it must refuse to run.
    let shutdown = shutdown.child_token();
    let peers = cfg.peer_map()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    // Before anything reads it: a directory a newer release wrote is refused.
    avalon_proto::data_format::check(&cfg.data_dir, "mds", avalon_proto::data_format::MDS_FORMAT)?;
    let log = LogStore::open(&cfg.data_dir).context("opening raft log")?;
    let durability = log.durability();
    let fresh = log.is_empty()?;
    let sm = StateMachineStore::open(&cfg.data_dir).context("opening state machine")?;
    let shared = sm.shared();
    // The cluster-wide settings this node already has (snapshot and log):
    // a configuration that disagrees stops it before it serves.
    let stored = {
        let (applied, cur) = {
            let sm = shared.read().unwrap_or_else(|e| e.into_inner());
            (
                sm.last_applied.map_or(0, |l| l.index),
                sm.state.settings.clone(),
            )
        };
        let entries = log
            .clone()
            .try_get_log_entries(applied + 1..)
            .await
            .context("reading raft log")?;
        settings::replay(
            cur,
            entries.iter().filter_map(|e| match &e.payload {
                openraft::EntryPayload::Normal(c) => Some(&c.op),
                _ => None,
            }),
        )
    };
    if let Some(s) = &stored {
        s.check(&cfg)?;
    }
    let tls = cfg.security.load("avalon-mds")?;
    if let Some(i) = &tls.identity {
        anyhow::ensure!(
            i.name == format!("mds.{}", cfg.id),
            "keyfile {} is for {}, not mds.{}",
            cfg.security
                .keyfile
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
                .display(),
            i.name,
            cfg.id
        );
    }
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    // Connections to the other MDS nodes and to the OSDs leave from the
    // address this node listens on (a wildcard: the kernel's choice).
    let client_tls = tls
        .client
        .clone()
        .with_source(listener.local_addr().ok().map(|a| a.ip()));
    let peer_features = raft_net::PeerFeatures::default();
    let raft = Raft::new(
        cfg.id,
        Arc::new(raft_config(&cfg)?),
        NetworkFactory {
            id: cfg.id,
            tls: client_tls.clone(),
            features: peer_features.clone(),
        },
        log,
        sm,
    )
    .await
    .context("starting raft")?;
    tracing::info!(id = cfg.id, listen = %cfg.listen, fresh, "MDS starting");

    let node = Arc::new(MdsNode {
        id: cfg.id,
        addr: cfg.listen.clone(),
        cfg: cfg.clone(),
        raft: raft.clone(),
        sm: shared,
        liveness: Mutex::new(Liveness::default()),
        opens: Mutex::new(node::OpenTable::default()),
        pending_changed: tokio::sync::Notify::new(),
        read_lease: read_lease::ReadLease::for_election_min(cfg.election_min_ms),
        leases: leases::LeaseTable::new(Duration::from_millis(cfg.lease_ms)),
        delegations: Default::default(),
        locks: Default::default(),
        fresh: fresh_leader::FreshLeader::new(
            Duration::from_millis(cfg.election_min_ms / 2),
            Duration::from_millis(cfg.lease_ms),
            Duration::from_millis(cfg.election_max_ms),
        ),
        log_sync: log_sync::LogSync::new(durability),
        proposer: proposer::Proposer::start(raft.clone()),
        settings_init: tokio::sync::Mutex::new(()),
        shutdown: shutdown.child_token(),
        tls: client_tls.clone(),
        metrics_addr: std::sync::OnceLock::new(),
        peer_features,
    });
    let refused: Arc<Mutex<Option<settings::Mismatch>>> = Arc::default();

    if fresh && !cfg.join && peers.keys().next() == Some(&cfg.id) {
        let members: BTreeMap<u64, BasicNode> = peers
            .iter()
            .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
            .collect();
        match raft.initialize(members).await {
            Ok(()) => tracing::info!(members = ?peers, "initialized raft group"),
            Err(e) => tracing::info!(error = %e, "raft initialize skipped"),
        }
    }

    let tasks = tokio_util::task::TaskTracker::new();
    {
        let n = node.clone();
        tasks.spawn(async move { n.liveness_loop().await });
        let n = node.clone();
        tasks.spawn(async move { gc::gc_loop(&n).await });
        let (n, stop, r) = (node.clone(), shutdown.clone(), refused.clone());
        tasks.spawn(async move { settings::guard_loop(&n, stop, &r).await });
        tasks.spawn(raft_store::snapshot_pacer(
            raft.clone(),
            node.sm.clone(),
            cfg.id,
            cfg.snapshot_logs,
            shutdown.clone(),
        ));
        tasks.spawn(ready::notify_when_member(
            raft.metrics(),
            cfg.id,
            shutdown.clone(),
        ));
    }
    tasks.close();
    if let Some(addr) = &cfg.metrics_addr {
        metrics_endpoint(addr, &node, &shutdown).await?;
    }

    let mut meta_svc = MetaService::new(node.clone());
    meta_svc.chunk_caps = chunk_caps::CapIssuer::new(tls.chunk_cap_key.clone(), cfg.chunk_cap_secs);
    let meta = MetaServer::new(meta_svc)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let raft_svc = RaftServer::new(RaftService { node: node.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let incoming = tls.server.incoming(listener);
    let stop = shutdown.clone();
    let leases = node.clone();
    let sent: avalon_proto::recall_mark::SentRecalls =
        Arc::new(move |sid, horizon| leases.leases.sent(sid, horizon));
    let capped = node.clone();
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            // Outermost: refusals, too, are logged with the request's id.
            .layer(avalon_proto::request_id::TraceLayer)
            .layer(avalon_proto::tls::AuthzLayer::new(authz::policy))
            .layer(avalon_proto::recall_mark::RecallMarkLayer(sent))
            .layer(avalon_proto::tls::AuthzLayer::new(move |path, peer| {
                caps::check(&capped, path, peer)
            }))
            .add_service(meta)
            .add_service(raft_svc)
            .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
    );

    let mut failure = None;
    let log_failed = node.log_sync.log().clone();
    let mut metrics = raft.metrics();
    let server_abort = server.abort_handle();
    // Biased: the server also ends on `shutdown`, and a shutdown must not
    // be taken for the server stopping on its own.
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            tracing::info!(id = cfg.id, "MDS shutting down");
            node.shutdown.cancel();
            // In-flight requests get a moment to finish; then the server is dropped.
            let abort = server.abort_handle();
            match tokio::time::timeout(Duration::from_secs(3), server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server error"),
                Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server task failed"),
                Err(_) => abort.abort(),
            }
        }
        r = &mut server => {
            node.shutdown.cancel();
            failure = match r {
                Ok(Ok(())) if shutdown.is_cancelled() => None,
                Ok(Ok(())) => Some(anyhow::anyhow!("gRPC server stopped unexpectedly")),
                Ok(Err(e)) => Some(anyhow::Error::new(e).context("gRPC server failed")),
                Err(e) => Some(anyhow::Error::new(e).context("gRPC server task failed")),
            };
        }
        // A storage error stops raft for good: a node that cannot write its
        // log must not stay up answering Unavailable; it exits non-zero and
        // its supervisor restarts it on what is on disk.
        e = log_failed.failed() => {
            node.shutdown.cancel();
            failure = Some(anyhow::anyhow!("{e}; stopping (restart recovers from the log on disk)"));
        }
        e = raft_fatal(&mut metrics) => {
            node.shutdown.cancel();
            failure = Some(anyhow::anyhow!("raft stopped: {e}; stopping (restart recovers from the log on disk)"));
        }
    }
    if failure.is_some() {
        server_abort.abort();
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), tasks.wait()).await;
    tracing::info!(id = cfg.id, "MDS stopped");
    if let Some(m) = refused.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(m.into());
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Starts serving `/metrics` and the status page (`/`, `/status`) on
/// `addr` until `shutdown`.
async fn metrics_endpoint(
    addr: &str,
    node: &Arc<MdsNode>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    avalon_proto::metrics_http::install()?;
    metrics::init();
    // Ends with raft (its metrics channel closes).
    tokio::spawn(metrics::watch_raft(node.raft.metrics()));
    let stop = shutdown.clone();
    let bound = avalon_proto::metrics_http::serve(
        addr,
        metrics::refresh(node.clone()),
        status_page::router(node.clone()),
        async move { stop.cancelled().await },
    )
    .await?;
    let _ = node.metrics_addr.set(bound.to_string());
    tracing::info!(%bound, "status page on http://{bound}/status");
    Ok(())
}
