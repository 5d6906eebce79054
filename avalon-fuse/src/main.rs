//! `avalon-fuse` / `mount.fuse.avalon`: mounts an Avalon filesystem.
//!
//! mount(8) runs `mount.fuse.avalon SOURCE MOUNTPOINT [-sfnv] -o OPTIONS`.
//! Without `--foreground` the program starts itself again in the
//! background, waits until the mount is up (or has failed) and exits with
//! the mount's status, like other network filesystems' helpers.

use anyhow::{bail, Context};
use avalon_fuse::client::{AtimeMode, Client};
use avalon_fuse::fs::AvalonFs;
use avalon_fuse::log_file::LogFile;
use avalon_fuse::mount_source;
use avalon_proto::log_output::LogFormat;
use avalon_proto::tls::{ClientTls, Dial};
use clap::Parser;
use fuser::{MountOption, SessionACL};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// mimalloc: the daemons allocate and free many small objects per request
/// (glibc's malloc/free were ~30% of the MDS's CPU applying batches).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Mount an Avalon filesystem.
#[derive(Parser, Debug)]
#[command(
    name = "avalon-fuse",
    version,
    about,
    long_about = "Mounts an Avalon filesystem with FUSE. Installed as \
/sbin/mount.fuse.avalon, so `mount -t fuse.avalon SOURCE DIR -o OPTIONS` and \
/etc/fstab lines (with _netdev) work. Without --foreground it detaches once the \
mount is ready and logs to the file of `log=` (default under /var/log/avalon). \
The client key is /etc/avalon/NAME.key for `name=client.NAME` unless `keyfile=` \
says otherwise."
)]
struct Args {
    /// MDS addresses and optional subdirectory: host:port[,host:port...][:/dir]
    source: String,
    /// Directory to mount on.
    mountpoint: PathBuf,
    /// Mount options, comma separated (ro, rw, allow_other, noatime, log=FILE (reopened on
    /// SIGHUP), log_level=LEVEL, log_format=text|json, slow_request_ms=MS, connect_timeout=SECS,
    /// threads=N, fsname=NAME, cache_mb=MB, metrics=HOST:PORT, nosubtype, selinux,
    /// name=client.NAME, keyfile=PATH (default /etc/avalon/NAME.key), insecure (no TLS),
    /// source_addr=IP (connect to the cluster from this local address); _netdev, defaults,
    /// nofail and x-* are accepted and ignored).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Stay in the foreground (do not detach).
    #[arg(long)]
    foreground: bool,
    /// Set by the detaching parent: its pipes close after READY, so logs go
    /// to a file (`log=` or the default under /var/log/avalon).
    #[arg(long, hide = true)]
    detached: bool,
    /// Accepted for mount(8) compatibility: do not write /etc/mtab.
    #[arg(short = 'n', hide = true)]
    no_mtab: bool,
    /// Accepted for mount(8) compatibility: sloppy options.
    #[arg(short = 's', hide = true)]
    sloppy: bool,
    /// Accepted for mount(8) compatibility: verbose.
    #[arg(short = 'v', hide = true)]
    verbose: bool,
    /// Accepted for mount(8) compatibility: filesystem type.
    #[arg(short = 't', hide = true)]
    fstype: Option<String>,
}

/// Options after parsing `-o`.
#[derive(Debug, Default)]
struct Opts {
    kernel: Vec<MountOption>,
    log: Option<PathBuf>,
    log_level: Option<String>,
    /// Log lines as text or JSON objects (`log_format=`).
    log_format: LogFormat,
    /// Operations slower than this are logged with their request id
    /// (`slow_request_ms=`).
    slow_request_ms: Option<u64>,
    connect_timeout: Option<u64>,
    threads: Option<usize>,
    fsname: Option<String>,
    subtype: bool,
    cache_mb: Option<u64>,
    /// When reads renew access times (noatime, relatime, strictatime;
    /// never on a read-only mount).
    atime: AtimeMode,
    read_only: bool,
    /// Store SELinux labels (security.selinux); off: EOPNOTSUPP.
    selinux: bool,
    /// Serve Prometheus metrics at this host:port (`metrics=`); off by default.
    metrics: Option<String>,
    /// Identity (`client.NAME`) and its keyfile; `insecure`: plaintext.
    name: Option<String>,
    keyfile: Option<PathBuf>,
    insecure: bool,
    /// Local address every connection to the cluster leaves from
    /// (`source_addr=`); the kernel's choice by default.
    source_addr: Option<std::net::IpAddr>,
}

