//! Configuration: a TOML file with defaults for every key, overridden by
//! command-line flags.

use anyhow::{bail, Context};
use clap::Parser;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::settings::FailureDomainRule;
use avalon_proto::log_output::LogFormat;

/// Effective configuration of one MDS node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Raft node id (>= 1).
    pub id: u64,
    /// Address to serve gRPC on (host:port).
    pub listen: String,
    /// Directory for the raft log and snapshots.
    pub data_dir: PathBuf,
    /// Initial members, as "id=host:port".
    pub peers: Vec<String>,
    /// Cluster-wide settings (`settings.rs`): used when this node creates
    /// the cluster; afterwards the cluster's stored values rule, and a
    /// value set here that differs makes the node refuse to start. `None`:
    /// not set (the cluster's value, or the default at creation).
    /// Cluster id (created at random unless given).
    pub cluster_id: Option<String>,
    /// Replicas per chunk (n).
    pub replicas: Option<u32>,
    /// Write quorum (m).
    pub write_quorum: Option<u32>,
    /// Placement groups.
    pub pg_count: Option<u32>,
    /// Chunk size of new files.
    pub chunk_size: Option<u32>,
    /// How placement spreads copies over failure domains ("spread").
    pub failure_domain_rule: Option<FailureDomainRule>,
    /// tracing filter (e.g. "info", "avalon_mds=debug").
    pub log_level: String,
    /// Log lines as text or JSON objects.
    pub log_format: LogFormat,
    /// Requests slower than this (ms) are logged at info with their id.
    pub slow_request_ms: u64,
    /// An OSD without heartbeat for this long is marked down.
    pub osd_down_after_ms: u64,
    /// An OSD without heartbeat for this long is marked out (its PGs get
    /// new members, which copy the data); 0 = never automatically.
    pub osd_out_after_ms: u64,
    /// Snapshot after this many log entries since the last one.
    pub snapshot_logs: u64,
    /// Raft heartbeat interval.
    pub heartbeat_ms: u64,
    /// Raft election timeout range.
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Period of the data garbage collector.
    pub gc_interval_ms: u64,
    /// A client session without heartbeat for this long is expired.
    pub session_timeout_ms: u64,
    /// An unlinked file counts as open this long after a client last
    /// reported it (or after it was created), and a new leader waits this
    /// long for heartbeats before it reclaims orphans.
    pub orphan_grace_ms: u64,
    /// Metadata lease: how long a client may cache past its last
    /// heartbeat, and how long a new leader holds changes back.
    pub lease_ms: u64,
    /// Join an existing group (added with `avalonctl mds add`): never
    /// initialize a new raft group, even with empty storage.
    pub join: bool,
    /// Metadata reserve floor in MiB: with less than the larger of this
    /// and 2% of the data dir's filesystem free, creates get ENOSPC and
    /// deletes are still served.
    pub disk_reserve_mb: u64,
    /// Lifetime of the chunk capabilities this node signs, in seconds:
    /// clients renew them before; a removed key's stop working after it.
    pub chunk_cap_secs: u64,
    /// Serve Prometheus metrics (and the status page) over HTTP here
    /// (host:port); unset: off.
    pub metrics_addr: Option<String>,
    /// `[security]`: this node's keyfile, or `insecure = true`.
    pub security: avalon_proto::tls::SecurityConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            id: 1,
            listen: "127.0.0.1:7100".into(),
            data_dir: PathBuf::from("/var/lib/avalon/mds"),
            peers: Vec::new(),
            cluster_id: None,
            replicas: None,
            write_quorum: None,
            pg_count: None,
            chunk_size: None,
            failure_domain_rule: None,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            slow_request_ms: avalon_proto::request_id::DEFAULT_SLOW_MS,
            osd_down_after_ms: 10_000,
            osd_out_after_ms: 60_000,
            snapshot_logs: 5000,
            // openraft gives an AppendEntries one heartbeat interval
            // before it sends it again: at 100 ms, batches of delegated
            // changes on a busy 2-core machine timed out and were re-sent
            // over and over, stalling commits for seconds.
            heartbeat_ms: 250,
            // A follower stands for election after openraft's leader lease
            // (= election_max_ms) plus a random election timeout without
            // hearing from the leader: 800-1000 ms, i.e. three to four
            // missed heartbeats. (1000/2000 made it 3-4 s, most of a
            // failover.) The read lease is election_min_ms / 2.
            election_min_ms: 300,
            election_max_ms: 500,
            gc_interval_ms: 2000,
            session_timeout_ms: 30_000,
            orphan_grace_ms: 5000,
            // Eight client heartbeats: a raft stall of a second under load
            // (no quorum check, so no renewal) no longer costs a client its
            // cache and delegations (an rm -rf of a tree made there then
            // went synchronous: 3 s became 40 s).
            lease_ms: 2000,
            join: false,
            disk_reserve_mb: 256,
            chunk_cap_secs: 60,
            metrics_addr: None,
            security: Default::default(),
        }
    }
}

