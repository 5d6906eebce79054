//! Names that another mount's change recalled a moment ago.
//!
//! Two ways a lookup's answer goes stale inside one syscall that names two
//! paths (rename, link), both of which let the kernel see one inode under
//! two names and complete a rename that no longer exists as a no-op:
//! - The lookup was read at the MDS before another mount's change of that
//!   very name and its reply waited for the recall (its mark): the answer
//!   is already superseded when it reaches the kernel. The client asks
//!   again ([`MovedNames::touched_since`]).
//! - The syscall resolved its first name from the kernel's cache, then a
//!   recall took that name away (another mount renamed it onto the second),
//!   and our answer for the second name gives the inode the kernel still
//!   holds under the first. Such a lookup answers ESTALE: the VFS then
//!   redoes the whole syscall once, revalidating every name
//!   (`retry_estale`), and finds the first one gone
//!   ([`MovedNames::stale_lookup`]). A lookup that revalidates a name the
//!   kernel holds is the same request as a first lookup, but an error
//!   there only makes the kernel drop the name and look it up again: so
//!   where the kernel holds the second name with another inode (as we last
//!   told it), the answer goes through, the kernel drops its name, and
//!   its new lookup gets the ESTALE.

use dashmap::DashMap;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a recalled name is remembered: a syscall holds a name it
/// resolved for a few milliseconds at most (longer only when the recall
/// waited for the kernel, `recall::ENTRY_WAIT`, or a reply for its mark).
const REMEMBER: Duration = Duration::from_millis(500);
/// Most names remembered (a burst of recalls forgets the oldest).
const MAX_NAMES: usize = 1024;
/// Most answers to the kernel remembered before starting over.
const MAX_TOLD: usize = 1 << 16;

/// A recalled name, or a name answered ESTALE (`seq` 0).
struct Moved {
    seq: u64,
    parent: u64,
    name: Box<[u8]>,
    /// The inode it named in this client's cache (0: unknown or absent).
    ino: u64,
    at: Instant,
}

/// Recently recalled names with the inode each named (in this cache).
#[derive(Default)]
pub struct MovedNames {
    inner: Mutex<Inner>,
    /// What the kernel was last told a name holds (0: absent), by a hash
    /// of directory and name: a lookup that finds another inode is the
    /// kernel revalidating what it holds (see the module's comment).
    told: DashMap<u64, u64>,
}

/// FNV-1a of a directory and a name: the key of [`MovedNames::told`].
fn name_key(parent: u64, name: &[u8]) -> u64 {
    parent
        .to_le_bytes()
        .iter()
        .chain(name)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
}

#[derive(Default)]
struct Inner {
    seq: u64,
    recalled: VecDeque<Moved>,
    /// Names a lookup answered ESTALE for: the kernel's retry passes.
    retried: VecDeque<Moved>,
}

fn forget_old(q: &mut VecDeque<Moved>, now: Instant) {
    while q
        .front()
        .is_some_and(|m| q.len() >= MAX_NAMES || now.duration_since(m.at) > REMEMBER)
    {
        q.pop_front();
    }
}

impl MovedNames {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `parent`/`name`, which named `ino` here (0 if unknown), was
    /// recalled now.
    pub fn recalled(&self, parent: u64, name: &[u8], ino: u64) {
        let now = Instant::now();
        let mut g = self.lock();
        forget_old(&mut g.recalled, now);
        g.seq += 1;
        let seq = g.seq;
        g.recalled.push_back(Moved {
            seq,
            parent,
            name: name.into(),
            ino,
            at: now,
        });
    }

    /// A mark to pass to [`MovedNames::touched_since`] after a request.
    pub fn mark(&self) -> u64 {
        self.lock().seq
    }

    /// True if `parent`/`name` was recalled after `mark` (while a lookup
    /// of it was in flight: its answer may predate the change).
    pub fn touched_since(&self, mark: u64, parent: u64, name: &[u8]) -> bool {
        let g = self.lock();
        g.recalled
            .iter()
            .rev()
            .take_while(|m| m.seq > mark)
            .any(|m| m.parent == parent && *m.name == *name)
    }

