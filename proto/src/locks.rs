//! Byte-range (fcntl/POSIX) and whole-file (flock) lock algebra, shared by
//! the MDS (which decides who holds what) and the client (which keeps a copy
//! of its own session's locks to reclaim them from a new leader).
//!
//! A lock belongs to `(session, owner)`: the client session and the kernel's
//! lock owner id (the `files_struct` of the process for fcntl locks, the open
//! file for flock, which the FUSE kernel module emulates as a whole-file
//! POSIX lock). Ranges are inclusive, `end == u64::MAX` (or the kernel's
//! OFFSET_MAX) means "to the end of the file". Setting a lock over part of an
//! owner's own lock splits or replaces it; adjacent or overlapping locks of
//! one owner and kind merge, as POSIX requires. A conflict is EAGAIN: blocking
//! waits (F_SETLKW, flock without LOCK_NB) are retried by the client.
//!
//! Everything here is deterministic (BTreeMap, no clocks): the MDS also
//! applies it in the replicated state machine (locks of sessions that cannot
//! reclaim, see `avalon-mds/src/locks.rs`), and the serialized [`LockTable`]
//! is part of its snapshots.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Lock kind, with the values of `F_RDLCK`, `F_WRLCK` and `F_UNLCK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockKind {
    Read,
    Write,
    Unlock,
}

impl LockKind {
    /// From the `l_type` of a `struct flock` (F_RDLCK=0, F_WRLCK=1, F_UNLCK=2).
    pub fn from_type(t: u32) -> Option<LockKind> {
        match t as i32 {
            libc::F_RDLCK => Some(LockKind::Read),
            libc::F_WRLCK => Some(LockKind::Write),
            libc::F_UNLCK => Some(LockKind::Unlock),
            _ => None,
        }
    }

    /// The `l_type` value.
    pub fn to_type(self) -> u32 {
        (match self {
            LockKind::Read => libc::F_RDLCK,
            LockKind::Write => libc::F_WRLCK,
            LockKind::Unlock => libc::F_UNLCK,
        }) as u32
    }
}

/// One held lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLock {
    pub session: u64,
    pub owner: u64,
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub end: u64,
    /// Read or Write (never Unlock).
    pub kind: LockKind,
    /// Process id on the holder's machine (reported by F_GETLK).
    pub pid: u32,
}

impl FileLock {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }

    fn same_owner(&self, session: u64, owner: u64) -> bool {
        self.session == session && self.owner == owner
    }
}

/// The lock table: inode -> its locks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockTable {
    pub files: BTreeMap<u64, Vec<FileLock>>,
}

impl LockTable {
    /// The first lock of another owner that conflicts with `kind` over
    /// `[start, end]` (what F_GETLK reports), if any.
    pub fn conflict(
        &self,
        ino: u64,
        session: u64,
        owner: u64,
        start: u64,
        end: u64,
        kind: LockKind,
    ) -> Option<FileLock> {
        if kind == LockKind::Unlock {
            return None;
        }
        self.files.get(&ino)?.iter().copied().find(|l| {
            !l.same_owner(session, owner)
                && l.overlaps(start, end)
                && (kind == LockKind::Write || l.kind == LockKind::Write)
        })
    }

