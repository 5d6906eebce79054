//! Directory snapshots (CephFS's `.snap`): the table of snapshots in the
//! Raft state, each a frozen copy of its directory's subtree.
//!
//! - Ids are one cluster-wide increasing sequence (`last_id`), never
//!   reused; the leader proposes the next one with [`Op::SnapCreate`] after
//!   the writers under the directory stored what they buffered and took
//!   the new id as their `snap_seq` (`meta_service.rs`).
//! - A snapshot keeps its own maps of the subtree's inodes, entries and
//!   readdir cookies, copied by a walk of the subtree when it is taken
//!   (O(entries below), no data): browsing it never looks at the live
//!   namespace, and a Raft snapshot stores only what it holds.
//! - The data stays on the OSDs as copy-on-write clones: a file's writes
//!   carry [`seq_of`] (the newest snapshot holding the inode), the GC
//!   deletes a removed file's data with it, and after a removal the
//!   leader sends `TrimSnapshots` with the live ids ([`Op::SnapTrimmed`]
//!   then records that it did).
//! - A directory with snapshots cannot be removed (ENOTEMPTY), as its
//!   snapshots are named by it.
//!
//! [`Op::SnapCreate`]: crate::command::Op::SnapCreate
//! [`Op::SnapTrimmed`]: crate::command::Op::SnapTrimmed

use crate::command::Attr;
use crate::namespace::{de_ns_map, Dentry, DirEntry, Inode, NsMap, State};
use avalon_proto::limits::check_name;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// The name of the virtual directory of a directory's snapshots.
pub const SNAP_DIR: &[u8] = b".snap";

type R<T> = Result<T, i32>;

/// One snapshot: where and when it was taken, and the subtree as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: u64,
    /// The directory it was taken of (the root of the frozen subtree).
    pub dir: u64,
    pub name: Vec<u8>,
    pub created_ns: i64,
    #[serde(deserialize_with = "de_ns_map")]
    pub inodes: NsMap<u64, Inode>,
    #[serde(deserialize_with = "de_ns_map")]
    pub dentries: NsMap<(u64, Vec<u8>), Dentry>,
    #[serde(deserialize_with = "de_ns_map")]
    pub cookies: NsMap<(u64, u64), Vec<u8>>,
}

/// Every live snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Snapshots {
    /// The newest id allocated (0: none yet).
    pub last_id: u64,
    pub by_id: BTreeMap<u64, Snapshot>,
    /// (directory, name) -> id.
    pub by_name: BTreeMap<(u64, Vec<u8>), u64>,
    /// Snapshots removed so far, and how many of those removals the OSDs
    /// were told of (`TrimSnapshots`): they differ while a trim is due.
    pub removals: u64,
    pub trimmed: u64,
}

/// Decodes the field, or no snapshots when an older snapshot ends before it.
pub fn absent_as_default<'de, D: Deserializer<'de>>(d: D) -> Result<Snapshots, D::Error> {
    Ok(Snapshots::deserialize(d).unwrap_or_default())
}

/// True if `dir` has snapshots.
pub fn has_any(s: &State, dir: u64) -> bool {
    s.snapshots
        .by_name
        .range((dir, Vec::new())..(dir.saturating_add(1), Vec::new()))
        .next()
        .is_some()
}

/// A snapshot name: a file name (not "." nor "..").
pub fn check_snap_name(name: &[u8]) -> R<()> {
    check_name(name)
}

/// Takes snapshot `id` of directory `dir`: the next id, else EAGAIN (a
/// create raced with another). EEXIST if `dir` has one named `name`.
pub fn take(s: &mut State, now: i64, id: u64, dir: u64, name: &[u8]) -> R<u64> {
    check_snap_name(name)?;
    let root = s.inodes.get(&dir).ok_or(libc::ENOENT)?;
    if !root.is_dir() {
        return Err(libc::ENOTDIR);
    }
    if root.attr.nlink == 0 {
        return Err(libc::ENOENT);
    }
    if s.snapshots.by_name.contains_key(&(dir, name.to_vec())) {
        return Err(libc::EEXIST);
    }
    if id != s.snapshots.last_id + 1 {
        return Err(libc::EAGAIN);
    }
    let mut inodes = NsMap::new();
    let mut dentries = NsMap::new();
    let mut cookies = NsMap::new();
    inodes.insert(dir, root.clone());
    let mut dirs = vec![dir];
    while let Some(d) = dirs.pop() {
        for (k, c) in s.cookies.range((d, 0)..=(d, u64::MAX)) {
            cookies.insert(*k, c.clone());
        }
        let next = (d.saturating_add(1), Vec::new());
        for (k, e) in s.dentries.range((d, Vec::new())..next) {
            dentries.insert(k.clone(), *e);
            if inodes.contains_key(&e.ino) {
                continue; // a second hard link
            }
            if let Some(i) = s.inodes.get(&e.ino) {
                if i.is_dir() {
                    dirs.push(e.ino);
                }
                inodes.insert(e.ino, i.clone());
            }
        }
    }
    let snap = Snapshot {
        id,
        dir,
        name: name.to_vec(),
        created_ns: now,
        inodes,
        dentries,
        cookies,
    };
    s.snapshots.last_id = id;
    s.snapshots.by_name.insert((dir, name.to_vec()), id);
    s.snapshots.by_id.insert(id, snap);
    Ok(id)
}

