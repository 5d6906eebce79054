//! The trash (MooseFS's `trashtime`): removed inodes kept, with where they
//! were, until their retention runs out.
//!
//! - A directory's retention is its attribute `avalon.trash_seconds` (kept
//!   with its xattrs, not listed by listxattr, set by root only; new
//!   subdirectories inherit it; 0 or removexattr turns it off).
//! - An unlink, rmdir or rename over an entry that removes the last link
//!   of an inode in a directory with a retention moves the inode here,
//!   with its original directory, name and path, the deletion time and
//!   the expiry (both from the time the leader stamped on the command).
//!   One removed while open enters when the last opener closes it
//!   (`pending`). Its data stays on the OSDs: it is in no GC queue, and
//!   `CheckInodes` counts it alive. It counts in no directory statistics
//!   nor quota.
//! - A restore puts the inode back under its number, with its data and
//!   attributes: at its original place (recreating, from the trash, the
//!   directories above it that were removed too), or at `--to`. A
//!   directory comes back with everything that was deleted from it and
//!   is still in the trash (recursively; of several removed entries of
//!   one name, the latest), and with the mtime it had before the first of
//!   them was deleted. A name that exists is never overwritten (EEXIST).
//! - Purge, and expiry (the leader proposes [`Op::TrashExpire`] when the
//!   first entry is due), free the entries: regular files' data goes
//!   through the GC queue. Purging a directory purges what was deleted
//!   from it.
//!
//! [`Op::TrashExpire`]: crate::command::Op::TrashExpire

use crate::command::Attr;
use crate::namespace::{de_ns_map, Inode, NsMap, State, S_IFMT, S_IFREG};
use crate::quota::Quota;
use avalon_proto::limits::{check_name, ROOT_INO};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The retention attribute of a directory, in seconds.
pub const TRASH_SECONDS: &[u8] = b"avalon.trash_seconds";
/// Longest retention accepted (ten years).
pub const MAX_SECONDS: u64 = 10 * 366 * 86_400;
/// Bound on walks up through trashed directories, against a corrupt loop.
const MAX_DEPTH: usize = 1 << 16;

type R<T> = Result<T, i32>;

/// Where a removed inode was, and when it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The directory it was removed from.
    pub parent: u64,
    pub name: Vec<u8>,
    /// Its path from the root at removal, for people.
    pub path: String,
    pub deleted_ns: i64,
    pub expires_ns: i64,
    /// The directory's mtime just before this removal (given back to the
    /// directory when both are restored).
    pub parent_mtime_ns: i64,
    /// A directory's quota (dropped from the table with its entry).
    pub quota: Option<Quota>,
}

/// One inode in the trash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub id: u64,
    pub origin: Origin,
    pub inode: Inode,
}

impl Entry {
    /// The bytes of data it holds on the OSDs (regular files).
    pub fn data_bytes(&self) -> u64 {
        if self.inode.attr.mode & S_IFMT == S_IFREG {
            self.inode.attr.size
        } else {
            0
        }
    }
}

/// The leader's time of the command being applied, for removals inside a
/// client's delegated batch (whose ops carry the client's own stamps).
/// Not part of the state: never stored, equal to any other.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyClock(pub Option<i64>);

impl PartialEq for ApplyClock {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for ApplyClock {}

/// The trash, part of the replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trash {
    /// Entries by id (ids are never reused).
    #[serde(deserialize_with = "de_ns_map")]
    pub entries: NsMap<u64, Entry>,
    /// (original directory, id): what was deleted from each directory.
    #[serde(deserialize_with = "de_ns_map")]
    pub children: NsMap<(u64, u64), ()>,
    /// Inode number -> id.
    #[serde(deserialize_with = "de_ns_map")]
    pub by_ino: NsMap<u64, u64>,
    /// (expiry, id), soonest first.
    #[serde(deserialize_with = "de_ns_map")]
    pub by_expiry: NsMap<(i64, u64), ()>,
    /// Inodes removed while open (orphans): they enter at the last close.
    pub pending: BTreeMap<u64, Origin>,
    pub next_id: u64,
    /// Sum of [`Entry::data_bytes`].
    pub bytes: u64,
    #[serde(skip)]
    pub clock: ApplyClock,
}

