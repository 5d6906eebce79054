//! Write delegations of directories, held by client sessions (the
//! leader's memory only, like the leases they extend).
//!
//! A session holding the delegation of directory D creates, removes and
//! renames entries of D by itself, and of every directory it creates
//! there, changes the inodes it so created, and sends all that later, in
//! its order, with `Apply` (see the proto's `DelegateRequest`). D and those
//! inodes form one *group*: a request of any other session that names one
//! of them first revokes the whole group, which makes the holder send what
//! it has pending (`MetaService::settle`). So nobody else ever sees the
//! group's state without the holder's changes in it.
//!
//! A delegation is granted only while no other session caches D (so no
//! cache elsewhere can go stale behind the holder's back), and not again
//! for [`REGRANT_AFTER`] once revoked (two sessions working in one
//! directory do not make it bounce).
//!
//! Inode numbers for those creates come from ranges reserved in the log
//! (`Op::ReserveInos`); this table remembers which session got which range,
//! so that one session cannot use another's numbers and the OSDs' garbage
//! collection keeps the data of files whose create is still on its way.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a revoked directory is not delegated again.
pub const REGRANT_AFTER: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Inner {
    /// Delegated inode → (holding session, root directory of its group).
    owner: HashMap<u64, (u64, u64)>,
    /// Root directory → the inodes of its group (the root included).
    groups: HashMap<u64, Vec<u64>>,
    /// Roots revoked lately, and when.
    revoked: HashMap<u64, Instant>,
    /// Reserved inode numbers: first → (end, session).
    reserved: BTreeMap<u64, (u64, u64)>,
    /// Inodes that changes in flight name (see [`Delegations::pin`]): not
    /// delegated until those are applied and recalled.
    busy: HashMap<u64, u32>,
}

/// The leader's delegation table.
#[derive(Default)]
pub struct Delegations {
    inner: Mutex<Inner>,
}

impl Delegations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delegates directory `dir` to `sid` unless another session holds it
    /// or it was revoked lately. `cached_elsewhere`: another session may
    /// cache `dir` (then it is not granted). True if `sid` holds it now.
    pub fn grant(&self, sid: u64, dir: u64, cached_elsewhere: bool) -> bool {
        let mut g = self.lock();
        if let Some((holder, _)) = g.owner.get(&dir) {
            return *holder == sid;
        }
        if cached_elsewhere || g.busy.contains_key(&dir) {
            return false;
        }
        let now = Instant::now();
        g.revoked
            .retain(|_, t| now.duration_since(*t) < REGRANT_AFTER);
        if g.revoked.contains_key(&dir) {
            return false;
        }
        g.owner.insert(dir, (sid, dir));
        g.groups.insert(dir, vec![dir]);
        true
    }

    /// The groups of sessions other than `sid` that cover any of `inos`:
    /// (holder, root), each once.
    pub fn conflicts(&self, sid: u64, inos: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
        let g = self.lock();
        if g.owner.is_empty() {
            return Vec::new();
        }
        let mut out: Vec<(u64, u64)> = Vec::new();
        for ino in inos {
            if let Some(&(holder, root)) = g.owner.get(&ino) {
                if holder != sid && !out.contains(&(holder, root)) {
                    out.push((holder, root));
                }
            }
        }
        out
    }

    /// Before `sid` changes `inos`: the groups of other sessions that cover
    /// any of them (to revoke first), or, if none, marks them busy until
    /// the returned pin is dropped, so that no delegation of them is
    /// granted while the change is on its way (a grant in between would
    /// let its holder decide from a state that misses the change).
    pub fn pin(&self, sid: u64, inos: &[u64]) -> Result<Pin<'_>, Vec<(u64, u64)>> {
        let mut g = self.lock();
        let mut conflicts: Vec<(u64, u64)> = Vec::new();
        for ino in inos {
            if let Some(&(holder, root)) = g.owner.get(ino) {
                if holder != sid && !conflicts.contains(&(holder, root)) {
                    conflicts.push((holder, root));
                }
            }
        }
        if !conflicts.is_empty() {
            return Err(conflicts);
        }
        for ino in inos {
            *g.busy.entry(*ino).or_insert(0) += 1;
        }
        Ok(Pin {
            table: self,
            inos: inos.to_vec(),
        })
    }

    /// `sid` created `ino` in `parent`: if `parent` is in one of its
    /// groups, so is `ino`.
    pub fn created(&self, sid: u64, parent: u64, ino: u64) {
        let mut g = self.lock();
        if let Some(&(holder, root)) = g.owner.get(&parent) {
            if holder == sid {
                g.owner.insert(ino, (sid, root));
                if let Some(members) = g.groups.get_mut(&root) {
                    members.push(ino);
                }
            }
        }
    }

    /// Every group of a session other than `sid`: (holder, root).
    pub fn others(&self, sid: u64) -> Vec<(u64, u64)> {
        let g = self.lock();
        g.owner
            .iter()
            .filter(|(ino, (holder, root))| *ino == root && *holder != sid)
            .map(|(_, &(holder, root))| (holder, root))
            .collect()
    }

    /// Ends the group rooted at `root` (revoked, or given back).
    pub fn revoke(&self, root: u64) {
        crate::metrics::revoked();
        let mut g = self.lock();
        if let Some(members) = g.groups.remove(&root) {
            for m in members {
                if g.owner.get(&m).is_some_and(|o| o.1 == root) {
                    g.owner.remove(&m);
                }
            }
            g.revoked.insert(root, Instant::now());
        }
    }

    /// Records that `sid` got inode numbers `[start, start + count)`.
    pub fn reserve(&self, sid: u64, start: u64, count: u64) {
        self.lock().reserved.insert(start, (start + count, sid));
    }

    /// The create of reserved number `ino` was applied: the numbers of its
    /// range up to it are used (a session uses its numbers in order, and
    /// its creates arrive in order), so the data of any of them that no
    /// inode holds is garbage again.
    pub fn consumed(&self, ino: u64) {
        let mut g = self.lock();
        let Some((&start, &(end, sid))) = g.reserved.range(..=ino).next_back() else {
            return;
        };
        if ino >= end {
            return;
        }
        g.reserved.remove(&start);
        if ino + 1 < end {
            g.reserved.insert(ino + 1, (end, sid));
        }
    }

    /// The session `ino` was reserved for (and not used yet), if this
    /// leader reserved it.
    pub fn reserved_for(&self, ino: u64) -> Option<u64> {
        let g = self.lock();
        g.reserved
            .range(..=ino)
            .next_back()
            .filter(|(_, (end, _))| ino < *end)
            .map(|(_, (_, sid))| *sid)
    }

    /// Forgets a session's delegations and reservations (ended or
    /// expired: its pending changes are lost with it).
    pub fn remove_session(&self, sid: u64) {
        let roots: Vec<u64> = {
            let g = self.lock();
            g.groups
                .keys()
                .copied()
                .filter(|r| g.owner.get(r).is_some_and(|o| o.0 == sid))
                .collect()
        };
        for r in roots {
            self.revoke(r);
        }
        self.lock().reserved.retain(|_, (_, s)| *s != sid);
    }

    /// Forgets everything (this node stopped leading).
    pub fn clear(&self) {
        *self.lock() = Inner::default();
    }

    /// Number of delegated inodes.
    pub fn len(&self) -> usize {
        self.lock().owner.len()
    }

    /// True if nothing is delegated.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Inodes a change in flight names (see [`Delegations::pin`]).