    /// Sets (or with `Unlock` clears) a lock of `(session, owner)` over
    /// `[start, end]`. EAGAIN if another owner holds a conflicting lock,
    /// EINVAL for an empty range.
    #[allow(clippy::too_many_arguments)]
    pub fn set(
        &mut self,
        ino: u64,
        session: u64,
        owner: u64,
        pid: u32,
        start: u64,
        end: u64,
        kind: LockKind,
    ) -> Result<(), i32> {
        if start > end {
            return Err(libc::EINVAL);
        }
        if self
            .conflict(ino, session, owner, start, end, kind)
            .is_some()
        {
            return Err(libc::EAGAIN);
        }
        let locks = self.files.entry(ino).or_default();
        // Cut [start, end] out of this owner's locks.
        let mut out = Vec::with_capacity(locks.len() + 2);
        for l in locks.drain(..) {
            if !l.same_owner(session, owner) || !l.overlaps(start, end) {
                out.push(l);
                continue;
            }
            if l.start < start {
                out.push(FileLock {
                    end: start - 1,
                    ..l
                });
            }
            if l.end > end {
                out.push(FileLock {
                    start: end + 1,
                    ..l
                });
            }
        }
        if kind != LockKind::Unlock {
            let mut new = FileLock {
                session,
                owner,
                start,
                end,
                kind,
                pid,
            };
            // Merge with this owner's adjacent locks of the same kind.
            out.retain(|l| {
                let touches =
                    l.start <= new.end.saturating_add(1) && new.start <= l.end.saturating_add(1);
                if l.same_owner(session, owner) && l.kind == kind && touches {
                    new.start = new.start.min(l.start);
                    new.end = new.end.max(l.end);
                    false
                } else {
                    true
                }
            });
            out.push(new);
        }
        out.sort_by_key(|l| (l.start, l.end, l.session, l.owner));
        if out.is_empty() {
            self.files.remove(&ino);
        } else {
            *locks = out;
        }
        Ok(())
    }

    /// Drops every lock of `(session, owner)` on `ino` (close, flock release).
    pub fn release_owner(&mut self, ino: u64, session: u64, owner: u64) {
        if let Some(locks) = self.files.get_mut(&ino) {
            locks.retain(|l| !l.same_owner(session, owner));
            if locks.is_empty() {
                self.files.remove(&ino);
            }
        }
    }

    /// True if `(session, owner)` holds any lock on `ino`.
    pub fn holds(&self, ino: u64, session: u64, owner: u64) -> bool {
        self.files
            .get(&ino)
            .is_some_and(|ls| ls.iter().any(|l| l.same_owner(session, owner)))
    }

    /// Drops every lock of a session (expiry).
    pub fn drop_session(&mut self, session: u64) {
        self.files.retain(|_, locks| {
            locks.retain(|l| l.session != session);
            !locks.is_empty()
        });
    }

    /// Drops every lock of a session on one inode (its lock cache came
    /// back with the locks it holds now).
    pub fn drop_session_on(&mut self, ino: u64, session: u64) {
        if let Some(locks) = self.files.get_mut(&ino) {
            locks.retain(|l| l.session != session);
            if locks.is_empty() {
                self.files.remove(&ino);
            }
        }
    }

    /// True if a session other than `session` holds a lock on `ino`.
    pub fn others_hold(&self, ino: u64, session: u64) -> bool {
        self.files
            .get(&ino)
            .is_some_and(|ls| ls.iter().any(|l| l.session != session))
    }

    /// The locks on one inode.
    pub fn file_locks(&self, ino: u64) -> &[FileLock] {
        self.files.get(&ino).map_or(&[], Vec::as_slice)
    }

    /// Drops every lock on an inode that no longer exists.
    pub fn drop_inode(&mut self, ino: u64) {
        self.files.remove(&ino);
    }

    /// The locks of `(session, owner)` on `ino`.
    pub fn owner_locks(&self, ino: u64, session: u64, owner: u64) -> Vec<FileLock> {
        self.files.get(&ino).map_or_else(Vec::new, |ls| {
            ls.iter()
                .filter(|l| l.same_owner(session, owner))
                .copied()
                .collect()
        })
    }

    /// Puts back the locks of `(session, owner)` on `ino` as `saved` (from
    /// [`LockTable::owner_locks`]): undoes a change that could not be made
    /// durable.
    pub fn restore_owner(&mut self, ino: u64, session: u64, owner: u64, saved: Vec<FileLock>) {
        self.release_owner(ino, session, owner);
        if saved.is_empty() {
            return;
        }
        let locks = self.files.entry(ino).or_default();
        locks.extend(saved);
        locks.sort_by_key(|l| (l.start, l.end, l.session, l.owner));
    }

    /// Every lock of a session, with its inode.
    pub fn session_locks(&self, session: u64) -> Vec<(u64, FileLock)> {
        self.files
            .iter()
            .flat_map(|(ino, ls)| {
                ls.iter()
                    .filter(move |l| l.session == session)
                    .map(move |l| (*ino, *l))
            })
            .collect()
    }

