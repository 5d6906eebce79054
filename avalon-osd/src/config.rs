//! Daemon configuration: a TOML file with defaults for every key, overridden
//! by command-line flags.

use avalon_proto::log_output::LogFormat;
use clap::Parser;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Configuration of one OSD.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the Osd gRPC service binds (`host:port`).
    pub listen: String,
    /// Address advertised to the MDS and peers; empty = the bound address.
    pub advertise: String,
    /// Directory holding the OSD id and the chunks.
    pub data_dir: PathBuf,
    /// MDS addresses (`host:port`).
    pub mds: Vec<String>,
    /// Failure domain (host, rack...); empty = this machine's host name.
    pub failure_domain: String,
    /// Capacity in bytes reported to the MDS; 0 = size of the data dir's
    /// filesystem.
    pub capacity: u64,
    /// Heartbeat interval to the MDS in milliseconds.
    pub heartbeat_ms: u64,
    /// Log filter (`info`, `debug`, `avalon_osd=debug,info`, ...).
    pub log_level: String,
    /// Log lines as text or JSON objects.
    pub log_format: LogFormat,
    /// Requests slower than this (ms) are logged at info with their id.
    pub slow_request_ms: u64,
    /// How long a primary waits for one replica's answer, in milliseconds.
    pub forward_timeout_ms: u64,
    /// How long a replica waits for an earlier version of a chunk to arrive
    /// before applying a later one out of order, in milliseconds.
    pub reorder_wait_ms: u64,
    /// Most bytes per second copied by recovery and repair (0 = no limit).
    pub recovery_bytes_per_sec: u64,
    /// Pause between scrub passes (re-read and verify every local chunk,
    /// compare with the PG's other members) in milliseconds; 0 = never.
    pub scrub_interval_ms: u64,
    /// Most bytes per second the scrubber reads (0 = no limit).
    pub scrub_bytes_per_sec: u64,
    /// Period of the garbage collection sweep (chunks of deleted files,
    /// copies of PGs this OSD no longer holds) in milliseconds; 0 = never.
    pub gc_interval_ms: u64,
    /// Fill ratio of the data directory's filesystem (as df's Use%:
    /// used / (used + free)) at which the OSD reports itself near full
    /// (`avalonctl status` warns).
    pub nearfull_ratio: f64,
    /// Fill ratio at which the OSD reports itself full: client writes to
    /// every PG it is a member of fail with ENOSPC until space is freed.
    pub full_ratio: f64,
    /// Serve Prometheus metrics over HTTP here (host:port); unset: off.
    pub metrics_addr: Option<String>,
    /// `[security]`: this OSD's keyfile, or `insecure = true`.
    pub security: avalon_proto::tls::SecurityConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7200".into(),
            advertise: String::new(),
            data_dir: PathBuf::from("/var/lib/avalon/osd"),
            mds: vec!["127.0.0.1:7100".into()],
            failure_domain: String::new(),
            capacity: 0,
            heartbeat_ms: 1000,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            slow_request_ms: avalon_proto::request_id::DEFAULT_SLOW_MS,
            forward_timeout_ms: 10_000,
            reorder_wait_ms: 5_000,
            recovery_bytes_per_sec: 256 << 20,
            scrub_interval_ms: 3_600_000,
            scrub_bytes_per_sec: 64 << 20,
            gc_interval_ms: 30_000,
            nearfull_ratio: 0.85,
            full_ratio: 0.95,
            metrics_addr: None,
            security: Default::default(),
        }
    }
}