/// Session heartbeat period: a quarter of the MDS's default 1 s lease.
const HEARTBEAT: Duration = Duration::from_millis(250);
/// How long a mount waits for its recall stream before it serves anyway.
const STREAM_WAIT: Duration = Duration::from_secs(5);
/// The cluster map is refreshed every this many heartbeats (2 s).
const MAP_REFRESH_TICKS: u64 = 8;

fn parse_opts(list: &[String]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        subtype: true,
        ..Default::default()
    };
    for opt in list
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        match (k, v) {
            ("ro", None) => {
                o.read_only = true;
                o.kernel.push(MountOption::RO)
            }
            ("rw", None) => {
                o.read_only = false;
                o.kernel.push(MountOption::RW)
            }
            ("noatime", None) => {
                o.atime = AtimeMode::Never;
                o.kernel.push(MountOption::NoAtime)
            }
            ("atime", None) => {
                if o.atime == AtimeMode::Never {
                    o.atime = AtimeMode::Relative;
                }
                o.kernel.push(MountOption::Atime)
            }
            ("relatime", None) => o.atime = AtimeMode::Relative,
            ("strictatime" | "norelatime", None) => o.atime = AtimeMode::Always,
            ("nodev", None) => o.kernel.push(MountOption::NoDev),
            ("dev", None) => o.kernel.push(MountOption::Dev),
            ("nosuid", None) => o.kernel.push(MountOption::NoSuid),
            ("suid", None) => o.kernel.push(MountOption::Suid),
            ("noexec", None) => o.kernel.push(MountOption::NoExec),
            ("exec", None) => o.kernel.push(MountOption::Exec),
            ("sync", None) => o.kernel.push(MountOption::Sync),
            ("async", None) => o.kernel.push(MountOption::Async),
            ("dirsync", None) => o.kernel.push(MountOption::DirSync),
            ("allow_other" | "default_permissions" | "allow_root", None) => {} // always on
            ("log", Some(p)) => o.log = Some(PathBuf::from(p)),
            ("log_level", Some(l)) => o.log_level = Some(l.to_string()),
            ("log_format", Some(f)) => o.log_format = f.parse().map_err(anyhow::Error::msg)?,
            ("slow_request_ms", Some(n)) => {
                o.slow_request_ms = Some(
                    n.parse()
                        .with_context(|| format!("slow_request_ms={n}: not a number"))?,
                )
            }
            ("connect_timeout", Some(s)) => {
                o.connect_timeout = Some(
                    s.parse()
                        .with_context(|| format!("connect_timeout={s}: not a number"))?,
                )
            }
            ("threads", Some(n)) => {
                o.threads = Some(
                    n.parse()
                        .with_context(|| format!("threads={n}: not a number"))?,
                )
            }
            ("fsname", Some(n)) => o.fsname = Some(n.to_string()),
            ("metrics", Some(a)) => o.metrics = Some(a.to_string()),
            ("cache_mb", Some(n)) => {
                o.cache_mb = Some(
                    n.parse()
                        .with_context(|| format!("cache_mb={n}: not a number"))?,
                )
            }
            ("nosubtype", None) => o.subtype = false,
            ("selinux", None) => o.selinux = true,
            ("name", Some(n)) => o.name = Some(n.to_string()),
            ("keyfile", Some(p)) => o.keyfile = Some(PathBuf::from(p)),
            ("insecure", None) => o.insecure = true,
            ("source_addr", Some(a)) => {
                o.source_addr = Some(
                    a.parse()
                        .with_context(|| format!("source_addr={a}: not an IP address"))?,
                )
            }
            ("nodiratime" | "diratime" | "lazytime" | "nolazytime" | "silent" | "loud", None) => {}
            (
                "_netdev" | "defaults" | "nofail" | "auto" | "noauto" | "user" | "nouser" | "users",
                _,
            ) => {}
            (k, _) if k.starts_with("x-") || k.starts_with("comment=") => {}
            _ => bail!("unknown mount option {opt:?}"),
        }
    }
    Ok(o)
}

