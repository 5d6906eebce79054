//! A local cluster on 127.0.0.1: real `avalon-mds`, `avalon-osd` and
//! `avalon-fuse` processes with all state under one directory.
//!
//! Used by `avalonctl up` and by the end-to-end tests. The layout (node
//! ids, ports, data dirs) is written to `DIR/cluster.toml` the first time,
//! so starting again on the same directory brings back the same cluster.
//! Dropping a [`LocalCluster`] unmounts and stops everything, also when a
//! test panics.

use crate::keys;
use crate::status::{self, ClusterStatus};
use anyhow::{anyhow, bail, Context};
use avalon_proto::tls::ClientTls;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One daemon of the layout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeSpec {
    /// MDS raft id, or OSD ordinal (the OSD's cluster id is assigned by the MDS).
    pub id: u64,
    pub addr: String,
    /// An MDS added later (`avalonctl mds add`): started with `--join`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join: bool,
    /// Where it serves Prometheus metrics (`--metrics-addr`); layouts
    /// made before metrics have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
}

/// What `DIR/cluster.toml` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Layout {
    pub mds: Vec<NodeSpec>,
    pub osds: Vec<NodeSpec>,
    /// Replicas and write quorum the cluster is created with (later the
    /// cluster's own settings rule: `avalonctl pool set`).
    pub replicas: u32,
    pub write_quorum: u32,
    /// Extra flags for every MDS (e.g. `--osd-out-after-ms 3000`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mds_flags: Vec<String>,
    /// Extra flags for every OSD (e.g. `--scrub-interval-ms 500`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub osd_flags: Vec<String>,
    /// Where the mount at `DIR/mnt` serves Prometheus metrics (`-o metrics=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_metrics_addr: Option<String>,
    /// No TLS, no authentication (`--insecure` daemons, `-o insecure`
    /// mounts). Otherwise every daemon and mount has a keyfile in
    /// `DIR/keys` (made on first start).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

