//! Permission checks in the MDS (issue 19): the POSIX algorithm of the
//! Linux VFS (`generic_permission`, `acl_permission_check`,
//! `posix_acl_permission`, `may_delete`, `setattr_prepare`,
//! `xattr_permission`), applied to the caller a mount reports with each
//! request (`avalon_proto::caller`), after the key's root_squash and uid/gid
//! mapping. The kernel's `default_permissions` checks first on a mount;
//! this check is what a request that bypasses the kernel (another client
//! program, a file handle, a guessed inode number) meets, so it must agree
//! with the kernel: anything stricter would break what the kernel allows.
//!
//! uid 0 (after squashing) stands for a process with the capabilities root
//! has (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_CHOWN,
//! CAP_FSETID, CAP_SYS_ADMIN); a non-root process with capabilities is not
//! known as such here and gets what its ids allow.
//!
//! Supplementary groups are known only when the client sent them (see
//! `avalon_proto::caller`): a decision that depends on membership of a
//! group other than the primary one answers [`Denied::NeedGroups`].

use crate::acl::{self, Entry};
use crate::caps::ClientCaps;
use crate::namespace::{Inode, State, RENAME_EXCHANGE};
use avalon_proto::pb;

/// Read permission (the kernel's MAY_READ).
pub const MAY_READ: u32 = 4;
/// Write permission (MAY_WRITE).
pub const MAY_WRITE: u32 = 2;
/// Execute / search permission (MAY_EXEC).
pub const MAY_EXEC: u32 = 1;

/// The kernel's `__FMODE_EXEC` open flag: an open by execve, which needs
/// execute permission, not read.
const FMODE_EXEC: u32 = 0x20;

const S_IFMT: u32 = libc::S_IFMT;
const S_IFDIR: u32 = libc::S_IFDIR;
const S_IFREG: u32 = libc::S_IFREG;

/// Who a request is checked as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cred {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, when the client sent them.
    pub groups: Option<Vec<u32>>,
}

/// Why a check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The errno to answer (EACCES, EPERM, ENODATA).
    Errno(i32),
    /// Membership of a supplementary group decides: the client must send
    /// its groups.
    NeedGroups,
}

/// The outcome of a check.
pub type Verdict = Result<(), Denied>;

const EACCES: Denied = Denied::Errno(libc::EACCES);
const EPERM: Denied = Denied::Errno(libc::EPERM);

impl Cred {
    /// The caller a request is checked as, if any: a client session that
    /// reports its caller (`has_caller`), with the key's root_squash and
    /// mapping applied (`caps`). `groups` as the request carried them.
    /// The administrator (`admin`), and daemons, tools and older clients
    /// (no caller or session 0) with an unlimited key are not checked:
    /// such a key may claim any caller, root included. A limited key
    /// (`caps`) that names no caller is checked as the key's squash uid and
    /// gid with no groups ([`Cred::unnamed`]): leaving the caller out must
    /// not get more than an unprivileged caller gets.
    pub fn of(
        hdr: Option<&pb::RequestHeader>,
        groups: Option<Vec<u32>>,
        caps: Option<&ClientCaps>,
        admin: bool,
    ) -> Option<Cred> {
        if admin {
            return None;
        }
        let caller = hdr.filter(|h| h.has_caller && h.session_id != 0);
        match (caller, caps) {
            (None, None) => None,
            (None, Some(c)) => Some(Cred::unnamed(c)),
            (Some(h), None) => Some(Cred {
                uid: h.caller_uid,
                gid: h.caller_gid,
                groups,
            }),
            (Some(h), Some(c)) => Some(Cred {
                uid: c.uid(h.caller_uid),
                gid: c.gid(h.caller_gid),
                groups: groups.map(|g| g.into_iter().map(|g| c.gid(g)).collect()),
            }),
        }
    }

    /// Who a limited key's request that names no caller is checked as:
    /// the key's squash ids (nobody unless set), in no other group.
    pub fn unnamed(c: &ClientCaps) -> Cred {
        let or_nobody = |id: u32| if id == 0 { crate::caps::NOBODY } else { id };
        Cred {
            uid: or_nobody(c.squash_uid),
            gid: or_nobody(c.squash_gid),
            groups: Some(Vec::new()),
        }
    }