/// Command line of `avalon-osd`.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "avalon-osd",
    version,
    about = "Avalon object storage daemon: stores file chunks and replicates writes",
    long_about = "Avalon object storage daemon: stores file chunks in its data \
directory, replicates writes to the other OSDs of each placement group, and \
recovers and scrubs chunks. Every flag is also a key of the TOML file given with \
--config (under systemd: the unit avalon-osd@ID reads /etc/avalon/osd-ID.toml; a \
commented example of every key is /etc/avalon/osd.example.toml). Logs go to \
standard error (the journal under systemd). SIGTERM or SIGINT stops it cleanly."
)]
pub struct Cli {
    /// TOML configuration file (same keys as the flags, snake_case).
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Address to serve on [default: 127.0.0.1:7200].
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Address to advertise to the cluster [default: the bound address].
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Data directory [default: /var/lib/avalon/osd].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Comma-separated MDS addresses [default: 127.0.0.1:7100].
    #[arg(long, value_name = "ADDR,ADDR", value_delimiter = ',')]
    pub mds: Option<Vec<String>>,
    /// Failure domain name [default: host name].
    #[arg(long, value_name = "NAME")]
    pub failure_domain: Option<String>,
    /// Capacity in bytes [default: size of the data dir's filesystem].
    #[arg(long, value_name = "BYTES")]
    pub capacity: Option<u64>,
    /// Heartbeat interval in milliseconds [default: 1000].
    #[arg(long, value_name = "MS")]
    pub heartbeat_ms: Option<u64>,
    /// Log filter [default: info].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log format, text or json [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log requests slower than this at info, with their id [default: 1000].
    #[arg(long, value_name = "MS")]
    pub slow_request_ms: Option<u64>,
    /// Per-replica forward timeout in milliseconds [default: 10000].
    #[arg(long, value_name = "MS")]
    pub forward_timeout_ms: Option<u64>,
    /// Pause between scrub passes in milliseconds, 0 = never [default: 3600000].
    #[arg(long, value_name = "MS")]
    pub scrub_interval_ms: Option<u64>,
    /// Garbage collection period in milliseconds, 0 = never [default: 30000].
    #[arg(long, value_name = "MS")]
    pub gc_interval_ms: Option<u64>,
    /// Recovery copy limit in bytes per second, 0 = none [default: 268435456].
    #[arg(long, value_name = "BYTES")]
    pub recovery_bytes_per_sec: Option<u64>,
    /// Fill ratio reported as near full [default: 0.85].
    #[arg(long, value_name = "RATIO")]
    pub nearfull_ratio: Option<f64>,
    /// Fill ratio at which writes are refused with ENOSPC [default: 0.95].
    #[arg(long, value_name = "RATIO")]
    pub full_ratio: Option<f64>,
    /// Serve Prometheus metrics on /metrics at this host:port [default: off].
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    /// This OSD's keyfile (`avalonctl auth add osd.N`): mutual TLS.
    #[arg(long, value_name = "PATH")]
    pub keyfile: Option<PathBuf>,
    /// No TLS and no authentication (logged loudly at start).
    #[arg(long)]
    pub insecure: bool,
}

