//! Directory quotas on bytes and inodes, enforced by the state machine
//! against the recursive statistics (`rstats.rs`).
//!
//! - Set with the xattrs `avalon.quota.max_bytes` / `avalon.quota.max_files`
//!   on a directory (a size with an optional K/M/G/T/P suffix, powers of
//!   1024); 0 or removexattr lifts the limit. Nested quotas all apply, so
//!   the tightest one wins.
//! - Inodes: a create that would make `rfiles + rsubdirs` of a quota
//!   directory above it exceed `max_files` fails with EDQUOT; so does a
//!   rename that brings more than fits into it.
//! - Bytes: data goes to the OSDs directly and the size reaches the MDS in
//!   commits. A truncate that grows a file must fit. A size commit is
//!   accepted if it fits, or if the quota is not full yet and it grows by
//!   at most [`WINDOW`]; otherwise EDQUOT. Clients writing under a quota
//!   commit their size at least every [`WINDOW`] bytes of growth (they
//!   learn it from the open/create reply), and commits are serialized by
//!   Raft, so usage ends below `max_bytes + WINDOW` whatever the number
//!   of writers.

use crate::namespace::State;
use crate::rstats::{self, DirStats};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// The byte quota xattr.
pub const MAX_BYTES: &[u8] = b"avalon.quota.max_bytes";
/// The inode quota xattr.
pub const MAX_FILES: &[u8] = b"avalon.quota.max_files";
/// Virtual xattr: the quota directories in a subtree, one per line.
pub const LIST: &[u8] = b"avalon.quota.list";
/// Prefix of the quota names.
pub const PREFIX: &[u8] = b"avalon.quota.";
/// Growth a size commit may add to a quota that is not full yet, and how
/// often (in bytes of growth) a client writing under a quota commits.
pub const WINDOW: u64 = 4 << 20;

/// The limits of one directory (0: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub max_bytes: u64,
    pub max_files: u64,
}

/// Every quota, by directory; part of the replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quotas {
    pub dirs: BTreeMap<u64, Quota>,
}

/// Decodes the field, or no quotas when an older snapshot ends before it.
pub fn absent_as_default<'de, D: Deserializer<'de>>(d: D) -> Result<Quotas, D::Error> {
    Ok(Quotas::deserialize(d).unwrap_or_default())
}

/// True for the names this module owns (they are not stored as xattrs).
pub fn is_quota_name(name: &[u8]) -> bool {
    name.starts_with(PREFIX)
}

/// Parses `10G`, `512M`, `1000`, `1.5T`: bytes (or a count), suffixes in
/// powers of 1024.
pub fn parse_size(v: &[u8]) -> Result<u64, i32> {
    let s = std::str::from_utf8(v).map_err(|_| libc::EINVAL)?;
    let s = s.trim().trim_end_matches('\0').trim();
    let s = s.strip_suffix(['B', 'b']).unwrap_or(s);
    let s = s.strip_suffix(['i']).unwrap_or(s);
    let (num, mult) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'P' => 1 << 50,
                _ => return Err(libc::EINVAL),
            };
            (&s[..s.len() - 1], m)
        }
        _ => (s, 1),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or(libc::EINVAL);
    }
    let f: f64 = num.parse().map_err(|_| libc::EINVAL)?;
    if !f.is_finite() || f < 0.0 || f * mult as f64 >= u64::MAX as f64 {
        return Err(libc::EINVAL);
    }
    Ok((f * mult as f64) as u64)
}

/// Sets a limit of directory `ino` (`setxattr avalon.quota.*`).
pub fn set(s: &mut State, ino: u64, name: &[u8], value: &[u8]) -> Result<(), i32> {
    if !s.inodes.get(&ino).ok_or(libc::ENOENT)?.is_dir() {
        return Err(libc::EINVAL);
    }
    let v = parse_size(value)?;
    let mut q = s.quotas.dirs.get(&ino).copied().unwrap_or_default();
    match name {
        MAX_BYTES => q.max_bytes = v,
        MAX_FILES => q.max_files = v,
        _ => return Err(libc::EINVAL),
    }
    store(s, ino, q);
    Ok(())
}

/// Lifts a limit of directory `ino` (`removexattr avalon.quota.*`).
pub fn remove(s: &mut State, ino: u64, name: &[u8]) -> Result<(), i32> {
    let mut q = s.quotas.dirs.get(&ino).copied().ok_or(libc::ENODATA)?;
    let slot = match name {
        MAX_BYTES => &mut q.max_bytes,
        MAX_FILES => &mut q.max_files,
        _ => return Err(libc::EINVAL),
    };
    if *slot == 0 {
        return Err(libc::ENODATA);
    }
    *slot = 0;
    store(s, ino, q);
    Ok(())
}