    /// The kernel is told that `parent`/`name` holds `ino` (0: absent).
    pub fn told(&self, parent: u64, name: &[u8], ino: u64) {
        if self.told.len() >= MAX_TOLD {
            self.told.clear();
        }
        self.told.insert(name_key(parent, name), ino);
    }

    /// True if a lookup of `parent`/`name` that found `ino` must make the
    /// kernel look again: another name of `ino` in the same directory was
    /// recalled a moment ago, and a syscall may still hold it. A name
    /// answered so once passes for a while, so that the kernel's retry
    /// (which it makes only once) gets through.
    pub fn stale_lookup(&self, parent: u64, name: &[u8], ino: u64) -> bool {
        if ino == 0 {
            return false;
        }
        let key = name_key(parent, name);
        let told = self.told.insert(key, ino);
        let now = Instant::now();
        let mut g = self.lock();
        if g.recalled.is_empty() {
            return false;
        }
        let fresh = |m: &Moved| now.duration_since(m.at) <= REMEMBER;
        let other = g
            .recalled
            .iter()
            .any(|m| m.ino == ino && m.parent == parent && *m.name != *name && fresh(m));
        if !other || told.is_some_and(|t| t != ino) {
            // Not stale, or the kernel revalidating another inode's name:
            // it drops that and asks again.
            return false;
        }
        forget_old(&mut g.retried, now);
        if g.retried
            .iter()
            .any(|m| m.parent == parent && *m.name == *name)
        {
            return false;
        }
        g.retried.push_back(Moved {
            seq: 0,
            parent,
            name: name.into(),
            ino,
            at: now,
        });
        self.told.remove(&key);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_name_of_a_recalled_inode_is_stale_once() {
        let m = MovedNames::default();
        m.recalled(1, b"n3", 7);
        assert!(!m.stale_lookup(1, b"n3", 7), "the same name is not another");
        assert!(!m.stale_lookup(2, b"n0", 7), "another directory");
        assert!(!m.stale_lookup(1, b"n1", 8), "another inode");
        assert!(m.stale_lookup(1, b"n0", 7));
        m.recalled(1, b"n2", 7);
        assert!(!m.stale_lookup(1, b"n0", 7), "the retry passes");
        assert!(m.stale_lookup(1, b"n4", 7), "another name");
    }

    #[test]
    fn a_revalidation_passes_and_the_lookup_after_it_is_stale() {
        let m = MovedNames::default();
        m.told(1, b"n0", 5);
        m.recalled(1, b"n3", 7);
        assert!(!m.stale_lookup(1, b"n0", 7), "the kernel held n0 -> 5");
        assert!(m.stale_lookup(1, b"n0", 7), "its lookup after dropping it");
        assert!(!m.stale_lookup(1, b"n0", 7), "the syscall's retry");
    }

    #[test]
    fn names_recalled_during_a_request_are_seen() {
        let m = MovedNames::default();
        m.recalled(1, b"a", 0);
        let mark = m.mark();
        assert!(!m.touched_since(mark, 1, b"a"), "before the request");
        m.recalled(1, b"b", 5);
        assert!(m.touched_since(mark, 1, b"b"));
        assert!(!m.touched_since(mark, 1, b"a"));
        assert!(!m.touched_since(mark, 2, b"b"));
    }

    #[test]
    fn absent_names_and_old_recalls_are_not_remembered() {
        let m = MovedNames::default();
        m.recalled(1, b"gone", 0);
        assert!(!m.stale_lookup(1, b"x", 0));
        for i in 0..(MAX_NAMES as u64 + 10) {
            m.recalled(1, b"n", 100 + i);
        }
        assert!(!m.stale_lookup(1, b"x", 100), "the oldest were forgotten");
        assert!(m.stale_lookup(1, b"y", 100 + MAX_NAMES as u64 + 9));
    }
}