    /// Root after squashing: has the capabilities.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether the caller is in group `gid`; `None`: only its groups, not
    /// sent, can tell.
    fn member(&self, gid: u32) -> Option<bool> {
        if gid == self.gid {
            return Some(true);
        }
        self.groups.as_ref().map(|g| g.contains(&gid))
    }

    /// in_group_p, or [`Denied::NeedGroups`].
    fn in_group(&self, gid: u32) -> Result<bool, Denied> {
        self.member(gid).ok_or(Denied::NeedGroups)
    }
}

/// The parsed access ACL of `i`, if it has one.
fn access_acl(i: &Inode) -> Option<Vec<Entry>> {
    i.xattrs.get(acl::ACCESS).and_then(|v| acl::parse(v))
}

/// Whether `perm` (rwx bits) covers `want`.
fn covers(perm: u32, want: u32) -> bool {
    perm & want == want
}

/// acl_permission_check: whether the owner, ACL or mode bits grant `want`
/// (no capabilities considered).
fn dac(cred: &Cred, i: &Inode, want: u32) -> Result<bool, Denied> {
    let a = &i.attr;
    // The ACL's USER_OBJ and OTHER are the mode's bits (acl.rs keeps them so).
    if cred.uid == a.uid {
        return Ok(covers(a.mode >> 6, want));
    }
    let other = a.mode & 7;
    let acl = if i.xattrs.is_empty() {
        None
    } else {
        access_acl(i)
    };
    let Some(acl) = acl else {
        return groups_decide(
            cred,
            [(a.gid, (a.mode >> 3) & 7)].into_iter(),
            None,
            other,
            want,
        );
    };
    let mask = acl
        .iter()
        .find(|e| e.0 == acl::MASK)
        .map(|e| u32::from(e.1));
    if let Some(e) = acl.iter().find(|e| e.0 == acl::USER && e.2 == cred.uid) {
        return Ok(covers(u32::from(e.1) & mask.unwrap_or(7), want));
    }
    let groups = acl.iter().filter_map(|e| match e.0 {
        acl::GROUP_OBJ => Some((a.gid, u32::from(e.1))),
        acl::GROUP => Some((e.2, u32::from(e.1))),
        _ => None,
    });
    groups_decide(cred, groups, mask, other, want)
}

/// The group class of posix_acl_permission: a matching group entry that
/// grants `want` sends the decision to the mask; matching entries that do
/// not grant it deny; no matching entry leaves it to `other`. Entries
/// whose membership is unknown (groups not sent) may change the answer:
/// then [`Denied::NeedGroups`].
fn groups_decide(
    cred: &Cred,
    entries: impl Iterator<Item = (u32, u32)>,
    mask: Option<u32>,
    other: u32,
    want: u32,
) -> Result<bool, Denied> {
    let (mut member, mut member_grants) = (false, false);
    let (mut unknown_grants, mut unknown_denies) = (false, false);
    for (gid, perm) in entries {
        let grants = covers(perm, want);
        match cred.member(gid) {
            Some(true) => {
                member = true;
                member_grants |= grants;
            }
            Some(false) => {}
            None if grants => unknown_grants = true,
            None => unknown_denies = true,
        }
    }
    let masked = mask.is_none_or(|m| covers(m, want));
    let outcome = |member: bool, grants: bool| {
        if grants {
            masked
        } else if member {
            false
        } else {
            covers(other, want)
        }
    };
    let known = outcome(member, member_grants);
    let differs = (unknown_grants && outcome(true, true) != known)
        || (unknown_denies && outcome(true, member_grants) != known);
    if differs {
        Err(Denied::NeedGroups)
    } else {
        Ok(known)
    }
}

/// generic_permission: `want` (MAY_* bits) on inode `i`, EACCES if
/// refused. Root passes, except execute on a non-directory without any
/// execute bit.
pub fn inode_permission(cred: &Cred, i: &Inode, want: u32) -> Verdict {
    if cred.is_root() {
        let is_dir = i.attr.mode & S_IFMT == S_IFDIR;
        if is_dir || want & MAY_EXEC == 0 || i.attr.mode & 0o111 != 0 {
            return Ok(());
        }
        // Execute with no x bit: only the bits themselves can grant it
        // (they cannot: no x bit), so refuse.
        return Err(EACCES);
    }
    match dac(cred, i, want) {
        Ok(true) => Ok(()),
        Ok(false) => Err(EACCES),
        Err(e) => Err(e),
    }
}