impl Config {
    /// Parses a TOML configuration.
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        Ok(toml::from_str(text)?)
    }

    /// Reads a TOML configuration file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        Config::from_toml(&text).map_err(|e| anyhow::anyhow!("bad config {}: {e}", path.display()))
    }

    /// The file named by `--config` (or the defaults) with the flags applied.
    pub fn from_cli(cli: Cli) -> anyhow::Result<Config> {
        let mut c = match &cli.config {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        if let Some(v) = cli.listen {
            c.listen = v;
        }
        if let Some(v) = cli.advertise {
            c.advertise = v;
        }
        if let Some(v) = cli.data_dir {
            c.data_dir = v;
        }
        if let Some(v) = cli.mds {
            c.mds = v.into_iter().filter(|s| !s.is_empty()).collect();
        }
        if let Some(v) = cli.failure_domain {
            c.failure_domain = v;
        }
        if let Some(v) = cli.capacity {
            c.capacity = v;
        }
        if let Some(v) = cli.heartbeat_ms {
            c.heartbeat_ms = v;
        }
        if let Some(v) = cli.log_level {
            c.log_level = v;
        }
        if let Some(v) = cli.log_format {
            c.log_format = v;
        }
        if let Some(v) = cli.slow_request_ms {
            c.slow_request_ms = v;
        }
        if let Some(v) = cli.forward_timeout_ms {
            c.forward_timeout_ms = v;
        }
        if let Some(v) = cli.scrub_interval_ms {
            c.scrub_interval_ms = v;
        }
        if let Some(v) = cli.gc_interval_ms {
            c.gc_interval_ms = v;
        }
        if let Some(v) = cli.recovery_bytes_per_sec {
            c.recovery_bytes_per_sec = v;
        }
        if let Some(v) = cli.nearfull_ratio {
            c.nearfull_ratio = v;
        }
        if let Some(v) = cli.full_ratio {
            c.full_ratio = v;
        }
        if let Some(v) = cli.metrics_addr {
            c.metrics_addr = Some(v);
        }
        if let Some(v) = cli.keyfile {
            c.security.keyfile = Some(v);
        }
        if cli.insecure {
            c.security.insecure = true;
        }
        c.validate()?;
        Ok(c)
    }

    /// Rejects unusable settings.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.mds.is_empty(), "no MDS address configured");
        anyhow::ensure!(self.heartbeat_ms > 0, "heartbeat_ms must be > 0");
        anyhow::ensure!(
            self.forward_timeout_ms > 0,
            "forward_timeout_ms must be > 0"
        );
        avalon_proto::disk_usage::check_ratios(self.nearfull_ratio, self.full_ratio)
            .map_err(|e| anyhow::anyhow!("bad disk ratios: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_defaults_and_overrides() {
        let c = Config::from_toml("").expect("empty");
        assert_eq!(c, Config::default());
        let c = Config::from_toml(
            "listen = \"0.0.0.0:7300\"\nmds = [\"a:1\", \"b:2\"]\nheartbeat_ms = 50\ncapacity = 10\n",
        )
        .expect("parse");
        assert_eq!(c.listen, "0.0.0.0:7300");
        assert_eq!(c.mds, vec!["a:1", "b:2"]);
        assert_eq!(c.heartbeat_ms, 50);
        assert_eq!(c.capacity, 10);
        assert_eq!(c.data_dir, Config::default().data_dir);
        assert!(Config::from_toml("bogus = 1").is_err());
        let c = Config::from_toml("nearfull_ratio = 0.5\nfull_ratio = 0.6\n").expect("ratios");
        assert!(c.validate().is_ok());
        let c = Config::from_toml("nearfull_ratio = 0.9\nfull_ratio = 0.8\n").expect("parse");
        assert!(c.validate().is_err(), "nearfull above full");
    }

    #[test]
    fn example_file_parses_to_defaults() {
        let text = include_str!("../osd.example.toml");
        assert_eq!(Config::from_toml(text).expect("example"), Config::default());
    }

    /// The example installed as /etc/avalon/osd.example.toml: valid as
    /// shipped, and every commented-out `# key = value` is a real key with
    /// its default value.
    #[test]
    fn packaged_example_parses() {
        let text = include_str!("../../packaging/etc/osd.example.toml");
        let c = Config::from_toml(text).expect("example as shipped");
        c.validate().expect("example valid");
        let all = avalon_proto::config_example::uncomment_settings(text);
        let every = Config::from_toml(&all).expect("example with every key");
        // The commented values are the defaults: only the keys set as
        // shipped differ.
        let expect = Config {
            listen: c.listen.clone(),
            data_dir: c.data_dir.clone(),
            mds: c.mds.clone(),
            metrics_addr: every.metrics_addr.clone(),
            // The one commented value that is an example, not a default.
            security: avalon_proto::tls::SecurityConfig {
                keyfile: Some("/etc/avalon/osd.1.key".into()),
                insecure: false,
            },
            ..Config::default()
        };
        assert!(every.metrics_addr.is_some());
        assert_eq!(every, expect);
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("osd.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:1\"\nfailure_domain = \"r1\"\n").expect("write");
        let cli = Cli::try_parse_from([
            "avalon-osd",
            "--config",
            f.to_str().expect("utf8"),
            "--listen",
            "127.0.0.1:2",
            "--mds",
            "x:1,y:2",
            "--log-format",
            "json",
        ])
        .expect("cli");
        let c = Config::from_cli(cli).expect("config");
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.listen, "127.0.0.1:2");
        assert_eq!(c.failure_domain, "r1");
        assert_eq!(c.mds, vec!["x:1", "y:2"]);
    }
}