/// Decodes the field, or an empty trash when an older snapshot ends
/// before it.
pub fn absent_as_default<'de, D: Deserializer<'de>>(d: D) -> Result<Trash, D::Error> {
    Ok(Trash::deserialize(d).unwrap_or_default())
}

/// Parses a retention: seconds, or a number with s/m/h/d/w.
pub fn parse_seconds(v: &[u8]) -> R<u64> {
    let s = std::str::from_utf8(v).map_err(|_| libc::EINVAL)?;
    let s = s.trim().trim_end_matches('\0').trim();
    let (num, mult) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                'w' => 7 * 86_400,
                _ => return Err(libc::EINVAL),
            };
            (&s[..s.len() - 1], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| libc::EINVAL)?;
    n.checked_mul(mult)
        .filter(|v| *v <= MAX_SECONDS)
        .ok_or(libc::EINVAL)
}

/// The retention of directory `dir` (0: off).
pub fn seconds_of(s: &State, dir: u64) -> u64 {
    s.inodes
        .get(&dir)
        .and_then(|i| i.xattrs.get(TRASH_SECONDS))
        .and_then(|v| parse_seconds(v).ok())
        .unwrap_or(0)
}

/// Sets directory `ino`'s retention (0 turns it off).
pub fn set(s: &mut State, now: i64, ino: u64, value: &[u8]) -> R<()> {
    let secs = parse_seconds(value)?;
    let i = s.inodes.get_mut(&ino).ok_or(libc::ENOENT)?;
    if !i.is_dir() {
        return Err(libc::EINVAL);
    }
    if secs == 0 {
        i.xattrs.remove(TRASH_SECONDS);
    } else {
        i.xattrs
            .insert(TRASH_SECONDS.to_vec(), secs.to_string().into_bytes());
    }
    i.attr.ctime_ns = now;
    Ok(())
}

/// Turns directory `ino`'s retention off.
pub fn remove(s: &mut State, now: i64, ino: u64) -> R<()> {
    let i = s.inodes.get_mut(&ino).ok_or(libc::ENOENT)?;
    i.xattrs.remove(TRASH_SECONDS).ok_or(libc::ENODATA)?;
    i.attr.ctime_ns = now;
    Ok(())
}

/// The value of `avalon.trash_seconds`, if `name` is it: a directory's
/// retention ("0" when off).
pub fn getxattr(s: &State, ino: u64, name: &[u8]) -> Option<R<Vec<u8>>> {
    if name != TRASH_SECONDS {
        return None;
    }
    Some(match s.inodes.get(&ino) {
        None => Err(libc::ENOENT),
        Some(i) if !i.is_dir() => Err(libc::ENODATA),
        Some(_) => Ok(seconds_of(s, ino).to_string().into_bytes()),
    })
}

/// A new directory takes its parent's retention.
pub fn inherit(parent: &Inode, child: &mut Inode) {
    if !child.is_dir() {
        return;
    }
    if let Some(v) = parent.xattrs.get(TRASH_SECONDS) {
        child.xattrs.insert(TRASH_SECONDS.to_vec(), v.clone());
    }
}

/// Where `ino` goes if the removal of entry `parent`/`name` (not removed
/// yet) is its last link and `parent` keeps removed inodes; `None` if it
/// is freed as usual.
pub fn origin(s: &State, now: i64, parent: u64, name: &[u8], ino: u64) -> Option<Origin> {
    let secs = seconds_of(s, parent);
    if secs == 0 {
        return None;
    }
    let i = s.inodes.get(&ino)?;
    if !i.is_dir() && i.attr.nlink > 1 {
        return None;
    }
    let deleted_ns = s.trash.clock.0.unwrap_or(now);
    Some(Origin {
        parent,
        name: name.to_vec(),
        path: join(&dir_path(s, parent), name),
        deleted_ns,
        expires_ns: deleted_ns.saturating_add((secs as i64).saturating_mul(1_000_000_000)),
        parent_mtime_ns: s.inodes.get(&parent).map_or(0, |p| p.attr.mtime_ns),
        quota: s.quotas.dirs.get(&ino).copied(),
    })
}