/// inode_owner_or_capable: the owner or root, else EPERM.
pub fn owner_or_root(cred: &Cred, i: &Inode) -> Verdict {
    if cred.is_root() || cred.uid == i.attr.uid {
        Ok(())
    } else {
        Err(EPERM)
    }
}

/// Checks `ino` in `s` with `f`; an absent inode passes (the operation
/// itself then answers ENOENT).
fn with_inode(s: &State, ino: u64, f: impl FnOnce(&Inode) -> Verdict) -> Verdict {
    s.inodes.get(&ino).map_or(Ok(()), f)
}

/// `want` on inode `ino`.
pub fn may(s: &State, cred: &Cred, ino: u64, want: u32) -> Verdict {
    with_inode(s, ino, |i| inode_permission(cred, i, want))
}

/// A lookup in directory `dir`: search permission.
pub fn may_lookup(s: &State, cred: &Cred, dir: u64) -> Verdict {
    may(s, cred, dir, MAY_EXEC)
}

/// Creating `name` in `dir` (create, mkdir, mknod, symlink, link): search
/// on the directory (the path walk's), then, if the name is free (else
/// the operation answers EEXIST, as the kernel's may_create does before
/// it checks), write and search.
pub fn may_create(s: &State, cred: &Cred, dir: u64, name: &[u8]) -> Verdict {
    let Some(d) = s.inodes.get(&dir) else {
        return Ok(());
    };
    inode_permission(cred, d, MAY_EXEC)?;
    if s.child_ino(dir, name).is_some() {
        return Ok(());
    }
    inode_permission(cred, d, MAY_WRITE | MAY_EXEC)
}

/// check_sticky: in a sticky directory only the owner of the directory or
/// of the entry (or root) removes or replaces the entry.
fn sticky_refuses(cred: &Cred, dir: &Inode, victim: &Inode) -> bool {
    dir.attr.mode & libc::S_ISVTX != 0
        && !cred.is_root()
        && cred.uid != dir.attr.uid
        && cred.uid != victim.attr.uid
}

/// may_delete: removing `name` from `dir` (unlink, rmdir, the source and
/// a replaced target of rename): search on the directory; an absent name
/// is the operation's ENOENT; then write and search, then the sticky rule
/// (EPERM).
pub fn may_delete(s: &State, cred: &Cred, dir: u64, name: &[u8]) -> Verdict {
    let Some(d) = s.inodes.get(&dir) else {
        return Ok(());
    };
    inode_permission(cred, d, MAY_EXEC)?;
    let Some(victim) = s.child_ino(dir, name).and_then(|i| s.inodes.get(&i)) else {
        return Ok(());
    };
    inode_permission(cred, d, MAY_WRITE | MAY_EXEC)?;
    if sticky_refuses(cred, d, victim) {
        return Err(EPERM);
    }
    Ok(())
}

/// vfs_rename's checks: deleting the source, creating or deleting the
/// target, and write permission on a directory that moves to another
/// parent (its ".." changes).
pub fn may_rename(
    s: &State,
    cred: &Cred,
    parent: u64,
    name: &[u8],
    new_parent: u64,
    new_name: &[u8],
    flags: u32,
) -> Verdict {
    may_delete(s, cred, parent, name)?;
    let target = s.child_ino(new_parent, new_name);
    if target.is_some() {
        may_delete(s, cred, new_parent, new_name)?;
    } else {
        may_create(s, cred, new_parent, new_name)?;
    }
    if new_parent != parent {
        let dir_write = |ino: Option<u64>| match ino.and_then(|i| s.inodes.get(&i)) {
            Some(i) if i.is_dir() => inode_permission(cred, i, MAY_WRITE),
            _ => Ok(()),
        };
        dir_write(s.child_ino(parent, name))?;
        if flags & RENAME_EXCHANGE != 0 {
            dir_write(target)?;
        }
    }
    Ok(())
}

