//! The cluster under test: 3 MDS and 3 OSD processes, each listening on
//! and connecting out from its own loopback address (MDS n on
//! 127.N.0.(10+n), OSD n on 127.N.0.(20+n)), and FUSE mounts of it by the
//! real `avalon-fuse` (mount i connecting from 127.N.0.(31+i)); N is the
//! cluster's network, 0 unless clusters run side by side. Unlike
//! `avalonctl`'s local cluster, each daemon can be stopped, paused and
//! restarted with its own fail points, and the network between any of
//! them cut ([`crate::partition`]). Dropping it heals the network,
//! resumes, unmounts and kills everything, also when the harness panics.

use crate::partition::Partition;
use anyhow::{anyhow, bail, Context};
use avalon_proto::tls::ClientTls;
use avalonctl::local_cluster::{mds_args, osd_args, spawn_client, unmount, Layout, NodeSpec};
use avalonctl::status::{self, ClusterStatus};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// MDS with this raft id.
    Mds(u64),
    /// OSD with this layout ordinal.
    Osd(u64),
}

/// One daemon process.
#[derive(Debug)]
pub struct Daemon {
    /// `mds1`, `osd2`...
    pub name: String,
    pub role: Role,
    child: Option<Child>,
    /// Stopped with SIGSTOP.
    pub paused: bool,
    /// `FAILPOINTS` it was started with.
    pub failpoints: Option<String>,
}

/// One FUSE mount.
#[derive(Debug)]
pub struct Mount {
    /// Mount point.
    pub path: PathBuf,
    child: Child,
}

/// The cluster and its mounts.
pub struct Cluster {
    /// Everything lives here: data dirs, logs, mount points.
    pub dir: PathBuf,
    bin_dir: PathBuf,
    /// Nodes and addresses.
    pub layout: Layout,
    /// Daemons, MDS first.
    pub daemons: Vec<Daemon>,
    /// The mounts.
    pub mounts: Vec<Mount>,
    /// The administrator's TLS (`DIR/keys`), for status queries.
    pub tls: ClientTls,
    /// Second octet of every address (127.N.0.x).
    net: u8,
    /// The network cut in place, if any.
    partition: Option<Partition>,
}

/// A free port on `ip` (closed again before returning).
fn free_port(ip: &str) -> anyhow::Result<u16> {
    Ok(TcpListener::bind(format!("{ip}:0"))
        .with_context(|| format!("cannot bind {ip}"))?
        .local_addr()?
        .port())
}

impl Cluster {
    /// Starts `mds` MDS and `osds` OSDs in `dir` (fresh), waits until they
    /// are healthy and mounts the filesystem `mounts` times.
    pub fn start(
        dir: &Path,
        bin_dir: &Path,
        mds: u64,
        osds: u64,
        mounts: usize,
    ) -> anyhow::Result<Cluster> {
        Self::start_on(dir, bin_dir, mds, osds, mounts, 0)
    }

    /// As [`Cluster::start`], on addresses 127.`net`.0.x: clusters whose
    /// networks are cut must not share addresses with others running at
    /// the same time.
    pub fn start_on(
        dir: &Path,
        bin_dir: &Path,
        mds: u64,
        osds: u64,
        mounts: usize,
        net: u8,
    ) -> anyhow::Result<Cluster> {
        // Before any mount: see `partition::prepare`.
        if let Err(e) = crate::partition::prepare() {
            eprintln!("cluster: no shell for nft: {e}");
        }
        // A cut left by a run killed mid-fault would still drop this
        // cluster's traffic (the same addresses): an MDS 1 cut off from
        // the others stays a candidate forever, the others learners.
        match crate::partition::remove_stale() {
            Ok(removed) if !removed.is_empty() => {
                eprintln!("cluster: removed stale nftables tables {removed:?}");
            }
            _ => {}
        }
        std::fs::create_dir_all(dir.join("logs"))?;
        let dir = std::fs::canonicalize(dir)?;
        for b in ["avalon-mds", "avalon-osd", "avalon-fuse"] {
            if !bin_dir.join(b).exists() {
                bail!(
                    "{b} not found in {} (build the workspace first)",
                    bin_dir.display()
                );
            }
        }
        let node = |id: u64, ip: String| -> anyhow::Result<NodeSpec> {
            Ok(NodeSpec {
                id,
                addr: format!("{ip}:{}", free_port(&ip)?),
                join: false,
                metrics_addr: None,
            })
        };
        let layout = Layout {
            mds: (1..=mds)
                .map(|i| node(i, format!("127.{net}.0.{}", 10 + i)))
                .collect::<anyhow::Result<_>>()?,
            osds: (1..=osds)
                .map(|i| node(i, format!("127.{net}.0.{}", 20 + i)))
                .collect::<anyhow::Result<_>>()?,
            replicas: 3.min(osds as u32),
            write_quorum: 2.min(osds as u32),
            mds_flags: Vec::new(),
            osd_flags: Vec::new(),
            client_metrics_addr: None,
            insecure: false,
        };
        avalonctl::local_cluster::ensure_keys(&dir, &layout)?;
        let tls = layout.admin_tls(&dir)?;
        let mut c = Cluster {
            tls,
            dir,
            bin_dir: bin_dir.to_path_buf(),
            daemons: Vec::new(),
            mounts: Vec::new(),
            layout,
            net,
            partition: None,
        };
        for n in c.layout.mds.clone() {
            c.daemons.push(Daemon {
                name: format!("mds{}", n.id),
                role: Role::Mds(n.id),
                child: None,
                paused: false,
                failpoints: None,
            });
        }
        for n in c.layout.osds.clone() {
            c.daemons.push(Daemon {
                name: format!("osd{}", n.id),
                role: Role::Osd(n.id),
                child: None,
                paused: false,
                failpoints: None,
            });
        }
        for i in 0..c.daemons.len() {
            c.spawn(i, None)?;
        }
        if !c.wait_healthy(Duration::from_secs(120)) {
            bail!(
                "cluster in {} not healthy after 120 s:\n{}{}",
                c.dir.display(),
                status::render(&c.status()),
                crate::partition::tables_of_ours()
                    .filter(|t| !t.is_empty())
                    .map(|t| format!("\nnftables tables of chaos runs still in place: {t:?}"))
                    .unwrap_or_default()
            );
        }
        for i in 0..mounts {
            c.mount(i)?;
        }
        Ok(c)
    }

