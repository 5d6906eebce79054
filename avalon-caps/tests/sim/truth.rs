//! The reference model: every write in its linear order (a change the MDS
//! applies is placed when it is applied; a change buffered under an
//! exclusive right when the client acknowledged it, since nobody else may
//! touch that state meanwhile), whether its writer was told it is done,
//! and whether it was lost with its session (only buffered changes that
//! never reached the MDS may be). Reads are checked against it.

use avalon_caps::{Ino, SessionId};
use std::collections::BTreeMap;

/// One piece of state a read or write touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Aspect {
    Attr(Ino),
    Data(Ino),
}

#[derive(Debug)]
struct Entry {
    value: u64,
    session: SessionId,
    buffered: bool,
    /// Its writer was told it is done.
    completed: bool,
    /// The MDS has it.
    applied: bool,
    lost: bool,
}

#[derive(Debug)]
struct NameEntry {
    name: u8,
    ino: Ino,
    session: SessionId,
    buffered: bool,
    completed: bool,
    applied: bool,
    lost: bool,
}

#[derive(Default)]
pub struct Truth {
    regs: BTreeMap<Aspect, Vec<Entry>>,
    names: BTreeMap<Ino, Vec<NameEntry>>,
    pub violations: Vec<String>,
}

impl Truth {
    pub fn init(&mut self, a: Aspect) {
        self.regs.insert(
            a,
            vec![Entry {
                value: 0,
                session: 0,
                buffered: false,
                completed: true,
                applied: true,
                lost: false,
            }],
        );
    }

    pub fn violation(&mut self, v: String) {
        self.violations.push(v);
    }

    fn log(&mut self, a: Aspect) -> &mut Vec<Entry> {
        self.regs.get_mut(&a).expect("aspect")
    }

    fn names(&mut self, dir: Ino) -> &mut Vec<NameEntry> {
        self.names.entry(dir).or_default()
    }

    /// A change buffered under an exclusive right, acknowledged to its
    /// caller: its position.
    pub fn buffered(&mut self, a: Aspect, value: u64, session: SessionId) -> usize {
        let log = self.log(a);
        log.push(Entry {
            value,
            session,
            buffered: true,
            completed: true,
            applied: false,
            lost: false,
        });
        log.len() - 1
    }

    /// The MDS applied `value` from `session`: a flushed buffered change
    /// (and the ones of that session it superseded), or a synchronous one.
    pub fn applied(&mut self, a: Aspect, value: u64, session: SessionId) {
        let log = self.log(a);
        match log.iter().position(|e| e.value == value) {
            Some(i) => {
                for e in &mut log[..=i] {
                    if e.session == session && e.buffered {
                        e.applied = true;
                    }
                }
                if log[i].lost {
                    let v = format!("{a:?}: {value} applied after it was counted lost");
                    self.violation(v);
                }
            }
            None => log.push(Entry {
                value,
                session,
                buffered: false,
                completed: false,
                applied: true,
                lost: false,
            }),
        }
    }

    /// The writer of synchronous change `value` got its answer.
    pub fn completed(&mut self, a: Aspect, value: u64) -> usize {
        let log = self.log(a);
        let i = log
            .iter()
            .position(|e| e.value == value)
            .expect("an acknowledged write was applied");
        log[i].completed = true;
        i
    }

    /// Whether `session` has buffered changes of `a` the MDS lacks.
    pub fn unapplied(&self, a: Aspect, session: SessionId) -> bool {
        self.regs[&a]
            .iter()
            .any(|e| e.session == session && e.buffered && !e.applied && !e.lost)
    }

    /// Whether `session` has buffered creates in `dir` the MDS lacks.
    pub fn unapplied_names(&self, dir: Ino, session: SessionId) -> bool {
        self.names.get(&dir).is_some_and(|l| {
            l.iter()
                .any(|e| e.session == session && e.buffered && !e.applied && !e.lost)
        })
    }

    /// The MDS ended `session`: what it buffered and never sent is lost
    /// (allowed: like a killed client's unsynced writes). How many.
    pub fn session_ended(&mut self, session: SessionId) -> u64 {
        let mut n = 0;
        let regs = self
            .regs
            .values_mut()
            .flatten()
            .map(|e| (e.session, e.buffered, e.applied, &mut e.lost));
        let names = self
            .names
            .values_mut()
            .flatten()
            .map(|e| (e.session, e.buffered, e.applied, &mut e.lost));
        for (s, buffered, applied, lost) in regs.chain(names) {
            if s == session && buffered && !applied && !*lost {
                *lost = true;
                n += 1;
            }
        }
        n
    }