/// The path of live directory `dir` from the root ("/" for the root).
pub fn dir_path(s: &State, dir: u64) -> String {
    match crate::quota::path_of(s, dir, ROOT_INO).as_str() {
        "." => "/".into(),
        p => format!("/{p}"),
    }
}

fn join(dir: &str, name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// Moves `inode` (already out of the namespace) into the trash.
pub fn put(s: &mut State, inode: Inode, origin: Origin) {
    let id = s.trash.next_id.max(1);
    s.trash.next_id = id + 1;
    let ino = inode.attr.ino;
    let e = Entry { id, origin, inode };
    let t = &mut s.trash;
    t.bytes = t.bytes.saturating_add(e.data_bytes());
    t.children.insert((e.origin.parent, id), ());
    t.by_ino.insert(ino, id);
    t.by_expiry.insert((e.origin.expires_ns, id), ());
    t.entries.insert(id, e);
}

/// Takes entry `id` out of the trash and its indexes.
fn take(s: &mut State, id: u64) -> Option<Entry> {
    let t = &mut s.trash;
    let e = t.entries.remove(&id)?;
    t.bytes = t.bytes.saturating_sub(e.data_bytes());
    t.children.remove(&(e.origin.parent, id));
    t.by_ino.remove(&e.inode.attr.ino);
    t.by_expiry.remove(&(e.origin.expires_ns, id));
    Some(e)
}

/// Frees entry `id`: a regular file's data goes to the GC queue.
fn free(s: &mut State, id: u64) -> bool {
    let Some(e) = take(s, id) else {
        return false;
    };
    if e.inode.attr.mode & S_IFMT == S_IFREG {
        s.gc_queue.insert(e.inode.attr.ino);
    }
    true
}

/// True if inode `ino` is kept by the trash (its data must stay).
pub fn holds(s: &State, ino: u64) -> bool {
    s.trash.by_ino.contains_key(&ino) || s.trash.pending.contains_key(&ino)
}

/// The ids of what was deleted from directory `dir`.
fn children_of(s: &State, dir: u64) -> Vec<u64> {
    s.trash
        .children
        .range((dir, 0)..=(dir, u64::MAX))
        .map(|((_, id), _)| *id)
        .collect()
}

/// Frees the entries `ids` and what was deleted from those that are
/// directories (recursively); returns how many went.
pub fn purge(s: &mut State, ids: &[u64]) -> u64 {
    let mut queue: VecDeque<u64> = ids.iter().copied().collect();
    let mut n = 0;
    while let Some(id) = queue.pop_front() {
        let Some(e) = s.trash.entries.get(&id) else {
            continue;
        };
        if e.inode.is_dir() {
            queue.extend(children_of(s, e.inode.attr.ino));
        }
        if free(s, id) {
            n += 1;
        }
    }
    n
}

/// Frees everything.
pub fn purge_all(s: &mut State) -> u64 {
    let ids: Vec<u64> = s.trash.entries.keys().copied().collect();
    ids.into_iter().filter(|id| free(s, *id)).count() as u64
}

/// Frees the entries whose expiry is at or before `now`.
pub fn expire(s: &mut State, now: i64) -> u64 {
    let due: Vec<u64> = s
        .trash
        .by_expiry
        .range(..=(now, u64::MAX))
        .map(|((_, id), _)| *id)
        .collect();
    due.into_iter().filter(|id| free(s, *id)).count() as u64
}

/// The first expiry in the trash, if any.
pub fn next_expiry(s: &State) -> Option<i64> {
    s.trash.by_expiry.keys().next().map(|(t, _)| *t)
}

/// Why a restore cannot be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("no trash entry {0}")]
    NoEntry(u64),
    #[error("{0} already exists (restore elsewhere with --to PATH)")]
    Exists(String),
    #[error("the directory of {0} is no longer there (restore with --to PATH)")]
    NoParent(String),
    #[error("{0}: {err}", err = std::io::Error::from_raw_os_error(*.1))]
    Target(String, i32),
    #[error("restoring {0} would exceed a quota of its directory or one above")]
    Quota(String),
}