pub struct Pin<'a> {
    table: &'a Delegations,
    inos: Vec<u64>,
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        let mut g = self.table.lock();
        for ino in &self.inos {
            if let Some(n) = g.busy.get_mut(ino) {
                *n -= 1;
                if *n == 0 {
                    g.busy.remove(ino);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_grow_with_creates_and_go_as_one() {
        let d = Delegations::default();
        assert!(d.grant(1, 10, false));
        assert!(d.grant(1, 10, true), "held already");
        assert!(!d.grant(2, 10, false), "held by another");
        assert!(!d.grant(2, 11, true), "cached elsewhere");
        d.created(1, 10, 20);
        d.created(1, 20, 21);
        d.created(2, 10, 22);
        assert_eq!(d.conflicts(2, [5, 21, 20, 10]), vec![(1, 10)]);
        assert!(d.conflicts(1, [10, 20, 21]).is_empty());
        assert!(d.conflicts(2, [22]).is_empty(), "not created in a group");
        assert!(d.pin(2, &[5, 20]).is_err(), "another's group");
        {
            let _p = d.pin(2, &[11]).unwrap();
            assert!(!d.grant(1, 11, false), "a change to it is in flight");
        }
        d.revoke(10);
        assert!(d.is_empty());
        assert!(!d.grant(1, 10, false), "revoked lately");
        assert!(d.grant(1, 12, false));
        d.remove_session(1);
        assert!(d.is_empty());
    }

    #[test]
    fn reservations_name_their_session() {
        let d = Delegations::default();
        d.reserve(1, 100, 10);
        d.reserve(2, 110, 10);
        assert_eq!(d.reserved_for(99), None);
        assert_eq!(d.reserved_for(100), Some(1));
        assert_eq!(d.reserved_for(109), Some(1));
        assert_eq!(d.reserved_for(110), Some(2));
        assert_eq!(d.reserved_for(120), None);
        d.consumed(104);
        assert_eq!(d.reserved_for(104), None, "used");
        assert_eq!(d.reserved_for(100), None, "below a used one");
        assert_eq!(d.reserved_for(105), Some(1));
        d.consumed(109);
        assert_eq!(d.reserved_for(109), None);
        assert_eq!(d.reserved_for(110), Some(2));
        d.remove_session(2);
        assert_eq!(d.reserved_for(115), None);
    }
}