fn store(s: &mut State, ino: u64, q: Quota) {
    if q == Quota::default() {
        s.quotas.dirs.remove(&ino);
    } else {
        s.quotas.dirs.insert(ino, q);
    }
}

/// The value of quota xattr `name` of `ino`, if it is one of ours.
pub fn getxattr(s: &State, ino: u64, name: &[u8]) -> Option<Result<Vec<u8>, i32>> {
    if !is_quota_name(name) {
        return None;
    }
    if !s.inodes.contains_key(&ino) {
        return Some(Err(libc::ENOENT));
    }
    let q = s.quotas.dirs.get(&ino).copied().unwrap_or_default();
    Some(match name {
        MAX_BYTES if q.max_bytes != 0 => Ok(q.max_bytes.to_string().into_bytes()),
        MAX_FILES if q.max_files != 0 => Ok(q.max_files.to_string().into_bytes()),
        LIST => Ok(list_text(s, ino).into_bytes()),
        _ => Err(libc::ENODATA),
    })
}

/// The quota directories with a limit on `dir` or above it, nearest first.
fn governing(s: &State, dir: u64) -> impl Iterator<Item = (u64, Quota)> + '_ {
    let any = !s.quotas.dirs.is_empty();
    rstats::ancestors(s, if any { dir } else { 0 })
        .filter_map(|d| s.quotas.dirs.get(&d).map(|q| (d, *q)))
}

/// True if a quota applies to directory `dir` (no write delegation is
/// granted there: its creates must be checked when they happen).
pub fn governed(s: &State, dir: u64) -> bool {
    governing(s, dir).next().is_some()
}

/// True if a byte quota applies to the file `ino` (its writers commit
/// their size every [`WINDOW`] bytes).
pub fn bytes_governed(s: &State, ino: u64) -> bool {
    let home = match s.inodes.get(&ino) {
        Some(i) if i.is_dir() => ino,
        Some(i) => i.parent,
        None => return false,
    };
    governing(s, home).any(|(_, q)| q.max_bytes != 0)
}

fn inodes_used(st: &DirStats) -> u64 {
    st.rfiles.saturating_add(st.rsubdirs)
}

/// EDQUOT if one more inode in `parent` would exceed an inode quota.
pub fn check_new(s: &State, parent: u64) -> Result<(), i32> {
    for (d, q) in governing(s, parent) {
        if q.max_files != 0 && inodes_used(&rstats::stats(s, d)) >= q.max_files {
            return Err(libc::EDQUOT);
        }
    }
    Ok(())
}

/// EDQUOT if file `ino` may not grow to `size`. `strict`: the growth must
/// fit (a truncate); otherwise a commit of at most [`WINDOW`] passes
/// while the quota is not full.
pub fn check_size(s: &State, ino: u64, size: u64, strict: bool) -> Result<(), i32> {
    if s.quotas.dirs.is_empty() {
        return Ok(());
    }
    let Some(i) = s.inodes.get(&ino) else {
        return Ok(());
    };
    if i.is_dir() || i.attr.mode & libc::S_IFMT != libc::S_IFREG || size <= i.attr.size {
        return Ok(());
    }
    let growth = size - i.attr.size;
    for (d, q) in governing(s, i.parent) {
        if q.max_bytes == 0 {
            continue;
        }
        let used = rstats::stats(s, d).rbytes;
        let fits = used.saturating_add(growth) <= q.max_bytes;
        let window = !strict && used < q.max_bytes && growth <= WINDOW;
        if !fits && !window {
            return Err(libc::EDQUOT);
        }
    }
    Ok(())
}

/// EDQUOT if `bytes` and `inodes` more under directory `to` exceed a
/// quota on it or above (a restore from the trash).
pub fn check_add(s: &State, to: u64, bytes: u64, inodes: u64) -> Result<(), i32> {
    for (d, q) in governing(s, to) {
        let st = rstats::stats(s, d);
        if (q.max_bytes != 0 && st.rbytes.saturating_add(bytes) > q.max_bytes)
            || (q.max_files != 0 && inodes_used(&st).saturating_add(inodes) > q.max_files)
        {
            return Err(libc::EDQUOT);
        }
    }
    Ok(())
}