    /// Keeps only the locks whose session `keep` accepts.
    pub fn retain_sessions(&mut self, keep: impl Fn(u64) -> bool) {
        self.files.retain(|_, locks| {
            locks.retain(|l| keep(l.session));
            !locks.is_empty()
        });
    }

    /// Number of held locks.
    pub fn len(&self) -> usize {
        self.files.values().map(Vec::len).sum()
    }

    /// True if no lock is held.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// Start of the message of [`reclaim_first`].
const RECLAIM_FIRST: &str = "reclaim locks first";

/// The leader's refusal of a lock request from a session whose locks it
/// has not had yet (a change of leader): the client reclaims, then retries.
pub fn reclaim_first() -> tonic::Status {
    tonic::Status::failed_precondition(format!(
        "{RECLAIM_FIRST}: this MDS became leader and has not had this session's locks"
    ))
}

/// Whether a status is [`reclaim_first`].
pub fn is_reclaim_first(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::FailedPrecondition && s.message().starts_with(RECLAIM_FIRST)
}

impl FileLock {
    /// The lock on `ino` as a client reclaims it.
    pub fn to_held(&self, ino: u64) -> crate::pb::HeldLock {
        crate::pb::HeldLock {
            ino,
            owner: self.owner,
            start: self.start,
            end: self.end,
            r#type: self.kind.to_type(),
            pid: self.pid,
        }
    }

