//! Namespace linearizability: the creates, unlinks, renames and stats of a
//! directory's few names must be explainable as happening one at a time,
//! each at some instant between its invocation and completion, against a
//! model of the directory (the set of names present).
//!
//! The search is Wing & Gong's with memoization (as in Porcupine): walk
//! the invocation/completion events in time order; at an invocation, try
//! to linearize that operation next; reaching the completion of an
//! operation not yet linearized means backtracking. A (set of linearized
//! operations, model state) pair seen before is not explored again.
//! Directories are independent (P-compositionality), so each is searched
//! alone. An operation that failed unexpectedly or never completed may
//! have taken effect at any time after its invocation, or not at all: it
//! completes at the end of time and its step allows both. The model state
//! is a set of possible directory contents (a bitmap over the 2^names
//! contents), which makes those steps deterministic.

use super::CheckResult;
use crate::history::{Entry, Op, Outcome};
use std::collections::{BTreeMap, HashSet};

/// Most names per directory (2^6 contents fit a u64 bitmap of states).
pub const MAX_NAMES: usize = 6;
/// Most search steps per directory before the answer is "inconclusive".
const MAX_STEPS: u64 = 20_000_000;
/// Most memoized (linearized set, state) pairs per directory (~40 bytes each).
const MAX_CACHE: usize = 4_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Create(u8),
    Unlink(u8),
    Rename(u8, u8),
    Exists(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    /// EEXIST for a create, ENOENT for an unlink or rename.
    Refused,
    Exists(bool),
    /// May have happened or not.
    Unknown,
}

#[derive(Debug, Clone)]
struct NsOp {
    kind: Kind,
    result: Answer,
    call: u64,
    ret: u64,
    entry: usize,
}

/// Next possible contents of the directory after `op` in `state` (a set of
/// names as a bitmask); 0 bits set = impossible.
fn step_one(state: u8, op: &NsOp) -> u64 {
    let has = |n: u8| state & (1 << n) != 0;
    let bit = |s: u8| 1u64 << s;
    match (op.kind, op.result) {
        (Kind::Create(n), Answer::Ok) if !has(n) => bit(state | 1 << n),
        (Kind::Create(n), Answer::Refused) if has(n) => bit(state),
        (Kind::Create(n), Answer::Unknown) => bit(state) | bit(state | 1 << n),
        (Kind::Unlink(n), Answer::Ok) if has(n) => bit(state & !(1 << n)),
        (Kind::Unlink(n), Answer::Refused) if !has(n) => bit(state),
        (Kind::Unlink(n), Answer::Unknown) => bit(state) | bit(state & !(1 << n)),
        (Kind::Rename(a, b), Answer::Ok) if has(a) => bit((state & !(1 << a)) | 1 << b),
        (Kind::Rename(a, _), Answer::Refused) if !has(a) => bit(state),
        (Kind::Rename(a, b), Answer::Unknown) => {
            let moved = if has(a) {
                bit((state & !(1 << a)) | 1 << b)
            } else {
                0
            };
            bit(state) | moved
        }
        (Kind::Exists(n), Answer::Exists(e)) if has(n) == e => bit(state),
        _ => 0,
    }
}

/// The model step on a set of possible contents.
fn step(states: u64, op: &NsOp) -> u64 {
    let mut next = 0;
    let mut s = states;
    while s != 0 {
        let i = s.trailing_zeros() as u8;
        s &= s - 1;
        next |= step_one(i, op);
    }
    next
}

/// What the search found for one directory.
#[derive(Debug)]
enum Found {
    Linearizable,
    /// No order explains the history; the operation whose completion the
    /// longest partial linearization could not get past.
    Violation {
        stuck: usize,
        linearized: usize,
    },
    GaveUp,
}