    /// Index of the daemon named `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.daemons.iter().position(|d| d.name == name)
    }

    /// Starts daemon `i` (which must not be running) with `failpoints`.
    pub fn spawn(&mut self, i: usize, failpoints: Option<&str>) -> anyhow::Result<()> {
        let (bin, args) = match self.daemons[i].role {
            Role::Mds(id) => {
                let n = self.layout.mds.iter().find(|n| n.id == id).cloned();
                let n = n.ok_or_else(|| anyhow!("no MDS {id}"))?;
                ("avalon-mds", mds_args(&self.dir, &self.layout, &n))
            }
            Role::Osd(id) => {
                let n = self.layout.osds.iter().find(|n| n.id == id).cloned();
                let n = n.ok_or_else(|| anyhow!("no OSD {id}"))?;
                ("avalon-osd", osd_args(&self.dir, &self.layout, &n))
            }
        };
        let name = self.daemons[i].name.clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("logs").join(format!("{name}.log")))?;
        let mut cmd = Command::new(self.bin_dir.join(bin));
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // The harness's own RUST_LOG reaches the daemons (to debug a
            // failing seed); info otherwise.
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("FAILPOINTS")
            // Its own process group: a Ctrl-C reaches only the harness,
            // which then stops everything itself.
            .process_group(0);
        if let Some(f) = failpoints {
            cmd.env("FAILPOINTS", f);
        }
        let child = cmd.spawn().with_context(|| format!("cannot start {bin}"))?;
        let d = &mut self.daemons[i];
        d.child = Some(child);
        d.paused = false;
        d.failpoints = failpoints.map(str::to_string);
        Ok(())
    }

    /// True while daemon `i`'s process runs (paused counts as running).
    pub fn running(&mut self, i: usize) -> bool {
        match self.daemons[i].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn signal(&self, i: usize, sig: Signal) {
        if let Some(c) = &self.daemons[i].child {
            let _ = kill(Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// Kills daemon `i` with SIGKILL and reaps it.
    pub fn kill(&mut self, i: usize) {
        self.signal(i, Signal::SIGKILL);
        if let Some(mut c) = self.daemons[i].child.take() {
            let _ = c.wait();
        }
        self.daemons[i].paused = false;
    }

    /// Stops daemon `i` with SIGSTOP.
    pub fn pause(&mut self, i: usize) {
        self.signal(i, Signal::SIGSTOP);
        self.daemons[i].paused = true;
    }

    /// Resumes daemon `i` with SIGCONT.
    pub fn resume(&mut self, i: usize) {
        self.signal(i, Signal::SIGCONT);
        self.daemons[i].paused = false;
    }

    /// The address daemon `i` listens on and connects from.
    pub fn daemon_ip(&self, i: usize) -> Ipv4Addr {
        let n = match self.daemons[i].role {
            Role::Mds(id) => 10 + id,
            Role::Osd(id) => 20 + id,
        };
        Ipv4Addr::new(127, self.net, 0, n as u8)
    }

    /// The address mount `i` connects from.
    pub fn mount_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(127, self.net, 0, 31 + i as u8)
    }

    /// Indexes of the MDS daemons.
    pub fn mds_indexes(&self) -> Vec<usize> {
        (0..self.daemons.len())
            .filter(|&i| matches!(self.daemons[i].role, Role::Mds(_)))
            .collect()
    }

    /// Indexes of the OSD daemons.
    pub fn osd_indexes(&self) -> Vec<usize> {
        (0..self.daemons.len())
            .filter(|&i| matches!(self.daemons[i].role, Role::Osd(_)))
            .collect()
    }

    /// Cuts the network between the addresses in `a` and those in `b`
    /// (replacing a cut in place); anything in neither reaches both sides.
    pub fn partition(&mut self, a: &[Ipv4Addr], b: &[Ipv4Addr]) -> anyhow::Result<()> {
        if self.partition.is_none() {
            self.partition = Some(Partition::new()?);
        }
        if let Some(p) = self.partition.as_mut() {
            p.cut(a, b)?;
        }
        Ok(())
    }

    /// Removes the network cut; true if there was one.
    pub fn heal_network(&mut self) -> anyhow::Result<bool> {
        match self.partition.as_mut() {
            Some(p) if p.is_cut() => {
                p.heal()?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Undoes every fault: heals the network, resumes paused daemons,
    /// restarts dead ones and those running with fail points (without
    /// them). Returns what it did.
    pub fn heal(&mut self) -> anyhow::Result<Vec<String>> {
        let mut did = Vec::new();
        if self.heal_network()? {
            did.push("healed the network".to_string());
        }
        for i in 0..self.daemons.len() {
            if self.daemons[i].paused {
                self.resume(i);
                did.push(format!("resumed {}", self.daemons[i].name));
            }
            if self.daemons[i].failpoints.is_some() {
                self.kill(i);
                did.push(format!("cleared fail points of {}", self.daemons[i].name));
            }
            if !self.running(i) {
                self.daemons[i].child = None;
                self.spawn(i, None)?;
                did.push(format!("restarted {}", self.daemons[i].name));
            }
        }
        Ok(did)
    }

    /// The cluster's status as the MDS nodes report it.
    pub fn status(&self) -> ClusterStatus {
        status_of(&self.tls, &self.layout.mds_addrs())
    }

    /// The MDS leader's id, if one answers.
    pub fn leader(&self) -> Option<u64> {
        self.status().leader_id
    }

    /// Waits up to `timeout` until there is a leader, every OSD is up and
    /// every placement group is fully replicated and peered.
    pub fn wait_healthy(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if s.healthy(self.layout.osds.len()) && s.pgs.healthy {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Mounts the filesystem at `DIR/mnt{i}` with a foreground client.
    pub fn mount(&mut self, i: usize) -> anyhow::Result<()> {
        let path = self.dir.join(format!("mnt{i}"));
        std::fs::create_dir_all(&path)?;
        let log = self.dir.join("logs").join(format!("mount{i}.log"));
        let mut cmd = Command::new(self.bin_dir.join("avalon-fuse"));
        cmd.arg("--foreground")
            .arg(self.layout.source())
            .arg(&path)
            .arg("-o")
            .arg(format!("log={}", log.display()))
            .arg("-o")
            .arg(format!("source_addr={}", self.mount_ip(i)))
            .arg("-o")
            .arg(avalonctl::local_cluster::mount_key_option(
                &self.dir,
                &self.layout,
            ));
        let child = spawn_client(cmd, &path)?;
        self.mounts.push(Mount { path, child });
        Ok(())
    }

    /// Pid of daemon `i`, if running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.daemons[i].child.as_ref().map(Child::id)
    }

    /// Heals the network, unmounts and stops everything (idempotent).
    pub fn stop(&mut self) {
        // First: unmounting must reach the cluster, and no rule may outlive
        // the run.
        if let Err(e) = self.heal_network() {
            eprintln!("cluster: {e:#}");
        }
        for i in 0..self.daemons.len() {
            if self.daemons[i].paused {
                self.resume(i);
            }
        }
        for m in self.mounts.iter_mut() {
            unmount(&m.path);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(m.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = m.child.kill();
            let _ = m.child.wait();
        }
        self.mounts.clear();
        for i in 0..self.daemons.len() {
            self.signal(i, Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for i in 0..self.daemons.len() {
            while Instant::now() < deadline && self.running(i) {
                std::thread::sleep(Duration::from_millis(20));
            }
            self.kill(i);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Status from the MDS at `addrs` (a small runtime of its own per call).
pub fn status_of(tls: &ClientTls, addrs: &[String]) -> ClusterStatus {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(status::collect(tls, addrs, Duration::from_secs(2))),
        Err(_) => ClusterStatus::default(),
    }
}

/// True when the binary at `path` was built with fail points (the `fail`
/// crate reads `FAILPOINTS` only then).
pub fn has_failpoints(path: &Path) -> bool {
    std::fs::read(path)
        .map(|b| b.windows(10).any(|w| w == b"FAILPOINTS"))
        .unwrap_or(false)
}