/// Default values of the numeric cluster-wide settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultSettings {
    pub replicas: u32,
    pub write_quorum: u32,
    pub pg_count: u32,
    pub chunk_size: u32,
}

/// Command-line flags of `avalon-mds`.
#[derive(Debug, Parser, Default)]
#[command(
    name = "avalon-mds",
    version,
    about = "Avalon metadata service",
    long_about = "Avalon metadata service: keeps the namespace and the cluster map, \
replicated over a Raft group of three or more nodes. Every flag is also a key of \
the TOML file given with --config (under systemd: the unit avalon-mds@ID reads \
/etc/avalon/mds-ID.toml; a commented example of every key is \
/etc/avalon/mds.example.toml). Logs go to standard error (the journal under \
systemd). SIGTERM or SIGINT stops the node cleanly; exit status 2 means a bad \
configuration or a peer refused for its version."
)]
pub struct Args {
    /// TOML configuration file (same keys as the flags, snake_case).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Raft node id.
    #[arg(long)]
    pub id: Option<u64>,
    /// Listen address (host:port).
    #[arg(long)]
    pub listen: Option<String>,
    /// Data directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Initial members: 1=host:port,2=host:port,...
    #[arg(long, value_delimiter = ',')]
    pub peers: Option<Vec<String>>,
    /// Cluster id (at creation; later it must match the cluster's).
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// Replicas per chunk.
    #[arg(long)]
    pub replicas: Option<u32>,
    /// Write quorum.
    #[arg(long)]
    pub write_quorum: Option<u32>,
    /// Placement groups.
    #[arg(long)]
    pub pg_count: Option<u32>,
    /// Chunk size of new files in bytes.
    #[arg(long)]
    pub chunk_size: Option<u32>,
    /// Failure-domain rule of placement ("spread").
    #[arg(long)]
    pub failure_domain_rule: Option<String>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<LogFormat>,
    /// Log requests slower than this many ms at info, with their id.
    #[arg(long)]
    pub slow_request_ms: Option<u64>,
    /// Mark an OSD down after this many ms without heartbeat.
    #[arg(long)]
    pub osd_down_after_ms: Option<u64>,
    /// Mark an OSD out after this many ms without heartbeat (0 = never).
    #[arg(long)]
    pub osd_out_after_ms: Option<u64>,
    /// Expire a client session after this many ms without heartbeat.
    #[arg(long)]
    pub session_timeout_ms: Option<u64>,
    /// Grace period of unlinked-but-open files (ms).
    #[arg(long)]
    pub orphan_grace_ms: Option<u64>,
    /// Metadata reserve floor in MiB (creates get ENOSPC below it).
    #[arg(long)]
    pub disk_reserve_mb: Option<u64>,
    /// Lifetime of signed chunk capabilities in seconds.
    #[arg(long)]
    pub chunk_cap_secs: Option<u64>,
    /// Serve Prometheus metrics on /metrics at this host:port (off unless set).
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Join an existing group instead of initializing one (the leader adds
    /// this node with `avalonctl mds add`).
    #[arg(long)]
    pub join: bool,
    /// This node's keyfile (`avalonctl auth add mds.N`): mutual TLS.
    #[arg(long)]
    pub keyfile: Option<PathBuf>,
    /// No TLS and no authentication (logged loudly at start).
    #[arg(long)]
    pub insecure: bool,
}

impl Config {
    /// Reads the config file (if any) and applies the flags over it.
    pub fn load(args: &Args) -> anyhow::Result<Config> {
        let mut cfg = match &args.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
            }
            None => Config::default(),
        };
        macro_rules! over {
            ($($f:ident),*) => {$(
                if let Some(v) = &args.$f { cfg.$f = v.clone(); }
            )*};
        }
        macro_rules! set {
            ($($f:ident),*) => {$(
                if let Some(v) = &args.$f { cfg.$f = Some(v.clone()); }
            )*};
        }
        set!(
            cluster_id,
            replicas,
            write_quorum,
            pg_count,
            chunk_size,
            metrics_addr
        );
        if let Some(r) = &args.failure_domain_rule {
            cfg.failure_domain_rule =
                Some(FailureDomainRule::parse(r).with_context(|| {
                    format!("unknown failure domain rule {r:?} (known: spread)")
                })?);
        }
        over!(
            id,
            listen,
            data_dir,
            peers,
            log_level,
            log_format,
            slow_request_ms,
            osd_down_after_ms,
            osd_out_after_ms,
            session_timeout_ms,
            orphan_grace_ms,
            disk_reserve_mb,
            chunk_cap_secs
        );
        if args.join {
            cfg.join = true;
        }
        if let Some(k) = &args.keyfile {
            cfg.security.keyfile = Some(k.clone());
        }
        if args.insecure {
            cfg.security.insecure = true;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks value ranges.
    pub fn validate(&self) -> anyhow::Result<()> {
        use avalon_proto::limits::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
        if self.id == 0 {
            bail!("id must be >= 1");
        }
        // The values this node would create a cluster with.
        let d = Config::default_settings();
        let replicas = self.replicas.unwrap_or(d.replicas);
        crate::settings::check_quorum(
            replicas,
            self.write_quorum.unwrap_or(d.write_quorum.min(replicas)),
        )?;
        if self.pg_count == Some(0) {
            bail!("pg_count must be >= 1");
        }
        if let Some(cs) = self.chunk_size {
            if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
                bail!("chunk_size must be in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}");
            }
        }
        if let Some(id) = &self.cluster_id {
            if id.trim().is_empty() || id.len() > 128 {
                bail!("cluster_id must be 1..=128 characters");
            }
        }
        if self.election_min_ms == 0
            || self.election_max_ms <= self.election_min_ms
            || self.heartbeat_ms >= self.election_min_ms
        {
            bail!("need heartbeat_ms < election_min_ms < election_max_ms");
        }
        if !(1..=86_400).contains(&self.chunk_cap_secs) {
            bail!("chunk_cap_secs must be in 1..=86400");
        }
        if !(100..=60_000).contains(&self.lease_ms) {
            bail!("lease_ms must be in 100..=60000");
        }
        self.peer_map()?;
        Ok(())
    }