/// Starts logging to `log` (returned, to be reopened on SIGHUP) or stderr.
fn init_logging(
    level: &str,
    format: LogFormat,
    log: Option<&PathBuf>,
) -> anyhow::Result<Option<LogFile>> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    match log {
        Some(p) => {
            let f = LogFile::open(p)
                .with_context(|| format!("cannot open log file {}", p.display()))?;
            avalon_proto::log_output::init(filter, format, false, false, f.clone());
            Ok(Some(f))
        }
        None => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            avalon_proto::log_output::init(filter, format, ansi, false, std::io::stderr);
            Ok(None)
        }
    }
}

fn main() {
    use clap::CommandFactory;
    if let Some(code) = avalon_proto::man_page::write_if_asked(Args::command()) {
        std::process::exit(code.into());
    }
    let args = Args::parse();
    let code = match if args.foreground {
        run_foreground(&args)
    } else {
        run_background(&args)
    } {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mount.fuse.avalon: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

/// Starts the real client detached and reports how the mount went.
fn run_background(args: &Args) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find own executable")?;
    let mut cmd = Command::new(exe);
    // `--foreground SOURCE MOUNTPOINT` first: scripts find the client by it.
    cmd.arg("--foreground")
        .arg(&args.source)
        .arg(&args.mountpoint)
        .arg("--detached");
    for o in &args.options {
        cmd.arg("-o").arg(o);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Own session: the terminal's signals and hangup do not reach the client.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the client process")?;
    let stdout = child.stdout.take().context("no pipe to the client")?;
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    if line.trim() == "READY" {
        return Ok(()); // the child keeps running; its stderr pipe is closed by it
    }
    let status = child.wait().context("waiting for the client process")?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    let err = err.trim();
    bail!(
        "mount failed ({status}){}{}",
        if err.is_empty() { "" } else { ": " },
        err
    )
}

/// The mount's TLS from `name=`, `keyfile=` (default
/// `/etc/avalon/NAME.key`) or `insecure`.
fn client_tls(o: &Opts) -> anyhow::Result<ClientTls> {
    if o.insecure {
        anyhow::ensure!(
            o.keyfile.is_none(),
            "options insecure and keyfile= exclude each other"
        );
        tracing::warn!("mounted with -o insecure: no TLS, no authentication");
        return Ok(ClientTls::plaintext().with_source(o.source_addr));
    }
    let path = match (&o.keyfile, &o.name) {
        (Some(p), _) => p.clone(),
        (None, Some(n)) => PathBuf::from(format!("/etc/avalon/{n}.key")),
        (None, None) => bail!(
            "no key: mount with -o name=client.NAME,keyfile=PATH (made by `avalonctl auth add \
             client.NAME`), or -o insecure for a cluster that runs without TLS"
        ),
    };
    let tls = ClientTls::from_keyfile(&path)?;
    if let (Some(n), Some(id)) = (&o.name, tls.identity()) {
        anyhow::ensure!(
            &id.name == n,
            "keyfile {} is for {}, not {n}",
            path.display(),
            id.name
        );
    }
    Ok(tls.with_source(o.source_addr))
}

fn run_foreground(args: &Args) -> anyhow::Result<()> {
    let mut opts = parse_opts(&args.options)?;
    let src = mount_source::parse(&args.source).map_err(anyhow::Error::msg)?;
    let mountpoint = std::fs::canonicalize(&args.mountpoint)
        .with_context(|| format!("mount point {} does not exist", args.mountpoint.display()))?;
    if !mountpoint.is_dir() {
        bail!("mount point {} is not a directory", mountpoint.display());
    }
    if args.detached && opts.log.is_none() {
        opts.log = Some(default_log_file(&mountpoint));
    }
    let log_file = init_logging(
        opts.log_level.as_deref().unwrap_or("info"),
        opts.log_format,
        opts.log.as_ref(),
    )?;
    avalon_proto::request_id::set_slow_threshold(
        opts.slow_request_ms
            .unwrap_or(avalon_proto::request_id::DEFAULT_SLOW_MS),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.threads.unwrap_or(4))
        .enable_all()
        .thread_name("avalon-client")
        .build()
        .context("cannot start the async runtime")?;
    // Before anything else: SIGHUP's default action would end the process
    // (logrotate's postrotate signals every client, some with no log file).
    let hup = {
        let _rt = rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot handle SIGHUP")?
    };
    rt.spawn(reopen_on_hangup(hup, log_file));
    let budget = Duration::from_secs(opts.connect_timeout.unwrap_or(10));
    let tls = client_tls(&opts)?;
    let client = rt
        .block_on(Client::connect(
            src.mds.clone(),
            &src.subdir,
            mountpoint.as_os_str().as_bytes(),
            budget,
            tls.clone(),
        ))
        .map_err(|e| {
            if let avalon_fuse::error::ClientError::Refused(m) = &e {
                return anyhow::anyhow!(
                    "the Avalon metadata service at {} refused this client: {m}",
                    src.mds.join(",")
                );
            }
            // A refused certificate shows only as a transport error: ask
            // the MDS nodes directly what went wrong in the handshake.
            let why = rt.block_on(tls.diagnose(&src.mds, Dial::Mds));
            anyhow::anyhow!(
                "cannot reach the Avalon metadata service at {}: {e}{}",
                src.mds.join(","),
                why.map(|w| format!(" ({w})")).unwrap_or_default()
            )
        })?;
    let mut client = client;
    client.set_cache_budget(opts.cache_mb.unwrap_or(128) << 20);
    client.set_selinux_labels(opts.selinux);
    client.set_atime_mode(if opts.read_only {
        AtimeMode::Never
    } else {
        opts.atime
    });
    let client = Arc::new(client);
    if let Some(addr) = &opts.metrics {
        // Metrics are an aid: a port in use (another mount's) does not
        // keep the filesystem from mounting.
        if let Err(e) = rt.block_on(avalon_fuse::metrics::serve(addr, client.clone())) {
            tracing::warn!(error = %e, "no metrics endpoint for this mount");
        }
    }
    tracing::info!(
        session = client.session.id(),
        root = client.root_ino,
        "connected to the metadata service"
    );

    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(opts.fsname.clone().unwrap_or_else(|| args.source.clone())),
        MountOption::DefaultPermissions,
    ];
    if opts.subtype {
        cfg.mount_options
            .push(MountOption::CUSTOM("subtype=avalon".into()));
    }
    cfg.mount_options.extend(opts.kernel.iter().cloned());
    cfg.acl = SessionACL::All;
    cfg.n_threads = Some(2);
    cfg.clone_fd = true;
    let fs = AvalonFs::new(client.clone(), rt.handle().clone());
    let kernel_slot = fs.kernel_slot();
    let mut session = fuser::Session::new(fs, &mountpoint, &cfg)
        .with_context(|| format!("cannot mount on {}", mountpoint.display()))?;

    // Background duties: the recall stream, heartbeats (which renew the
    // metadata lease, so several per lease) and cluster map refresh.
    let device = std::os::fd::AsFd::as_fd(&session).try_clone_to_owned().ok();
    let kernel = avalon_fuse::recall::KernelCache::new(session.notifier(), client.root_ino, device);
    let _ = kernel_slot.set(kernel.clone());
    client
        .session
        .mds
        .set_gate(std::sync::Arc::new(avalon_fuse::recall::MarkGate::new(
            &client,
            Some(kernel.clone()),
        )));
    rt.spawn(avalon_fuse::recall::run(client.clone(), Some(kernel)));
    let fl = client.clone();
    rt.spawn(async move { fl.run_delegation_flusher().await });
    let hb = client.clone();
    rt.spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT);
        for n in 0u64.. {
            tick.tick().await;
            if let Err(e) = hb.heartbeat().await {
                tracing::warn!(error = %e, "session heartbeat failed");
            }
            avalon_fuse::locks::Locks::spawn_asked_reclaim(&hb);
            if n % MAP_REFRESH_TICKS == 0 {
                if let Err(e) = hb.refresh_map().await {
                    tracing::warn!(error = %e, "cluster map refresh failed");
                }
            }
        }
    });

    // SIGTERM/SIGINT unmount, which ends the session loop below.
    let mut unmounter = session.unmount_callable();
    let mp = mountpoint.clone();
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!(mountpoint = %mp.display(), "signal received; unmounting");
        if let Err(e) = unmounter.unmount() {
            tracing::warn!(error = %e, "unmount failed; detaching");
            let _ = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH);
        }
    });

    // Files opened before the recall stream is up stay in shared-write
    // mode for good; give it a moment (the MDS answered a moment ago).
    if !rt.block_on(client.session.wait_stream(STREAM_WAIT)) {
        tracing::warn!("the recall stream is not open yet; writes go through until it is");
    }
    // Tell a waiting parent (mount helper mode) that the mount is up.
    println!("READY");
    let _ = std::io::stdout().flush();
    redirect_stdio_after_ready(args.detached || opts.log.is_some());
    tracing::info!(mountpoint = %mountpoint.display(), source = %args.source, "mounted");
    let r = session.run();
    tracing::info!("session ended");
    drop(rt);
    r.context("FUSE session failed")
}