impl Layout {
    /// The MDS addresses, comma separated (the mount source's first part).
    pub fn mds_list(&self) -> String {
        self.mds
            .iter()
            .map(|n| n.addr.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The MDS addresses.
    pub fn mds_addrs(&self) -> Vec<String> {
        self.mds.iter().map(|n| n.addr.clone()).collect()
    }

    /// A metrics address for a node added to this layout: a free port if
    /// its nodes serve metrics, else none.
    fn metrics_port(&self) -> anyhow::Result<Option<String>> {
        let on = self
            .mds
            .iter()
            .chain(&self.osds)
            .any(|n| n.metrics_addr.is_some());
        Ok(match on {
            true => Some(format!("127.0.0.1:{}", free_port()?)),
            false => None,
        })
    }

    /// Every metrics endpoint: (process name, host:port).
    pub fn metrics_addrs(&self) -> Vec<(String, String)> {
        let named = |kind: &str, n: &NodeSpec| {
            n.metrics_addr
                .clone()
                .map(|a| (format!("{kind}{}", n.id), a))
        };
        let mds = self.mds.iter().filter_map(|n| named("mds", n));
        let osds = self.osds.iter().filter_map(|n| named("osd", n));
        let client = self
            .client_metrics_addr
            .clone()
            .map(|a| ("client".to_string(), a));
        mds.chain(osds).chain(client).collect()
    }

    /// The TLS an administrator of the cluster in `dir` uses
    /// (`DIR/keys/client.admin.key`), or plaintext when insecure.
    pub fn admin_tls(&self, dir: &Path) -> anyhow::Result<ClientTls> {
        if self.insecure {
            return Ok(ClientTls::plaintext());
        }
        let path = keys::keyfile(&keys_dir(dir), keys::ADMIN);
        ClientTls::from_keyfile(&path).map_err(anyhow::Error::from)
    }

    /// The mount source for the whole filesystem.
    pub fn source(&self) -> String {
        format!("{}:/", self.mds_list())
    }
}

/// Options for [`LocalCluster::start`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Number of MDS nodes (used when the directory has no layout yet).
    pub mds: usize,
    /// Number of OSDs (used when the directory has no layout yet).
    pub osds: usize,
    /// Mount the filesystem at `DIR/mnt`.
    pub mount: bool,
    /// Directory with the avalon-* binaries.
    pub bin_dir: PathBuf,
    /// Log level for the daemons.
    pub log_level: String,
    /// How long to wait for the cluster to become healthy.
    pub ready_timeout: Duration,
    /// Extra flags for every MDS / OSD (first start only; kept in
    /// `cluster.toml`), e.g. `--osd-out-after-ms 3000`.
    pub mds_flags: Vec<String>,
    pub osd_flags: Vec<String>,
    /// Give every daemon and the mount a metrics endpoint (first start
    /// only; kept in `cluster.toml`).
    pub metrics: bool,
    /// Run without TLS (first start only; kept in `cluster.toml`).
    pub insecure: bool,
}

impl Options {
    /// Defaults: 3 MDS, 3 OSDs, mounted, binaries next to this executable.
    pub fn new() -> Self {
        Options {
            mds: 3,
            osds: 3,
            mount: true,
            bin_dir: default_bin_dir(),
            log_level: "info".into(),
            ready_timeout: Duration::from_secs(90),
            mds_flags: Vec::new(),
            osd_flags: Vec::new(),
            metrics: true,
            insecure: false,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the avalon-* binaries are: `$AVALON_BIN_DIR`, else the directory
/// of the running executable (or its parent, for test binaries in `deps/`).
pub fn default_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AVALON_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

/// A free TCP port on 127.0.0.1 (the listener is closed before returning).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A started daemon or client process.
struct Proc {
    name: String,
    args: Vec<String>,
    bin: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn signal(&self, sig: Signal) {
        if let Some(pid) = self.pid() {
            let _ = kill(Pid::from_raw(pid as i32), sig);
        }
    }

    /// Waits up to `t` for exit; true if it exited.
    fn wait_for(&mut self, t: Duration) -> bool {
        let deadline = Instant::now() + t;
        while Instant::now() < deadline {
            if !self.running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        !self.running()
    }

    fn stop(&mut self, grace: Duration) {
        if self.running() {
            self.signal(Signal::SIGTERM);
            if !self.wait_for(grace) {
                self.signal(Signal::SIGKILL);
                self.wait_for(Duration::from_secs(5));
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

/// A running local cluster.
pub struct LocalCluster {
    /// The directory holding everything.
    pub dir: PathBuf,
    /// Node ids and addresses.
    pub layout: Layout,
    opts: Options,
    mds: Vec<Proc>,
    osds: Vec<Proc>,
    client: Option<Proc>,
    tls: ClientTls,
}

impl LocalCluster {
    /// The administrator's TLS (`DIR/keys/client.admin.key`), for tools and
    /// tests that open their own connections.
    pub fn tls(&self) -> &ClientTls {
        &self.tls
    }
}

/// Starts a foreground `avalon-fuse` (`cmd`, its arguments set) and waits
/// until it prints READY, i.e. `mnt` is mounted; else kills it and fails
/// with what it wrote to stderr.
pub fn spawn_client(mut cmd: Command, mnt: &Path) -> anyhow::Result<std::process::Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().context("cannot start avalon-fuse")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout pipe"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let ready = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
    if ready.trim() != "READY" || !is_mounted(mnt) {
        let _ = child.kill();
        let out = child
            .wait_with_output()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned());
        bail!(
            "mount at {} failed: {}",
            mnt.display(),
            out.unwrap_or_default().trim()
        );
    }
    Ok(child)
}

/// True when `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(path).or_else(|_| Ok::<_, ()>(path.to_path_buf())) else {
        return false;
    };
    let target = canon.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| {
            s.lines()
                .any(|l| l.split(' ').nth(4) == Some(target.as_str()))
        })
        .unwrap_or(false)
}

/// Unmounts `path`, retrying while busy, detaching as a last resort.
pub fn unmount(path: &Path) {
    use nix::mount::{umount2, MntFlags};
    for _ in 0..50 {
        if !is_mounted(path) {
            return;
        }
        match umount2(path, MntFlags::empty()) {
            Ok(()) => return,
            Err(nix::errno::Errno::EBUSY) => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => break,
        }
    }
    if is_mounted(path) {
        let _ = umount2(path, MntFlags::MNT_DETACH);
    }
}

/// True while `pid` runs; a zombie (exited, not yet reaped by its parent)
/// counts as gone.
fn pid_alive(pid: i32) -> bool {
    if pid <= 0 || kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

impl LocalCluster {
    /// Starts (or restarts) the cluster in `dir` and waits until it is
    /// healthy and, if asked, mounted at `dir/mnt`.
    pub fn start(dir: &Path, opts: Options) -> anyhow::Result<LocalCluster> {
        let fresh = !dir.join("cluster.toml").exists();
        let mut attempt = 0;
        loop {
            match Self::start_once(dir, opts.clone()) {
                // Ports are chosen free, then bound by the daemons: another
                // process may take one in between. A new cluster starts over
                // on other ports.
                Err(e)
                    if fresh
                        && attempt < 3
                        && format!("{e:#}").contains("Address already in use") =>
                {
                    attempt += 1;
                    Self::forget_layout(dir);
                }
                r => return r,
            }
        }
    }

    /// Removes what a first start that failed created: the layout and the
    /// nodes' data directories (the logs stay).
    fn forget_layout(dir: &Path) {
        let path = dir.join("cluster.toml");
        if let Ok(layout) = std::fs::read_to_string(&path)
            .map_err(anyhow::Error::from)
            .and_then(|s| toml::from_str::<Layout>(&s).map_err(anyhow::Error::from))
        {
            for n in &layout.mds {
                let _ = std::fs::remove_dir_all(dir.join(format!("mds{}", n.id)));
            }
            for n in &layout.osds {
                let _ = std::fs::remove_dir_all(dir.join(format!("osd{}", n.id)));
            }
        }
        let _ = std::fs::remove_file(path);
    }

    fn start_once(dir: &Path, opts: Options) -> anyhow::Result<LocalCluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = std::fs::canonicalize(dir)?;
        for sub in ["logs", "run", "mnt"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let layout = Self::load_or_create_layout(&dir, &opts)?;
        ensure_keys(&dir, &layout)?;
        let tls = layout.admin_tls(&dir)?;
        for b in ["avalon-mds", "avalon-osd", "avalon-fuse"] {
            if !opts.bin_dir.join(b).exists() {
                bail!(
                    "{} not found in {} (build the workspace first: cargo build --workspace)",
                    b,
                    opts.bin_dir.display()
                );
            }
        }
        let mut c = LocalCluster {
            dir,
            layout,
            opts,
            mds: Vec::new(),
            osds: Vec::new(),
            client: None,
            tls,
        };
        // A previous run that died may have left a dead mount behind.
        unmount(&c.mountpoint());
        c.spawn_all()?;
        if let Err(e) = c.wait_healthy(c.opts.ready_timeout) {
            c.stop();
            return Err(e);
        }
        if c.opts.mount {
            if let Err(e) = c.mount() {
                c.stop();
                return Err(e);
            }
        }
        Ok(c)
    }

    fn load_or_create_layout(dir: &Path, opts: &Options) -> anyhow::Result<Layout> {
        let path = dir.join("cluster.toml");
        if path.exists() {
            let s = std::fs::read_to_string(&path)?;
            return toml::from_str(&s).with_context(|| format!("bad layout in {}", path.display()));
        }
        if opts.mds == 0 || opts.osds == 0 {
            bail!("a cluster needs at least one MDS and one OSD");
        }
        let metrics_addr = || -> anyhow::Result<Option<String>> {
            Ok(match opts.metrics {
                true => Some(format!("127.0.0.1:{}", free_port()?)),
                false => None,
            })
        };
        let mut node = |id: u64| -> anyhow::Result<NodeSpec> {
            Ok(NodeSpec {
                id,
                addr: format!("127.0.0.1:{}", free_port()?),
                join: false,
                metrics_addr: metrics_addr()?,
            })
        };
        let layout = Layout {
            mds: (1..=opts.mds as u64)
                .map(&mut node)
                .collect::<anyhow::Result<_>>()?,
            osds: (1..=opts.osds as u64)
                .map(&mut node)
                .collect::<anyhow::Result<_>>()?,
            replicas: 3.min(opts.osds as u32),
            write_quorum: 2.min(opts.osds as u32),
            mds_flags: opts.mds_flags.clone(),
            osd_flags: opts.osd_flags.clone(),
            client_metrics_addr: metrics_addr()?,
            insecure: opts.insecure,
        };
        std::fs::write(&path, toml::to_string_pretty(&layout)?)?;
        Ok(layout)
    }

    /// Where the filesystem is mounted.
    pub fn mountpoint(&self) -> PathBuf {
        self.dir.join("mnt")
    }

    fn spawn(&self, name: &str, bin: &str, args: Vec<String>) -> anyhow::Result<Proc> {
        let mut p = Proc {
            name: name.to_string(),
            args,
            bin: self.opts.bin_dir.join(bin),
            child: None,
        };
        self.respawn(&mut p)?;
        Ok(p)
    }

    fn respawn(&self, p: &mut Proc) -> anyhow::Result<()> {
        // An MDS's flags depend on whether its data directory exists yet.
        if let Some(n) = self
            .layout
            .mds
            .iter()
            .find(|n| format!("mds{}", n.id) == p.name)
        {
            p.args = self.mds_args(n);
        }
        p.child = Some(spawn_daemon(
            &self.dir,
            &p.name,
            &p.bin,
            &p.args,
            &self.opts.log_level,
        )?);
        Ok(())
    }

    fn mds_args(&self, n: &NodeSpec) -> Vec<String> {
        mds_args(&self.dir, &self.layout, n)
    }

    fn osd_args(&self, n: &NodeSpec) -> Vec<String> {
        osd_args(&self.dir, &self.layout, n)
    }

    fn spawn_all(&mut self) -> anyhow::Result<()> {
        for n in self.layout.mds.clone() {
            let p = self.spawn(&format!("mds{}", n.id), "avalon-mds", self.mds_args(&n))?;
            self.mds.push(p);
        }
        for n in self.layout.osds.clone() {
            let p = self.spawn(&format!("osd{}", n.id), "avalon-osd", self.osd_args(&n))?;
            self.osds.push(p);
        }
        Ok(())
    }

    fn log_tail(&self, name: &str) -> String {
        let s = std::fs::read_to_string(self.dir.join("logs").join(format!("{name}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Cluster status as seen from the MDS nodes.
    pub fn status(&self) -> ClusterStatus {
        let addrs = self.layout.mds_addrs();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        match rt {
            Ok(rt) => rt.block_on(status::collect(&self.tls, &addrs, Duration::from_secs(2))),
            Err(_) => ClusterStatus::default(),
        }
    }

    /// Waits until a leader is elected and every running OSD is up.
    pub fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<ClusterStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            for p in self.mds.iter_mut().chain(self.osds.iter_mut()) {
                if p.child.is_some() && !p.running() {
                    let name = p.name.clone();
                    bail!(
                        "{name} exited during start-up; last log lines:\n{}",
                        self.log_tail(&name)
                    );
                }
            }
            let want = self.osds.iter().filter(|p| p.child.is_some()).count();
            let s = self.status();
            if s.healthy(want) {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!(
                    "cluster in {} not healthy after {:?}:\n{}",
                    self.dir.display(),
                    timeout,
                    status::render(&s)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Mounts the filesystem at `DIR/mnt` with a client process.
    pub fn mount(&mut self) -> anyhow::Result<()> {
        let mnt = self.mountpoint();
        let mut args = vec![
            "--foreground".to_string(),
            self.layout.source(),
            mnt.to_string_lossy().into_owned(),
            "-o".to_string(),
            format!("log={}", self.dir.join("logs").join("client.log").display()),
            "-o".to_string(),
            mount_key_option(&self.dir, &self.layout),
        ];
        if let Some(a) = &self.layout.client_metrics_addr {
            args[4].push_str(&format!(",metrics={a}"));
        }
        let mut cmd = Command::new(self.opts.bin_dir.join("avalon-fuse"));
        cmd.args(&args).env("RUST_LOG", &self.opts.log_level);
        let child = spawn_client(cmd, &mnt)?;
        std::fs::write(
            self.dir.join("run").join("client.pid"),
            child.id().to_string(),
        )?;
        self.client = Some(Proc {
            name: "client".into(),
            args,
            bin: self.opts.bin_dir.join("avalon-fuse"),
            child: Some(child),
        });
        Ok(())
    }

    /// Unmounts `DIR/mnt` and waits for the client process to end.
    pub fn unmount(&mut self) {
        unmount(&self.mountpoint());
        if let Some(mut p) = self.client.take() {
            if !p.wait_for(Duration::from_secs(15)) {
                p.stop(Duration::from_secs(2));
            }
            if let Some(mut c) = p.child.take() {
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_file(self.dir.join("run").join("client.pid"));
    }

    /// Process ids, by name (mds1, osd2, client...).
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.mds
            .iter()
            .chain(self.osds.iter())
            .chain(self.client.iter())
            .filter_map(|p| p.pid().map(|pid| (p.name.clone(), pid)))
            .collect()
    }

    /// Kills MDS `id` with SIGKILL (fault tests).
    pub fn kill_mds(&mut self, id: u64) {
        if let Some(p) = self.mds.iter_mut().find(|p| p.name == format!("mds{id}")) {
            p.signal(Signal::SIGKILL);
            p.wait_for(Duration::from_secs(5));
            p.child = None;
        }
    }

    /// Kills OSD `n` (ordinal in the layout) with SIGKILL.
    pub fn kill_osd(&mut self, n: u64) {
        if let Some(p) = self.osds.iter_mut().find(|p| p.name == format!("osd{n}")) {
            p.signal(Signal::SIGKILL);
            p.wait_for(Duration::from_secs(5));
            p.child = None;
        }
    }

    /// Stops OSD `n` (ordinal in the layout) as a service manager does:
    /// SIGTERM, then SIGKILL after 10 s.
    pub fn stop_osd(&mut self, n: u64) {
        if let Some(p) = self.osds.iter_mut().find(|p| p.name == format!("osd{n}")) {
            p.stop(Duration::from_secs(10));
        }
    }

    /// Starts every daemon that is not running again.
    pub fn restart_stopped(&mut self) -> anyhow::Result<()> {
        let mut mds = std::mem::take(&mut self.mds);
        let mut osds = std::mem::take(&mut self.osds);
        let mut res = Ok(());
        for p in mds.iter_mut().chain(osds.iter_mut()) {
            if !p.running() {
                if let Err(e) = self.respawn(p) {
                    res = Err(e);
                }
            }
        }
        self.mds = mds;
        self.osds = osds;
        res
    }

    /// Starts MDS `id` again if it is not running.
    pub fn restart_mds(&mut self, id: u64) -> anyhow::Result<()> {
        let mut mds = std::mem::take(&mut self.mds);
        let res = match mds.iter_mut().find(|p| p.name == format!("mds{id}")) {
            Some(p) => {
                if p.running() {
                    Ok(())
                } else {
                    self.respawn(p)
                }
            }
            None => Err(anyhow!("no MDS {id} in this cluster")),
        };
        self.mds = mds;
        res
    }

    /// Ids of the MDS nodes of the layout.
    pub fn mds_ids(&self) -> Vec<u64> {
        self.layout.mds.iter().map(|n| n.id).collect()
    }

    /// Process id of MDS `id`, if this handle runs it.
    pub fn mds_pid(&self, id: u64) -> Option<u32> {
        self.mds
            .iter()
            .find(|p| p.name == format!("mds{id}"))
            .and_then(Proc::pid)
    }

    /// Starts one more MDS (new id, free port, `--join`), records it in
    /// `DIR/cluster.toml` and has the leader add it to the raft group.
    pub fn add_mds(&mut self) -> anyhow::Result<NodeSpec> {
        let spec = new_mds_spec(&self.dir, &self.layout)?;
        ensure_key(&self.dir, &self.layout, &format!("mds.{}", spec.id))?;
        let args = mds_args(&self.dir, &self.layout, &spec);
        let p = self.spawn(&format!("mds{}", spec.id), "avalon-mds", args)?;
        self.mds.push(p);
        self.layout.mds.push(spec.clone());
        save_layout(&self.dir, &self.layout)?;
        let addrs = self.layout.mds_addrs();
        block_on(crate::mds_admin::add_mds(
            &self.tls,
            &addrs,
            spec.id,
            &spec.addr,
            Duration::from_secs(120),
        ))?;
        Ok(spec)
    }

    /// Removes MDS `id` from the raft group, stops it and drops it from
    /// `DIR/cluster.toml`.
    pub fn remove_mds(&mut self, id: u64) -> anyhow::Result<()> {
        let addrs = self.layout.mds_addrs();
        block_on(crate::mds_admin::remove_mds(
            &self.tls,
            &addrs,
            id,
            Duration::from_secs(60),
        ))?;
        let name = format!("mds{id}");
        if let Some(i) = self.mds.iter().position(|p| p.name == name) {
            let mut p = self.mds.remove(i);
            p.stop(Duration::from_secs(10));
        } else {
            stop_pid_file(&self.dir.join("run").join(format!("{name}.pid")));
        }
        let _ = std::fs::remove_file(self.dir.join("run").join(format!("{name}.pid")));
        self.layout.mds.retain(|n| n.id != id);
        save_layout(&self.dir, &self.layout)?;
        Ok(())
    }

    /// Starts one more OSD (next ordinal, free port, data dir
    /// `DIR/osd{n}`), records it in `DIR/cluster.toml` and waits until
    /// the MDS lists it up.
    pub fn add_osd(&mut self) -> anyhow::Result<NodeSpec> {
        let spec = new_osd_spec(&self.dir, &self.layout)?;
        ensure_key(&self.dir, &self.layout, &format!("osd.{}", spec.id))?;
        let p = self.spawn(
            &format!("osd{}", spec.id),
            "avalon-osd",
            osd_args(&self.dir, &self.layout, &spec),
        )?;
        self.osds.push(p);
        self.layout.osds.push(spec.clone());
        save_layout(&self.dir, &self.layout)?;
        self.wait_healthy(Duration::from_secs(60))?;
        Ok(spec)
    }

    /// Polls until every PG has its full set of up members and each member
    /// reports it peered with nothing left to copy.
    pub fn wait_pgs_healthy(&self, timeout: Duration) -> anyhow::Result<ClusterStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if s.leader_id.is_some() && s.pgs.healthy {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!("PGs not healthy after {timeout:?}:\n{}", status::render(&s));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Unmounts and stops every process: client, then OSDs, then MDS
    /// (also those another `avalonctl` process added to this directory).
    pub fn stop(&mut self) {
        self.unmount();
        for p in self.osds.iter_mut() {
            p.stop(Duration::from_secs(10));
        }
        for p in self.mds.iter_mut() {
            p.stop(Duration::from_secs(10));
        }
        for p in self.mds.iter().chain(self.osds.iter()) {
            let _ = std::fs::remove_file(self.dir.join("run").join(format!("{}.pid", p.name)));
        }
        self.mds.clear();
        self.osds.clear();
        // MDS nodes started by `avalonctl mds add DIR` from another shell.
        if let Ok(rd) = std::fs::read_dir(self.dir.join("run")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if (name.starts_with("mds") || name.starts_with("osd")) && name.ends_with(".pid") {
                    stop_pid_file(&e.path());
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// Command-line arguments of MDS `n` of `layout` in `dir`.
pub fn mds_args(dir: &Path, layout: &Layout, n: &NodeSpec) -> Vec<String> {
    let mut peers: Vec<String> = layout
        .mds
        .iter()
        .map(|m| format!("{}={}", m.id, m.addr))
        .collect();
    if !layout.mds.iter().any(|m| m.id == n.id) {
        peers.push(format!("{}={}", n.id, n.addr));
    }
    let data_dir = dir.join(format!("mds{}", n.id));
    let mut v: Vec<String> = vec![
        "--id".into(),
        n.id.to_string(),
        "--listen".into(),
        n.addr.clone(),
        "--data-dir".into(),
        data_dir.to_string_lossy().into_owned(),
        "--peers".into(),
        peers.join(","),
    ];
    if let Some(a) = &n.metrics_addr {
        v.extend(["--metrics-addr".into(), a.clone()]);
    }
    if n.join {
        v.push("--join".into());
    } else if !data_dir.exists() {
        // Cluster-wide settings are given once, to create the cluster; a
        // restart takes them from the replicated state (they may have been
        // changed since with `avalonctl pool set`), a joining node too.
        v.extend([
            "--replicas".into(),
            layout.replicas.to_string(),
            "--write-quorum".into(),
            layout.write_quorum.to_string(),
        ]);
    }
    v.extend(security_args(dir, layout, &format!("mds.{}", n.id)));
    v.extend(layout.mds_flags.iter().cloned());
    v
}

/// Command-line arguments of OSD `n` (layout ordinal) of `layout` in `dir`.
pub fn osd_args(dir: &Path, layout: &Layout, n: &NodeSpec) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--listen".into(),
        n.addr.clone(),
        "--data-dir".into(),
        dir.join(format!("osd{}", n.id))
            .to_string_lossy()
            .into_owned(),
        "--mds".into(),
        layout.mds_list(),
        "--failure-domain".into(),
        format!("local-osd{}", n.id),
    ];
    if let Some(a) = &n.metrics_addr {
        v.extend(["--metrics-addr".into(), a.clone()]);
    }
    v.extend(security_args(dir, layout, &format!("osd.{}", n.id)));
    v.extend(layout.osd_flags.iter().cloned());
    v
}

/// A new OSD for `layout`: the next ordinal not used in `dir`, a free port.
fn new_osd_spec(dir: &Path, layout: &Layout) -> anyhow::Result<NodeSpec> {
    let mut max = layout.osds.iter().map(|n| n.id).max().unwrap_or(0);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_prefix("osd").and_then(|s| s.parse::<u64>().ok()) {
                max = max.max(id);
            }
        }
    }
    Ok(NodeSpec {
        id: max + 1,
        addr: format!("127.0.0.1:{}", free_port()?),
        join: false,
        metrics_addr: layout.metrics_port()?,
    })
}

/// `avalonctl osd add DIR`: starts one more OSD for the local cluster in
/// `dir` as a detached process (pid in `DIR/run`, stopped by `down`) and
/// records it in `DIR/cluster.toml`; it registers itself with the MDS.
pub fn add_osd_detached(dir: &Path, bin_dir: &Path, log_level: &str) -> anyhow::Result<NodeSpec> {
    let dir = std::fs::canonicalize(dir)?;
    let mut layout = load_layout(&dir)?;
    let spec = new_osd_spec(&dir, &layout)?;
    ensure_key(&dir, &layout, &format!("osd.{}", spec.id))?;
    let name = format!("osd{}", spec.id);
    let args = osd_args(&dir, &layout, &spec);
    spawn_daemon(&dir, &name, &bin_dir.join("avalon-osd"), &args, log_level)?;
    layout.osds.push(spec.clone());
    save_layout(&dir, &layout)?;
    Ok(spec)
}

/// Starts one daemon of the cluster in `dir`: output appended to
/// `DIR/logs/NAME.log`, pid written to `DIR/run/NAME.pid`, in its own
/// process group (a Ctrl-C at the terminal reaches `up`, which then stops
/// everything in order).
fn spawn_daemon(
    dir: &Path,
    name: &str,
    bin: &Path,
    args: &[String],
    log_level: &str,
) -> anyhow::Result<Child> {
    std::fs::create_dir_all(dir.join("logs"))?;
    std::fs::create_dir_all(dir.join("run"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs").join(format!("{name}.log")))?;
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env("RUST_LOG", log_level)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    std::fs::write(
        dir.join("run").join(format!("{name}.pid")),
        child.id().to_string(),
    )?;
    Ok(child)
}

/// The key directory of the local cluster in `dir`.
pub fn keys_dir(dir: &Path) -> PathBuf {
    dir.join("keys")
}

/// The identity the local cluster's mounts use.
pub const MOUNT_IDENTITY: &str = "client.local";

/// The CA and every keyfile the cluster in `dir` needs (its daemons, the
/// administrator, the mounts), made where missing; nothing when insecure.
pub fn ensure_keys(dir: &Path, layout: &Layout) -> anyhow::Result<()> {
    if layout.insecure {
        return Ok(());
    }
    let mut names: Vec<String> = layout.mds.iter().map(|n| format!("mds.{}", n.id)).collect();
    names.extend(layout.osds.iter().map(|n| format!("osd.{}", n.id)));
    names.extend([keys::ADMIN.to_string(), MOUNT_IDENTITY.to_string()]);
    keys::ensure(&keys_dir(dir), &names)
}

/// `name`'s keyfile, made if missing (a node added later).
fn ensure_key(dir: &Path, layout: &Layout, name: &str) -> anyhow::Result<()> {
    if layout.insecure {
        return Ok(());
    }
    keys::ensure(&keys_dir(dir), &[name.to_string()])
}

/// A daemon's `--keyfile DIR/keys/NAME.key`, or `--insecure`.
fn security_args(dir: &Path, layout: &Layout, name: &str) -> Vec<String> {
    if layout.insecure {
        return vec!["--insecure".into()];
    }
    vec![
        "--keyfile".into(),
        keys::keyfile(&keys_dir(dir), name)
            .to_string_lossy()
            .into_owned(),
    ]
}

/// The mount option that gives a mount of the cluster in `dir` its key
/// (`name=client.local,keyfile=...`), or `insecure`.
pub fn mount_key_option(dir: &Path, layout: &Layout) -> String {
    if layout.insecure {
        return "insecure".into();
    }
    format!(
        "name={MOUNT_IDENTITY},keyfile={}",
        keys::keyfile(&keys_dir(dir), MOUNT_IDENTITY).display()
    )
}

/// Reads `DIR/cluster.toml`.
pub fn load_layout(dir: &Path) -> anyhow::Result<Layout> {
    let path = dir.join("cluster.toml");
    let s = std::fs::read_to_string(&path)
        .with_context(|| format!("no cluster layout at {}", path.display()))?;
    toml::from_str(&s).with_context(|| format!("bad layout in {}", path.display()))
}

/// Writes `DIR/cluster.toml` atomically.
pub fn save_layout(dir: &Path, layout: &Layout) -> anyhow::Result<()> {
    let tmp = dir.join("cluster.toml.tmp");
    std::fs::write(&tmp, toml::to_string_pretty(layout)?)?;
    std::fs::rename(&tmp, dir.join("cluster.toml"))?;
    Ok(())
}

/// A new MDS for `layout`: an id never used in `dir`, a free port, `join`.
fn new_mds_spec(dir: &Path, layout: &Layout) -> anyhow::Result<NodeSpec> {
    let mut max = layout.mds.iter().map(|n| n.id).max().unwrap_or(0);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_prefix("mds").and_then(|s| s.parse::<u64>().ok()) {
                max = max.max(id);
            }
        }
    }
    Ok(NodeSpec {
        id: max + 1,
        addr: format!("127.0.0.1:{}", free_port()?),
        join: true,
        metrics_addr: layout.metrics_port()?,
    })
}

/// Signals the process in a pid file: SIGTERM, then SIGKILL after 10 s.
fn stop_pid_file(path: &Path) {
    let Some(pid) = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| pid_alive(*p))
    else {
        return;
    };
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if pid_alive(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// `avalonctl mds add DIR`: starts one more MDS for the local cluster in
/// `dir` as a detached process (pid in `DIR/run`, stopped by `down`),
/// records it in `DIR/cluster.toml` and adds it to the raft group.
pub fn add_mds_detached(dir: &Path, bin_dir: &Path, log_level: &str) -> anyhow::Result<NodeSpec> {
    let dir = std::fs::canonicalize(dir)?;
    let mut layout = load_layout(&dir)?;
    let spec = new_mds_spec(&dir, &layout)?;
    ensure_key(&dir, &layout, &format!("mds.{}", spec.id))?;
    let name = format!("mds{}", spec.id);
    let args = mds_args(&dir, &layout, &spec);
    spawn_daemon(&dir, &name, &bin_dir.join("avalon-mds"), &args, log_level)?;
    layout.mds.push(spec.clone());
    save_layout(&dir, &layout)?;
    let addrs = layout.mds_addrs();
    block_on(crate::mds_admin::add_mds(
        &layout.admin_tls(&dir)?,
        &addrs,
        spec.id,
        &spec.addr,
        Duration::from_secs(120),
    ))?;
    Ok(spec)
}

/// `avalonctl mds remove DIR ID`: removes MDS `id` from the raft group,
/// stops its process (pid from `DIR/run`) and drops it from the layout.
pub fn remove_mds_in_dir(dir: &Path, id: u64) -> anyhow::Result<()> {
    let mut layout = load_layout(dir)?;
    if !layout.mds.iter().any(|n| n.id == id) {
        bail!("MDS {id} is not in {}", dir.join("cluster.toml").display());
    }
    if layout.mds.len() == 1 {
        bail!("cannot remove the last MDS");
    }
    let addrs = layout.mds_addrs();
    block_on(crate::mds_admin::remove_mds(
        &layout.admin_tls(dir)?,
        &addrs,
        id,
        Duration::from_secs(60),
    ))?;
    let pid_file = dir.join("run").join(format!("mds{id}.pid"));
    stop_pid_file(&pid_file);
    let _ = std::fs::remove_file(&pid_file);
    layout.mds.retain(|n| n.id != id);
    save_layout(dir, &layout)?;
    Ok(())
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops a cluster started by another process (`avalonctl down DIR`): asks
/// the `up` process to stop it, or, if that is gone, unmounts and signals
/// every process recorded in `DIR/run`.
pub fn down(dir: &Path, timeout: Duration) -> anyhow::Result<()> {
    let run = dir.join("run");
    let read_pid = |name: &str| -> Option<i32> {
        std::fs::read_to_string(run.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    if let Some(pid) = read_pid("up.pid").filter(|p| pid_alive(*p)) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while pid_alive(pid) {
            if Instant::now() >= deadline {
                bail!("avalonctl up (pid {pid}) did not stop within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        return Ok(());
    }
    unmount(&dir.join("mnt"));
    let mut pids = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&run) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = read_pid(&name).filter(|p| pid_alive(*p)) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                pids.push(pid);
            }
            let _ = std::fs::remove_file(e.path());
        }
    }
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|p| pid_alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in pids.into_iter().filter(|p| pid_alive(*p)) {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    Ok(())
}
