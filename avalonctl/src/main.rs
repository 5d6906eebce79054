//! `avalonctl`: the Avalon admin CLI.

use anyhow::{bail, Context};
use avalon_proto::pb;
use avalon_proto::tls::ClientTls;
use avalonctl::local_cluster::{self, LocalCluster, Options};
use avalonctl::status;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Duration;

mod generate;
mod top;

/// Administer Avalon clusters.
#[derive(Parser, Debug)]
#[command(name = "avalonctl", version, about)]
struct Cli {
    /// Keyfile to connect with (an admin key for admin commands) [default:
    /// DIR/keys/client.admin.key for a local cluster DIR, else
    /// /etc/avalon/client.admin.key].
    #[arg(long, global = true, env = "AVALON_KEYFILE", value_name = "PATH")]
    keyfile: Option<PathBuf>,
    /// Connect without TLS (to a cluster whose daemons run `insecure`).
    #[arg(long, global = true)]
    insecure: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// `--keyfile` and `--insecure`, set once in `main`.
static KEY_FLAGS: std::sync::OnceLock<(Option<PathBuf>, bool)> = std::sync::OnceLock::new();

/// Where the administrator's key is by default on a real cluster.
const DEFAULT_ADMIN_KEY: &str = "/etc/avalon/client.admin.key";

/// The TLS to connect with: `--insecure`, `--keyfile`, the local cluster
/// DIR's admin key, or the default admin key.
fn client_tls(dir: Option<&Path>) -> anyhow::Result<ClientTls> {
    let (key, insecure) = KEY_FLAGS.get().cloned().unwrap_or_default();
    if insecure {
        return Ok(ClientTls::plaintext());
    }
    if let Some(k) = key {
        return Ok(ClientTls::from_keyfile(&k)?);
    }
    if let Some(d) = dir {
        return local_cluster::load_layout(d)?.admin_tls(d);
    }
    ClientTls::from_keyfile(Path::new(DEFAULT_ADMIN_KEY)).with_context(|| {
        "no key to connect with: give --keyfile PATH (an admin key: `avalonctl auth add \
         client.admin`), or --insecure for a cluster without TLS"
    })
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a local cluster on 127.0.0.1 with all data under DIR, mount it
    /// at DIR/mnt and stay in the foreground; Ctrl-C unmounts and stops it.
    Up {
        /// Directory for data, logs and the mount point.
        dir: PathBuf,
        /// Number of MDS nodes (first start only).
        #[arg(long, default_value_t = 3)]
        mds: usize,
        /// Number of OSDs (first start only).
        #[arg(long, default_value_t = 3)]
        osds: usize,
        /// Start the daemons but do not mount.
        #[arg(long)]
        no_mount: bool,
        /// Log level of the daemons (RUST_LOG syntax).
        #[arg(long, default_value = "info")]
        log_level: String,
        /// No Prometheus metrics endpoints (first start only; by default
        /// every daemon and the mount serve /metrics on a port of their own).
        #[arg(long)]
        no_metrics: bool,
    },
    /// Stop the local cluster in DIR (started by `avalonctl up`).
    Down {
        dir: PathBuf,
        /// Seconds to wait for everything to stop.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Show every MDS, OSD and client with address, pid, state and role.
    Status {
        /// A local cluster directory (reads its layout).
        dir: Option<PathBuf>,
        /// MDS addresses instead of a directory: host:port[,host:port...]
        #[arg(long)]
        mds: Option<String>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// A live view of ops/s, latency and throughput per MDS, OSD and
    /// client, and the slowest OSDs (refreshed every second; q quits).
    Top {
        /// A local cluster directory (reads its layout).
        dir: Option<PathBuf>,
        /// MDS addresses instead of a directory: host:port[,host:port...]
        #[arg(long)]
        mds: Option<String>,
    },
    /// Add or remove metadata servers (raft membership).
    Mds {
        #[command(subcommand)]
        cmd: MdsCmd,
    },
    /// Object storage daemons: add one, take one out or back in.
    Osd {
        #[command(subcommand)]
        cmd: OsdCmd,
    },
    /// Cluster-wide settings (kept in the replicated MDS state): show them,
    /// or change the number of replicas, which re-replicates the data.
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// Wait until every placement group has its full set of current
    /// replicas (every member up and peered, nothing left to copy); shows
    /// progress. Exits 0 when healthy, 1 at the timeout.
    WaitHealthy {
        /// A local cluster directory (reads its layout).
        dir: Option<PathBuf>,
        /// MDS addresses instead of a directory: host:port[,host:port...]
        #[arg(long)]
        mds: Option<String>,
        /// Seconds to wait.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// The cluster's CA: `cluster init --dir DIR` makes it (ca.key 0600,
    /// ca.crt, cluster_id).
    Cluster {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Identities' keyfiles (key, certificate, CA certificate; 0600),
    /// signed by the cluster CA: `auth add mds.1|osd.3|client.NAME`,
    /// `auth ls`, `auth rm NAME`.
    Auth {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Recursive usage of directories in a mount, from the MDS's
    /// statistics (instant, whatever the tree's size): bytes, files,
    /// subdirectories.
    Du {
        /// Directories in an Avalon mount.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Sizes as 1.5G rather than bytes.
        #[arg(short = 'H', long)]
        human: bool,
    },
    /// Directory quotas on bytes and inodes (set by root only).
    Quota {
        #[command(subcommand)]
        cmd: QuotaCmd,
    },
    /// The trash of directories with `avalon.trash_seconds` set: list what
    /// removed files and directories it keeps, restore them with their data
    /// and attributes, or free the space now (admin only).
    Trash {
        #[command(subcommand)]
        cmd: TrashCmd,
    },
    /// Directory snapshots: read-only, copy-on-write copies of a directory
    /// tree, browsable on mounts under DIR/.snap/NAME (admin only; root on
    /// a mount can also `mkdir DIR/.snap/NAME` and `rmdir` it).
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
    /// Write man pages and bash/zsh completions under DIR (packaging).
    #[command(hide = true)]
    Generate { dir: PathBuf },
}

/// Which cluster a trash command talks to.
#[derive(clap::Args, Debug)]
struct ClusterArgs {
    /// A local cluster directory (reads its layout).
    #[arg(long, value_name = "DIR")]
    cluster: Option<PathBuf>,
    /// MDS addresses instead of a directory: host:port[,host:port...]
    #[arg(long)]
    mds: Option<String>,
}

#[derive(Subcommand, Debug)]
enum TrashCmd {
    /// List the entries (id, size, deletion and expiry times, original
    /// path) removed at or below PATH (a path from the filesystem root;
    /// default: all).
    Ls {
        path: Option<String>,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Put entry ID back with its data and attributes: at its original
    /// path (recreating removed directories above it from the trash), or
    /// at --to. A directory comes back with what was deleted from it.
    /// An existing name is never overwritten.
    Restore {
        id: u64,
        /// A path from the filesystem root: into it if it is a directory,
        /// else as it.
        #[arg(long, value_name = "PATH")]
        to: Option<String>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Free entry ID (with what was deleted from it if it is a directory),
    /// or everything with --all, now.
    Purge {
        id: Option<u64>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Take snapshot NAME of directory DIR (a path from the filesystem root).
    Create {
        dir: String,
        name: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// List the snapshots of DIR (default: all) with their ids and times.
    Ls {
        dir: Option<String>,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshot NAME of DIR; the OSDs then free the data only it kept.
    Rm {
        dir: String,
        name: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

fn snapshot_cmd(cmd: SnapshotCmd) -> anyhow::Result<()> {
    use avalonctl::snapshot;
    let addrs = |c: &ClusterArgs| mds_addrs(c.cluster.as_deref(), c.mds.as_deref());
    match cmd {
        SnapshotCmd::Create { dir, name, cluster } => {
            let (addrs, tls) = addrs(&cluster)?;
            let s = block_on(snapshot::create(&tls, &addrs, &dir, &name))?;
            println!(
                "snapshot {} of {} taken ({} inodes): {}/.snap/{name}",
                s.id,
                s.path,
                s.inodes,
                s.path.trim_end_matches('/')
            );
        }
        SnapshotCmd::Ls { dir, cluster, json } => {
            let (addrs, tls) = addrs(&cluster)?;
            let snaps = block_on(snapshot::list(&tls, &addrs, dir.as_deref()))?;
            if json {
                let v: Vec<serde_json::Value> = snaps
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "id": s.id,
                            "dir": s.dir,
                            "path": s.path,
                            "name": String::from_utf8_lossy(&s.name),
                            "created_ns": s.created_ns,
                            "inodes": s.inodes,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", snapshot::render(&snaps));
            }
        }
        SnapshotCmd::Rm { dir, name, cluster } => {
            let (addrs, tls) = addrs(&cluster)?;
            block_on(snapshot::remove(&tls, &addrs, &dir, &name))?;
            println!("snapshot {name} of {dir} removed");
        }
    }
    Ok(())
}

fn trash_cmd(cmd: TrashCmd) -> anyhow::Result<()> {
    use avalonctl::trash;
    let addrs = |c: &ClusterArgs| mds_addrs(c.cluster.as_deref(), c.mds.as_deref());
    match cmd {
        TrashCmd::Ls {
            path,
            cluster,
            json,
        } => {
            let (addrs, tls) = addrs(&cluster)?;
            let (entries, more) =
                block_on(trash::list(&tls, &addrs, path.as_deref().unwrap_or("")))?;
            if more {
                eprintln!(
                    "note: only the first {} entries (give a PATH to see others)",
                    entries.len()
                );
            }
            if json {
                let v: Vec<serde_json::Value> = entries
                    .iter()
                    .map(|e| {
                        let a = e.attr.unwrap_or_default();
                        serde_json::json!({
                            "id": e.id,
                            "path": e.path,
                            "ino": a.ino,
                            "mode": a.mode,
                            "uid": a.uid,
                            "gid": a.gid,
                            "size": a.size,
                            "deleted_ns": e.deleted_ns,
                            "expires_ns": e.expires_ns,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", trash::render(&entries));
            }
        }
        TrashCmd::Restore { id, to, cluster } => {
            let (addrs, tls) = addrs(&cluster)?;
            let r = block_on(trash::restore(&tls, &addrs, id, to.as_deref()))?;
            println!(
                "restored {} ({} inode{})",
                r.path,
                r.restored,
                if r.restored == 1 { "" } else { "s" }
            );
        }
        TrashCmd::Purge { id, all, cluster } => {
            if id.is_none() && !all {
                bail!("give an entry ID or --all");
            }
            let (addrs, tls) = addrs(&cluster)?;
            let n = block_on(trash::purge(&tls, &addrs, id.into_iter().collect(), all))?;
            println!("purged {n} entr{}", if n == 1 { "y" } else { "ies" });
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
enum QuotaCmd {
    /// Set the limits of a directory (0 lifts one).
    Set {
        /// A directory in an Avalon mount.
        path: PathBuf,
        /// Bytes below it: a size like 10G, 512M, 1000.
        #[arg(long)]
        max_bytes: Option<String>,
        /// Files and directories below it.
        #[arg(long)]
        max_files: Option<String>,
    },
    /// Show the limits and usage of a directory.
    Get {
        /// A directory in an Avalon mount.
        path: PathBuf,
    },
    /// List the quota directories at or below a directory, with usage.
    Ls {
        /// A directory in an Avalon mount (its mount point: all).
        path: PathBuf,
    },
}

fn quota_cmd(cmd: QuotaCmd) -> anyhow::Result<()> {
    use avalonctl::dir_quota::{self, limit};
    match cmd {
        QuotaCmd::Set {
            path,
            max_bytes,
            max_files,
        } => {
            if max_bytes.is_none() && max_files.is_none() {
                bail!("give --max-bytes and/or --max-files");
            }
            dir_quota::set_limits(&path, max_bytes.as_deref(), max_files.as_deref())?;
            Ok(())
        }
        QuotaCmd::Get { path } => {
            let l = dir_quota::limits(&path)?;
            let u = dir_quota::du(&path)?;
            println!("path       {}", path.display());
            println!(
                "bytes      {} used of {}",
                u.rbytes,
                limit(l.max_bytes, false)
            );
            println!(
                "inodes     {} used of {}",
                u.rfiles + u.rsubdirs,
                limit(l.max_files, false)
            );
            Ok(())
        }
        QuotaCmd::Ls { path } => {
            println!(
                "{:<40} {:>10} {:>10} {:>12} {:>12}",
                "PATH", "MAX_BYTES", "USED", "MAX_INODES", "USED_INODES"
            );
            for q in dir_quota::list(&path)? {
                println!(
                    "{:<40} {:>10} {:>10} {:>12} {:>12}",
                    path.join(&q.path).display(),
                    limit(q.limits.max_bytes, true),
                    dir_quota::human(q.used_bytes),
                    limit(q.limits.max_files, false),
                    q.used_inodes
                );
            }
            Ok(())
        }
    }
}

fn du_cmd(paths: &[PathBuf], human: bool) -> anyhow::Result<()> {
    for p in paths {
        let u = avalonctl::dir_quota::du(p)?;
        let bytes = if human {
            avalonctl::dir_quota::human(u.rbytes)
        } else {
            u.rbytes.to_string()
        };
        println!("{bytes}\t{}\t{}\t{}", u.rfiles, u.rsubdirs, p.display());
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
enum PoolCmd {
    /// Print the cluster id, replicas, write quorum, placement groups,
    /// chunk size and failure-domain rule.
    Show {
        /// A local cluster directory (reads its layout).
        dir: Option<PathBuf>,
        /// MDS addresses instead of a directory: host:port[,host:port...]
        #[arg(long)]
        mds: Option<String>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// `pool set [DIR] replicas N`: keep N copies of every chunk. The OSDs
    /// copy chunks to new members (or drop surplus copies); a progress bar
    /// follows until every PG has its N current copies.
    Set {
        /// [DIR] replicas N
        #[arg(num_args = 2..=3, required = true)]
        args: Vec<String>,
        /// New write quorum (default: the current one, at most N).
        #[arg(long)]
        write_quorum: Option<u32>,
        /// MDS addresses instead of a directory: host:port[,host:port...]
        #[arg(long)]
        mds: Option<String>,
        /// Return once the change is committed; do not follow the copying.
        #[arg(long)]
        no_wait: bool,
        /// Set more replicas than there are OSDs in (placement stays
        /// degraded until enough OSDs are added).
        #[arg(long)]
        force: bool,
        /// Seconds to wait for re-replication.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
}

fn pool_cmd(cmd: PoolCmd) -> anyhow::Result<()> {
    use avalonctl::pool;
    match cmd {
        PoolCmd::Show { dir, mds, json } => {
            let (addrs, tls) = mds_addrs(dir.as_deref(), mds.as_deref())?;
            let s = block_on(pool::get(&tls, &addrs))?;
            if json {
                let v = serde_json::json!({
                    "cluster_id": s.cluster_id,
                    "replicas": s.replicas,
                    "write_quorum": s.write_quorum,
                    "pg_count": s.pg_count,
                    "chunk_size": s.chunk_size,
                    "failure_domain_rule": s.failure_domain_rule,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", pool::render(&s));
            }
            Ok(())
        }
        PoolCmd::Set {
            args,
            write_quorum,
            mds,
            no_wait,
            force,
            timeout,
        } => {
            let (dir, key, value) = match args.as_slice() {
                [dir, k, v] => (Some(PathBuf::from(dir)), k, v),
                [k, v] => (None, k, v),
                _ => bail!("usage: pool set [DIR] replicas N"),
            };
            if key != "replicas" {
                bail!("only `replicas` can be changed (pg count, chunk size, failure-domain rule and cluster id are fixed when the cluster is created)");
            }
            let replicas: u32 = value
                .parse()
                .with_context(|| format!("bad number of replicas {value:?}"))?;
            let (addrs, tls) = mds_addrs(dir.as_deref(), mds.as_deref())?;
            let before = block_on(pool::get(&tls, &addrs))?;
            let st = block_on(async {
                Ok(status::collect(&tls, &addrs, Duration::from_secs(2)).await)
            })?;
            let in_osds = st.osds.iter().filter(|o| o.state != "out").count();
            if st.leader_id.is_some() && replicas as usize > in_osds && !force {
                bail!(
                    "only {in_osds} OSDs are in: {replicas} copies cannot be placed (the cluster would stay degraded); add OSDs first, or give --force"
                );
            }
            let s = block_on(pool::set_replicas(
                &tls,
                &addrs,
                replicas,
                write_quorum.unwrap_or(0),
            ))?;
            println!(
                "replicas {} -> {}, write quorum {} -> {} (committed to the cluster's settings)",
                before.replicas, s.replicas, before.write_quorum, s.write_quorum
            );
            println!(
                "note: an MDS whose config file or flags set `replicas`/`write_quorum` to other values will refuse to start; update or remove them"
            );
            if no_wait {
                return Ok(());
            }
            if wait_healthy(&tls, &addrs, Duration::from_secs(timeout))? {
                Ok(())
            } else {
                std::process::exit(1);
            }
        }
    }
}

#[derive(Subcommand, Debug)]
enum OsdCmd {
    /// Start one more OSD for a cluster of `avalonctl up DIR` (next
    /// ordinal, free port, data in DIR/osd{n}, recorded in
    /// DIR/cluster.toml, stopped by `avalonctl down DIR`). It registers,
    /// takes its share of PGs and receives their data in the background.
    Add {
        dir: PathBuf,
        /// Log level of the OSD.
        #[arg(long, default_value = "info")]
        log_level: String,
    },
    /// Take OSD ID out of placement by hand: its PGs get new members, which
    /// copy the data; it stays out (also across restarts) until `osd in`.
    Out(OsdTarget),
    /// Put OSD ID back into placement.
    In(OsdTarget),
    /// Like `out`, then wait until the data is re-replicated without it
    /// (the new members copy from the PG's remaining members). Keep the OSD
    /// running meanwhile: its garbage collection drops each copy only once
    /// every new member holds it; afterwards it can be stopped.
    Drain {
        #[command(flatten)]
        target: OsdTarget,
        /// Seconds to wait for re-replication.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
}

#[derive(clap::Args, Debug)]
struct OsdTarget {
    /// [DIR] ID: a local cluster directory (optional) and the OSD id (as
    /// `avalonctl status` shows it).
    #[arg(num_args = 1..=2, required = true)]
    args: Vec<String>,
    /// MDS addresses instead of a directory: host:port[,host:port...]
    #[arg(long)]
    mds: Option<String>,
}

impl OsdTarget {
    fn resolve(&self) -> anyhow::Result<(Vec<String>, ClientTls, u64)> {
        let (dir, id) = match self.args.as_slice() {
            [dir, id] => (Some(PathBuf::from(dir)), id),
            [id] => (None, id),
            _ => bail!("give [DIR] ID"),
        };
        let id: u64 = id.parse().with_context(|| format!("bad OSD id {id:?}"))?;
        let (addrs, tls) = mds_addrs(dir.as_deref(), self.mds.as_deref())?;
        Ok((addrs, tls, id))
    }
}

async fn set_osd_state(
    tls: &ClientTls,
    addrs: &[String],
    id: u64,
    state: &str,
) -> anyhow::Result<()> {
    let conn = avalon_proto::mds_conn::MdsConn::new(addrs.to_vec(), tls.clone());
    let req = avalon_proto::pb::SetOsdStateRequest {
        header: None,
        osd_id: id,
        state: state.to_string(),
    };
    conn.call_within(Duration::from_secs(30), |mut c| {
        let r = req.clone();
        async move { c.set_osd_state(r).await }
    })
    .await
    .map_err(|s| anyhow::anyhow!("setting OSD {id} {state}: {}", s.message()))?;
    Ok(())
}

/// Polls the cluster until PGs are healthy; prints progress to stderr: a
/// bar redrawn in place on a terminal (indicatif), else a line per change.
fn wait_healthy(tls: &ClientTls, addrs: &[String], timeout: Duration) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = std::time::Instant::now() + timeout;
    let mut peak_bytes = 0u64;
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let b = indicatif::ProgressBar::new(100);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("[{bar:20}] {pos:>3}%  {wide_msg}")
        {
            b.set_style(style.progress_chars("#>-"));
        }
        b
    });
    let mut last = String::new();
    loop {
        let st = rt.block_on(status::collect(tls, addrs, Duration::from_secs(2)));
        let p = &st.pgs;
        peak_bytes = peak_bytes.max(p.recovery_bytes);
        let done =
            avalonctl::pool::percent_done(p.pg_copies, p.recovering, p.recovery_bytes, peak_bytes);
        let text = if st.leader_id.is_none() {
            "no MDS leader".to_string()
        } else {
            format!(
                "{} PGs: {} degraded, {} recovering, {} to copy{}",
                p.pg_count,
                p.degraded,
                p.recovering,
                status::human(p.recovery_bytes),
                if p.stale_reports > 0 {
                    format!(", waiting for {} OSD reports", p.stale_reports)
                } else {
                    String::new()
                }
            )
        };
        match &bar {
            Some(b) => {
                b.set_position(done);
                b.set_message(text);
            }
            None => {
                let line = if st.leader_id.is_none() {
                    text
                } else {
                    format!(
                        "[{:<20}] {:>3}%  {text}",
                        "#".repeat((done / 5) as usize),
                        done
                    )
                };
                if line != last {
                    eprintln!("{line}");
                }
                last = line;
            }
        }
        if st.leader_id.is_some() && p.healthy {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            println!(
                "healthy: {} PGs with {} current replicas each",
                p.pg_count, st.replicas
            );
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            if let Some(b) = &bar {
                b.abandon();
            }
            eprintln!("not healthy after {timeout:?}");
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn osd_cmd(cmd: OsdCmd) -> anyhow::Result<()> {
    match cmd {
        OsdCmd::Add { dir, log_level } => {
            let spec = local_cluster::add_osd_detached(
                &dir,
                &local_cluster::default_bin_dir(),
                &log_level,
            )?;
            println!(
                "started osd{} at {} (data {}); it registers with the MDS and takes its share of PGs",
                spec.id,
                spec.addr,
                dir.join(format!("osd{}", spec.id)).display()
            );
            Ok(())
        }
        OsdCmd::Out(t) => {
            let (addrs, tls, id) = t.resolve()?;
            block_on(set_osd_state(&tls, &addrs, id, "out"))?;
            println!("OSD {id} is out; its PGs move to other OSDs");
            Ok(())
        }
        OsdCmd::In(t) => {
            let (addrs, tls, id) = t.resolve()?;
            block_on(set_osd_state(&tls, &addrs, id, "in"))?;
            println!("OSD {id} is in");
            Ok(())
        }
        OsdCmd::Drain { target, timeout } => {
            let (addrs, tls, id) = target.resolve()?;
            block_on(set_osd_state(&tls, &addrs, id, "drain"))?;
            println!("OSD {id} is draining; keep it running until the data is re-replicated");
            if wait_healthy(&tls, &addrs, Duration::from_secs(timeout))? {
                println!("OSD {id} is drained and can be stopped");
                Ok(())
            } else {
                std::process::exit(1);
            }
        }
    }
}

#[derive(Subcommand, Debug)]
enum MdsCmd {
    /// Add an MDS. With DIR (a cluster of `avalonctl up`): start a new MDS
    /// process (new id, free port, recorded in DIR/cluster.toml) and add
    /// it. With --mds/--id/--addr: add a node you started yourself with
    /// `avalon-mds --id N --listen HOST:PORT --join ...`.
    Add {
        /// A local cluster directory.
        dir: Option<PathBuf>,
        /// Current MDS addresses: host:port[,host:port...]
        #[arg(long)]
        mds: Option<String>,
        /// Raft id of the node to add (with --mds).
        #[arg(long)]
        id: Option<u64>,
        /// Address of the node to add (with --mds).
        #[arg(long)]
        addr: Option<String>,
        /// Log level of a started MDS.
        #[arg(long, default_value = "info")]
        log_level: String,
        /// Seconds to wait for the change.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Remove an MDS: `mds remove DIR ID` (also stops its process) or
    /// `mds remove --mds ADDRS ID`.
    Remove {
        /// [DIR] ID
        #[arg(num_args = 1..=2, required = true)]
        args: Vec<String>,
        /// Current MDS addresses: host:port[,host:port...]
        #[arg(long)]
        mds: Option<String>,
        /// Seconds to wait for the change.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn mds_cmd(cmd: MdsCmd) -> anyhow::Result<()> {
    use avalonctl::mds_admin;
    match cmd {
        MdsCmd::Add {
            dir,
            mds,
            id,
            addr,
            log_level,
            timeout,
        } => {
            if let Some(list) = mds {
                let (Some(id), Some(addr)) = (id, addr) else {
                    bail!("with --mds give --id N and --addr HOST:PORT of the node to add");
                };
                let (addrs, tls) = mds_addrs(None, Some(&list))?;
                block_on(mds_admin::add_mds(
                    &tls,
                    &addrs,
                    id,
                    &addr,
                    Duration::from_secs(timeout),
                ))?;
                println!("added MDS {id} at {addr}");
                return Ok(());
            }
            let Some(dir) = dir else {
                bail!("give a cluster directory or --mds ADDRS --id N --addr HOST:PORT");
            };
            let spec = local_cluster::add_mds_detached(
                &dir,
                &local_cluster::default_bin_dir(),
                &log_level,
            )?;
            println!("added MDS {} at {}", spec.id, spec.addr);
            Ok(())
        }
        MdsCmd::Remove { args, mds, timeout } => {
            let (dir, id) = match args.as_slice() {
                [dir, id] => (Some(PathBuf::from(dir)), id),
                [id] => (None, id),
                _ => bail!("usage: mds remove DIR ID | mds remove --mds ADDRS ID"),
            };
            let id: u64 = id.parse().with_context(|| format!("bad MDS id {id:?}"))?;
            match (dir, mds) {
                (_, Some(list)) => {
                    let (addrs, tls) = mds_addrs(None, Some(&list))?;
                    block_on(mds_admin::remove_mds(
                        &tls,
                        &addrs,
                        id,
                        Duration::from_secs(timeout),
                    ))?;
                }
                (Some(dir), None) => local_cluster::remove_mds_in_dir(&dir, id)?,
                (None, None) => bail!("give a cluster directory or --mds ADDRS"),
            }
            println!("removed MDS {id}");
            Ok(())
        }
    }
}

/// The MDS addresses (`--mds`, or the local cluster DIR's) and the TLS to
/// reach them with.
fn mds_addrs(dir: Option<&Path>, mds: Option<&str>) -> anyhow::Result<(Vec<String>, ClientTls)> {
    let tls = client_tls(if mds.is_some() { None } else { dir })?;
    if let Some(list) = mds {
        let addrs = list
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        return Ok((addrs, tls));
    }
    let Some(dir) = dir else {
        bail!("give a cluster directory or --mds host:port[,host:port...]");
    };
    let path = dir.join("cluster.toml");
    let s = std::fs::read_to_string(&path)
        .with_context(|| format!("no cluster layout at {}", path.display()))?;
    let layout: local_cluster::Layout =
        toml::from_str(&s).with_context(|| format!("bad layout in {}", path.display()))?;
    Ok((layout.mds_addrs(), tls))
}

fn up(
    dir: PathBuf,
    mds: usize,
    osds: usize,
    no_mount: bool,
    log_level: String,
    metrics: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("run"))?;
    let up_pid = dir.join("run").join("up.pid");
    if let Some(pid) = std::fs::read_to_string(&up_pid)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        if pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
            bail!("a cluster is already running in {} (avalonctl up, pid {pid}); stop it with avalonctl down", dir.display());
        }
    }
    std::fs::write(&up_pid, std::process::id().to_string())?;
    // Signals are handled by a thread that waits for them.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut opts = Options::new();
    opts.mds = mds;
    opts.osds = osds;
    // `avalonctl --insecure up DIR`: a new cluster without TLS (kept in its layout).
    opts.insecure = KEY_FLAGS.get().is_some_and(|f| f.1);
    opts.mount = !no_mount;
    opts.log_level = log_level;
    opts.metrics = metrics;
    eprintln!("starting Avalon in {} ...", dir.display());
    let cluster = LocalCluster::start(&dir, opts);
    let mut cluster = match cluster {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&up_pid);
            return Err(e);
        }
    };
    let st = cluster.status();
    println!("{}", status::render(&st));
    println!("data:   {}", cluster.dir.display());
    println!("logs:   {}", cluster.dir.join("logs").display());
    if !no_mount {
        println!(
            "mount:  {} (source {})",
            cluster.mountpoint().display(),
            cluster.layout.source()
        );
    }
    for (name, addr) in cluster.layout.metrics_addrs() {
        println!("metrics: {name:<7} http://{addr}/metrics");
    }
    // Every MDS serves the page (a follower redirects to the leader's).
    let page = st
        .mds
        .iter()
        .filter(|m| !m.metrics_addr.is_empty())
        .min_by_key(|m| m.role != "leader");
    if let Some(m) = page {
        println!("status page: http://{}/status", m.metrics_addr);
    }
    println!(
        "by hand: mount -t fuse.avalon {} /some/dir   |   avalonctl status {}",
        cluster.layout.source(),
        cluster.dir.display()
    );
    println!(
        "Ctrl-C (or avalonctl down {}) unmounts and stops everything.",
        cluster.dir.display()
    );
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {}, _ = hup.recv() => {} }
        Ok::<_, anyhow::Error>(())
    })?;
    eprintln!("stopping ...");
    cluster.stop();
    let _ = std::fs::remove_file(&up_pid);
    eprintln!("stopped.");
    Ok(())
}

#[derive(Subcommand, Debug)]
enum KeyCmd {
    /// Make the cluster CA (and a new cluster id) in DIR.
    Init {
        /// Key directory.
        #[arg(long, default_value = "/etc/avalon")]
        dir: PathBuf,
        /// Cluster id to put in the certificates [default: random].
        #[arg(long)]
        cluster_id: Option<String>,
    },
    /// Make NAME's keyfile (DIR/NAME.key): mds.N, osd.N, client.NAME
    /// (client.admin may run admin commands). With capability flags (and
    /// --mds), also limits the client on the MDS.
    Add {
        name: String,
        /// Key directory (holding the CA).
        #[arg(long, default_value = "/etc/avalon")]
        dir: PathBuf,
        #[command(flatten)]
        caps: CapsArgs,
    },
    /// Set client.NAME's capabilities on the MDS (replacing its old ones;
    /// no flags: full access).
    Caps {
        name: String,
        #[command(flatten)]
        caps: CapsArgs,
    },
    /// List the identities with a keyfile in DIR.
    Ls {
        #[arg(long, default_value = "/etc/avalon")]
        dir: PathBuf,
        /// Also list the client capabilities (subtree, read-only,
        /// root_squash, uid/gid mapping) set at these MDS addresses.
        #[arg(long)]
        mds: Option<String>,
    },
    /// Delete NAME's keyfile from DIR; with --mds, also revoke client.NAME
    /// on the MDS (its sessions end within a lease; its certificate is
    /// refused from then on).
    Rm {
        name: String,
        #[arg(long, default_value = "/etc/avalon")]
        dir: PathBuf,
        /// MDS addresses (host:port[,...]) to revoke the client at.
        #[arg(long)]
        mds: Option<String>,
    },
}

/// A client key's capabilities (`auth add|caps`), enforced by the MDS.
#[derive(clap::Args, Debug)]
struct CapsArgs {
    /// MDS addresses (host:port[,...]) to set the capabilities at.
    #[arg(long)]
    mds: Option<String>,
    /// Confine the client to this subtree (its mounts' root).
    #[arg(long)]
    path: Option<String>,
    /// Refuse every change with EROFS.
    #[arg(long)]
    read_only: bool,
    /// uid/gid 0 become --squash-uid/--squash-gid.
    #[arg(long)]
    root_squash: bool,
    #[arg(long, default_value_t = 65534)]
    squash_uid: u32,
    #[arg(long, default_value_t = 65534)]
    squash_gid: u32,
    /// Map client uids to cluster uids: CLIENT:CLUSTER[:COUNT] (several
    /// allowed). Once mapped, an unmapped uid is --squash-uid.
    #[arg(long, value_name = "CLIENT:CLUSTER[:COUNT]", value_parser = parse_id_range)]
    map_uid: Vec<pb::IdRange>,
    /// Map client gids to cluster gids, as --map-uid.
    #[arg(long, value_name = "CLIENT:CLUSTER[:COUNT]", value_parser = parse_id_range)]
    map_gid: Vec<pb::IdRange>,
}

/// `CLIENT:CLUSTER[:COUNT]` (COUNT 1 when absent).
fn parse_id_range(s: &str) -> Result<pb::IdRange, String> {
    let n: Vec<u32> = s
        .split(':')
        .map(|p| p.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{s:?}: expected CLIENT:CLUSTER[:COUNT] (numbers)"))?;
    let (client, cluster, count) = match n.as_slice() {
        [a, b] => (*a, *b, 1),
        [a, b, c] => (*a, *b, *c),
        _ => return Err(format!("{s:?}: expected CLIENT:CLUSTER[:COUNT]")),
    };
    let fits = |from: u32| u64::from(from) + u64::from(count) <= 1 << 32;
    if count == 0 || !fits(client) || !fits(cluster) {
        return Err(format!("{s:?}: COUNT >= 1 and ids within 32 bits"));
    }
    Ok(pb::IdRange {
        client,
        cluster,
        count,
    })
}

/// `CLIENT:CLUSTER:COUNT,...` for listings.
fn show_ranges(r: &[pb::IdRange]) -> String {
    let v: Vec<String> = r
        .iter()
        .map(|r| format!("{}:{}:{}", r.client, r.cluster, r.count))
        .collect();
    v.join(",")
}

impl CapsArgs {
    fn limited(&self) -> bool {
        self.path.is_some()
            || self.read_only
            || self.root_squash
            || !self.map_uid.is_empty()
            || !self.map_gid.is_empty()
    }

    fn to_pb(&self, name: &str) -> pb::ClientCaps {
        pb::ClientCaps {
            name: name.to_string(),
            path: self.path.clone().unwrap_or_default(),
            read_only: self.read_only,
            root_squash: self.root_squash,
            squash_uid: self.squash_uid,
            squash_gid: self.squash_gid,
            revoked: false,
            uid_map: self.map_uid.clone(),
            gid_map: self.map_gid.clone(),
        }
    }
}

/// The key `auth` talks to the MDS with: --keyfile, else DIR's
/// client.admin.key, else the default.
fn caps_admin_tls(dir: Option<&Path>) -> anyhow::Result<ClientTls> {
    let admin = dir.map(|d| avalonctl::keys::keyfile(d, avalonctl::keys::ADMIN));
    Ok(match (KEY_FLAGS.get().and_then(|k| k.0.clone()), admin) {
        (None, Some(a)) if a.exists() && !KEY_FLAGS.get().is_some_and(|k| k.1) => {
            ClientTls::from_keyfile(&a)?
        }
        _ => client_tls(None)?,
    })
}

/// The client capabilities set at the MDS at `mds`.
fn list_caps(dir: &Path, mds: &str) -> anyhow::Result<Vec<pb::ClientCaps>> {
    let tls = caps_admin_tls(Some(dir))?;
    let addrs: Vec<String> = mds
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let r = block_on(async move {
        let conn = avalon_proto::mds_conn::MdsConn::new(addrs, tls);
        conn.call_within(Duration::from_secs(30), |mut c| async move {
            c.list_client_caps(pb::Empty {}).await
        })
        .await
        .map_err(|s| anyhow::anyhow!("listing client capabilities: {}", s.message()))
    })?;
    Ok(r.caps)
}

/// One line for a client's capabilities in `auth ls`.
fn describe_caps(c: &pb::ClientCaps) -> String {
    if c.revoked {
        return "revoked".into();
    }
    let mut v = vec![format!(
        "path={}",
        if c.path.is_empty() { "/" } else { &c.path }
    )];
    v.push(if c.read_only { "ro" } else { "rw" }.into());
    if c.root_squash {
        v.push("root_squash".into());
    }
    if c.root_squash || !c.uid_map.is_empty() || !c.gid_map.is_empty() {
        v.push(format!("squash={}:{}", c.squash_uid, c.squash_gid));
    }
    if !c.uid_map.is_empty() {
        v.push(format!("map_uid={}", show_ranges(&c.uid_map)));
    }
    if !c.gid_map.is_empty() {
        v.push(format!("map_gid={}", show_ranges(&c.gid_map)));
    }
    v.join(" ")
}

/// Sends client capabilities (or their removal) to the MDS at `mds`.
fn send_caps(
    dir: Option<&Path>,
    mds: &str,
    caps: pb::ClientCaps,
    clear: bool,
) -> anyhow::Result<()> {
    let tls = caps_admin_tls(dir)?;
    let addrs: Vec<String> = mds
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let name = caps.name.clone();
    block_on(async move {
        let conn = avalon_proto::mds_conn::MdsConn::new(addrs, tls);
        let req = pb::SetClientCapsRequest {
            header: None,
            caps: Some(caps),
            clear,
        };
        conn.call_within(Duration::from_secs(30), |mut c| {
            let r = req.clone();
            async move { c.set_client_caps(r).await }
        })
        .await
        .map_err(|s| anyhow::anyhow!("setting the capabilities of {name}: {}", s.message()))
    })?;
    Ok(())
}

fn auth_cmd(cmd: KeyCmd) -> anyhow::Result<()> {
    use avalonctl::keys;
    match cmd {
        KeyCmd::Init { dir, cluster_id } => {
            let id = keys::init(&dir, cluster_id.as_deref())?;
            println!(
                "cluster CA for cluster {id} in {}; next: avalonctl auth add NAME --dir {}",
                dir.display(),
                dir.display()
            );
        }
        KeyCmd::Add { name, dir, caps } => {
            if caps.limited() && caps.mds.is_none() {
                bail!("capability flags need --mds host:port to set them at");
            }
            let p = keys::add(&dir, &name)?;
            if let Some(mds) = &caps.mds {
                send_caps(Some(&dir), mds, caps.to_pb(&name), !caps.limited())?;
            }
            println!("{}", p.display());
        }
        KeyCmd::Caps { name, caps } => {
            let Some(mds) = &caps.mds else {
                bail!("give --mds host:port");
            };
            send_caps(None, mds, caps.to_pb(&name), !caps.limited())?;
        }
        KeyCmd::Ls { dir, mds } => {
            let caps = match &mds {
                Some(m) => list_caps(&dir, m)?,
                None => Vec::new(),
            };
            for n in keys::list(&dir)? {
                match caps.iter().find(|c| c.name == n) {
                    Some(c) => println!("{n}\t{}", describe_caps(c)),
                    None if mds.is_some() && n.starts_with("client.") => {
                        println!("{n}\tfull access")
                    }
                    None => println!("{n}"),
                }
            }
            for c in caps
                .iter()
                .filter(|c| !keys::keyfile(&dir, &c.name).exists())
            {
                println!(
                    "{}\t{} (no keyfile in {})",
                    c.name,
                    describe_caps(c),
                    dir.display()
                );
            }
        }
        KeyCmd::Rm { name, dir, mds } => {
            if let Some(mds) = &mds {
                let caps = pb::ClientCaps {
                    name: name.clone(),
                    revoked: true,
                    ..Default::default()
                };
                send_caps(Some(&dir), mds, caps, false)?;
                eprintln!("revoked {name} on the MDS");
            }
            match keys::remove(&dir, &name) {
                Ok(()) => eprintln!("removed {}", keys::keyfile(&dir, &name).display()),
                Err(e) if mds.is_some() => eprintln!("{e:#}"),
                Err(e) => return Err(e),
            }
            if mds.is_none() {
                eprintln!(
                    "note: not revoked on the servers (give --mds to revoke; a copy of the key \
                     works until then)"
                );
            }
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let _ = KEY_FLAGS.set((cli.keyfile.clone(), cli.insecure));
    match cli.cmd {
        Cmd::Cluster { cmd } => auth_cmd(cmd),
        Cmd::Auth { cmd } => auth_cmd(cmd),
        Cmd::Up {
            dir,
            mds,
            osds,
            no_mount,
            log_level,
            no_metrics,
        } => up(dir, mds, osds, no_mount, log_level, !no_metrics),
        Cmd::Mds { cmd } => mds_cmd(cmd),
        Cmd::Osd { cmd } => osd_cmd(cmd),
        Cmd::Pool { cmd } => pool_cmd(cmd),
        Cmd::WaitHealthy { dir, mds, timeout } => {
            let (addrs, tls) = mds_addrs(dir.as_deref(), mds.as_deref())?;
            if wait_healthy(&tls, &addrs, Duration::from_secs(timeout))? {
                Ok(())
            } else {
                std::process::exit(1);
            }
        }
        Cmd::Generate { dir } => {
            use clap::CommandFactory;
            generate::write_all(Cli::command(), &dir)
                .with_context(|| format!("writing man pages and completions to {}", dir.display()))
        }
        Cmd::Du { paths, human } => du_cmd(&paths, human),
        Cmd::Quota { cmd } => quota_cmd(cmd),
        Cmd::Trash { cmd } => trash_cmd(cmd),
        Cmd::Snapshot { cmd } => snapshot_cmd(cmd),
        Cmd::Down { dir, timeout } => local_cluster::down(&dir, Duration::from_secs(timeout)),
        Cmd::Top { dir, mds } => {
            let (addrs, tls) = mds_addrs(dir.as_deref(), mds.as_deref())?;
            top::run(tls, addrs)
        }
        Cmd::Status { dir, mds, json } => {
            let (addrs, tls) = mds_addrs(dir.as_deref(), mds.as_deref())?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let st = rt.block_on(status::collect(&tls, &addrs, Duration::from_secs(2)));
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", status::render(&st));
            }
            if st.leader_id.is_none() {
                std::process::exit(2);
            }
            Ok(())
        }
    }
}
