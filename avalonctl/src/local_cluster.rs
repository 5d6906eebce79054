//! A local cluster on 127.0.0.1: real `avalon-mds`, `avalon-osd` and
//! `avalon-fuse` processes with all state under one directory.
//!
//! Used by `avalonctl up` and by the end-to-end tests. The layout (node
//! ids, ports, data dirs) is written to `DIR/cluster.toml` the first time,
//! so starting again on the same directory brings back the same cluster.
//! Dropping a [`LocalCluster`] unmounts and stops everything, also when a
//! test panics.

use crate::status::{self, ClusterStatus};
use anyhow::{anyhow, bail, Context};
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
}

/// What `DIR/cluster.toml` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Layout {
    pub mds: Vec<NodeSpec>,
    pub osds: Vec<NodeSpec>,
    pub replicas: u32,
    pub write_quorum: u32,
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
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = std::fs::canonicalize(dir)?;
        for sub in ["logs", "run", "mnt"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let layout = Self::load_or_create_layout(&dir, &opts)?;
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
        let mut node = |id: u64| -> anyhow::Result<NodeSpec> {
            Ok(NodeSpec {
                id,
                addr: format!("127.0.0.1:{}", free_port()?),
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
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("logs").join(format!("{}.log", p.name)))?;
        let mut cmd = Command::new(&p.bin);
        cmd.args(&p.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("RUST_LOG", &self.opts.log_level)
            // Own process group: a Ctrl-C at the terminal reaches `up`,
            // which then stops everything in order.
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", p.bin.display()))?;
        std::fs::write(
            self.dir.join("run").join(format!("{}.pid", p.name)),
            child.id().to_string(),
        )?;
        p.child = Some(child);
        Ok(())
    }

    fn mds_args(&self, n: &NodeSpec) -> Vec<String> {
        let peers: Vec<String> = self
            .layout
            .mds
            .iter()
            .map(|m| format!("{}={}", m.id, m.addr))
            .collect();
        vec![
            "--id".into(),
            n.id.to_string(),
            "--listen".into(),
            n.addr.clone(),
            "--data-dir".into(),
            self.dir
                .join(format!("mds{}", n.id))
                .to_string_lossy()
                .into_owned(),
            "--peers".into(),
            peers.join(","),
            "--replicas".into(),
            self.layout.replicas.to_string(),
            "--write-quorum".into(),
            self.layout.write_quorum.to_string(),
        ]
    }

    fn osd_args(&self, n: &NodeSpec) -> Vec<String> {
        vec![
            "--listen".into(),
            n.addr.clone(),
            "--data-dir".into(),
            self.dir
                .join(format!("osd{}", n.id))
                .to_string_lossy()
                .into_owned(),
            "--mds".into(),
            self.layout.mds_list(),
            "--failure-domain".into(),
            format!("local-osd{}", n.id),
        ]
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
            Ok(rt) => rt.block_on(status::collect(&addrs, Duration::from_secs(2))),
            Err(_) => ClusterStatus {
                leader_id: None,
                map_epoch: 0,
                replicas: 0,
                write_quorum: 0,
                inodes: 0,
                mds: vec![],
                osds: vec![],
                clients: vec![],
            },
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
        let args = vec![
            "--foreground".to_string(),
            self.layout.source(),
            mnt.to_string_lossy().into_owned(),
            "-o".to_string(),
            format!("log={}", self.dir.join("logs").join("client.log").display()),
        ];
        let mut cmd = Command::new(self.opts.bin_dir.join("avalon-fuse"));
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        cmd.env("RUST_LOG", &self.opts.log_level);
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
        if ready.trim() != "READY" {
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

    /// Starts every daemon that is not running again.
    pub fn restart_stopped(&mut self) -> anyhow::Result<()> {
        let mut procs = std::mem::take(&mut self.mds);
        procs.append(&mut self.osds);
        for p in procs.iter_mut() {
            if !p.running() {
                self.respawn(p)?;
            }
        }
        let n_mds = self.layout.mds.len();
        self.osds = procs.split_off(n_mds);
        self.mds = procs;
        Ok(())
    }

    /// Unmounts and stops every process: client, then OSDs, then MDS.
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
    }
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