/// Removes snapshot `name` of `dir`; returns its id. Its clones on the
/// OSDs go at the next trim.
pub fn remove(s: &mut State, dir: u64, name: &[u8]) -> R<u64> {
    let id = s
        .snapshots
        .by_name
        .remove(&(dir, name.to_vec()))
        .ok_or(libc::ENOENT)?;
    s.snapshots.by_id.remove(&id);
    s.snapshots.removals += 1;
    Ok(id)
}

/// The newest snapshot holding inode `ino` (0: none): the `snap_seq` its
/// data changes carry, so that the OSDs keep what that snapshot saw.
pub fn seq_of(s: &State, ino: u64) -> u64 {
    s.snapshots
        .by_id
        .values()
        .rev()
        .find(|sn| sn.inodes.contains_key(&ino))
        .map_or(0, |sn| sn.id)
}

/// True if a snapshot holds inode `ino` (its data is still needed).
pub fn holds(s: &State, ino: u64) -> bool {
    seq_of(s, ino) != 0
}

/// True if a trim is due: a snapshot was removed since the last one.
pub fn trim_due(s: &State) -> bool {
    s.snapshots.removals != s.snapshots.trimmed
}

/// Snapshot `id`.
pub fn get(s: &State, id: u64) -> R<&Snapshot> {
    s.snapshots.by_id.get(&id).ok_or(libc::ENOENT)
}

/// The snapshots of `dir` (all with `None`), by id.
pub fn list(s: &State, dir: Option<u64>) -> Vec<&Snapshot> {
    s.snapshots
        .by_id
        .values()
        .filter(|sn| dir.is_none_or(|d| sn.dir == d))
        .collect()
}

impl Snapshot {
    fn inode(&self, ino: u64) -> R<&Inode> {
        self.inodes.get(&ino).ok_or(libc::ENOENT)
    }

    /// Inode `ino` as frozen.
    pub fn getattr(&self, ino: u64) -> R<Attr> {
        Ok(self.inode(ino)?.attr)
    }

    /// Entry `name` of directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> R<Attr> {
        if !self.inode(parent)?.is_dir() {
            return Err(libc::ENOTDIR);
        }
        check_name(name)?;
        let d = self
            .dentries
            .get(&(parent, name.to_vec()))
            .ok_or(libc::ENOENT)?;
        self.getattr(d.ino)
    }

    /// Extended attribute `name` as frozen (the stored ones: the virtual
    /// `avalon.*` attributes describe the live tree only).
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> R<Vec<u8>> {
        let i = self.inode(ino)?;
        crate::namespace::check_xattr_name(name)?;
        i.xattrs.get(name).cloned().ok_or(libc::ENODATA)
    }

    /// The names of the stored extended attributes, as the live tree
    /// lists them (the trash retention is not listed).
    pub fn listxattr(&self, ino: u64) -> R<Vec<Vec<u8>>> {
        Ok(crate::namespace::listed_xattrs(self.inode(ino)?))
    }

    /// A symbolic link's target.
    pub fn readlink(&self, ino: u64) -> R<Vec<u8>> {
        self.inode(ino)?.symlink.clone().ok_or(libc::EINVAL)
    }

    /// Entries of `ino` with cookie > `cookie`, in cookie order;
    /// `(entries, eof)` as [`State::readdir`].
    pub fn readdir(
        &self,
        ino: u64,
        cookie: u64,
        max: usize,
        plus: bool,
    ) -> R<(Vec<DirEntry>, bool)> {
        if !self.inode(ino)?.is_dir() {
            return Err(libc::ENOTDIR);
        }
        Ok(crate::namespace::list_entries(
            (&self.inodes, &self.dentries, &self.cookies),
            ino,
            cookie,
            max,
            plus,
        ))
    }

    /// A directory's parent inside the snapshot (the snapshot's root is
    /// its own).
    pub fn parent_of(&self, ino: u64) -> u64 {
        match self.inodes.get(&ino) {
            Some(i) if ino != self.dir && self.inodes.contains_key(&i.parent) => i.parent,
            _ => self.dir,
        }
    }
}

#[cfg(test)]
mod tests;
