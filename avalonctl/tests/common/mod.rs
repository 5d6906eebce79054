//! Shared helpers of the end-to-end tests: a cluster in a temp dir, random
//! data and digests.
#![allow(dead_code)]

use avalonctl::local_cluster::{unmount, LocalCluster, Options};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// A cluster in a fresh temp dir; the dir outlives the cluster handle so
/// a test can restart on it.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub cluster: Option<LocalCluster>,
}

impl TestCluster {
    pub fn start(mds: usize, osds: usize) -> TestCluster {
        Self::start_with(opts(mds, osds))
    }

    /// A cluster started with options `o` (see [`opts`]).
    pub fn start_with(o: Options) -> TestCluster {
        let dir = tempfile::Builder::new()
            .prefix("avalon-e2e-")
            .tempdir()
            .expect("temp dir");
        let cluster = LocalCluster::start(dir.path(), o).expect("cluster starts");
        TestCluster {
            dir,
            cluster: Some(cluster),
        }
    }

    pub fn c(&mut self) -> &mut LocalCluster {
        self.cluster.as_mut().expect("cluster running")
    }

    pub fn mnt(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt")
    }

    /// Stops everything and starts again on the same directory.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.cluster.take() {
            c.stop();
        }
        self.cluster =
            Some(LocalCluster::start(self.dir.path(), opts(0, 0)).expect("cluster restarts"));
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // Stop before the temp dir is removed.
        if let Some(mut c) = self.cluster.take() {
            c.stop();
        }
        // A failed test's logs and data, kept for a look when asked
        // (AVALON_KEEP_FAILED=all: every test's).
        let keep = std::env::var("AVALON_KEEP_FAILED").ok();
        if keep.as_deref() == Some("all") || (std::thread::panicking() && keep.is_some()) {
            self.dir.disable_cleanup(true);
            eprintln!("kept the test's directory {}", self.dir.path().display());
        }
    }
}

pub fn opts(mds: usize, osds: usize) -> Options {
    let mut o = Options::new();
    o.mds = mds;
    o.osds = osds;
    // AVALON_TEST_LOG: the daemons' and mount's RUST_LOG, for a debugging run.
    o.log_level = std::env::var("AVALON_TEST_LOG").unwrap_or_else(|_| "info".into());
    o
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for 100 MiB.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

pub fn sha_file(p: &Path) -> Vec<u8> {
    sha(&std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())))
}

/// Runs a command and returns stdout, failing the test on non-zero exit.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `f` until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// The cluster map, from the MDS leader.
pub fn cluster_map(c: &LocalCluster) -> avalon_proto::pb::ClusterMap {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let conn = avalon_proto::mds_conn::MdsConn::new(c.layout.mds_addrs(), c.tls().clone());
    rt.block_on(
        conn.call_within(Duration::from_secs(10), |mut m| async move {
            m.get_cluster_map(avalon_proto::pb::Empty {}).await
        }),
    )
    .expect("cluster map")
}

/// A second mount of the cluster through the mount helper binary.
pub struct SecondMount {
    pub path: PathBuf,
    source: String,
}

impl SecondMount {
    pub fn new(c: &LocalCluster, path: PathBuf) -> SecondMount {
        Self::with_options(c, path, "")
    }

    /// A second mount with more mount options (`,`-separated, may be "").
    pub fn with_options(c: &LocalCluster, path: PathBuf, options: &str) -> SecondMount {
        Self::with_env(c, path, options, &[])
    }

    /// A second mount with mount options and environment variables for
    /// its client process.
    pub fn with_env(
        c: &LocalCluster,
        path: PathBuf,
        options: &str,
        env: &[(&str, &str)],
    ) -> SecondMount {
        std::fs::create_dir_all(&path).unwrap();
        let source = c.layout.source();
        let bin = avalonctl::local_cluster::default_bin_dir().join("avalon-fuse");
        let log = path.with_extension("log");
        let mut opts = format!(
            "log={},{}",
            log.display(),
            avalonctl::local_cluster::mount_key_option(&c.dir, &c.layout)
        );
        if !options.is_empty() {
            opts = format!("{opts},{options}");
        }
        run(Command::new(bin)
            .envs(env.iter().copied())
            .arg(&source)
            .arg(&path)
            .arg("-o")
            .arg(opts));
        assert!(avalonctl::local_cluster::is_mounted(&path));
        SecondMount { path, source }
    }

