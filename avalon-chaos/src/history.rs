//! The history: every operation a workload client invoked, with its
//! invocation and completion times and its result, as the checkers read it.

use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::Instant;

/// Which lock call a lock operation used (the two kinds never conflict
/// with each other on Linux, so each has its own files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockKind {
    /// `flock(LOCK_EX | LOCK_NB)`.
    Flock,
    /// `fcntl(F_OFD_SETLK)` write lock on the whole file (owned by the open
    /// file description, so threads of one process exclude each other).
    Ofd,
}

/// One operation, with its arguments. Paths are relative to the mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// `open(dir/name, O_CREAT | O_EXCL)` then close: Ok or EEXIST.
    Create { dir: String, name: String },
    /// `unlink(dir/name)`: Ok or ENOENT.
    Unlink { dir: String, name: String },
    /// `rename(dir/from, dir/to)`: Ok or ENOENT.
    Rename {
        dir: String,
        from: String,
        to: String,
    },
    /// `stat(dir/name)`: Exists(true) or Exists(false).
    Exists { dir: String, name: String },
    /// Creates a data file only this client writes (`O_CREAT | O_EXCL`),
    /// kept open for the following operations on it.
    FileCreate { file: String },
    /// `pwrite` of `len` bytes of [`pattern`]`(seed)` at `offset`.
    Write {
        file: String,
        offset: u64,
        len: u64,
        seed: u64,
    },
    /// `ftruncate(len)`.
    Truncate { file: String, len: u64 },
    /// `fsync` of the open data file.
    Fsync { file: String },
    /// `close` of the data file.
    Close { file: String },
    /// `open(O_APPEND)`, one write of `record`, `fsync`, `close`: Ok only
    /// when all of them succeeded.
    Append { file: String, record: String },
    /// A non-blocking exclusive lock: Ok, or EAGAIN/EWOULDBLOCK when held.
    Lock { file: String, kind: LockKind },
    /// Unlock of a lock this client holds.
    Unlock { file: String, kind: LockKind },
}

impl Op {
    /// Short name, for counts in the report.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Unlink { .. } => "unlink",
            Op::Rename { .. } => "rename",
            Op::Exists { .. } => "exists",
            Op::FileCreate { .. } => "file_create",
            Op::Write { .. } => "write",
            Op::Truncate { .. } => "truncate",
            Op::Fsync { .. } => "fsync",
            Op::Close { .. } => "close",
            Op::Append { .. } => "append",
            Op::Lock { .. } => "lock",
            Op::Unlock { .. } => "unlock",
        }
    }
}

/// What an operation returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Succeeded.
    Ok,
    /// `stat` answered: present or not.
    Exists(bool),
    /// Failed with this errno.
    Err(i32),
    /// Never completed (its thread was still blocked when the run ended):
    /// it may or may not have taken effect.
    Unknown,
}

/// One operation of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Workload client (thread) that ran it.
    pub client: u32,
    pub op: Op,
    /// Nanoseconds since the run started.
    pub invoke_ns: u64,
    /// `None` while (or if) it never completed.
    pub complete_ns: Option<u64>,
    pub outcome: Outcome,
}

impl Entry {
    /// Completion time, with a never-completed operation at the end of time.
    pub fn end_ns(&self) -> u64 {
        self.complete_ns.unwrap_or(u64::MAX)
    }
}

/// The shared recorder the clients append to.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    entries: Mutex<Vec<Entry>>,
}

impl Recorder {
    /// A recorder whose clock starts now.
    pub fn new() -> Recorder {
        Recorder {
            start: Instant::now(),
            entries: Mutex::new(Vec::new()),
        }
    }

    /// Nanoseconds since the start.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Records the invocation of `op`; returns its index for [`Self::complete`].
    pub fn invoke(&self, client: u32, op: Op) -> usize {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.push(Entry {
            client,
            op,
            invoke_ns: self.now_ns(),
            complete_ns: None,
            outcome: Outcome::Unknown,
        });
        e.len() - 1
    }

    /// Records the completion of operation `idx`.
    pub fn complete(&self, idx: usize, outcome: Outcome) {
        let now = self.now_ns();
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(x) = e.get_mut(idx) {
            x.complete_ns = Some(now);
            x.outcome = outcome;
        }
    }

    /// A copy of the history so far (operations still running are Unknown).
    pub fn snapshot(&self) -> Vec<Entry> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// The bytes a [`Op::Write`] with `seed` writes: deterministic, and
/// different for every (client, sequence number), so a byte tells whose
/// write it came from.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The line an [`Op::Append`] writes: client, sequence number and a
/// checksum of both, so a torn or foreign line is recognised.
pub fn append_record(client: u32, seq: u64) -> String {
    let crc = crc32c::crc32c(format!("{client}:{seq}").as_bytes());
    format!("R {client} {seq} {crc:08x}\n")
}

/// Parses a line written by [`append_record`] (without its newline).
pub fn parse_record(line: &str) -> Option<(u32, u64)> {
    let mut it = line.split(' ');
    if it.next()? != "R" {
        return None;
    }
    let client: u32 = it.next()?.parse().ok()?;
    let seq: u64 = it.next()?.parse().ok()?;
    let crc = u32::from_str_radix(it.next()?, 16).ok()?;
    if it.next().is_some() || crc != crc32c::crc32c(format!("{client}:{seq}").as_bytes()) {
        return None;
    }
    Some((client, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_damage() {
        let r = append_record(3, 17);
        assert_eq!(parse_record(r.trim_end()), Some((3, 17)));
        assert_eq!(parse_record("R 3 18 00000000"), None);
        assert_eq!(parse_record(&r.trim_end()[..r.len() - 3]), None);
    }

    #[test]
    fn patterns_differ_by_seed() {
        assert_ne!(pattern(1, 64), pattern(2, 64));
        assert_eq!(pattern(5, 100).len(), 100);
    }
}