    /// Client `c` read `value` of `a`, having seen position `seen` before:
    /// the value's position, if the read was allowed.
    pub fn check_read(&mut self, c: usize, a: Aspect, value: u64, seen: usize) -> Option<usize> {
        let log = &self.regs[&a];
        let Some(i) = log.iter().position(|e| e.value == value) else {
            self.violation(format!("client {c} read {a:?} = {value}, never written"));
            return None;
        };
        let floor = log
            .iter()
            .rposition(|e| e.completed && !e.lost)
            .expect("the initial value");
        let problem = if log[i].lost {
            Some("a lost write")
        } else if i < floor {
            Some("older than an acknowledged write")
        } else if i < seen {
            Some("older than what it read or wrote before")
        } else {
            None
        };
        if let Some(p) = problem {
            let v = format!(
                "client {c} read {a:?} = {value} (position {i}): {p} (newest acknowledged: \
                 position {floor} = {}; seen {seen})",
                log[floor].value
            );
            self.violation(v);
            return None;
        }
        Some(i)
    }

    /// A create acknowledged under a delegation.
    pub fn buffered_name(&mut self, dir: Ino, name: u8, ino: Ino, session: SessionId) {
        if self.names(dir).iter().any(|e| e.name == name && !e.lost) {
            self.violation(format!(
                "session {session} created {name} in {dir} under its delegation, but it exists"
            ));
        }
        self.names(dir).push(NameEntry {
            name,
            ino,
            session,
            buffered: true,
            completed: true,
            applied: false,
            lost: false,
        });
    }

    /// The MDS applied a create.
    pub fn applied_name(
        &mut self,
        dir: Ino,
        name: u8,
        ino: Ino,
        session: SessionId,
        delegated: bool,
    ) {
        if delegated {
            let found = self
                .names(dir)
                .iter_mut()
                .find(|e| e.ino == ino)
                .map(|e| e.applied = true)
                .is_some();
            if !found {
                self.violation(format!("delegated create of {ino} never acknowledged"));
            }
            return;
        }
        if self.names(dir).iter().any(|e| e.name == name && !e.lost) {
            self.violation(format!(
                "session {session}'s create of {name} in {dir} applied over another's \
                 acknowledged create"
            ));
        }
        self.names(dir).push(NameEntry {
            name,
            ino,
            session,
            buffered: false,
            completed: false,
            applied: true,
            lost: false,
        });
    }

    /// The writer of a synchronous create got its answer.
    pub fn completed_name(&mut self, dir: Ino, ino: Ino) {
        if let Some(e) = self.names(dir).iter_mut().find(|e| e.ino == ino) {
            e.completed = true;
        }
    }

    /// Someone was told `name` exists in `dir`.
    pub fn observed_name(&mut self, dir: Ino, name: u8) {
        if !self.names(dir).iter().any(|e| e.name == name && !e.lost) {
            self.violation(format!(
                "told {name} exists in {dir}, but no create of it stands"
            ));
        }
    }

    pub fn check_lookup(&mut self, c: usize, dir: Ino, name: u8, found: Option<Ino>) {
        let log = self.names(dir);
        let ok = match found {
            Some(i) => log.iter().any(|e| e.name == name && e.ino == i && !e.lost),
            None => !log.iter().any(|e| e.name == name && e.completed && !e.lost),
        };
        if !ok {
            self.violation(format!(
                "client {c} looked {name} up in {dir} from its cache: {found:?}, stale"
            ));
        }
    }

    pub fn check_listing(&mut self, c: usize, dir: Ino, listing: &BTreeMap<u8, Ino>) {
        let log = self.names(dir);
        let bogus = listing
            .iter()
            .any(|(n, i)| !log.iter().any(|e| e.name == *n && e.ino == *i && !e.lost));
        let missing: Vec<u8> = log
            .iter()
            .filter(|e| e.completed && !e.lost && listing.get(&e.name) != Some(&e.ino))
            .map(|e| e.name)
            .collect();
        if bogus || !missing.is_empty() {
            self.violation(format!(
                "client {c} listed {dir} from its cache: {listing:?}, missing acknowledged \
                 creates {missing:?}"
            ));
        }
    }

    /// After quiescing: the MDS holds the last change not lost.
    pub fn check_final(&mut self, a: Aspect, mds: u64) {
        let last = self.regs[&a]
            .iter()
            .rev()
            .find(|e| !e.lost)
            .expect("initial value");
        if last.value != mds || !last.applied {
            let v = format!("{a:?}: the MDS has {mds}, the last change standing is {last:?}");
            self.violation(v);
        }
    }

    /// After quiescing: the MDS holds every create not lost, and no other.
    pub fn check_final_names(&mut self, dir: Ino, mds: &BTreeMap<u8, Ino>) {
        let standing: BTreeMap<u8, Ino> = self
            .names(dir)
            .iter()
            .filter(|e| !e.lost)
            .map(|e| (e.name, e.ino))
            .collect();
        if &standing != mds {
            self.violation(format!(
                "{dir}: the MDS lists {mds:?}, the creates standing are {standing:?}"
            ));
        }
    }
}