    /// Pid of the client process serving this mount.
    pub fn pid(&self) -> u32 {
        let out = run(Command::new("pgrep").args([
            "-f",
            // A detached client runs as `--foreground --detached`.
            &format!(
                "avalon-fuse --foreground (--detached )?{} {}",
                self.source,
                self.path.display()
            ),
        ]));
        out.split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("client pid")
    }
}

impl Drop for SecondMount {
    fn drop(&mut self) {
        unmount(&self.path);
    }
}

/// A single-threaded runtime for a test's async admin calls.
/// Registers a session on `m` as a client of this release named
/// `hostname` would (no mount behind it); its id.
pub async fn register_session(
    m: &mut avalon_proto::pb::meta_client::MetaClient<tonic::transport::Channel>,
    hostname: &str,
) -> u64 {
    m.register_client(avalon_proto::pb::RegisterClientRequest {
        hostname: hostname.into(),
        mountpoint: "/none".into(),
        pid: std::process::id(),
        version: Some(avalon_proto::version::local()),
        ..Default::default()
    })
    .await
    .expect("register")
    .into_inner()
    .session_id
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The MDS leader's id as the nodes of `c` report it (waits for one).
pub fn leader(c: &LocalCluster) -> u64 {
    let addrs = c.layout.mds_addrs();
    let rt = rt();
    let mut found = None;
    assert!(
        wait_until(Duration::from_secs(120), || {
            found = rt
                .block_on(avalonctl::mds_admin::find_leader(c.tls(), &addrs))
                .map(|(id, _)| id);
            found.is_some()
        }),
        "no MDS leader"
    );
    found.unwrap_or(0)
}

/// Waits until every MDS of the layout answers with the same last_applied
/// and state digest (a restarted node caught up); returns them.
pub fn wait_converged(c: &LocalCluster, limit: Duration) -> (u64, u64) {
    let addrs = c.layout.mds_addrs();
    let rt = rt();
    let mut last = Vec::new();
    let ok = wait_until(limit, || {
        last = addrs
            .iter()
            .map(|a| {
                rt.block_on(avalonctl::mds_admin::status_of(
                    c.tls(),
                    a,
                    Duration::from_secs(2),
                ))
                .and_then(|s| s.self_)
                .map(|m| (m.last_applied, m.state_digest))
            })
            .collect();
        match last.first() {
            Some(Some((idx, dig))) => *idx > 0 && last.iter().all(|x| *x == Some((*idx, *dig))),
            _ => false,
        }
    });
    assert!(ok, "MDS nodes did not converge: {last:?}");
    last.first().copied().flatten().unwrap_or((0, 0))
}

/// The user.* xattrs of `p` (not following a symlink), sorted.
pub fn user_xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str()))
        .expect("path");
    let mut names = vec![0u8; 65536];
    // SAFETY: c is NUL-terminated; names is valid for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", p.display());
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| n.starts_with(b"user.")) {
        let cn = std::ffi::CString::new(name).expect("name");
        let mut v = vec![0u8; 65536];
        // SAFETY: c and cn are NUL-terminated; v is valid for its length.
        let len =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(len >= 0, "lgetxattr {}", p.display());
        v.truncate(len as usize);
        out.push((String::from_utf8_lossy(name).into_owned(), v));
    }
    out.sort();
    out
}

/// Runs `avalonctl ARGS` with the cluster's admin key from `keys_dir`.
pub fn admin_ctl(keys_dir: &Path, args: &[&str]) {
    let admin = avalonctl::keys::keyfile(keys_dir, avalonctl::keys::ADMIN);
    run(
        Command::new(avalonctl::local_cluster::default_bin_dir().join("avalonctl"))
            .arg("--keyfile")
            .arg(&admin)
            .args(args),
    );
}

/// The errno of a call that must have been refused.
pub fn refused_errno(r: std::io::Result<impl std::fmt::Debug>) -> i32 {
    r.expect_err("refused").raw_os_error().unwrap_or(0)
}
