//! Checkers over a history: each takes the recorded operations (and what
//! the files hold afterwards) and says whether the system kept its
//! promises.

pub mod appends;
pub mod files;
pub mod locks;
pub mod namespace;

use serde::Serialize;

/// A checker's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Everything checked was allowed.
    Pass,
    /// Something the history does not allow happened (see the details).
    Fail,
    /// The search hit its bound before deciding (not a failure).
    Inconclusive,
}

/// What one checker found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// Checker name.
    pub name: String,
    pub verdict: Verdict,
    /// How many items (files, records, locks, directories) it checked.
    pub checked: usize,
    /// One line per problem (or per inconclusive item).
    pub details: Vec<String>,
}

impl CheckResult {
    /// A result named `name` that passes until a problem is added.
    pub fn new(name: &str) -> CheckResult {
        CheckResult {
            name: name.to_string(),
            verdict: Verdict::Pass,
            checked: 0,
            details: Vec::new(),
        }
    }

    /// Records a violation.
    pub fn fail(&mut self, detail: String) {
        self.verdict = Verdict::Fail;
        self.details.push(detail);
    }

    /// Records an undecided item (a failure elsewhere still wins).
    pub fn inconclusive(&mut self, detail: String) {
        if self.verdict == Verdict::Pass {
            self.verdict = Verdict::Inconclusive;
        }
        self.details.push(detail);
    }
}
