//! Network partitions on the loopback interface. Every node of a chaos
//! cluster listens on and connects out from its own 127.0.0.0/8 address,
//! so nftables rules on `lo` can drop the traffic between two sets of
//! nodes. The rules live in a table of their own, named with this
//! process's id (`avalon_chaos_PID_N`), only ever match loopback
//! addresses, and drop silently on input: the sender sees no error, its
//! packets just vanish, as on a cut cable. A table left by a process
//! that died (a crashed or killed run) is removed when the next one is made.
//! Every `nft` runs from one shell started before any mount ([`prepare`]).

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Prefix of the tables this module makes.
pub const TABLE_PREFIX: &str = "avalon_chaos_";

/// Tables made by this process so far (two clusters in one test process
/// each have their own).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Why a partition could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// Only 127.0.0.0/8 is ever touched.
    #[error("{0} is not a loopback address: partitions only touch 127.0.0.0/8")]
    NotLoopback(Ipv4Addr),
    /// A side of the cut is empty.
    #[error("a partition needs addresses on both sides")]
    EmptySide,
    /// `nft` could not be run.
    #[error("cannot run nft (install nftables): {0}")]
    Spawn(std::io::Error),
    /// `nft` did not end in time (killed).
    #[error("nft {what} did not end within {after:?}")]
    Timeout {
        /// What was asked.
        what: String,
        /// How long it was given.
        after: Duration,
    },
    /// `nft` refused.
    #[error("nft {what}: {msg}")]
    Nft {
        /// What was asked.
        what: String,
        /// nft's error output.
        msg: String,
    },
}

/// One nftables table of this process: at most one cut at a time, removed
/// by [`Partition::heal`] and when dropped.
#[derive(Debug)]
pub struct Partition {
    table: String,
    cut: bool,
}

/// How long one `nft` command may take: it normally takes milliseconds.
const NFT_TIMEOUT: Duration = Duration::from_secs(30);

/// The shell every `nft` runs from (see [`prepare`]).
struct Shell {
    child: Child,
    stdin: ChildStdin,
    /// Lines of its output (stdout and stderr), read by a thread.
    lines: Receiver<String>,
    /// Numbers each command's end marker.
    seq: u64,
}

static SHELL: Mutex<Option<Shell>> = Mutex::new(None);