/// The search over one directory's operations (see the module comment).
fn search(ops: &[NsOp]) -> Found {
    // Events: (time, is return, op); calls before returns at equal times.
    let mut ev: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, o) in ops.iter().enumerate() {
        ev.push((o.call, false, i));
        ev.push((o.ret, true, i));
    }
    ev.sort();
    // Doubly linked list over the events, node 0 the head, n+1 the end.
    let n = ev.len();
    let end = n + 1;
    let mut next: Vec<usize> = (1..=n + 1).chain([end]).collect();
    let mut prev: Vec<usize> = [0].into_iter().chain(0..=n).collect();
    let mut ret_node = vec![0; ops.len()];
    for (k, e) in ev.iter().enumerate() {
        if e.1 {
            ret_node[e.2] = k + 1;
        }
    }
    let node_op = |k: usize| ev[k - 1].2;
    let is_ret = |k: usize| ev[k - 1].1;
    let lift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, k: usize| {
        next[prev[k]] = next[k];
        prev[next[k]] = prev[k];
    };
    let unlift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, k: usize| {
        next[prev[k]] = k;
        prev[next[k]] = k;
    };
    // The set of linearized operations, as a 128-bit Zobrist hash (each
    // operation a random key, xored in and out): O(1) to update and to
    // store, with collisions too unlikely to matter.
    let mut seed = 0x5eed_u64;
    let keys: Vec<u128> = (0..ops.len())
        .map(|_| (splitmix(&mut seed) as u128) << 64 | splitmix(&mut seed) as u128)
        .collect();
    let mut done: u128 = 0;
    let mut cache: HashSet<(u128, u64)> = HashSet::new();
    let mut stack: Vec<(usize, u64)> = Vec::new();
    let mut state: u64 = 1; // the empty directory
    let mut entry = next[0];
    let mut steps = 0u64;
    let mut best = (0usize, 0usize);
    while next[0] != end {
        steps += 1;
        if steps > MAX_STEPS || cache.len() > MAX_CACHE {
            return Found::GaveUp;
        }
        if entry == end {
            // Only reachable with an empty list, checked above.
            break;
        }
        let op = node_op(entry);
        if !is_ret(entry) {
            let ns = step(state, &ops[op]);
            if ns != 0 {
                done ^= keys[op];
                if cache.insert((done, ns)) {
                    stack.push((entry, state));
                    state = ns;
                    lift(&mut next, &mut prev, entry);
                    lift(&mut next, &mut prev, ret_node[op]);
                    entry = next[0];
                    continue;
                }
                done ^= keys[op];
            }
            entry = next[entry];
        } else {
            if stack.len() >= best.0 {
                best = (stack.len(), op);
            }
            let Some((call, st)) = stack.pop() else {
                return Found::Violation {
                    stuck: best.1,
                    linearized: best.0,
                };
            };
            let cop = node_op(call);
            done ^= keys[cop];
            state = st;
            unlift(&mut next, &mut prev, ret_node[cop]);
            unlift(&mut next, &mut prev, call);
            entry = next[call];
        }
    }
    Found::Linearizable
}

/// A step of the splitmix64 generator (the Zobrist keys).
fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn errno_result(kind: Kind, errno: i32) -> Answer {
    match kind {
        Kind::Create(_) if errno == libc::EEXIST => Answer::Refused,
        Kind::Unlink(_) | Kind::Rename(..) if errno == libc::ENOENT => Answer::Refused,
        _ => Answer::Unknown,
    }
}