impl RestoreError {
    /// The errno the state machine answers with.
    pub fn errno(&self) -> i32 {
        match self {
            RestoreError::NoEntry(_) | RestoreError::NoParent(_) => libc::ENOENT,
            RestoreError::Exists(_) => libc::EEXIST,
            RestoreError::Target(_, e) => *e,
            RestoreError::Quota(_) => libc::EDQUOT,
        }
    }
}

/// One inode a restore puts back: entry `id` as `parent`/`name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub id: u64,
    pub ino: u64,
    pub parent: u64,
    pub name: Vec<u8>,
}

fn live_dir(s: &State, ino: u64) -> bool {
    s.inodes
        .get(&ino)
        .is_some_and(|i| i.is_dir() && (i.attr.nlink > 0 || ino == ROOT_INO))
}

/// Where `--to PATH` puts entry `name`: into PATH if it is a directory,
/// else as PATH (whose directory must exist).
fn target_of(s: &State, path: &[u8], name: &[u8]) -> Result<(u64, Vec<u8>), RestoreError> {
    let shown = String::from_utf8_lossy(path).into_owned();
    let err = |e: i32| RestoreError::Target(shown.clone(), e);
    if let Ok(d) = s.resolve_dir(path) {
        if !live_dir(s, d) {
            return Err(err(libc::ENOENT));
        }
        return Ok((d, name.to_vec()));
    }
    let trimmed = path.strip_suffix(b"/").unwrap_or(path);
    let (dir, last) = match trimmed.iter().rposition(|b| *b == b'/') {
        Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
        None => (&b""[..], trimmed),
    };
    check_name(last).map_err(err)?;
    if matches!(last, b"." | b"..") {
        return Err(err(libc::EINVAL));
    }
    let d = s.resolve_dir(dir).map_err(err)?;
    if !live_dir(s, d) {
        return Err(err(libc::ENOENT));
    }
    Ok((d, last.to_vec()))
}

/// What restoring entry `id` (to `to`, a path from the root, if given)
/// puts back, parents before children. Changes nothing.
pub fn plan(s: &State, id: u64, to: Option<&[u8]>) -> Result<Vec<Step>, RestoreError> {
    let e = s.trash.entries.get(&id).ok_or(RestoreError::NoEntry(id))?;
    let mut steps = Vec::new();
    let (parent, name) = match to {
        Some(p) => target_of(s, p, &e.origin.name)?,
        None => {
            // Up through removed directories to a live one.
            let mut chain = Vec::new();
            let mut cur = e.origin.parent;
            while !live_dir(s, cur) {
                let pe = s
                    .trash
                    .by_ino
                    .get(&cur)
                    .and_then(|pid| s.trash.entries.get(pid))
                    .filter(|pe| pe.inode.is_dir() && chain.len() < MAX_DEPTH)
                    .ok_or_else(|| RestoreError::NoParent(e.origin.path.clone()))?;
                chain.push(pe);
                cur = pe.origin.parent;
            }
            for pe in chain.iter().rev() {
                steps.push(Step {
                    id: pe.id,
                    ino: pe.inode.attr.ino,
                    parent: pe.origin.parent,
                    name: pe.origin.name.clone(),
                });
            }
            (e.origin.parent, e.origin.name.clone())
        }
    };
    steps.push(Step {
        id,
        ino: e.inode.attr.ino,
        parent,
        name,
    });
    let first = &steps[0];
    if s.dentries.contains_key(&(first.parent, first.name.clone())) {
        return Err(RestoreError::Exists(join(
            &dir_path(s, first.parent),
            &first.name,
        )));
    }
    // A directory comes back with what was deleted from it.
    let mut dirs: VecDeque<u64> = VecDeque::new();
    if e.inode.is_dir() {
        dirs.push_back(e.inode.attr.ino);
    }
    while let Some(d) = dirs.pop_front() {
        let mut kids: Vec<&Entry> = children_of(s, d)
            .iter()
            .filter_map(|c| s.trash.entries.get(c))
            .collect();
        // The latest of several entries with one name wins.
        kids.sort_by_key(|k| std::cmp::Reverse((k.origin.deleted_ns, k.id)));
        let mut names = BTreeSet::new();
        for k in kids {
            if !names.insert(k.origin.name.clone()) {
                continue;
            }
            if k.inode.is_dir() {
                dirs.push_back(k.inode.attr.ino);
            }
            steps.push(Step {
                id: k.id,
                ino: k.inode.attr.ino,
                parent: d,
                name: k.origin.name.clone(),
            });
        }
    }
    Ok(steps)
}

