//! The rights a session may hold on an inode, and which of them two
//! different sessions may hold at the same time.

use std::fmt;

/// One right on one inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Right {
    /// Cache the inode's attributes (getattr answered locally).
    AttrShared = 0,
    /// Change the attributes locally and send them later (buffered
    /// chmod/chown/utimes, the size a close commits).
    AttrExcl = 1,
    /// Cache the names of a directory looked up one by one, positive and
    /// negative.
    Entries = 2,
    /// The cached names are the directory's complete listing (readdir and
    /// any lookup answered locally).
    Listing = 3,
    /// Cache the file's data (reads answered from the client's pages).
    DataCache = 4,
    /// Buffer writes of the file (write-back) and send them later.
    DataBuffer = 5,
    /// Directory delegation: create names locally (numbered from inode
    /// numbers the MDS reserved for the session) and send them later.
    Delegation = 6,
}

impl Right {
    /// Every right, in bit order.
    pub const ALL: [Right; 7] = [
        Right::AttrShared,
        Right::AttrExcl,
        Right::Entries,
        Right::Listing,
        Right::DataCache,
        Right::DataBuffer,
        Right::Delegation,
    ];

    /// This right alone, as a set.
    pub const fn set(self) -> Rights {
        Rights(1 << self as u8)
    }

    /// Whether holding this right lets the session change state the MDS
    /// has not seen yet (it must be flushed before the right is given up).
    pub const fn is_exclusive(self) -> bool {
        matches!(
            self,
            Right::AttrExcl | Right::DataBuffer | Right::Delegation
        )
    }
}

/// Whether two *different* sessions may hold `a` and `b` on the same inode
/// at the same time. One session may hold any combination.
///
/// |            | AttrShared | AttrExcl | Entries | Listing | DataCache | DataBuffer | Delegation |
/// |------------|:---:|:---:|:---:|:---:|:---:|:---:|:---:|
/// | AttrShared |  y  |  -  |  y  |  y  |  y  |  -  |  -  |
/// | AttrExcl   |  -  |  -  |  y  |  y  |  y  |  -  |  -  |
/// | Entries    |  y  |  y  |  y  |  y  |  y  |  y  |  -  |
/// | Listing    |  y  |  y  |  y  |  y  |  y  |  y  |  -  |
/// | DataCache  |  y  |  y  |  y  |  y  |  y  |  -  |  y  |
/// | DataBuffer |  -  |  -  |  y  |  y  |  -  |  -  |  y  |
/// | Delegation |  -  |  -  |  -  |  -  |  y  |  y  |  -  |
///
/// Why: buffered writes move size and mtime, so they exclude cached
/// attributes; a delegation adds names and moves the directory's mtime, so
/// it excludes cached names, listings and attributes of the directory. The
/// data rights never meet the directory rights on one inode in practice
/// (files versus directories); they are declared compatible.
pub const fn compatible(a: Right, b: Right) -> bool {
    use Right::*;
    // The conflicting pairs, each listed both ways round.
    !matches!(
        (a, b),
        (AttrExcl, AttrShared | AttrExcl | DataBuffer | Delegation)
            | (AttrShared | DataBuffer | Delegation, AttrExcl)
            | (AttrShared, DataBuffer | Delegation)
            | (DataBuffer | Delegation, AttrShared)
            | (DataBuffer, DataCache | DataBuffer)
            | (DataCache, DataBuffer)
            | (Delegation, Entries | Listing | Delegation)
            | (Entries | Listing, Delegation)
    )
}

/// A set of rights (a bit per [`Right`]).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Rights(u8);

impl Rights {
    /// No right.
    pub const NONE: Rights = Rights(0);
    /// Every right that lets a session change state locally.
    pub const EXCLUSIVE: Rights =
        Rights(Right::AttrExcl.set().0 | Right::DataBuffer.set().0 | Right::Delegation.set().0);

    /// The union of `rights`.
    pub const fn of(rights: &[Right]) -> Rights {
        let mut bits = 0;
        let mut i = 0;
        while i < rights.len() {
            bits |= 1 << rights[i] as u8;
            i += 1;
        }
        Rights(bits)
    }

    /// Whether `r` is in the set.
    pub const fn has(self, r: Right) -> bool {
        self.0 & (1 << r as u8) != 0
    }

    /// Whether every right of `other` is in the set.
    pub const fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Union.
    pub const fn union(self, other: Rights) -> Rights {
        Rights(self.0 | other.0)
    }

    /// Intersection.
    pub const fn intersect(self, other: Rights) -> Rights {
        Rights(self.0 & other.0)
    }

    /// The rights of `self` not in `other`.
    pub const fn minus(self, other: Rights) -> Rights {
        Rights(self.0 & !other.0)
    }

    /// The rights in the set, in bit order.
    pub fn iter(self) -> impl Iterator<Item = Right> {
        Right::ALL.into_iter().filter(move |r| self.has(*r))
    }

    /// The rights of `held` (another session's) that conflict with any
    /// right of `wanted`: what must be revoked before `wanted` is granted.
    pub fn conflicting(held: Rights, wanted: Rights) -> Rights {
        let mut out = Rights::NONE;
        for h in held.iter() {
            if wanted.iter().any(|w| !compatible(h, w)) {
                out = out.union(h.set());
            }
        }
        out
    }
}

impl From<Right> for Rights {
    fn from(r: Right) -> Rights {
        r.set()
    }
}

impl fmt::Debug for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_symmetric() {
        for a in Right::ALL {
            for b in Right::ALL {
                assert_eq!(compatible(a, b), compatible(b, a), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn exclusive_rights_exclude_themselves_and_shared_ones_do_not() {
        for r in Right::ALL {
            assert_eq!(compatible(r, r), !r.is_exclusive(), "{r:?}");
        }
    }

    #[test]
    fn conflicts_name_only_what_must_go() {
        let held = Rights::of(&[Right::AttrShared, Right::DataCache, Right::Entries]);
        assert_eq!(
            Rights::conflicting(held, Right::DataBuffer.into()),
            Rights::of(&[Right::AttrShared, Right::DataCache])
        );
        assert_eq!(
            Rights::conflicting(held, Right::Delegation.into()),
            Rights::of(&[Right::AttrShared, Right::Entries])
        );
        assert!(Rights::conflicting(held, Right::AttrShared.into()).is_empty());
    }

    #[test]
    fn set_operations() {
        let a = Rights::of(&[Right::AttrShared, Right::Listing]);
        assert!(a.has(Right::Listing) && !a.has(Right::Entries));
        assert!(a.contains(Right::AttrShared.into()));
        assert_eq!(a.minus(Right::Listing.into()), Right::AttrShared.into());
        assert_eq!(a.intersect(Rights::EXCLUSIVE), Rights::NONE);
        assert_eq!(format!("{a:?}"), "{AttrShared, Listing}");
    }
}