/// Checks each directory's namespace operations in `history`.
pub fn check(history: &[Entry]) -> CheckResult {
    let mut r = CheckResult::new("namespace linearizability");
    let mut dirs: BTreeMap<&str, (Vec<String>, Vec<NsOp>)> = BTreeMap::new();
    for (idx, e) in history.iter().enumerate() {
        let (dir, names): (&str, Vec<&str>) = match &e.op {
            Op::Create { dir, name } | Op::Unlink { dir, name } | Op::Exists { dir, name } => {
                (dir, vec![name])
            }
            Op::Rename { dir, from, to } => (dir, vec![from, to]),
            _ => continue,
        };
        let (known, ops) = dirs.entry(dir).or_default();
        let mut ix = Vec::new();
        for n in names {
            let i = match known.iter().position(|k| k == n) {
                Some(i) => i,
                None => {
                    known.push(n.to_string());
                    known.len() - 1
                }
            };
            ix.push(i.min(255) as u8);
        }
        let kind = match &e.op {
            Op::Create { .. } => Kind::Create(ix[0]),
            Op::Unlink { .. } => Kind::Unlink(ix[0]),
            Op::Rename { .. } => Kind::Rename(ix[0], ix[1]),
            _ => Kind::Exists(ix[0]),
        };
        let result = match (e.outcome, kind) {
            (Outcome::Ok, Kind::Exists(_)) | (Outcome::Exists(_), Kind::Create(_)) => {
                Answer::Unknown
            }
            (Outcome::Ok, _) => Answer::Ok,
            (Outcome::Exists(b), _) => Answer::Exists(b),
            (Outcome::Err(errno), k) => errno_result(k, errno),
            (Outcome::Unknown, _) => Answer::Unknown,
        };
        // A stat that failed tells nothing.
        if matches!(kind, Kind::Exists(_)) && result == Answer::Unknown {
            continue;
        }
        let ret = if result == Answer::Unknown {
            u64::MAX
        } else {
            e.end_ns()
        };
        ops.push(NsOp {
            kind,
            result,
            call: e.invoke_ns,
            ret,
            entry: idx,
        });
    }
    for (dir, (names, ops)) in dirs {
        r.checked += 1;
        if names.len() > MAX_NAMES {
            r.inconclusive(format!(
                "{dir}: {} names, more than {MAX_NAMES}",
                names.len()
            ));
            continue;
        }
        match search(&ops) {
            Found::Linearizable => {}
            Found::GaveUp => r.inconclusive(format!(
                "{dir}: search bound of {MAX_STEPS} steps reached over {} operations",
                ops.len()
            )),
            Found::Violation { stuck, linearized } => {
                let s = &ops[stuck];
                let window: Vec<String> = ops
                    .iter()
                    .filter(|o| o.call <= s.ret && s.call <= o.ret)
                    .take(12)
                    .map(|o| describe(&history[o.entry]))
                    .collect();
                r.fail(format!(
                    "{dir}: not linearizable ({} of {} operations linearized at most); stuck at {}; concurrent: [{}]",
                    linearized,
                    ops.len(),
                    describe(&history[s.entry]),
                    window.join("; ")
                ));
            }
        }
    }
    r
}

/// One history entry, briefly, for the report.
pub fn describe(e: &Entry) -> String {
    let op = match &e.op {
        Op::Create { name, .. } => format!("create {name}"),
        Op::Unlink { name, .. } => format!("unlink {name}"),
        Op::Rename { from, to, .. } => format!("rename {from}->{to}"),
        Op::Exists { name, .. } => format!("exists {name}"),
        other => other.name().to_string(),
    };
    let end = e
        .complete_ns
        .map_or("?".to_string(), |t| format!("{:.3}", t as f64 / 1e9));
    format!(
        "c{} {op} [{:.3}s..{end}s] {:?}",
        e.client,
        e.invoke_ns as f64 / 1e9,
        e.outcome
    )
}

#[cfg(test)]
mod tests {
    use super::super::Verdict;
    use super::*;

    fn at(client: u32, op: Op, t0: u64, t1: Option<u64>, outcome: Outcome) -> Entry {
        Entry {
            client,
            op,
            invoke_ns: t0,
            complete_ns: t1,
            outcome,
        }
    }
    fn create(n: &str) -> Op {
        Op::Create {
            dir: "d".into(),
            name: n.into(),
        }
    }
    fn unlink(n: &str) -> Op {
        Op::Unlink {
            dir: "d".into(),
            name: n.into(),
        }
    }
    fn rename(a: &str, b: &str) -> Op {
        Op::Rename {
            dir: "d".into(),
            from: a.into(),
            to: b.into(),
        }
    }
    fn exists(n: &str) -> Op {
        Op::Exists {
            dir: "d".into(),
            name: n.into(),
        }
    }
    const ENOENT: Outcome = Outcome::Err(libc::ENOENT);
    const EEXIST: Outcome = Outcome::Err(libc::EEXIST);

    #[test]
    fn sequential_history_passes() {
        let h = vec![
            at(1, create("a"), 0, Some(1), Outcome::Ok),
            at(2, create("a"), 2, Some(3), EEXIST),
            at(1, rename("a", "b"), 4, Some(5), Outcome::Ok),
            at(2, exists("a"), 6, Some(7), Outcome::Exists(false)),
            at(2, exists("b"), 8, Some(9), Outcome::Exists(true)),
            at(1, unlink("a"), 10, Some(11), ENOENT),
            at(1, unlink("b"), 12, Some(13), Outcome::Ok),
        ];
        let r = check(&h);
        assert_eq!(r.verdict, Verdict::Pass, "{r:?}");
    }

