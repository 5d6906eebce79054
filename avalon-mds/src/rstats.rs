//! Recursive statistics of directories (CephFS's rstats): for each
//! directory, the bytes, files and subdirectories below it and the latest
//! ctime below it (itself included), kept up to date by every change.
//!
//! Rules:
//! - A non-directory counts once, under its *primary* directory
//!   (`Inode::parent`): the one it was created in (or renamed to). When
//!   its primary link goes and other hard links remain, the primary moves
//!   to another of its directories (found by a scan: a rare case); a file
//!   with no link left (an open orphan) counts nowhere.
//! - `rbytes` sums the sizes of regular files and symbolic links (their
//!   target's length), as `du -b` counts them; directories add nothing.
//! - `rfiles` counts non-directories, `rsubdirs` the directories strictly
//!   below (the directory itself is not counted).
//! - `rctime` only grows: removing the newest entry does not lower it
//!   (the removal itself stamps the directory anyway).
//!
//! Each change walks the parent pointers to the root: O(depth), no
//! allocation beyond a directory's first entry in the table.

use crate::namespace::State;
use avalon_proto::limits::ROOT_INO;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// Bound on parent walks, against a corrupt loop.
const MAX_DEPTH: usize = 1 << 16;

/// Virtual xattr names (read-only, not listed by listxattr, as CephFS
/// does not list its `ceph.dir.*`).
pub const RBYTES: &[u8] = b"avalon.dir.rbytes";
pub const RFILES: &[u8] = b"avalon.dir.rfiles";
pub const RSUBDIRS: &[u8] = b"avalon.dir.rsubdirs";
pub const RCTIME: &[u8] = b"avalon.dir.rctime";
/// Prefix of the statistics' names.
pub const PREFIX: &[u8] = b"avalon.dir.";

/// The statistics of one directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirStats {
    pub rbytes: u64,
    pub rfiles: u64,
    pub rsubdirs: u64,
    pub rctime: i64,
}

/// The statistics of every directory, part of the replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RStats {
    /// False in a state decoded from a snapshot older than rstats: the
    /// table is rebuilt before the next command applies.
    pub ready: bool,
    /// Copy-on-write like the namespace maps: a snapshot copies it in O(1).
    #[serde(deserialize_with = "crate::namespace::de_ns_map")]
    pub dirs: crate::namespace::NsMap<u64, DirStats>,
}

impl RStats {
    /// The table of a fresh filesystem.
    pub fn new() -> Self {
        RStats {
            ready: true,
            dirs: Default::default(),
        }
    }
}

/// Decodes the field, or an empty table that is not ready when an older
/// snapshot ends before it.
pub fn absent_as_default<'de, D: Deserializer<'de>>(d: D) -> Result<RStats, D::Error> {
    Ok(RStats::deserialize(d).unwrap_or_default())
}

/// What one change adds to each directory above it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delta {
    pub bytes: i64,
    pub files: i64,
    pub subdirs: i64,
}

impl Delta {
    fn neg(self) -> Delta {
        Delta {
            bytes: -self.bytes,
            files: -self.files,
            subdirs: -self.subdirs,
        }
    }
}

fn add(v: u64, d: i64) -> u64 {
    if d < 0 {
        v.saturating_sub(d.unsigned_abs())
    } else {
        v.saturating_add(d as u64)
    }
}

/// The directory `dir` and those above it, up to the root.
pub struct Ancestors<'a> {
    state: &'a State,
    next: u64,
    left: usize,
}

impl Iterator for Ancestors<'_> {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        if self.next == 0 || self.left == 0 {
            return None;
        }
        self.left -= 1;
        let cur = self.next;
        self.next = match self.state.inodes.get(&cur) {
            Some(i) if cur != ROOT_INO && i.parent != cur => i.parent,
            _ => 0,
        };
        Some(cur)
    }
}

/// `dir` and its ancestors (nothing for 0).
pub fn ancestors(s: &State, dir: u64) -> Ancestors<'_> {
    Ancestors {
        state: s,
        next: dir,
        left: MAX_DEPTH,
    }
}

/// Adds `d` to `dir` and every directory above it, and lifts their
/// rctime to `ctime`.
fn walk_add(s: &mut State, dir: u64, d: Delta, ctime: i64) {
    let mut cur = dir;
    for _ in 0..MAX_DEPTH {
        if cur == 0 {
            return;
        }
        let e = s.rstats.dirs.entry(cur).or_default();
        e.rbytes = add(e.rbytes, d.bytes);
        e.rfiles = add(e.rfiles, d.files);
        e.rsubdirs = add(e.rsubdirs, d.subdirs);
        e.rctime = e.rctime.max(ctime);
        cur = match s.inodes.get(&cur) {
            Some(i) if cur != ROOT_INO && i.parent != cur => i.parent,
            _ => return,
        };
    }
}

