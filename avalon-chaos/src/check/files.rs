//! Data files: each file's final content must be one the history allows.
//!
//! Every data file has a single writer, so its operations are in program
//! order. A write or truncate is *durable* when it succeeded and a later
//! fsync succeeded with every operation in between successful: it must be
//! in the final content. Every other write or truncate (acknowledged but
//! not yet fsynced, failed, or never completed) may or may not be. The
//! checker enumerates the contents those choices allow (deduplicated,
//! bounded) and looks for the observed one.

use super::CheckResult;
use crate::history::{pattern, Entry, Op, Outcome};
use std::collections::{BTreeMap, HashSet};

/// Most candidate contents kept per file before giving up on it.
const MAX_STATES: usize = 4096;

/// A content-changing step of a file's life.
#[derive(Debug, Clone, Copy)]
enum Change {
    Write { offset: u64, len: u64, seed: u64 },
    Truncate { len: u64 },
}

impl Change {
    fn apply(&self, content: &[u8]) -> Vec<u8> {
        let mut c = content.to_vec();
        match *self {
            Change::Write { offset, len, seed } => {
                let end = (offset + len) as usize;
                if c.len() < end {
                    c.resize(end, 0);
                }
                c[offset as usize..end].copy_from_slice(&pattern(seed, len as usize));
            }
            Change::Truncate { len } => c.resize(len as usize, 0),
        }
        c
    }
}

/// The operations on one data file, in order.
fn per_file(history: &[Entry]) -> BTreeMap<String, Vec<&Entry>> {
    let mut m: BTreeMap<String, Vec<&Entry>> = BTreeMap::new();
    for e in history {
        let file = match &e.op {
            Op::FileCreate { file }
            | Op::Write { file, .. }
            | Op::Truncate { file, .. }
            | Op::Fsync { file }
            | Op::Close { file } => file,
            _ => continue,
        };
        m.entry(file.clone()).or_default().push(e);
    }
    for v in m.values_mut() {
        v.sort_by_key(|e| e.invoke_ns);
    }
    m
}

/// Checks every data file of `history` against `observed` (path relative
/// to the mount → content, `None` when absent). `observed` must hold every
/// file that exists in the data directories, so that a file nobody
/// created is caught too.
pub fn check(history: &[Entry], observed: &BTreeMap<String, Option<Vec<u8>>>) -> CheckResult {
    let mut r = CheckResult::new("file-contents (fsynced writes kept)");
    let files = per_file(history);
    for (path, content) in observed {
        // Only `data/` holds single-writer files (the appends are checked
        // by their own checker).
        if path.starts_with("data/") && content.is_some() && !files.contains_key(path) {
            r.fail(format!("{path}: exists, but no client ever created it"));
        }
    }
    for (file, ops) in &files {
        r.checked += 1;
        let seen = observed.get(file).cloned().flatten();
        let created = matches!(ops.first(), Some(e) if matches!(e.op, Op::FileCreate { .. }) && e.outcome == Outcome::Ok);
        if !created {
            if seen.as_ref().is_some_and(|c| !c.is_empty()) {
                r.fail(format!(
                    "{file}: its create did not succeed, yet it holds {} bytes",
                    seen.map_or(0, |c| c.len())
                ));
            }
            continue;
        }
        let Some(seen) = seen else {
            r.fail(format!(
                "{file}: created (acknowledged at {:.3}s) but missing afterwards",
                secs(ops[0].end_ns())
            ));
            continue;
        };
        // Durability, from the end: is the next non-ok operation after
        // this point preceded by a successful fsync?
        let mut durable = false;
        let mut steps: Vec<(Change, bool, &Entry)> = Vec::new();
        for e in ops.iter().rev() {
            let ok = e.outcome == Outcome::Ok;
            match &e.op {
                Op::Fsync { .. } => durable = ok,
                Op::Write {
                    offset, len, seed, ..
                } => {
                    let c = Change::Write {
                        offset: *offset,
                        len: *len,
                        seed: *seed,
                    };
                    steps.push((c, ok && durable, e));
                    durable &= ok;
                }
                Op::Truncate { len, .. } => {
                    steps.push((Change::Truncate { len: *len }, ok && durable, e));
                    durable &= ok;
                }
                _ => durable &= ok,
            }
        }
        steps.reverse();
        let mut states: HashSet<Vec<u8>> = HashSet::from([Vec::new()]);
        let mut gave_up = false;
        for (change, required, _) in &steps {
            let next: HashSet<Vec<u8>> = states.iter().map(|s| change.apply(s)).collect();
            if *required {
                states = next;
            } else {
                states.extend(next);
            }
            if states.len() > MAX_STATES {
                gave_up = true;
                break;
            }
        }
        if gave_up {
            r.inconclusive(format!(
                "{file}: more than {MAX_STATES} allowed contents, not checked"
            ));
            continue;
        }
        if !states.contains(&seen) {
            r.fail(format!(
                "{file}: content ({} bytes) is none of the {} the history allows; {}",
                seen.len(),
                states.len(),
                missing_durable(&steps, &seen)
            ));
        }
    }
    r
}

