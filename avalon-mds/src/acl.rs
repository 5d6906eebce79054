//! POSIX ACLs, stored as the xattrs `system.posix_acl_access` and
//! `system.posix_acl_default` in the kernel's binary format. The kernel
//! (FUSE_POSIX_ACL) enforces them; the filesystem keeps them consistent
//! with the mode, as a local filesystem does:
//!
//! - setting an access ACL sets the permission bits from it (owner from
//!   USER_OBJ, group from MASK or else GROUP_OBJ, other from OTHER); an ACL
//!   equivalent to the mode is not stored;
//! - chmod rewrites those entries of a stored access ACL;
//! - a new entry in a directory with a default ACL gets an access ACL made
//!   from it, masked by the create mode (posix_acl_create_masq), and a new
//!   subdirectory also inherits the default ACL.
//!
//! The MDS evaluates the access ACL itself too (`permission.rs`).

use crate::namespace::Inode;

pub const ACCESS: &[u8] = b"system.posix_acl_access";
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
pub const USER_OBJ: u16 = 0x01;
pub const USER: u16 = 0x02;
pub const GROUP_OBJ: u16 = 0x04;
pub const GROUP: u16 = 0x08;
pub const MASK: u16 = 0x10;
pub const OTHER: u16 = 0x20;

/// One entry: (tag, perm, id).
pub type Entry = (u16, u16, u32);

/// Parses an ACL xattr value; None if malformed.
pub fn parse(v: &[u8]) -> Option<Vec<Entry>> {
    if v.len() < 4 || !(v.len() - 4).is_multiple_of(8) {
        return None;
    }
    if u32::from_le_bytes(v[0..4].try_into().ok()?) != VERSION {
        return None;
    }
    let mut out = Vec::new();
    for e in v[4..].chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        if !matches!(tag, USER_OBJ | USER | GROUP_OBJ | GROUP | MASK | OTHER) || perm & !7 != 0 {
            return None;
        }
        out.push((tag, perm, id));
    }
    let count = |t| out.iter().filter(|e| e.0 == t).count();
    if count(USER_OBJ) != 1 || count(GROUP_OBJ) != 1 || count(OTHER) != 1 || count(MASK) > 1 {
        return None;
    }
    if (count(USER) + count(GROUP) > 0) && count(MASK) == 0 {
        return None;
    }
    Some(out)
}

/// Encodes entries in the xattr format.
pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + 8 * entries.len());
    v.extend_from_slice(&VERSION.to_le_bytes());
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// True if the ACL says no more than the permission bits.
pub fn is_minimal(entries: &[Entry]) -> bool {
    entries
        .iter()
        .all(|e| matches!(e.0, USER_OBJ | GROUP_OBJ | OTHER))
}

/// The permission bits (0o777) an access ACL stands for.
pub fn mode_of(entries: &[Entry]) -> u32 {
    let get = |t| entries.iter().find(|e| e.0 == t).map(|e| u32::from(e.1));
    let user = get(USER_OBJ).unwrap_or(0);
    let group = get(MASK).or(get(GROUP_OBJ)).unwrap_or(0);
    let other = get(OTHER).unwrap_or(0);
    (user << 6) | (group << 3) | other
}

/// chmod: the ACL's owner, group (mask) and other entries follow `mode`.
pub fn chmod(entries: &mut [Entry], mode: u32) {
    let has_mask = entries.iter().any(|e| e.0 == MASK);
    for e in entries.iter_mut() {
        match e.0 {
            USER_OBJ => e.1 = ((mode >> 6) & 7) as u16,
            MASK => e.1 = ((mode >> 3) & 7) as u16,
            GROUP_OBJ if !has_mask => e.1 = ((mode >> 3) & 7) as u16,
            OTHER => e.1 = (mode & 7) as u16,
            _ => {}
        }
    }
}

/// posix_acl_create_masq: masks the inherited ACL with the create mode and
/// the mode with the ACL; returns the new permission bits.
fn create_masq(entries: &mut [Entry], mode: u32) -> u32 {
    let mut mode = mode;
    let has_mask = entries.iter().any(|e| e.0 == MASK);
    for e in entries.iter_mut() {
        let (shift, applies) = match e.0 {
            USER_OBJ => (6, true),
            OTHER => (0, true),
            MASK => (3, true),
            GROUP_OBJ => (3, !has_mask),
            _ => (0, false),
        };
        if applies {
            e.1 &= ((mode >> shift) & 7) as u16;
            mode &= !(0o7 << shift) | (u32::from(e.1) << shift);
        }
    }
    mode
}

/// Set in a create request's `mode` when bits 16..25 carry the caller's
/// umask, not applied yet (it does not apply under a default ACL).
pub const UMASK_FLAG: u32 = 1 << 31;

/// The create mode a client sends: `mode` unmasked plus its umask.
pub fn with_umask(mode: u32, umask: u32) -> u32 {
    mode | UMASK_FLAG | ((umask & 0o777) << 16)
}

/// Splits a create request's mode into (mode, umask still to apply).
pub fn split_umask(mode: u32) -> (u32, u32) {
    if mode & UMASK_FLAG != 0 {
        (mode & 0xffff, (mode >> 16) & 0o777)
    } else {
        (mode & 0xffff, 0)
    }
}

/// Sets up the mode and ACLs of `child`, just created in `parent` by a
/// caller with `umask`.
pub fn inherit(parent: &Inode, child: &mut Inode, umask: u32) {
    if child.attr.mode & libc::S_IFMT == libc::S_IFLNK {
        return;
    }
    let Some(mut acl) = parent.xattrs.get(DEFAULT).and_then(|v| parse(v)) else {
        child.attr.mode &= !umask;
        return;
    };
    if child.is_dir() {
        if let Some(v) = parent.xattrs.get(DEFAULT) {
            child.xattrs.insert(DEFAULT.to_vec(), v.clone());
        }
    }
    let perm = create_masq(&mut acl, child.attr.mode & 0o777);
    child.attr.mode = (child.attr.mode & !0o777) | perm;
    if !is_minimal(&acl) {
        child.xattrs.insert(ACCESS.to_vec(), encode(&acl));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_mode_and_masq() {
        let acl = vec![
            (USER_OBJ, 7, u32::MAX),
            (USER, 6, 1000),
            (GROUP_OBJ, 5, u32::MAX),
            (MASK, 7, u32::MAX),
            (OTHER, 0, u32::MAX),
        ];
        let v = encode(&acl);
        assert_eq!(parse(&v).unwrap(), acl);
        assert_eq!(mode_of(&acl), 0o770);
        assert!(!is_minimal(&acl));
        let mut a = acl.clone();
        chmod(&mut a, 0o640);
        assert_eq!(mode_of(&a), 0o640);
        assert_eq!(a[2].1, 5, "GROUP_OBJ kept when a mask exists");
        let mut a = acl.clone();
        assert_eq!(create_masq(&mut a, 0o666), 0o660);
        assert_eq!(a[3].1, 6);
        assert!(parse(&v[..v.len() - 1]).is_none());
        assert!(parse(&encode(&[(USER, 7, 1)])).is_none());
    }
}