    #[test]
    fn concurrent_operations_may_reorder() {
        // Client 2's stat overlaps the rename: either answer is fine.
        for seen in [true, false] {
            let h = vec![
                at(1, create("a"), 0, Some(1), Outcome::Ok),
                at(1, rename("a", "b"), 2, Some(10), Outcome::Ok),
                at(2, exists("a"), 3, Some(4), Outcome::Exists(seen)),
                at(3, exists("b"), 5, Some(6), Outcome::Exists(!seen)),
            ];
            assert_eq!(check(&h).verdict, Verdict::Pass, "seen {seen}");
        }
    }

    #[test]
    fn stale_read_after_rename_fails() {
        // The rename completed before the stat began, yet the old name is
        // still seen: a stale cache.
        let h = vec![
            at(1, create("a"), 0, Some(1), Outcome::Ok),
            at(1, rename("a", "b"), 2, Some(3), Outcome::Ok),
            at(2, exists("a"), 4, Some(5), Outcome::Exists(true)),
        ];
        let r = check(&h);
        assert_eq!(r.verdict, Verdict::Fail, "{r:?}");
        assert!(r.details[0].contains("exists a"), "{r:?}");
    }

    #[test]
    fn both_renames_succeeding_fails() {
        // Two clients rename the same source, one after the other: the
        // second must get ENOENT.
        let h = vec![
            at(1, create("a"), 0, Some(1), Outcome::Ok),
            at(1, rename("a", "b"), 2, Some(4), Outcome::Ok),
            at(2, rename("a", "c"), 3, Some(5), Outcome::Ok),
        ];
        assert_eq!(check(&h).verdict, Verdict::Fail);
    }

    #[test]
    fn exclusive_create_answered_eexist_on_absent_name_fails() {
        let h = vec![at(1, create("a"), 0, Some(1), EEXIST)];
        assert_eq!(check(&h).verdict, Verdict::Fail);
    }

    #[test]
    fn unknown_outcome_may_or_may_not_apply() {
        let base = vec![
            at(1, create("a"), 0, None, Outcome::Unknown),
            at(2, unlink("x"), 1, Some(2), ENOENT),
        ];
        for seen in [true, false] {
            let mut h = base.clone();
            h.push(at(2, exists("a"), 5, Some(6), Outcome::Exists(seen)));
            assert_eq!(check(&h).verdict, Verdict::Pass, "seen {seen}");
        }
        // But it cannot flip back: seen, then gone with no unlink.
        let mut h = base.clone();
        h.push(at(2, exists("a"), 5, Some(6), Outcome::Exists(true)));
        h.push(at(2, exists("a"), 7, Some(8), Outcome::Exists(false)));
        assert_eq!(check(&h).verdict, Verdict::Fail);
        // An EIO is as unknown as a hang.
        let h = vec![
            at(1, rename("a", "b"), 0, Some(1), Outcome::Err(libc::EIO)),
            at(2, exists("b"), 5, Some(6), Outcome::Exists(false)),
        ];
        assert_eq!(check(&h).verdict, Verdict::Pass);
    }

    #[test]
    fn long_concurrent_history_is_decided() {
        // Four clients cycling create/rename/unlink on distinct names with
        // overlapping windows: linearizable, and decided within the bound.
        let mut h = Vec::new();
        let mut t = 0;
        for round in 0..300u64 {
            for c in 0..4u32 {
                let a = format!("n{c}");
                let b = format!("m{c}");
                let base = t + c as u64;
                let op = match round % 3 {
                    0 => create(&a),
                    1 => rename(&a, &b),
                    _ => unlink(&b),
                };
                h.push(at(c, op, base, Some(base + 6), Outcome::Ok));
            }
            t += 10;
        }
        let r = check(&h);
        assert_eq!(
            r.verdict,
            Verdict::Inconclusive,
            "8 names exceed the model: {r:?}"
        );
        let small: Vec<Entry> = h.into_iter().filter(|e| e.client < 3).collect();
        let r = check(&small);
        assert_eq!(r.verdict, Verdict::Pass, "{r:?}");
    }
}