/// Reopens the log file (if any) at each SIGHUP (logrotate's postrotate).
async fn reopen_on_hangup(mut hup: tokio::signal::unix::Signal, f: Option<LogFile>) {
    while hup.recv().await.is_some() {
        let Some(f) = &f else {
            tracing::debug!("SIGHUP: logging to stderr, no file to reopen");
            continue;
        };
        match f.reopen() {
            Ok(()) => tracing::info!(path = %f.path().display(), "log file reopened"),
            Err(e) => {
                tracing::warn!(path = %f.path().display(), error = %e, "cannot reopen the log file; still writing the old one")
            }
        }
    }
}

/// Where a detached client without `log=` logs:
/// `/var/log/avalon/<mount point with / as ->.log`, or /dev/null if that
/// file cannot be written (a read-only /var must not stop the mount).
fn default_log_file(mountpoint: &std::path::Path) -> PathBuf {
    let dir = std::path::Path::new("/var/log/avalon");
    let trimmed = mountpoint
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "-");
    let name = if trimmed.is_empty() {
        "-".into()
    } else {
        trimmed
    };
    let path = dir.join(format!("{name}.log"));
    let writable = std::fs::create_dir_all(dir).is_ok()
        && std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .is_ok();
    if writable {
        path
    } else {
        PathBuf::from("/dev/null")
    }
}

/// After READY the parent stops reading our pipes; point stdout (and stderr
/// when logging goes to a file) at /dev/null so late writes cannot fail.
fn redirect_stdio_after_ready(stderr_too: bool) {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
        if stderr_too {
            let _ = nix::unistd::dup2(null.as_raw_fd(), 2);
        }
    }
}