/// An open of `ino` with open(2) `flags`: read and/or write by the access
/// mode, write for O_TRUNC, execute for an execve. Directories pass (the
/// kernel's opendir checked read; their listings are checked by
/// [`may_readdir`]).
pub fn may_open(s: &State, cred: &Cred, ino: u64, flags: u32) -> Verdict {
    with_inode(s, ino, |i| {
        if i.is_dir() {
            return Ok(());
        }
        inode_permission(cred, i, open_mask(flags))
    })
}

/// The MAY_* bits an open with `flags` needs.
pub fn open_mask(flags: u32) -> u32 {
    if flags & FMODE_EXEC != 0 {
        return MAY_EXEC;
    }
    let mut want = match flags as i32 & libc::O_ACCMODE {
        libc::O_RDONLY => MAY_READ,
        libc::O_WRONLY => MAY_WRITE,
        _ => MAY_READ | MAY_WRITE,
    };
    if flags as i32 & libc::O_TRUNC != 0 {
        want |= MAY_WRITE;
    }
    want
}

/// Listing directory `ino`: read permission, as opendir needs.
pub fn may_readdir(s: &State, cred: &Cred, ino: u64) -> Verdict {
    may(s, cred, ino, MAY_READ)
}

/// A SetAttr request's changes, as the checks see them.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: bool,
    /// atime or mtime set to a given time.
    pub times_set: bool,
    /// atime or mtime set to now (only).
    pub times_now: bool,
    /// Made through an open file (the open was checked).
    pub by_handle: bool,
}

/// setattr_prepare and may_setattr: chown (root, or the owner keeping the
/// owner), chgrp (root, or the owner to one of its groups), chmod (the
/// owner or root; S_ISGID dropped for a caller outside the file's group),
/// truncate (write permission unless through an open file), times (the
/// owner or root for given times; write permission also does for now).
/// Returns the mode to store instead of the requested one, if it changes.
pub fn may_setattr(
    s: &State,
    cred: &Cred,
    ino: u64,
    ch: &AttrChange,
) -> Result<Option<u32>, Denied> {
    let Some(i) = s.inodes.get(&ino) else {
        return Ok(None);
    };
    let a = &i.attr;
    let root = cred.is_root();
    let owner = cred.uid == a.uid;
    if let Some(u) = ch.uid {
        let keeps_owner = owner && u == a.uid;
        if !root && !keeps_owner {
            return Err(EPERM);
        }
    }
    if let Some(g) = ch.gid {
        if !root && !(owner && (g == a.gid || cred.in_group(g)?)) {
            return Err(EPERM);
        }
    }
    let mut new_mode = None;
    if let Some(m) = ch.mode {
        // Clearing set-id bits is what the kernel does on a write or
        // chown by anyone (file_remove_privs, ATTR_KILL_S*ID): allowed.
        let setid = libc::S_ISUID | libc::S_ISGID;
        let only_drops_setid = (a.mode ^ m) & 0o7777 & !setid == 0 && m & !a.mode & setid == 0;
        if !root && !owner && !only_drops_setid {
            return Err(EPERM);
        }
        let gid = ch.gid.unwrap_or(a.gid);
        if m & libc::S_ISGID != 0 && !root && !cred.in_group(gid)? {
            new_mode = Some(m & !libc::S_ISGID);
        }
    }
    if ch.size && !ch.by_handle {
        inode_permission(cred, i, MAY_WRITE)?;
    }
    if !ch.by_handle && !root && !owner {
        if ch.times_set {
            return Err(EPERM);
        }
        if ch.times_now {
            inode_permission(cred, i, MAY_WRITE)?;
        }
    }
    Ok(new_mode)
}