/// Restores entry `id` (see [`plan`]); returns the attributes of the
/// inode restored and how many inodes came back.
pub fn restore(
    s: &mut State,
    now: i64,
    id: u64,
    to: Option<&[u8]>,
) -> Result<(Attr, u64), RestoreError> {
    let steps = plan(s, id, to)?;
    // What comes back counts against the quotas where it lands (unlike
    // what is in the trash).
    if !s.quotas.dirs.is_empty() {
        let bytes = steps
            .iter()
            .filter_map(|st| s.trash.entries.get(&st.id))
            .map(|e| crate::rstats::counted_size(&e.inode))
            .sum();
        if crate::quota::check_add(s, steps[0].parent, bytes, steps.len() as u64).is_err() {
            let path = s.trash.entries.get(&id).map(|e| e.origin.path.clone());
            return Err(RestoreError::Quota(path.unwrap_or_default()));
        }
    }
    // Restored directories that get entries back: the mtime they had
    // before the first of those was deleted.
    let mut mtimes: BTreeMap<u64, i64> = BTreeMap::new();
    let mut top = None;
    for (k, st) in steps.iter().enumerate() {
        let Some(e) = take(s, st.id) else {
            continue;
        };
        let mut inode = e.inode;
        let is_dir = inode.is_dir();
        inode.attr.nlink = if is_dir { 2 } else { 1 };
        if is_dir {
            inode.parent = st.parent;
        }
        if st.id == id {
            top = Some(inode.attr);
        }
        let ino = inode.attr.ino;
        s.inodes.insert(ino, inode);
        s.add_entry(st.parent, &st.name, ino);
        if is_dir {
            if let Some(p) = s.inodes.get_mut(&st.parent) {
                p.attr.nlink = p.attr.nlink.saturating_add(1);
            }
        }
        if let Some(q) = e.origin.quota {
            s.quotas.dirs.insert(ino, q);
        }
        crate::rstats::linked(s, st.parent, ino, now);
        if k == 0 {
            s.touch_dir(st.parent, now);
        } else {
            let m = mtimes.entry(st.parent).or_insert(i64::MAX);
            *m = (*m).min(e.origin.parent_mtime_ns);
        }
    }
    for (d, m) in mtimes {
        if let Some(i) = s.inodes.get_mut(&d) {
            i.attr.mtime_ns = m;
        }
    }
    let mut attr = top.ok_or(RestoreError::NoEntry(id))?;
    if let Some(i) = s.inodes.get(&attr.ino) {
        attr = i.attr;
    }
    Ok((attr, steps.len() as u64))
}

/// One entry as listings show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: u64,
    pub ino: u64,
    pub path: String,
    pub attr: Attr,
    pub deleted_ns: i64,
    pub expires_ns: i64,
}

/// The first `max` entries (by id) whose original path is `under` or
/// below it.
pub fn list(s: &State, under: &str, max: usize) -> Vec<Listed> {
    let under = under.trim_end_matches('/');
    s.trash
        .entries
        .values()
        .filter(|e| {
            under.is_empty()
                || e.origin.path == under
                || e.origin
                    .path
                    .strip_prefix(under)
                    .is_some_and(|r| r.starts_with('/'))
        })
        .map(|e| Listed {
            id: e.id,
            ino: e.inode.attr.ino,
            path: e.origin.path.clone(),
            attr: e.inode.attr,
            deleted_ns: e.origin.deleted_ns,
            expires_ns: e.origin.expires_ns,
        })
        .take(max)
        .collect()
}

#[cfg(test)]
mod tests;
