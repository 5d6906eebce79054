//! O_APPEND logs shared by every client: each acknowledged record (write +
//! fsync succeeded) is there exactly once; a record whose append failed or
//! never completed is there at most once; every line is a whole record
//! some client appended to that file.

use super::CheckResult;
use crate::history::{parse_record, Entry, Op, Outcome};
use std::collections::{BTreeMap, HashMap};

/// Checks the append files of `history` against their final contents
/// (`observed`: path → content, `None` when absent).
pub fn check(history: &[Entry], observed: &BTreeMap<String, Option<Vec<u8>>>) -> CheckResult {
    let mut r = CheckResult::new("appends (each acknowledged record exactly once)");
    // file → record → (outcome, acknowledged at)
    let mut invoked: BTreeMap<&str, HashMap<(u32, u64), &Entry>> = BTreeMap::new();
    for e in history {
        if let Op::Append { file, record } = &e.op {
            if let Some(k) = parse_record(record.trim_end()) {
                invoked.entry(file.as_str()).or_default().insert(k, e);
            }
        }
    }
    for (file, recs) in &invoked {
        let content = observed.get(*file).cloned().flatten().unwrap_or_default();
        let text = String::from_utf8_lossy(&content);
        let mut counts: HashMap<(u32, u64), usize> = HashMap::new();
        let mut lines: Vec<&str> = text.split('\n').collect();
        // The content ends with a newline: the last piece is empty.
        if lines.last() == Some(&"") {
            lines.pop();
        } else if !content.is_empty() {
            r.fail(format!("{file}: does not end with a whole record"));
        }
        for (i, line) in lines.iter().enumerate() {
            match parse_record(line) {
                Some(k) if recs.contains_key(&k) => *counts.entry(k).or_default() += 1,
                Some((c, s)) => r.fail(format!(
                    "{file}: line {} is record {c}/{s}, which was never appended to this file",
                    i + 1
                )),
                None => r.fail(format!(
                    "{file}: line {} is not a record: {:?}",
                    i + 1,
                    line.chars().take(60).collect::<String>()
                )),
            }
        }
        let mut keys: Vec<_> = recs.keys().collect();
        keys.sort();
        for k in keys {
            let e = recs[k];
            r.checked += 1;
            let n = counts.get(k).copied().unwrap_or(0);
            if e.outcome == Outcome::Ok && n != 1 {
                r.fail(format!(
                    "{file}: record {}/{} acknowledged at {:.3}s is there {n} times",
                    k.0,
                    k.1,
                    e.end_ns() as f64 / 1e9
                ));
            } else if n > 1 {
                r.fail(format!(
                    "{file}: record {}/{} ({:?}) is there {n} times",
                    k.0, k.1, e.outcome
                ));
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::super::Verdict;
    use super::*;
    use crate::history::append_record;

    fn app(client: u32, seq: u64, outcome: Outcome) -> Entry {
        Entry {
            client,
            op: Op::Append {
                file: "appends/a0".into(),
                record: append_record(client, seq),
            },
            invoke_ns: seq * 10,
            complete_ns: Some(seq * 10 + 5),
            outcome,
        }
    }

    fn obs(s: String) -> BTreeMap<String, Option<Vec<u8>>> {
        BTreeMap::from([("appends/a0".to_string(), Some(s.into_bytes()))])
    }

    fn history() -> Vec<Entry> {
        vec![
            app(1, 1, Outcome::Ok),
            app(2, 1, Outcome::Ok),
            app(1, 2, Outcome::Err(libc::EIO)),
            app(2, 2, Outcome::Unknown),
        ]
    }

    #[test]
    fn acknowledged_once_and_unknown_at_most_once_pass() {
        let s = append_record(2, 1) + &append_record(1, 1) + &append_record(2, 2);
        assert_eq!(check(&history(), &obs(s)).verdict, Verdict::Pass);
    }

    #[test]
    fn duplicated_append_fails() {
        let s = append_record(1, 1) + &append_record(2, 1) + &append_record(1, 1);
        let r = check(&history(), &obs(s));
        assert_eq!(r.verdict, Verdict::Fail);
        assert!(r.details[0].contains("1/1"), "{r:?}");
        // A failed append there twice is a duplicate too.
        let s = append_record(1, 1)
            + &append_record(2, 1)
            + &append_record(1, 2)
            + &append_record(1, 2);
        assert_eq!(check(&history(), &obs(s)).verdict, Verdict::Fail);
    }

    #[test]
    fn lost_or_torn_append_fails() {
        assert_eq!(
            check(&history(), &obs(append_record(1, 1))).verdict,
            Verdict::Fail
        );
        let torn = append_record(1, 1) + &append_record(2, 1) + "R 1 2 ";
        assert_eq!(check(&history(), &obs(torn)).verdict, Verdict::Fail);
        let zeros = append_record(1, 1) + "\0\0\0\n" + &append_record(2, 1);
        assert_eq!(check(&history(), &obs(zeros)).verdict, Verdict::Fail);
    }
}
