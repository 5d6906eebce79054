//! Client side of POSIX ACLs: the MDS stores `system.posix_acl_*` and keeps
//! the mode in step (avalon-mds `acl.rs`); the kernel (FUSE_POSIX_ACL)
//! enforces them. What needs the caller's credentials is done here: setting
//! an access ACL clears S_ISGID unless the caller is root or in the file's
//! group (as `posix_acl_update_mode` does on a local filesystem).

use crate::client::{Client, SetAttr};
use crate::error::Result;

pub const ACCESS: &[u8] = b"system.posix_acl_access";

/// The mode of a create request: permission bits unmasked, the umask in
/// bits 16..25 with bit 31 set; the MDS applies it unless the parent
/// directory has a default ACL (then the ACL decides, as POSIX says).
pub fn create_mode(mode: u32, umask: u32) -> u32 {
    (mode & (libc::S_IFMT | 0o7777)) | (1 << 31) | ((umask & 0o777) << 16)
}

/// Supplementary groups of process `pid` (from /proc; empty if gone).
pub fn groups_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Groups:").map(|g| {
                    g.split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect()
                })
            })
        })
        .unwrap_or_default()
}

/// After `name` was set on `ino` by (uid, gid, pid): the setgid rule.
pub async fn after_setxattr(
    c: &Client,
    ino: u64,
    name: &[u8],
    uid: u32,
    gid: u32,
    pid: u32,
) -> Result<()> {
    if name != ACCESS || uid == 0 {
        return Ok(());
    }
    let a = c.getattr(ino).await?;
    if a.mode & libc::S_ISGID == 0 || a.gid == gid || groups_of(pid).contains(&a.gid) {
        return Ok(());
    }
    let ch = SetAttr {
        mode: Some(a.mode & 0o7777 & !libc::S_ISGID),
        ..Default::default()
    };
    c.setattr(ino, ch).await.map(|_| ())
}
