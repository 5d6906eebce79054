//! When an open may keep the kernel's cached pages of a file
//! (FOPEN_KEEP_CACHE) instead of reading everything again from the OSDs.
//!
//! The pages are current if the file's version at the MDS (ctime and size,
//! which every committed change moves) is the one seen at the previous
//! open here, and nothing changed the file through this client or a recall
//! since, or the version is the one this client's own committed writes
//! left. Another mount's committed write moves ctime, so close-to-open
//! consistency holds; while the file is open here, its recall drops the
//! kernel's pages (see recall.rs). The client's chunk cache follows the
//! same decision.

use avalon_proto::pb::Attr;
use dashmap::{DashMap, DashSet};
use std::sync::atomic::{AtomicBool, Ordering};

/// Versions remembered at most; past that all are forgotten (so a file is
/// read again once, never served stale).
const MAX_FILES: usize = 1 << 17;

/// Per inode: the version the kernel's pages were read at.
#[derive(Default)]
pub struct PageVersions {
    map: DashMap<u64, (i64, u64)>,
    /// Files written around the kernel's pages (O_APPEND opens are direct
    /// I/O) since this client last wrote them through the pages.
    bypassed: DashSet<u64>,
    /// `bypassed` was full once: no own write is trusted to leave current
    /// pages any more.
    bypassed_overflow: AtomicBool,
}

impl PageVersions {
    /// At open, with the MDS's attributes: true if the kernel's pages of
    /// the file are still current. `cacheable`: this open goes through the
    /// page cache at all (not direct I/O, not shared-write).
    pub fn open(&self, a: &Attr, cacheable: bool) -> bool {
        if !cacheable {
            self.changed(a.ino);
            return false;
        }
        if self.map.len() >= MAX_FILES {
            self.map.clear();
        }
        let v = (a.ctime_ns, a.size);
        self.map.insert(a.ino, v) == Some(v)
    }

    /// This client's writes to `a.ino`, now committed, went through the
    /// kernel's pages, which are current at `a`'s version: an open that
    /// finds the file at that version keeps them (and the client's cached
    /// chunks), as it would after a read. (The kernel itself drops its
    /// pages once it sees the commit's new mtime: FUSE_AUTO_INVAL_DATA.)
    pub fn written(&self, a: &Attr) {
        if self.bypassed.remove(&a.ino).is_some() || self.bypassed_overflow.load(Ordering::Relaxed)
        {
            return;
        }
        if self.map.len() >= MAX_FILES {
            self.map.clear();
        }
        self.map.insert(a.ino, (a.ctime_ns, a.size));
    }

    /// `ino` was written with direct I/O: its pages are not current (see
    /// `written`).
    pub fn bypassed(&self, ino: u64) {
        self.changed(ino);
        if self.bypassed.len() < MAX_FILES {
            self.bypassed.insert(ino);
        } else {
            self.bypassed_overflow.store(true, Ordering::Relaxed);
        }
    }

    /// `ino` changed here or elsewhere: its pages are not known current.
    pub fn changed(&self, ino: u64) {
        // The read-locked check keeps writes to unknown files cheap.
        if self.map.contains_key(&ino) {
            self.map.remove(&ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ino: u64, ctime_ns: i64, size: u64) -> Attr {
        Attr {
            ino,
            ctime_ns,
            size,
            ..Default::default()
        }
    }

    #[test]
    fn pages_are_kept_only_at_an_unchanged_version() {
        let p = PageVersions::default();
        assert!(!p.open(&attr(5, 10, 100), true), "first open reads");
        assert!(p.open(&attr(5, 10, 100), true));
        assert!(!p.open(&attr(5, 11, 100), true), "ctime moved");
        assert!(p.open(&attr(5, 11, 100), true));
        assert!(!p.open(&attr(5, 11, 101), true), "size moved");
        p.changed(5);
        assert!(!p.open(&attr(5, 11, 101), true), "written here");
        assert!(!p.open(&attr(5, 11, 101), false), "direct I/O");
        assert!(!p.open(&attr(5, 11, 101), true), "direct I/O forgot it");
    }

    #[test]
    fn own_committed_writes_leave_pages_current_unless_they_went_around() {
        let p = PageVersions::default();
        p.changed(6);
        p.written(&attr(6, 20, 4096));
        assert!(p.open(&attr(6, 20, 4096), true), "our own version");
        assert!(!p.open(&attr(6, 21, 4096), true), "another's commit");
        // An O_APPEND (direct) write since: not trusted at the commit.
        p.bypassed(6);
        p.written(&attr(6, 22, 5000));
        assert!(!p.open(&attr(6, 22, 5000), true));
        // Until the next write through the pages and its commit.
        p.changed(6);
        p.written(&attr(6, 23, 5000));
        assert!(p.open(&attr(6, 23, 5000), true));
    }
}