impl Shell {
    fn start() -> std::io::Result<Shell> {
        let mut child = Command::new("sh")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Not reached by the harness's Ctrl-C; killed as a group
            // (with its nft) when a command overruns.
            .process_group(0)
            .spawn()?;
        let (stdin, stdout) = match (child.stdin.take(), child.stdout.take()) {
            (Some(i), Some(o)) => (i, o),
            _ => return Err(std::io::Error::other("no pipes to sh")),
        };
        let (tx, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name("nft-shell".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(l) = line else { break };
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Shell {
            child,
            stdin,
            lines,
            seq: 0,
        })
    }

    /// Runs `prog ARGS` (with `input` on its stdin) and returns its exit
    /// code and output, or `None` when it did not end within `timeout`.
    fn run(
        &mut self,
        prog: &str,
        args: &[&str],
        input: Option<&str>,
        timeout: Duration,
    ) -> Option<(i32, String)> {
        self.seq += 1;
        let marker = format!("__avalon_chaos_nft_{}_rc=", self.seq);
        let mut cmd = String::from(prog);
        for a in args {
            // Our arguments are plain words; quoted all the same.
            cmd.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        }
        cmd.push_str(" 2>&1");
        if let Some(text) = input {
            cmd.push_str(&format!(
                " <<'__AVALON_CHAOS_EOF'\n{text}\n__AVALON_CHAOS_EOF"
            ));
        }
        // The empty echo ends output that lacks a final newline.
        cmd.push_str(&format!("\nr=$?; echo; echo \"{marker}$r\"\n"));
        self.stdin.write_all(cmd.as_bytes()).ok()?;
        self.stdin.flush().ok()?;
        let deadline = Instant::now() + timeout;
        let mut out: Vec<String> = Vec::new();
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            if let Some(rc) = line.strip_prefix(&marker) {
                // The empty line the echo added.
                if out.last().is_some_and(String::is_empty) {
                    out.pop();
                }
                let mut text = out.join("\n");
                if !text.is_empty() {
                    text.push('\n');
                }
                return Some((rc.trim().parse().unwrap_or(-1), text));
            }
            out.push(line);
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        // The whole group: the shell and an nft it may be waiting for.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

/// Starts the shell that runs every `nft` of this process, if it is not
/// running. Call it before the process opens files on a FUSE mount (the
/// cluster does, before mounting): a process spawned by one that has such
/// files open closes its copies of them while it execs, and each close
/// is a FUSE flush that waits for the mount, which, cut off from the MDS,
/// can wait for minutes, with the cut in place because the nft that would
/// remove it had not started. The shell forks nft from a table of files
/// with no mount's files in it.
pub fn prepare() -> Result<(), PartitionError> {
    let mut shell = SHELL.lock().unwrap_or_else(|p| p.into_inner());
    if shell
        .as_mut()
        .is_some_and(|s| matches!(s.child.try_wait(), Ok(None)))
    {
        return Ok(());
    }
    *shell = Some(Shell::start().map_err(PartitionError::Spawn)?);
    Ok(())
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, PartitionError> {
    prepare()?;
    let mut guard = SHELL.lock().unwrap_or_else(|p| p.into_inner());
    let what = || args.join(" ");
    let Some(shell) = guard.as_mut() else {
        return Err(PartitionError::Spawn(std::io::Error::other("no shell")));
    };
    match shell.run("nft", args, stdin, NFT_TIMEOUT) {
        Some((0, out)) => Ok(out),
        // sh's "not found".
        Some((127, out)) => Err(PartitionError::Spawn(std::io::Error::other(out))),
        Some((_, out)) => Err(PartitionError::Nft {
            what: what(),
            msg: out.trim().to_string(),
        }),
        None => {
            // The next command gets a fresh shell.
            *guard = None;
            Err(PartitionError::Timeout {
                what: what(),
                after: NFT_TIMEOUT,
            })
        }
    }
}

/// True when `nft` runs and the kernel has nf_tables.
pub fn available() -> bool {
    nft(&["list", "tables"], None).is_ok()
}

/// The pid in a table name of ours.
fn table_pid(name: &str) -> Option<i32> {
    name.strip_prefix(TABLE_PREFIX)?
        .split('_')
        .next()?
        .parse()
        .ok()
}

/// The tables of chaos runs (any process's) in place: (family, name).
fn list_ours() -> Result<Vec<(String, String)>, PartitionError> {
    Ok(nft(&["list", "tables"], None)?
        .lines()
        .filter_map(|line| {
            // "table ip avalon_chaos_1234_0"
            let mut w = line.split_whitespace();
            match (w.next(), w.next(), w.next()) {
                (Some("table"), Some(family), Some(name)) if name.starts_with(TABLE_PREFIX) => {
                    Some((family.to_string(), name.to_string()))
                }
                _ => None,
            }
        })
        .collect())
}

/// Names of the chaos runs' tables in place (`None`: nft does not work).
pub fn tables_of_ours() -> Option<Vec<String>> {
    list_ours()
        .ok()
        .map(|v| v.into_iter().map(|(_, name)| name).collect())
}

/// Deletes the tables of ours whose process is gone.
pub fn remove_stale() -> Result<Vec<String>, PartitionError> {
    let mut removed = Vec::new();
    for (family, name) in list_ours()? {
        let (family, name) = (family.as_str(), name.as_str());
        let Some(pid) = table_pid(name) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        nft(&["delete", "table", family, name], None)?;
        removed.push(name.to_string());
    }
    Ok(removed)
}

/// The nftables script that makes `table` drop everything between `a`
/// and `b` on `lo`, replacing what the table held.
fn script(table: &str, a: &[Ipv4Addr], b: &[Ipv4Addr]) -> String {
    let set = |s: &[Ipv4Addr]| {
        s.iter()
            .map(Ipv4Addr::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (a, b) = (set(a), set(b));
    // Created empty first so that the delete always has something to
    // delete: the script is one transaction, the swap atomic.
    format!(
        "add table ip {table}\n\
         delete table ip {table}\n\
         table ip {table} {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority -10; policy accept;\n\
         \t\tiifname \"lo\" ip saddr {{ {a} }} ip daddr {{ {b} }} drop\n\
         \t\tiifname \"lo\" ip saddr {{ {b} }} ip daddr {{ {a} }} drop\n\
         \t}}\n\
         }}\n"
    )
}

impl Partition {
    /// A fresh table name for this process; first removes tables that
    /// runs which died left behind.
    pub fn new() -> Result<Partition, PartitionError> {
        let removed = remove_stale()?;
        if !removed.is_empty() {
            eprintln!("partition: removed stale nftables tables {removed:?}");
        }
        Ok(Partition {
            table: format!(
                "{TABLE_PREFIX}{}_{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
            cut: false,
        })
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// True while a cut is in place.
    pub fn is_cut(&self) -> bool {
        self.cut
    }

    /// Drops all traffic between the addresses in `a` and those in `b`,
    /// both ways (replacing an earlier cut). Traffic within each side, and
    /// with addresses in neither, still flows.
    pub fn cut(&mut self, a: &[Ipv4Addr], b: &[Ipv4Addr]) -> Result<(), PartitionError> {
        if a.is_empty() || b.is_empty() {
            return Err(PartitionError::EmptySide);
        }
        if let Some(ip) = a.iter().chain(b).find(|ip| !ip.is_loopback()) {
            return Err(PartitionError::NotLoopback(*ip));
        }
        // Marked first: a failure half way still gets the table removed.
        self.cut = true;
        nft(&["-f", "-"], Some(&script(&self.table, a, b)))?;
        Ok(())
    }

    /// Removes the cut (the whole table); nothing when there is none.
    pub fn heal(&mut self) -> Result<(), PartitionError> {
        if !self.cut {
            return Ok(());
        }
        match nft(&["delete", "table", "ip", &self.table], None) {
            Ok(_) => {}
            // Already gone (removed by hand): healed all the same.
            Err(PartitionError::Nft { msg, .. })
                if msg.contains("No such file") || msg.contains("does not exist") => {}
            Err(e) => return Err(e),
        }
        self.cut = false;
        Ok(())
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        if let Err(e) = self.heal() {
            eprintln!("partition: could not remove table {}: {e}", self.table);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_carry_the_pid() {
        assert_eq!(table_pid("avalon_chaos_1234_0"), Some(1234));
        assert_eq!(table_pid("avalon_chaos_77_12"), Some(77));
        assert_eq!(table_pid("filter"), None);
        assert_eq!(table_pid("avalon_chaos_x_1"), None);
    }

    #[test]
    fn the_script_drops_both_ways_on_lo_only() {
        let a = [Ipv4Addr::new(127, 0, 0, 11)];
        let b = [Ipv4Addr::new(127, 0, 0, 12), Ipv4Addr::new(127, 0, 0, 31)];
        let s = script("avalon_chaos_1_0", &a, &b);
        assert!(s.contains(
            "iifname \"lo\" ip saddr { 127.0.0.11 } ip daddr { 127.0.0.12, 127.0.0.31 } drop"
        ));
        assert!(s.contains(
            "iifname \"lo\" ip saddr { 127.0.0.12, 127.0.0.31 } ip daddr { 127.0.0.11 } drop"
        ));
        assert!(s.starts_with("add table ip avalon_chaos_1_0\ndelete table ip avalon_chaos_1_0\n"));
    }

    /// The shell hands back each command's output (with or without a
    /// final newline) and exit code, feeds it its input, and gives up on
    /// a command that overruns, killing it with the shell.
    #[test]
    fn the_shell_runs_commands_and_gives_up_on_slow_ones() {
        let mut sh = Shell::start().expect("sh");
        let t = Duration::from_secs(20);
        assert_eq!(
            sh.run("printf", &["a\\nb"], None, t),
            Some((0, "a\nb\n".to_string()))
        );
        assert_eq!(sh.run("false", &[], None, t), Some((1, String::new())));
        assert_eq!(
            sh.run("cat", &[], Some("it's\nthere"), t),
            Some((0, "it's\nthere\n".to_string()))
        );
        assert_eq!(
            sh.run("echo", &["it's"], None, t),
            Some((0, "it's\n".to_string()))
        );
        let started = Instant::now();
        assert_eq!(
            sh.run("sleep", &["30"], None, Duration::from_millis(300)),
            None
        );
        assert!(started.elapsed() < Duration::from_secs(20));
        let pid = sh.child.id();
        drop(sh);
        // Killed and reaped with its group.
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn only_loopback_addresses_are_cut() {
        let mut p = Partition {
            table: "avalon_chaos_test_unused".into(),
            cut: false,
        };
        let e = p
            .cut(
                &[Ipv4Addr::new(127, 0, 0, 11)],
                &[Ipv4Addr::new(10, 0, 0, 1)],
            )
            .expect_err("refused");
        assert!(matches!(e, PartitionError::NotLoopback(_)), "{e}");
        assert!(!p.is_cut());
        assert!(matches!(
            p.cut(&[], &[Ipv4Addr::new(127, 0, 0, 1)]),
            Err(PartitionError::EmptySide)
        ));
    }

    /// On a machine with nftables (as root): a cut really drops a TCP
    /// connection between two loopback addresses, and heal lets it through
    /// again. Skipped, saying so, without nft.
    #[test]
    fn a_cut_drops_loopback_traffic_and_heal_restores_it() {
        use std::net::{SocketAddr, TcpListener};
        use std::time::Duration;
        if !available() {
            eprintln!("nft not available: skipping the live partition check");
            return;
        }
        let server = TcpListener::bind("127.0.9.12:0").expect("bind");
        let to = server.local_addr().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let connect = || {
            rt.block_on(async {
                let s = tokio::net::TcpSocket::new_v4()?;
                s.bind(SocketAddr::from(([127, 0, 9, 11], 0)))?;
                tokio::time::timeout(Duration::from_millis(500), s.connect(to))
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
            })
        };
        connect().expect("connects before the cut");
        let mut p = Partition::new().expect("table");
        p.cut(
            &[Ipv4Addr::new(127, 0, 9, 11)],
            &[Ipv4Addr::new(127, 0, 9, 12)],
        )
        .expect("cut");
        let listed = nft(&["list", "table", "ip", p.table()], None).expect("listed");
        assert!(listed.contains("127.0.9.11"), "{listed}");
        let e = connect().expect_err("dropped while cut");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        p.heal().expect("heal");
        assert!(nft(&["list", "table", "ip", p.table()], None).is_err());
        connect().expect("connects after the heal");
    }
}