/// xattr_permission (and posix_acl_xattr_set): `write` for set and
/// remove. trusted.* is root's (EPERM to write, ENODATA to read);
/// system.posix_acl_* is written by the owner or root; other system.* and
/// security.* names are left to their handlers; user.* lives on regular
/// files and directories only, and in a sticky directory is written by
/// its owner only; every other name needs read or write permission.
pub fn may_xattr(s: &State, cred: &Cred, ino: u64, name: &[u8], write: bool) -> Verdict {
    with_inode(s, ino, |i| {
        let want = if write { MAY_WRITE } else { MAY_READ };
        let no = if write {
            EPERM
        } else {
            Denied::Errno(libc::ENODATA)
        };
        if name == acl::ACCESS || name == acl::DEFAULT {
            return if write {
                owner_or_root(cred, i)
            } else {
                Ok(())
            };
        }
        if name.starts_with(b"security.") || name.starts_with(b"system.") {
            return Ok(());
        }
        if name.starts_with(b"trusted.") {
            return if cred.is_root() { Ok(()) } else { Err(no) };
        }
        if name.starts_with(b"user.") {
            let t = i.attr.mode & S_IFMT;
            if t != S_IFREG && t != S_IFDIR {
                return Err(no);
            }
            let sticky = t == S_IFDIR && i.attr.mode & libc::S_ISVTX != 0;
            if write && sticky && owner_or_root(cred, i).is_err() {
                return Err(EPERM);
            }
        }
        inode_permission(cred, i, want)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::{GROUP, GROUP_OBJ, MASK, OTHER, USER, USER_OBJ};
    use crate::command::Attr;

    fn inode(mode: u32, uid: u32, gid: u32) -> Inode {
        Inode {
            attr: Attr {
                mode,
                uid,
                gid,
                ..Default::default()
            },
            parent: 0,
            next_cookie: 0,
            symlink: None,
            xattrs: Default::default(),
        }
    }

    fn with_acl(mut i: Inode, entries: &[Entry]) -> Inode {
        i.xattrs.insert(acl::ACCESS.to_vec(), acl::encode(entries));
        i
    }

    fn cred(uid: u32, gid: u32, groups: Option<&[u32]>) -> Cred {
        Cred {
            uid,
            gid,
            groups: groups.map(|g| g.to_vec()),
        }
    }

    const FILE: u32 = S_IFREG;
    const DIR: u32 = S_IFDIR;

    #[test]
    fn owner_group_other() {
        let f = inode(FILE | 0o640, 1000, 100);
        let owner = cred(1000, 1000, Some(&[]));
        let group = cred(2000, 100, Some(&[]));
        let other = cred(3000, 3000, Some(&[]));
        assert_eq!(inode_permission(&owner, &f, MAY_READ | MAY_WRITE), Ok(()));
        assert_eq!(inode_permission(&owner, &f, MAY_EXEC), Err(EACCES));
        assert_eq!(inode_permission(&group, &f, MAY_READ), Ok(()));
        assert_eq!(inode_permission(&group, &f, MAY_WRITE), Err(EACCES));
        assert_eq!(inode_permission(&other, &f, MAY_READ), Err(EACCES));
        // The owner class decides for the owner even when others have more.
        let f = inode(FILE | 0o066, 1000, 100);
        assert_eq!(inode_permission(&owner, &f, MAY_READ), Err(EACCES));
        // A supplementary group counts as the group.
        let member = cred(3000, 3000, Some(&[7, 100]));
        assert_eq!(inode_permission(&member, &f, MAY_READ), Ok(()));
    }

    #[test]
    fn groups_are_asked_for_only_when_they_decide() {
        let unknown = cred(3000, 3000, None);
        // Group and other agree: decided without the groups.
        let f = inode(FILE | 0o644, 0, 0);
        assert_eq!(inode_permission(&unknown, &f, MAY_READ), Ok(()));
        assert_eq!(inode_permission(&unknown, &f, MAY_WRITE), Err(EACCES));
        // Only the group grants: ask.
        let f = inode(FILE | 0o640, 0, 100);
        assert_eq!(
            inode_permission(&unknown, &f, MAY_READ),
            Err(Denied::NeedGroups)
        );
        // Only other grants (a member would be refused): ask too.
        let f = inode(FILE | 0o604, 0, 100);
        assert_eq!(
            inode_permission(&unknown, &f, MAY_READ),
            Err(Denied::NeedGroups)
        );
        // The primary group is known without them.
        let f = inode(FILE | 0o640, 0, 3000);
        assert_eq!(inode_permission(&unknown, &f, MAY_READ), Ok(()));
        // Sent and empty: decided.
        let none = cred(3000, 3000, Some(&[]));
        let f = inode(FILE | 0o640, 0, 100);
        assert_eq!(inode_permission(&none, &f, MAY_READ), Err(EACCES));
    }

    #[test]
    fn acl_named_entries_and_mask() {
        let base = inode(FILE | 0o640, 1000, 100);
        let f = with_acl(
            base,
            &[
                (USER_OBJ, 6, u32::MAX),
                (USER, 6, 2000),
                (USER, 4, 2001),
                (GROUP_OBJ, 4, u32::MAX),
                (GROUP, 6, 500),
                (MASK, 4, u32::MAX),
                (OTHER, 0, u32::MAX),
            ],
        );
        // Named user: its entry, limited by the mask.
        assert_eq!(
            inode_permission(&cred(2000, 9, Some(&[])), &f, MAY_READ),
            Ok(())
        );
        assert_eq!(
            inode_permission(&cred(2000, 9, Some(&[])), &f, MAY_WRITE),
            Err(EACCES),
            "rw- masked to r--"
        );
        // Named group, masked.
        let g = cred(3000, 3000, Some(&[500]));
        assert_eq!(inode_permission(&g, &f, MAY_READ), Ok(()));
        assert_eq!(inode_permission(&g, &f, MAY_WRITE), Err(EACCES));
        // A matching group that does not grant denies (no fall to other).
        let g = cred(3000, 100, Some(&[]));
        assert_eq!(inode_permission(&g, &f, MAY_EXEC), Err(EACCES));
        // No entry: other.
        assert_eq!(
            inode_permission(&cred(4000, 4000, Some(&[])), &f, MAY_READ),
            Err(EACCES)
        );
        // With a wider mask the named group writes.
        let mut f2 = f.clone();
        f2.xattrs.insert(
            acl::ACCESS.to_vec(),
            acl::encode(&[
                (USER_OBJ, 6, u32::MAX),
                (GROUP_OBJ, 4, u32::MAX),
                (GROUP, 6, 500),
                (MASK, 6, u32::MAX),
                (OTHER, 0, u32::MAX),
            ]),
        );
        assert_eq!(
            inode_permission(&cred(3000, 500, None), &f2, MAY_WRITE),
            Ok(())
        );
        // Unknown groups and a named group that would grant: ask.
        assert_eq!(
            inode_permission(&cred(3000, 3000, None), &f2, MAY_WRITE),
            Err(Denied::NeedGroups)
        );
    }

    #[test]
    fn root_overrides_except_exec_without_x() {
        let root = cred(0, 0, None);
        let f = inode(FILE, 1000, 1000);
        assert_eq!(inode_permission(&root, &f, MAY_READ | MAY_WRITE), Ok(()));
        assert_eq!(inode_permission(&root, &f, MAY_EXEC), Err(EACCES));
        let f = inode(FILE | 0o001, 1000, 1000);
        assert_eq!(inode_permission(&root, &f, MAY_EXEC), Ok(()));
        let d = inode(DIR, 1000, 1000);
        assert_eq!(inode_permission(&root, &d, MAY_EXEC | MAY_WRITE), Ok(()));
        // Squashed root is nobody.
        let caps = ClientCaps::from_pb(&pb::ClientCaps {
            root_squash: true,
            ..Default::default()
        });
        let h = pb::RequestHeader {
            session_id: 5,
            has_caller: true,
            ..Default::default()
        };
        let c = Cred::of(Some(&h), None, Some(&caps), false).unwrap();
        assert_eq!((c.uid, c.gid), (crate::caps::NOBODY, crate::caps::NOBODY));
        assert_eq!(
            inode_permission(&c, &inode(FILE | 0o600, 7, 7), MAY_READ),
            Err(EACCES)
        );
        // Not checked: no caller, a daemon, the administrator.
        assert!(Cred::of(Some(&h), None, None, true).is_none());
        let daemon = pb::RequestHeader {
            has_caller: true,
            ..Default::default()
        };
        assert!(Cred::of(Some(&daemon), None, None, false).is_none());
        assert!(Cred::of(Some(&pb::RequestHeader::default()), None, None, false).is_none());
    }

    #[test]
    fn limited_keys_naming_no_caller_are_checked_as_nobody() {
        let limited = ClientCaps::from_pb(&pb::ClientCaps {
            path: "/x".into(),
            ..Default::default()
        });
        let sid = |session_id, has_caller| pb::RequestHeader {
            session_id,
            has_caller,
            caller_uid: 0,
            ..Default::default()
        };
        let nobody = Cred {
            uid: crate::caps::NOBODY,
            gid: crate::caps::NOBODY,
            groups: Some(vec![]),
        };
        // No header, no caller, or session 0: nobody, groups sent or not.
        for h in [None, Some(sid(5, false)), Some(sid(0, true))] {
            let c = Cred::of(h.as_ref(), Some(vec![0]), Some(&limited), false);
            assert_eq!(c.as_ref(), Some(&nobody), "{h:?}");
        }
        let c = Cred::of(None, None, Some(&ClientCaps::default()), false).unwrap();
        assert_eq!(c.uid, crate::caps::NOBODY, "squash id 0 is still nobody");
        assert_eq!(
            inode_permission(&nobody, &inode(FILE | 0o600, 7, 7), MAY_READ),
            Err(EACCES)
        );
        // Unlimited keys and the administrator: unchecked as before.
        assert!(Cred::of(Some(&sid(5, false)), None, None, false).is_none());
        assert!(Cred::of(None, None, Some(&limited), true).is_none());
        // A named caller of a limited key: as named (after squashing).
        let c = Cred::of(Some(&sid(5, true)), None, Some(&limited), false).unwrap();
        assert_eq!(c.uid, 0);
    }

    #[test]
    fn open_flags() {
        assert_eq!(open_mask(libc::O_RDONLY as u32), MAY_READ);
        assert_eq!(open_mask(libc::O_WRONLY as u32), MAY_WRITE);
        assert_eq!(open_mask(libc::O_RDWR as u32), MAY_READ | MAY_WRITE);
        assert_eq!(
            open_mask((libc::O_RDONLY | libc::O_TRUNC) as u32),
            MAY_READ | MAY_WRITE
        );
        assert_eq!(open_mask(FMODE_EXEC), MAY_EXEC);
    }

    #[test]
    fn setattr_rules() {
        let mut s = State::default();
        s.inodes.insert(5, inode(FILE | 0o2664, 1000, 100));
        let owner = cred(1000, 1000, Some(&[]));
        let writer = cred(2000, 100, Some(&[]));
        let other = cred(3000, 3000, Some(&[]));
        let ch = |f: fn(&mut AttrChange)| {
            let mut c = AttrChange::default();
            f(&mut c);
            c
        };
        // chmod: owner only; the owner outside the group loses S_ISGID.
        let chmod = ch(|c| c.mode = Some(0o2644));
        assert_eq!(may_setattr(&s, &owner, 5, &chmod), Ok(Some(0o644)));
        assert_eq!(may_setattr(&s, &writer, 5, &chmod), Err(EPERM));
        // Dropping set-id bits (a write's kill_priv) is anyone's.
        let drop = ch(|c| c.mode = Some(0o664));
        assert_eq!(may_setattr(&s, &writer, 5, &drop), Ok(None));
        // chown: root; the owner to itself.
        let chown = ch(|c| c.uid = Some(2000));
        assert_eq!(may_setattr(&s, &owner, 5, &chown), Err(EPERM));
        assert_eq!(may_setattr(&s, &cred(0, 0, None), 5, &chown), Ok(None));
        assert_eq!(
            may_setattr(&s, &owner, 5, &ch(|c| c.uid = Some(1000))),
            Ok(None)
        );
        // chgrp: the owner to one of its groups.
        let to_200 = ch(|c| c.gid = Some(200));
        assert_eq!(may_setattr(&s, &owner, 5, &to_200), Err(EPERM));
        let in_200 = cred(1000, 1000, Some(&[200]));
        assert_eq!(may_setattr(&s, &in_200, 5, &to_200), Ok(None));
        assert_eq!(
            may_setattr(&s, &cred(1000, 1000, None), 5, &to_200),
            Err(Denied::NeedGroups)
        );
        // truncate: write permission, unless through an open file.
        let trunc = ch(|c| c.size = true);
        assert_eq!(may_setattr(&s, &writer, 5, &trunc), Ok(None));
        assert_eq!(may_setattr(&s, &other, 5, &trunc), Err(EACCES));
        let ftrunc = ch(|c| {
            c.size = true;
            c.by_handle = true
        });
        assert_eq!(may_setattr(&s, &other, 5, &ftrunc), Ok(None));
        // utimes: given times need the owner; now needs write permission.
        let given = ch(|c| c.times_set = true);
        assert_eq!(may_setattr(&s, &writer, 5, &given), Err(EPERM));
        assert_eq!(may_setattr(&s, &owner, 5, &given), Ok(None));
        let now = ch(|c| c.times_now = true);
        assert_eq!(may_setattr(&s, &writer, 5, &now), Ok(None));
        assert_eq!(may_setattr(&s, &other, 5, &now), Err(EACCES));
    }

    #[test]
    fn sticky_and_parents() {
        let mut s = State::default();
        s.inodes.insert(2, inode(DIR | 0o1777, 0, 0));
        s.inodes.insert(3, inode(FILE | 0o644, 1000, 1000));
        s.inodes.insert(4, inode(DIR | 0o755, 1000, 1000));
        s.dentries.insert(
            (2, b"f".to_vec()),
            crate::namespace::Dentry { ino: 3, cookie: 1 },
        );
        let owner = cred(1000, 1000, Some(&[]));
        let other = cred(2000, 2000, Some(&[]));
        assert_eq!(may_delete(&s, &owner, 2, b"f"), Ok(()));
        assert_eq!(may_delete(&s, &other, 2, b"f"), Err(EPERM), "sticky");
        assert_eq!(may_delete(&s, &cred(0, 0, None), 2, b"f"), Ok(()));
        assert_eq!(may_create(&s, &other, 2, b"new"), Ok(()));
        // Not writable: EACCES; a taken name is the operation's EEXIST.
        assert_eq!(may_create(&s, &other, 4, b"new"), Err(EACCES));
        assert_eq!(may_create(&s, &other, 2, b"f"), Ok(()));
        assert_eq!(may_lookup(&s, &other, 4), Ok(()));
        assert_eq!(
            may_rename(&s, &other, 2, b"f", 4, b"g", 0),
            Err(EPERM),
            "source in a sticky dir"
        );
        assert_eq!(may_rename(&s, &owner, 2, b"f", 4, b"g", 0), Ok(()));
        assert_eq!(may_readdir(&s, &other, 4), Ok(()));
    }

    #[test]
    fn xattr_namespaces() {
        let mut s = State::default();
        s.inodes.insert(3, inode(FILE | 0o644, 1000, 1000));
        s.inodes.insert(4, inode(libc::S_IFLNK | 0o777, 1000, 1000));
        let owner = cred(1000, 1000, Some(&[]));
        let other = cred(2000, 2000, Some(&[]));
        assert_eq!(may_xattr(&s, &other, 3, b"user.a", false), Ok(()));
        assert_eq!(may_xattr(&s, &other, 3, b"user.a", true), Err(EACCES));
        assert_eq!(may_xattr(&s, &owner, 3, b"user.a", true), Ok(()));
        assert_eq!(may_xattr(&s, &owner, 4, b"user.a", true), Err(EPERM));
        assert_eq!(
            may_xattr(&s, &owner, 4, b"user.a", false),
            Err(Denied::Errno(libc::ENODATA))
        );
        assert_eq!(may_xattr(&s, &owner, 3, b"trusted.a", true), Err(EPERM));
        assert_eq!(
            may_xattr(&s, &cred(0, 0, None), 3, b"trusted.a", true),
            Ok(())
        );
        assert_eq!(may_xattr(&s, &other, 3, acl::ACCESS, true), Err(EPERM));
        assert_eq!(may_xattr(&s, &owner, 3, acl::ACCESS, true), Ok(()));
        assert_eq!(may_xattr(&s, &other, 3, acl::ACCESS, false), Ok(()));
        assert_eq!(may_xattr(&s, &other, 3, b"security.x", true), Ok(()));
    }
}