/// The directory whose statistics an inode's own changes touch: itself
/// for a directory, its primary directory otherwise (0: none).
fn home(s: &State, ino: u64) -> u64 {
    match s.inodes.get(&ino) {
        Some(i) if i.is_dir() => ino,
        Some(i) => i.parent,
        None => 0,
    }
}

/// What inode `ino` (not a directory) adds to its primary directory.
fn own(s: &State, ino: u64) -> Delta {
    match s.inodes.get(&ino) {
        Some(i) if i.is_dir() => {
            let st = stats(s, ino);
            Delta {
                bytes: st.rbytes as i64,
                files: st.rfiles as i64,
                subdirs: st.rsubdirs as i64 + 1,
            }
        }
        Some(i) => Delta {
            bytes: counted_size(i) as i64,
            files: 1,
            subdirs: 0,
        },
        None => Delta::default(),
    }
}

/// The bytes an inode counts for in `rbytes` (files and symlinks).
pub(crate) fn counted_size(i: &crate::namespace::Inode) -> u64 {
    let t = i.attr.mode & libc::S_IFMT;
    if t == libc::S_IFREG || t == libc::S_IFLNK {
        i.attr.size
    } else {
        0
    }
}

/// The statistics of directory `dir` (zeros if it has none yet).
pub fn stats(s: &State, dir: u64) -> DirStats {
    if !s.rstats.ready {
        return compute(s, dir);
    }
    s.rstats.dirs.get(&dir).copied().unwrap_or_default()
}

/// Lifts the rctime of `ino`'s home and everything above to `ctime`
/// (stops where it is already as late: ancestors are never earlier).
pub fn touched(s: &mut State, ino: u64, ctime: i64) {
    let mut cur = home(s, ino);
    for _ in 0..MAX_DEPTH {
        if cur == 0 {
            return;
        }
        let e = s.rstats.dirs.entry(cur).or_default();
        if e.rctime >= ctime {
            return;
        }
        e.rctime = ctime;
        cur = match s.inodes.get(&cur) {
            Some(i) if cur != ROOT_INO && i.parent != cur => i.parent,
            _ => return,
        };
    }
}

/// `ino` was just linked into `parent` as a new inode: a non-directory
/// takes `parent` as its primary directory.
pub fn linked(s: &mut State, parent: u64, ino: u64, now: i64) {
    let Some(i) = s.inodes.get_mut(&ino) else {
        return;
    };
    let is_dir = i.is_dir();
    if !is_dir {
        i.parent = parent;
    }
    let d = own(s, ino);
    walk_add(s, parent, d, now);
    if is_dir {
        touched(s, ino, now);
    }
}

/// The link `parent`/… of `ino` was just removed (its entry is gone, its
/// link count not yet lowered).
pub fn unlinking(s: &mut State, parent: u64, ino: u64, now: i64) {
    let Some(i) = s.inodes.get(&ino) else {
        return;
    };
    if i.is_dir() {
        let d = own(s, ino);
        walk_add(s, parent, d.neg(), now);
        s.rstats.dirs.remove(&ino);
        s.quotas.dirs.remove(&ino);
        return;
    }
    if i.parent != parent {
        // Another link than the primary one: nothing moves.
        return;
    }
    let others = i.attr.nlink > 1;
    let d = own(s, ino);
    walk_add(s, parent, d.neg(), now);
    let next = if others {
        s.dentries
            .iter()
            .find(|(_, e)| e.ino == ino)
            .map_or(0, |((dir, _), _)| *dir)
    } else {
        0
    };
    if let Some(i) = s.inodes.get_mut(&ino) {
        i.parent = next;
    }
    if next != 0 {
        walk_add(s, next, d, now);
    }
}

/// `ino` was just renamed from directory `from` to directory `to`.
pub fn moved(s: &mut State, ino: u64, from: u64, to: u64, now: i64) {
    let Some(i) = s.inodes.get(&ino) else {
        return;
    };
    let is_dir = i.is_dir();
    if from != to && (is_dir || i.parent == from) {
        let d = own(s, ino);
        walk_add(s, from, d.neg(), now);
        if !is_dir {
            if let Some(i) = s.inodes.get_mut(&ino) {
                i.parent = to;
            }
        }
        walk_add(s, to, d, now);
    }
    touched(s, ino, now);
}