/// EDQUOT if renaming `ino` from directory `from` into `to` brings more
/// into a quota directory (one above `to` but not above `from`) than fits.
pub fn check_move(s: &State, ino: u64, from: u64, to: u64) -> Result<(), i32> {
    if s.quotas.dirs.is_empty() || from == to {
        return Ok(());
    }
    let Some(i) = s.inodes.get(&ino) else {
        return Ok(());
    };
    let (bytes, inodes) = if i.is_dir() {
        let st = rstats::stats(s, ino);
        (st.rbytes, inodes_used(&st) + 1)
    } else if i.parent == from {
        (rstats::size_of(s, ino), 1)
    } else {
        return Ok(());
    };
    for (d, q) in governing(s, to) {
        if rstats::ancestors(s, from).any(|a| a == d) {
            // Above both: nothing changes for it, nor for those above.
            break;
        }
        let st = rstats::stats(s, d);
        if (q.max_bytes != 0 && st.rbytes.saturating_add(bytes) > q.max_bytes)
            || (q.max_files != 0 && inodes_used(&st).saturating_add(inodes) > q.max_files)
        {
            return Err(libc::EDQUOT);
        }
    }
    Ok(())
}

/// What statfs shows on a mount of `dir`: the tightest quota on it or
/// above as the size (and inode count), its usage as used; `base` (the
/// cluster's) where no quota applies, and as a cap on what is free.
pub fn statfs(s: &State, dir: u64, base: crate::namespace::StatFs) -> crate::namespace::StatFs {
    let mut out = base;
    let mut bytes: Option<(u64, u64)> = None;
    let mut files: Option<(u64, u64)> = None;
    for (d, q) in governing(s, dir) {
        let st = rstats::stats(s, d);
        if q.max_bytes != 0 {
            let free = q.max_bytes.saturating_sub(st.rbytes);
            if bytes.is_none_or(|(_, f)| free < f) {
                bytes = Some((q.max_bytes, free));
            }
        }
        if q.max_files != 0 {
            let free = q.max_files.saturating_sub(inodes_used(&st));
            if files.is_none_or(|(_, f)| free < f) {
                files = Some((q.max_files, free));
            }
        }
    }
    if let Some((total, free)) = bytes {
        out.total_bytes = total;
        out.free_bytes = free.min(base.free_bytes);
        out.avail_bytes = free.min(base.avail_bytes);
    }
    if let Some((total, free)) = files {
        out.total_inodes = total;
        out.free_inodes = free.min(base.free_inodes);
    }
    out
}

/// One quota directory as `avalonctl quota ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Path relative to the listed directory ("." for itself).
    pub path: String,
    pub quota: Quota,
    pub stats: DirStats,
}

/// The quota directories within `under`, by inode number.
pub fn list(s: &State, under: u64) -> Vec<Listed> {
    s.quotas
        .dirs
        .iter()
        .filter(|(d, _)| rstats::ancestors(s, **d).any(|a| a == under))
        .map(|(d, q)| Listed {
            path: path_of(s, *d, under),
            quota: *q,
            stats: rstats::stats(s, *d),
        })
        .collect()
}

/// `dir`'s path below `under`, from the parent pointers and a scan of
/// each parent's entries (few quota directories: fine; the trash names
/// a removed entry's directory with it).
pub(crate) fn path_of(s: &State, dir: u64, under: u64) -> String {
    let mut names: Vec<String> = Vec::new();
    let mut cur = dir;
    for parent in rstats::ancestors(s, dir).skip(1) {
        if cur == under {
            break;
        }
        let name = s
            .cookies
            .range((parent, 0)..=(parent, u64::MAX))
            .map(|(_, n)| n)
            .find(|n| s.dentries.get(&(parent, (*n).clone())).map(|e| e.ino) == Some(cur));
        names.push(name.map_or_else(
            || format!("#{cur}"),
            |n| String::from_utf8_lossy(n).into_owned(),
        ));
        cur = parent;
    }
    if names.is_empty() {
        return ".".into();
    }
    names.reverse();
    names.join("/")
}

/// [`list`] as text: `PATH MAX_BYTES RBYTES MAX_FILES RFILES+RSUBDIRS`
/// per line (tab-separated, 0: no limit).
pub fn list_text(s: &State, under: u64) -> String {
    let mut out = String::new();
    for l in list(s, under) {
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\n",
            l.path,
            l.quota.max_bytes,
            l.stats.rbytes,
            l.quota.max_files,
            inodes_used(&l.stats)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_powers_of_1024() {
        assert_eq!(parse_size(b"10G"), Ok(10 << 30));
        assert_eq!(parse_size(b"512M"), Ok(512 << 20));
        assert_eq!(parse_size(b"4k"), Ok(4096));
        assert_eq!(parse_size(b"1000"), Ok(1000));
        assert_eq!(parse_size(b"1.5K"), Ok(1536));
        assert_eq!(parse_size(b"2GiB"), Ok(2 << 30));
        assert_eq!(parse_size(b"0"), Ok(0));
        assert_eq!(parse_size(b"ten"), Err(libc::EINVAL));
        assert_eq!(parse_size(b"-1"), Err(libc::EINVAL));
        assert_eq!(parse_size(b"99999999999P"), Err(libc::EINVAL));
    }
}
