//! Exclusive locks: no two clients held the same lock at overlapping
//! times. A client holds a lock from the completion of its successful
//! lock call to the invocation of its unlock (or to the end of the run if
//! it never unlocked): the part of the real holding time it can be sure
//! of, so an overlap is a real violation.

use super::CheckResult;
use crate::history::{Entry, LockKind, Op, Outcome};
use std::collections::BTreeMap;

/// One interval a client held a lock.
#[derive(Debug, Clone, Copy)]
struct Held {
    client: u32,
    from: u64,
    to: u64,
}

/// Checks every lock of `history`.
pub fn check(history: &[Entry]) -> CheckResult {
    let mut r = CheckResult::new("locks (no two holders at once)");
    let mut by_client: BTreeMap<(u32, &str, LockKind), Vec<&Entry>> = BTreeMap::new();
    for e in history {
        match &e.op {
            Op::Lock { file, kind } | Op::Unlock { file, kind } => by_client
                .entry((e.client, file.as_str(), *kind))
                .or_default()
                .push(e),
            _ => {}
        }
    }
    let mut held: BTreeMap<(&str, LockKind), Vec<Held>> = BTreeMap::new();
    for ((client, file, kind), mut ops) in by_client {
        ops.sort_by_key(|e| e.invoke_ns);
        for (i, e) in ops.iter().enumerate() {
            if !matches!(e.op, Op::Lock { .. }) || e.outcome != Outcome::Ok {
                continue;
            }
            let to = ops[i + 1..]
                .iter()
                .find(|u| matches!(u.op, Op::Unlock { .. }))
                .map_or(u64::MAX, |u| u.invoke_ns);
            held.entry((file, kind)).or_default().push(Held {
                client,
                from: e.end_ns(),
                to,
            });
        }
    }
    for ((file, kind), mut v) in held {
        r.checked += 1;
        v.sort_by_key(|h| h.from);
        // The interval reaching furthest so far: an interval starting
        // before its end overlaps it (one client's intervals never overlap
        // each other, so it is another client's).
        let mut reach: Option<Held> = None;
        for h in v {
            if let Some(p) = reach {
                if h.from < p.to && p.client != h.client {
                    r.fail(format!(
                        "{file} ({kind:?}): client {} held it from {:.3}s to {}, client {} got it at {:.3}s",
                        p.client,
                        p.from as f64 / 1e9,
                        if p.to == u64::MAX { "the end".to_string() } else { format!("{:.3}s", p.to as f64 / 1e9) },
                        h.client,
                        h.from as f64 / 1e9
                    ));
                }
            }
            if reach.is_none_or(|p| h.to > p.to) {
                reach = Some(h);
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::super::Verdict;
    use super::*;

    fn op(client: u32, lock: bool, t0: u64, t1: u64, outcome: Outcome) -> Entry {
        let (file, kind) = ("locks/f0".to_string(), LockKind::Flock);
        Entry {
            client,
            op: if lock {
                Op::Lock { file, kind }
            } else {
                Op::Unlock { file, kind }
            },
            invoke_ns: t0,
            complete_ns: Some(t1),
            outcome,
        }
    }

    #[test]
    fn handovers_pass() {
        let h = vec![
            op(1, true, 0, 10, Outcome::Ok),
            op(2, true, 5, 12, Outcome::Err(libc::EWOULDBLOCK)),
            op(1, false, 20, 30, Outcome::Ok),
            // Granted while client 1's unlock was still running: fine,
            // client 1 had let go when it called unlock.
            op(2, true, 22, 25, Outcome::Ok),
            op(2, false, 40, 41, Outcome::Ok),
            op(1, true, 41, 50, Outcome::Ok),
        ];
        let r = check(&h);
        assert_eq!(r.verdict, Verdict::Pass, "{r:?}");
        assert_eq!(r.checked, 1);
    }

    #[test]
    fn overlapping_holders_fail() {
        let h = vec![
            op(1, true, 0, 10, Outcome::Ok),
            op(2, true, 12, 15, Outcome::Ok),
            op(1, false, 20, 30, Outcome::Ok),
            op(2, false, 40, 41, Outcome::Ok),
        ];
        let r = check(&h);
        assert_eq!(r.verdict, Verdict::Fail, "{r:?}");
        assert!(r.details[0].contains("client 2 got it at"), "{r:?}");
    }

    #[test]
    fn never_unlocked_is_held_to_the_end() {
        let h = vec![
            op(1, true, 0, 10, Outcome::Ok),
            op(3, true, 100, 110, Outcome::Ok),
            op(3, false, 120, 130, Outcome::Ok),
        ];
        assert_eq!(check(&h).verdict, Verdict::Fail);
    }
}