    /// Default cluster-wide settings (a cluster created by a node whose
    /// configuration sets none of them).
    pub fn default_settings() -> DefaultSettings {
        DefaultSettings {
            replicas: 3,
            write_quorum: 2,
            pg_count: avalon_proto::limits::DEFAULT_PG_COUNT,
            chunk_size: avalon_proto::limits::DEFAULT_CHUNK_SIZE,
        }
    }

    /// The initial members: `--peers`, or just this node if empty.
    pub fn peer_map(&self) -> anyhow::Result<BTreeMap<u64, String>> {
        let mut m = BTreeMap::new();
        for p in &self.peers {
            let p = p.trim();
            if p.is_empty() {
                continue;
            }
            let (id, addr) = p
                .split_once('=')
                .with_context(|| format!("peer {p:?} is not id=host:port"))?;
            let id: u64 = id
                .trim()
                .parse()
                .with_context(|| format!("bad peer id in {p:?}"))?;
            if id == 0 || addr.trim().is_empty() {
                bail!("bad peer {p:?}");
            }
            m.insert(id, addr.trim().to_string());
        }
        if m.is_empty() {
            m.insert(self.id, self.listen.clone());
        }
        if !m.contains_key(&self.id) {
            bail!("--peers does not contain this node's id {}", self.id);
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example installed as /etc/avalon/mds.example.toml: valid as
    /// shipped, and every commented-out `# key = value` is a real key.
    #[test]
    fn packaged_example_parses() {
        let text = include_str!("../../packaging/etc/mds.example.toml");
        let c: Config = toml::from_str(text).expect("example as shipped");
        c.validate().expect("example valid");
        assert_eq!(c.peer_map().expect("peers").len(), 3);
        let all = avalon_proto::config_example::uncomment_settings(text);
        let c: Config = toml::from_str(&all).expect("example with every key");
        assert_eq!(c.replicas, Some(3));
        assert_eq!(c.lease_ms, Config::default().lease_ms);
        assert!(c.metrics_addr.is_some());
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.slow_request_ms, Config::default().slow_request_ms);
        c.validate().expect("every key valid");
    }

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("mds.toml");
        std::fs::write(
            &p,
            "id = 2\nlisten = \"127.0.0.1:7101\"\npeers = [\"1=127.0.0.1:7100\", \"2=127.0.0.1:7101\"]\nreplicas = 2\nwrite_quorum = 1\n",
        )
        .expect("write");
        let args = Args::parse_from([
            "avalon-mds",
            "--config",
            p.to_str().unwrap_or(""),
            "--pg-count",
            "64",
        ]);
        let c = Config::load(&args).expect("load");
        assert_eq!(c.id, 2);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.replicas, Some(2));
        assert_eq!(c.pg_count, Some(64));
        // Not set anywhere: no value (the cluster's rules).
        assert_eq!(c.chunk_size, None);
        assert_eq!(c.failure_domain_rule, None);
        assert_eq!(c.peer_map().expect("peers").len(), 2);
        let args = Args::parse_from(["avalon-mds", "--peers", "1=a:1,2=b:2", "--id", "3"]);
        assert!(Config::load(&args).is_err());
    }
}
