//! `avalon-chaos`: runs a workload on two mounts of a fresh local cluster
//! while a nemesis injects faults, then checks the history. Exit code 0
//! when every check passed, 1 when one failed, 2 when the run itself
//! could not be done.

use avalon_chaos::nemesis::{FaultKind, Kinds};
use avalon_chaos::run::{self, Options, INTERRUPTED};
use clap::Parser;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Seed of `--short` (and the default): fixed, so CI runs are replayable.
const DEFAULT_SEED: u64 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "avalon-chaos",
    about = "Avalon chaos harness: faults under a workload, checked"
)]
struct Args {
    /// Seed of every random choice (workload and nemesis); printed, replay with it.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// A bounded CI run: 90 s of faults with the fixed seed unless --seed.
    #[arg(long, conflicts_with = "duration")]
    short: bool,
    /// How long to inject faults: 90s, 30m, 2h (a soak).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Faults to inject, comma separated: kill, pause, flap, disk, partition,
    /// all (all but partition), none.
    #[arg(long, default_value = "all")]
    nemesis: String,
    /// Client threads per mount (two mounts).
    #[arg(long, default_value_t = 3)]
    clients_per_mount: u32,
    /// Number of FUSE mounts of the cluster.
    #[arg(long, default_value_t = 2)]
    mounts: usize,
    /// Weights of namespace, data, append and lock operations (e.g.
    /// 0,0,1,0 for appends only).
    #[arg(long, value_parser = parse_mix, default_value = "45,30,13,12")]
    mix: [u32; 4],
    /// Run directory (must be new or empty) [default: /var/tmp/avalon-chaos-SEED-PID].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Directory of the avalon-mds, avalon-osd and avalon-fuse binaries
    /// [default: $AVALON_BIN_DIR, else next to this program].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Seconds the cluster may take to be healthy once the faults stop.
    #[arg(long, default_value_t = 120)]
    recover_bound: u64,
    /// Keep the nodes' data directories after a passing run.
    #[arg(long)]
    keep: bool,
    /// Second octet of every address of the cluster (127.N.0.x): runs side
    /// by side need different ones.
    #[arg(long, default_value_t = 0)]
    net: u8,
}

/// `90`, `90s`, `30m`, `2h`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("bad duration unit in {s:?} (s, m, h)")),
    };
    Ok(Duration::from_secs(secs))
}

/// Four comma-separated weights.
fn parse_mix(s: &str) -> Result<[u32; 4], String> {
    let v: Vec<u32> = s
        .split(',')
        .map(|p| p.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad mix {s:?}: {e}"))?;
    let m: [u32; 4] = v
        .try_into()
        .map_err(|_| format!("bad mix {s:?}: four weights"))?;
    if m.iter().sum::<u32>() == 0 {
        return Err("the mix weights are all zero".into());
    }
    Ok(m)
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn main() {
    let args = Args::parse();
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let kinds: Vec<FaultKind> = match args.nemesis.parse::<Kinds>() {
        Ok(k) => k.0,
        Err(e) => {
            eprintln!("avalon-chaos: {e}");
            std::process::exit(2);
        }
    };
    let (mode, duration) = match args.duration {
        Some(d) if d >= Duration::from_secs(600) => ("soak", d),
        Some(d) => ("custom", d),
        None => (
            if args.short { "short" } else { "default" },
            Duration::from_secs(90),
        ),
    };
    let dir = args.dir.unwrap_or_else(|| {
        PathBuf::from(format!(
            "/var/tmp/avalon-chaos-{}-{}",
            args.seed,
            std::process::id()
        ))
    });
    let opts = Options {
        seed: args.seed,
        mode: mode.to_string(),
        duration,
        kinds,
        clients_per_mount: args.clients_per_mount,
        mounts: args.mounts,
        mix: args.mix,
        dir: dir.clone(),
        bin_dir: args
            .bin_dir
            .unwrap_or_else(avalonctl::local_cluster::default_bin_dir),
        recover_bound: Duration::from_secs(args.recover_bound),
        net: args.net,
    };
    match run::run(&opts) {
        Ok(report) => {
            print!("{}", report.render());
            if report.passed && !args.keep {
                // The nodes' data is large and explains nothing a passing
                // run needs; logs, history and report stay.
                if let Ok(rd) = std::fs::read_dir(&dir) {
                    for e in rd.flatten() {
                        let n = e.file_name().to_string_lossy().into_owned();
                        if n.starts_with("mds") || n.starts_with("osd") {
                            let _ = std::fs::remove_dir_all(e.path());
                        }
                    }
                }
            }
            std::process::exit(if report.passed { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("avalon-chaos: seed {}: {e:#}", args.seed);
            eprintln!("avalon-chaos: logs in {}", dir.display());
            std::process::exit(2);
        }
    }
}
