//! The caller of a client operation (issue 19): the process whose FUSE
//! request a mount serves, whose permissions the MDS checks.
//!
//! The client runs each FUSE operation that the MDS judges inside
//! [`scope`]; the request headers it builds then carry the caller's uid
//! and gid (`RequestHeader.caller_uid`, `caller_gid`, `has_caller`).
//!
//! Supplementary groups are not sent up front: FUSE gives uid, gid and pid
//! per request but not the groups, and reading `/proc/PID/status` on every
//! operation would cost more than the operation. Most checks do not depend
//! on them (the owner, the primary group, or a file whose group and other
//! bits agree decide), so the MDS decides without them and, only when
//! membership of a group other than the primary one would change its
//! answer, refuses with [`need_groups`]. The connection's retry loop
//! ([`crate::mds_conn`]) then reads the caller's groups once
//! ([`load_groups`]) and sends the request again with them in the
//! [`GROUPS_KEY`] metadata ([`crate::request_id::Stamp`] adds it to each
//! call made in the scope). The common case stays one round trip with no
//! `/proc` read; an access through a supplementary group costs a second
//! round trip.

use std::cell::OnceCell;
use std::future::Future;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::Status;

/// Metadata key with the caller's supplementary groups (decimal, comma
/// separated, possibly empty); present only on a retry the MDS asked for.
pub const GROUPS_KEY: &str = "avalon-groups";

/// Metadata key of the MDS's answer that it needs the caller's groups.
pub const NEED_GROUPS_KEY: &str = "avalon-need-groups";

/// Most supplementary groups read and sent (NGROUPS_MAX is 65536; the
/// kernel's own permission check walks all, we keep the header bounded).
pub const MAX_GROUPS: usize = 1024;

/// The process a FUSE operation serves, as the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// fsuid.
    pub uid: u32,
    /// fsgid.
    pub gid: u32,
    /// Process id (0 when the kernel made the request itself).
    pub pid: u32,
}

struct Current {
    caller: Caller,
    /// The supplementary groups as metadata, once the MDS asked for them.
    groups: OnceCell<AsciiMetadataValue>,
}

tokio::task_local! {
    static CURRENT: Current;
}

/// Runs `f` on behalf of `caller`: the MDS requests it makes carry it.
pub async fn scope<F: Future>(caller: Caller, f: F) -> F::Output {
    CURRENT
        .scope(
            Current {
                caller,
                groups: OnceCell::new(),
            },
            f,
        )
        .await
}

/// The caller the current task works for, if any.
pub fn current() -> Option<Caller> {
    CURRENT.try_with(|c| c.caller).ok()
}

/// The groups metadata to add to a call, once loaded.
pub fn groups_metadata() -> Option<AsciiMetadataValue> {
    CURRENT.try_with(|c| c.groups.get().cloned()).ok().flatten()
}

/// Reads the caller's supplementary groups (once per operation). Returns
/// whether they were loaded now, i.e. whether a retry would send more
/// than the failed attempt did. An unreadable `/proc` entry (the process
/// is gone, or the kernel made the request) sends an empty list: the
/// MDS then decides on uid and gid alone.
pub fn load_groups() -> bool {
    CURRENT
        .try_with(|c| {
            if c.groups.get().is_some() {
                return false;
            }
            let groups = read_groups(c.caller.pid).unwrap_or_default();
            let v = encode(&groups)
                .parse()
                .unwrap_or_else(|_| AsciiMetadataValue::from_static(""));
            c.groups.set(v).is_ok()
        })
        .unwrap_or(false)
}

/// The `Groups:` line of `/proc/PID/status`.
fn read_groups(pid: u32) -> Option<Vec<u32>> {
    if pid == 0 {
        return None;
    }
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    Some(
        line.split_ascii_whitespace()
            .filter_map(|g| g.parse().ok())
            .take(MAX_GROUPS)
            .collect(),
    )
}

/// Groups in the metadata form.
pub fn encode(groups: &[u32]) -> String {
    let mut s = String::with_capacity(groups.len() * 6);
    for (i, g) in groups.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&g.to_string());
    }
    s
}

/// The groups a request carries (`None`: not sent). Malformed entries are
/// left out: a group the caller does not get cannot grant anything.
pub fn groups_of(md: &MetadataMap) -> Option<Vec<u32>> {
    let v = md.get(GROUPS_KEY)?.to_str().ok()?;
    Some(
        v.split(',')
            .filter_map(|g| g.trim().parse().ok())
            .take(MAX_GROUPS)
            .collect(),
    )
}

/// The MDS's answer when the caller's supplementary groups would change
/// the verdict. Carries EACCES, so a client that does not retry reports
/// a refusal.
pub fn need_groups() -> Status {
    let mut s = crate::errno::status(
        libc::EACCES,
        "permission depends on the caller's supplementary groups; send them",
    );
    s.metadata_mut()
        .insert(NEED_GROUPS_KEY, AsciiMetadataValue::from_static("1"));
    s
}

/// Whether `s` is [`need_groups`].
pub fn asks_groups(s: &Status) -> bool {
    s.metadata().get(NEED_GROUPS_KEY).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_round_trip_through_metadata() {
        let mut md = MetadataMap::new();
        assert_eq!(groups_of(&md), None);
        md.insert(GROUPS_KEY, encode(&[4, 27, 1000]).parse().unwrap());
        assert_eq!(groups_of(&md), Some(vec![4, 27, 1000]));
        md.insert(GROUPS_KEY, encode(&[]).parse().unwrap());
        assert_eq!(groups_of(&md), Some(vec![]), "sent, but none");
        assert!(asks_groups(&need_groups()));
        assert_eq!(crate::errno::errno_of(&need_groups()), libc::EACCES);
    }

    #[tokio::test]
    async fn groups_load_once_per_scope_and_only_in_one() {
        assert!(!load_groups(), "no caller outside a scope");
        let me = std::process::id();
        let c = Caller {
            uid: 0,
            gid: 0,
            pid: me,
        };
        scope(c, async {
            assert_eq!(current(), Some(c));
            assert!(groups_metadata().is_none());
            assert!(load_groups());
            assert!(!load_groups(), "a second retry sends nothing new");
            assert!(groups_metadata().is_some());
        })
        .await;
        assert_eq!(current(), None);
        // This process's own groups, as the kernel has them.
        let mine = read_groups(me).expect("own /proc status");
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        assert_eq!(mine.len(), n.max(0) as usize);
    }
}