/// A hint for the report: the durable writes whose bytes are not where
/// they were written (they may have been overwritten later legitimately;
/// the content check above is the verdict).
fn missing_durable(steps: &[(Change, bool, &Entry)], seen: &[u8]) -> String {
    let mut out = Vec::new();
    for (i, (c, required, e)) in steps.iter().enumerate() {
        let Change::Write { offset, len, seed } = *c else {
            continue;
        };
        if !required {
            continue;
        }
        let overwritten = steps[i + 1..].iter().any(|(later, _, _)| match *later {
            Change::Write {
                offset: o, len: l, ..
            } => o < offset + len && offset < o + l,
            Change::Truncate { len: t } => t < offset + len,
        });
        let end = (offset + len) as usize;
        let present =
            seen.len() >= end && seen[offset as usize..end] == pattern(seed, len as usize)[..];
        if !present && !overwritten {
            out.push(format!(
                "fsynced write [{offset}, +{len}) by client {} acknowledged at {:.3}s is not there",
                e.client,
                secs(e.end_ns())
            ));
        }
    }
    if out.is_empty() {
        "(no single lost fsynced write pinned down)".into()
    } else {
        out.join("; ")
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(op: Op, t: u64, outcome: Outcome) -> Entry {
        Entry {
            client: 1,
            op,
            invoke_ns: t * 10,
            complete_ns: Some(t * 10 + 5),
            outcome,
        }
    }

    fn f() -> String {
        "data/c1-0".into()
    }

    fn w(offset: u64, len: u64, seed: u64, t: u64, o: Outcome) -> Entry {
        e(
            Op::Write {
                file: f(),
                offset,
                len,
                seed,
            },
            t,
            o,
        )
    }

    fn sync(t: u64, o: Outcome) -> Entry {
        e(Op::Fsync { file: f() }, t, o)
    }

    fn history() -> Vec<Entry> {
        vec![
            e(Op::FileCreate { file: f() }, 0, Outcome::Ok),
            w(0, 100, 1, 1, Outcome::Ok),
            sync(2, Outcome::Ok),
            w(150, 100, 2, 3, Outcome::Ok),
        ]
    }

    fn obs(c: Option<Vec<u8>>) -> BTreeMap<String, Option<Vec<u8>>> {
        BTreeMap::from([(f(), c)])
    }

    #[test]
    fn fsynced_write_kept_and_later_write_either_way_pass() {
        let first = Change::Write {
            offset: 0,
            len: 100,
            seed: 1,
        }
        .apply(&[]);
        let both = Change::Write {
            offset: 150,
            len: 100,
            seed: 2,
        }
        .apply(&first);
        assert_eq!(
            check(&history(), &obs(Some(first))).verdict,
            super::super::Verdict::Pass
        );
        assert_eq!(
            check(&history(), &obs(Some(both))).verdict,
            super::super::Verdict::Pass
        );
    }

    #[test]
    fn lost_fsynced_write_fails() {
        // Only the second (unsynced) write is there: the fsynced one's
        // bytes are zeros.
        let lost = Change::Write {
            offset: 150,
            len: 100,
            seed: 2,
        }
        .apply(&[]);
        let r = check(&history(), &obs(Some(lost)));
        assert_eq!(r.verdict, super::super::Verdict::Fail, "{r:?}");
        assert!(r.details[0].contains("fsynced write [0, +100)"), "{r:?}");
        // And an empty file (everything lost) too.
        assert_eq!(
            check(&history(), &obs(Some(Vec::new()))).verdict,
            super::super::Verdict::Fail
        );
    }

    #[test]
    fn failed_fsync_makes_earlier_write_optional() {
        let h = vec![
            e(Op::FileCreate { file: f() }, 0, Outcome::Ok),
            w(0, 10, 1, 1, Outcome::Ok),
            sync(2, Outcome::Err(libc::EIO)),
            sync(3, Outcome::Ok),
        ];
        assert_eq!(
            check(&h, &obs(Some(Vec::new()))).verdict,
            super::super::Verdict::Pass
        );
    }

    #[test]
    fn missing_or_foreign_files_fail() {
        assert_eq!(
            check(&history(), &obs(None)).verdict,
            super::super::Verdict::Fail
        );
        let mut o = obs(Some(
            Change::Write {
                offset: 0,
                len: 100,
                seed: 1,
            }
            .apply(&[]),
        ));
        o.insert("data/stranger".into(), Some(vec![1]));
        assert_eq!(check(&history(), &o).verdict, super::super::Verdict::Fail);
    }

    #[test]
    fn truncate_then_extend_leaves_zeros() {
        let h = vec![
            e(Op::FileCreate { file: f() }, 0, Outcome::Ok),
            w(0, 10, 1, 1, Outcome::Ok),
            e(Op::Truncate { file: f(), len: 4 }, 2, Outcome::Ok),
            e(Op::Truncate { file: f(), len: 8 }, 3, Outcome::Ok),
            sync(4, Outcome::Ok),
        ];
        let mut want = pattern(1, 4);
        want.resize(8, 0);
        assert_eq!(
            check(&h, &obs(Some(want))).verdict,
            super::super::Verdict::Pass
        );
        assert_eq!(
            check(&h, &obs(Some(pattern(1, 8)))).verdict,
            super::super::Verdict::Fail
        );
    }
}