    /// A reclaimed lock of `session`; None for a bad type or range.
    pub fn from_held(session: u64, h: &crate::pb::HeldLock) -> Option<FileLock> {
        let kind = LockKind::from_type(h.r#type).filter(|k| *k != LockKind::Unlock)?;
        (h.start <= h.end).then_some(FileLock {
            session,
            owner: h.owner,
            start: h.start,
            end: h.end,
            kind,
            pid: h.pid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use LockKind::*;

    const MAX: u64 = u64::MAX;

    #[test]
    fn conflicts_between_owners() {
        let mut t = LockTable::default();
        t.set(1, 1, 10, 100, 0, 99, Read).unwrap();
        // Another reader is fine, a writer is not.
        t.set(1, 2, 20, 200, 50, 149, Read).unwrap();
        assert_eq!(t.set(1, 3, 30, 300, 0, 0, Write), Err(libc::EAGAIN));
        assert_eq!(t.set(1, 3, 30, 300, 100, 200, Write), Err(libc::EAGAIN));
        t.set(1, 3, 30, 300, 150, MAX, Write).unwrap();
        let c = t.conflict(1, 1, 10, 160, 160, Read).unwrap();
        assert_eq!((c.session, c.pid, c.kind), (3, 300, Write));
        // Same owner on another session is another owner.
        assert_eq!(t.set(1, 4, 10, 1, 200, 200, Read), Err(libc::EAGAIN));
        // Other inodes are independent.
        t.set(2, 4, 10, 1, 0, MAX, Write).unwrap();
        assert!(t.conflict(1, 9, 9, 0, 10, Read).is_none());
    }

    #[test]
    fn split_merge_and_upgrade() {
        let mut t = LockTable::default();
        t.set(1, 1, 1, 1, 0, 99, Write).unwrap();
        t.set(1, 1, 1, 1, 40, 59, Unlock).unwrap();
        let ls = &t.files[&1];
        assert_eq!(ls.len(), 2);
        assert_eq!(
            (ls[0].start, ls[0].end, ls[1].start, ls[1].end),
            (0, 39, 60, 99)
        );
        // Fill the hole with a read lock: three pieces.
        t.set(1, 1, 1, 1, 40, 59, Read).unwrap();
        assert_eq!(t.files[&1].len(), 3);
        // Make it all write: one merged lock.
        t.set(1, 1, 1, 1, 40, 59, Write).unwrap();
        assert_eq!(t.files[&1].len(), 1);
        assert_eq!((t.files[&1][0].start, t.files[&1][0].end), (0, 99));
        // Adjacent locks merge.
        t.set(1, 1, 1, 1, 100, 199, Write).unwrap();
        assert_eq!((t.files[&1][0].start, t.files[&1][0].end), (0, 199));
        // Downgrade part of it.
        t.set(1, 1, 1, 1, 0, 9, Read).unwrap();
        t.set(1, 2, 2, 2, 0, 9, Read).unwrap();
        assert_eq!(t.set(1, 2, 2, 2, 10, 10, Read), Err(libc::EAGAIN));
        t.release_owner(1, 1, 1);
        t.set(1, 2, 2, 2, 10, 10, Write).unwrap();
        t.drop_session(2);
        assert!(t.is_empty());
    }

    #[test]
    fn whole_file_flock_style() {
        let mut t = LockTable::default();
        t.set(7, 1, 5, 1, 0, MAX, Read).unwrap();
        t.set(7, 2, 6, 1, 0, MAX, Read).unwrap();
        assert_eq!(t.set(7, 1, 5, 1, 0, MAX, Write), Err(libc::EAGAIN));
        t.set(7, 2, 6, 1, 0, MAX, Unlock).unwrap();
        t.set(7, 1, 5, 1, 0, MAX, Write).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t.set(7, 1, 5, 1, 5, 4, Write), Err(libc::EINVAL));
    }

    #[test]
    fn owner_restore_and_sessions() {
        let mut t = LockTable::default();
        t.set(1, 1, 1, 1, 0, 9, Write).unwrap();
        t.set(1, 2, 1, 1, 20, 29, Read).unwrap();
        t.set(2, 1, 3, 1, 0, MAX, Read).unwrap();
        let saved = t.owner_locks(1, 1, 1);
        t.set(1, 1, 1, 1, 0, 99, Unlock).unwrap();
        t.set(1, 1, 1, 1, 5, 6, Read).unwrap();
        t.restore_owner(1, 1, 1, saved);
        assert_eq!(t.owner_locks(1, 1, 1)[0].end, 9);
        assert_eq!(t.files[&1].len(), 2);
        let mine = t.session_locks(1);
        assert_eq!(mine.len(), 2);
        assert!(mine.iter().all(|(_, l)| l.session == 1));
        t.retain_sessions(|s| s != 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.session_locks(2).len(), 1);
    }

    /// Model: per byte in 0..64, the set of (owner, kind) holding it.
    fn model_kind(m: &[Vec<(u64, LockKind)>], byte: usize, owner: u64) -> Option<LockKind> {
        m[byte].iter().find(|(o, _)| *o == owner).map(|(_, k)| *k)
    }

    proptest! {
        #[test]
        fn matches_a_per_byte_model(ops in prop::collection::vec(
            (0u64..3, 0u64..64, 0u64..16, 0u32..3), 1..60)) {
            let mut t = LockTable::default();
            let mut m: Vec<Vec<(u64, LockKind)>> = vec![Vec::new(); 80];
            for (owner, start, len, ty) in ops {
                let end = start + len;
                let kind = LockKind::from_type(ty).unwrap();
                let conflict = kind != Unlock && (start..=end).any(|b| {
                    m[b as usize].iter().any(|(o, k)| *o != owner && (kind == Write || *k == Write))
                });
                let r = t.set(1, 1, owner, 0, start, end, kind);
                prop_assert_eq!(r.is_err(), conflict);
                if !conflict {
                    for b in start..=end {
                        let v = &mut m[b as usize];
                        v.retain(|(o, _)| *o != owner);
                        if kind != Unlock {
                            v.push((owner, kind));
                        }
                    }
                }
                // Table agrees with the model byte by byte, and one owner's
                // locks never overlap and never touch with the same kind.
                let ls = t.files.get(&1).cloned().unwrap_or_default();
                for b in 0..80u64 {
                    for o in 0..3 {
                        let held: Vec<_> = ls.iter().filter(|l| l.owner == o && l.start <= b && b <= l.end).collect();
                        prop_assert!(held.len() <= 1);
                        prop_assert_eq!(held.first().map(|l| l.kind), model_kind(&m, b as usize, o));
                    }
                }
                for a in &ls {
                    for b in &ls {
                        if a != b && a.owner == b.owner && a.kind == b.kind {
                            prop_assert!(a.end + 1 < b.start || b.end + 1 < a.start);
                        }
                    }
                }
            }
        }
    }
}