/// Inode `ino` changed in place (size, ctime): `old_size` was its size
/// before.
pub fn changed(s: &mut State, ino: u64, old_size: u64) {
    let Some(i) = s.inodes.get(&ino) else {
        return;
    };
    let (home, ctime) = (if i.is_dir() { ino } else { i.parent }, i.attr.ctime_ns);
    let new = counted_size(i);
    if !i.is_dir() && new != old_size {
        let d = Delta {
            bytes: new as i64 - old_size as i64,
            ..Delta::default()
        };
        walk_add(s, home, d, ctime);
    } else {
        touched(s, ino, ctime);
    }
}

/// The size rstats count for `ino` now.
pub fn size_of(s: &State, ino: u64) -> u64 {
    s.inodes.get(&ino).map_or(0, counted_size)
}

/// Rebuilds the whole table from the namespace (a state from before
/// rstats): primary directories from the entries, in key order, then
/// every inode added once. O(inodes × depth), once.
pub fn rebuild(s: &mut State) {
    s.rstats.dirs.clear();
    let mut primary: BTreeMap<u64, u64> = BTreeMap::new();
    for ((dir, _), e) in &s.dentries {
        primary.entry(e.ino).or_insert(*dir);
    }
    let mut adds = Vec::new();
    let inos: Vec<u64> = s.inodes.keys().copied().collect();
    for ino in inos {
        let Some(i) = s.inodes.get_mut(&ino) else {
            continue;
        };
        if i.is_dir() {
            if ino != ROOT_INO && i.attr.nlink > 0 {
                adds.push((i.parent, ino, true, i.attr.ctime_ns));
            } else {
                adds.push((0, ino, true, i.attr.ctime_ns));
            }
        } else {
            i.parent = primary.get(&ino).copied().unwrap_or(0);
            adds.push((i.parent, ino, false, i.attr.ctime_ns));
        }
    }
    s.rstats.ready = true;
    for (parent, ino, is_dir, ctime) in adds {
        if is_dir {
            touched(s, ino, ctime);
            if parent != 0 {
                walk_add(
                    s,
                    parent,
                    Delta {
                        subdirs: 1,
                        ..Delta::default()
                    },
                    ctime,
                );
            }
        } else if parent != 0 {
            let d = own(s, ino);
            walk_add(s, parent, d, ctime);
        }
    }
}

/// The statistics of `dir` counted by walking its subtree (for a state
/// not rebuilt yet, and to check the incremental table in tests).
pub fn compute(s: &State, dir: u64) -> DirStats {
    let mut st = DirStats {
        rctime: s.inodes.get(&dir).map_or(0, |i| i.attr.ctime_ns),
        ..DirStats::default()
    };
    let mut stack = vec![dir];
    // A file with two links in one directory counts once.
    let mut seen = std::collections::BTreeSet::new();
    while let Some(d) = stack.pop() {
        for ((_, _), name) in s.cookies.range((d, 0)..=(d, u64::MAX)) {
            let Some(e) = s.dentries.get(&(d, name.clone())) else {
                continue;
            };
            let Some(i) = s.inodes.get(&e.ino) else {
                continue;
            };
            st.rctime = st.rctime.max(i.attr.ctime_ns);
            if i.is_dir() {
                st.rsubdirs += 1;
                stack.push(e.ino);
            } else if (i.parent == d || (!s.rstats.ready && first_link(s, e.ino) == Some(d)))
                && seen.insert(e.ino)
            {
                st.rfiles += 1;
                st.rbytes += counted_size(i);
            }
        }
    }
    st
}

fn first_link(s: &State, ino: u64) -> Option<u64> {
    s.dentries
        .iter()
        .find(|(_, e)| e.ino == ino)
        .map(|((dir, _), _)| *dir)
}

/// The value of virtual xattr `name` of `ino`, if it is one of ours.
pub fn getxattr(s: &State, ino: u64, name: &[u8]) -> Option<Result<Vec<u8>, i32>> {
    if !name.starts_with(PREFIX) {
        return None;
    }
    let Some(i) = s.inodes.get(&ino) else {
        return Some(Err(libc::ENOENT));
    };
    if !i.is_dir() {
        return Some(Err(libc::ENODATA));
    }
    let st = stats(s, ino);
    let v = match name {
        RBYTES => st.rbytes.to_string(),
        RFILES => st.rfiles.to_string(),
        RSUBDIRS => st.rsubdirs.to_string(),
        RCTIME => format!(
            "{}.{:09}",
            st.rctime.div_euclid(1_000_000_000),
            st.rctime.rem_euclid(1_000_000_000)
        ),
        _ => return Some(Err(libc::ENODATA)),
    };
    Some(Ok(v.into_bytes()))
}

#[cfg(test)]
pub(crate) mod tests;
