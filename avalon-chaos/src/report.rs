//! The run's report: seed, faults, operations, checks, unavailability; as
//! text for people and JSON for scripts.

use crate::check::{CheckResult, Verdict};
use crate::history::{Entry, Outcome};
use crate::nemesis::Fault;
use serde::Serialize;
use std::collections::BTreeMap;

/// Everything a run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    /// `short`, `soak` or `custom`.
    pub mode: String,
    /// Seconds the workload ran under faults.
    pub fault_window_s: f64,
    /// Whether the daemons honour `FAILPOINTS` (disk faults need it).
    pub failpoints_compiled: bool,
    /// Faults injected, by kind.
    pub faults_by_kind: BTreeMap<String, usize>,
    pub faults: Vec<Fault>,
    /// Operations by kind, then by outcome (ok, exists, absent, errno name, unknown).
    pub ops: BTreeMap<String, BTreeMap<String, usize>>,
    pub total_ops: usize,
    /// Longest time without any operation completing successfully, and when it began.
    pub longest_unavailability_s: f64,
    pub longest_unavailability_at_s: f64,
    /// Seconds from the end of the faults until the cluster was healthy
    /// (`None`: not within the bound).
    pub healthy_after_faults_s: Option<f64>,
    /// Client threads still blocked in a syscall when the run ended.
    pub stuck_clients: usize,
    pub checks: Vec<CheckResult>,
    /// Every check passed (inconclusive ones do not fail the run).
    pub passed: bool,
    /// Where the logs and the history are.
    pub dir: String,
}

fn errno_name(e: i32) -> String {
    let known = [
        (libc::ENOENT, "ENOENT"),
        (libc::EEXIST, "EEXIST"),
        (libc::EIO, "EIO"),
        (libc::EAGAIN, "EAGAIN"),
        (libc::ETIMEDOUT, "ETIMEDOUT"),
        (libc::ENOTCONN, "ENOTCONN"),
        (libc::ENOSPC, "ENOSPC"),
        (libc::EINTR, "EINTR"),
        (libc::ESTALE, "ESTALE"),
        (libc::EBADF, "EBADF"),
        (libc::ENOLCK, "ENOLCK"),
        (libc::EROFS, "EROFS"),
        (libc::EHOSTUNREACH, "EHOSTUNREACH"),
    ];
    known
        .iter()
        .find(|k| k.0 == e)
        .map_or_else(|| format!("errno {e}"), |k| k.1.to_string())
}

/// Operation counts by kind and outcome.
pub fn op_counts(history: &[Entry]) -> BTreeMap<String, BTreeMap<String, usize>> {
    let mut m: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for e in history {
        let o = match e.outcome {
            Outcome::Ok => "ok".to_string(),
            Outcome::Exists(true) => "present".to_string(),
            Outcome::Exists(false) => "absent".to_string(),
            Outcome::Err(n) => errno_name(n),
            Outcome::Unknown => "unknown".to_string(),
        };
        *m.entry(e.op.name().to_string())
            .or_default()
            .entry(o)
            .or_default() += 1;
    }
    m
}

/// The longest stretch without a successful completion between `from_ns`
/// and `to_ns`, and when it began (both in seconds). An expected refusal
/// (EEXIST, ENOENT, a held lock) counts as success: the system answered.
pub fn longest_gap(history: &[Entry], from_ns: u64, to_ns: u64) -> (f64, f64) {
    let answered = |o: Outcome| match o {
        Outcome::Ok | Outcome::Exists(_) => true,
        Outcome::Err(e) => [libc::EEXIST, libc::ENOENT, libc::EAGAIN].contains(&e),
        Outcome::Unknown => false,
    };
    let mut t: Vec<u64> = history
        .iter()
        .filter(|e| answered(e.outcome))
        .filter_map(|e| e.complete_ns)
        .filter(|&c| c >= from_ns && c <= to_ns)
        .collect();
    t.push(from_ns);
    t.push(to_ns);
    t.sort_unstable();
    let (gap, at) = t
        .windows(2)
        .map(|w| (w[1] - w[0], w[0]))
        .max()
        .unwrap_or((0, from_ns));
    (gap as f64 / 1e9, at as f64 / 1e9)
}

impl Report {
    /// Sets `passed` from the checks.
    pub fn conclude(&mut self) {
        self.passed = self.checks.iter().all(|c| c.verdict != Verdict::Fail);
    }

    /// The report for people.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let verdict = if self.passed { "PASS" } else { "FAIL" };
        s += &format!(
            "avalon-chaos {verdict}: seed {} ({} mode; replay with --seed {})\n",
            self.seed, self.mode, self.seed
        );
        s += &format!(
            "faults for {:.0} s ({} injected; fail points {}):\n",
            self.fault_window_s,
            self.faults.len(),
            if self.failpoints_compiled {
                "compiled in"
            } else {
                "NOT compiled in: disk faults had no effect"
            }
        );
        for (k, n) in &self.faults_by_kind {
            s += &format!("  {k:<20} {n}\n");
        }
        let slow = self
            .faults
            .iter()
            .filter_map(|f| f.recovered_after_s)
            .fold(0.0f64, f64::max);
        s += &format!(
            "  slowest recovery after a fault: {slow:.1} s; never recovered: {}\n",
            self.faults
                .iter()
                .filter(|f| f.recovered_after_s.is_none())
                .count()
        );
        s += &format!("operations ({}):\n", self.total_ops);
        for (k, outcomes) in &self.ops {
            let o: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o} {n}")).collect();
            s += &format!("  {k:<12} {}\n", o.join(", "));
        }
        s += &format!(
            "longest unavailability: {:.2} s (from {:.2} s)\n",
            self.longest_unavailability_s, self.longest_unavailability_at_s
        );
        s += &format!(
            "healthy after the faults stopped: {}\n",
            self.healthy_after_faults_s
                .map_or("NOT within the bound".to_string(), |t| format!("{t:.1} s"))
        );
        if self.stuck_clients > 0 {
            s += &format!(
                "client threads still blocked at the end: {}\n",
                self.stuck_clients
            );
        }
        s += "checks:\n";
        for c in &self.checks {
            s += &format!(
                "  {:<12} {} ({} checked)\n",
                format!("{:?}", c.verdict).to_uppercase(),
                c.name,
                c.checked
            );
            for d in c.details.iter().take(20) {
                s += &format!("      {d}\n");
            }
            if c.details.len() > 20 {
                s += &format!("      ... {} more\n", c.details.len() - 20);
            }
        }
        s += &format!("logs and history: {}\n", self.dir);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Op;

    #[test]
    fn longest_gap_spans_the_window() {
        let e = |t: u64, o: Outcome| Entry {
            client: 0,
            op: Op::Fsync { file: "f".into() },
            invoke_ns: t,
            complete_ns: Some(t),
            outcome: o,
        };
        let h = vec![
            e(2_000_000_000, Outcome::Ok),
            e(3_000_000_000, Outcome::Err(libc::EIO)),
            e(7_000_000_000, Outcome::Ok),
        ];
        let (gap, at) = longest_gap(&h, 1_000_000_000, 8_000_000_000);
        assert_eq!((gap, at), (5.0, 2.0));
    }
}
