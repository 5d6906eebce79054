//! Which files had chunk writes sent without `sync` since their last
//! fsync. Only those need the OSDs' `SyncObjects`: an fsync whose data all
//! went out as sync writes (the primary and its replicas fsync each one
//! before they acknowledge it) is done once they are acknowledged, one
//! round trip instead of two.

use dashmap::DashMap;
use std::sync::atomic::{AtomicBool, Ordering};

/// Files tracked at most; past that every file counts as unsynced (a
/// client writing millions of files it never fsyncs keeps no more).
const MAX_TRACKED: usize = 1 << 18;

/// Per file: writes sent without sync, and how many of them a finished
/// `SyncObjects` covers.
#[derive(Default)]
pub struct SyncMarks {
    files: DashMap<u64, (u64, u64)>,
    overflow: AtomicBool,
}

impl SyncMarks {
    /// A chunk write of `ino` without sync is about to be sent.
    pub fn note_unsynced(&self, ino: u64) {
        if let Some(mut e) = self.files.get_mut(&ino) {
            e.0 += 1;
            return;
        }
        if self.files.len() >= MAX_TRACKED {
            self.overflow.store(true, Ordering::Relaxed);
            return;
        }
        self.files.entry(ino).or_default().0 += 1;
    }

    /// Whether `ino` needs a `SyncObjects`: the mark to pass to
    /// [`SyncMarks::synced`] once it succeeded.
    pub fn pending(&self, ino: u64) -> Option<u64> {
        match self.files.get(&ino) {
            Some(e) if e.0 > e.1 => Some(e.0),
            Some(_) => None,
            // Unknown: clean, unless some marks were never kept.
            None => self.overflow.load(Ordering::Relaxed).then_some(0),
        }
    }

    /// A `SyncObjects` of `ino` that started at `mark` succeeded. Concurrent
    /// fsyncs each sync what they saw; a write sent meanwhile stays pending.
    pub fn synced(&self, ino: u64, mark: u64) {
        if let Some(mut e) = self.files.get_mut(&ino) {
            e.1 = e.1.max(mark);
        }
        self.files.remove_if(&ino, |_, e| e.1 >= e.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_until_a_sync_covers_every_write() {
        let m = SyncMarks::default();
        assert_eq!(m.pending(1), None);
        m.note_unsynced(1);
        let mark = m.pending(1).expect("pending");
        // A write sent while the sync runs is not covered by it.
        m.note_unsynced(1);
        m.synced(1, mark);
        let again = m.pending(1).expect("still pending");
        assert!(again > mark);
        m.synced(1, again);
        assert_eq!(m.pending(1), None);
        // An older sync finishing late changes nothing.
        m.synced(1, mark);
        assert_eq!(m.pending(1), None);
    }
}
