//! The errno codec: how a Linux errno travels inside a gRPC status.
//!
//! Servers build statuses with [`status`]; the client turns any status back
//! into an errno with [`errno_of`]. The status code is chosen to match the
//! errno so that generic gRPC tools still see something meaningful.

use tonic::{Code, Status};

/// Metadata key that carries the errno as decimal ASCII.
pub const ERRNO_KEY: &str = "avalon-errno";

/// A status carrying `errno`, with a human-readable message.
pub fn status(errno: i32, msg: impl Into<String>) -> Status {
    let mut s = Status::new(code_for(errno), msg);
    if let Ok(v) = errno.to_string().parse() {
        s.metadata_mut().insert(ERRNO_KEY, v);
    }
    s
}

/// The gRPC code that best matches an errno.
pub fn code_for(errno: i32) -> Code {
    match errno {
        libc::ENOENT => Code::NotFound,
        libc::EEXIST => Code::AlreadyExists,
        libc::EINVAL | libc::ENAMETOOLONG | libc::E2BIG | libc::ERANGE => Code::InvalidArgument,
        libc::EPERM | libc::EACCES | libc::EROFS => Code::PermissionDenied,
        libc::ENOSPC | libc::EDQUOT => Code::ResourceExhausted,
        libc::EAGAIN | libc::EIO => Code::Unavailable,
        libc::ENOSYS | libc::EOPNOTSUPP => Code::Unimplemented,
        libc::EFBIG | libc::EOVERFLOW => Code::OutOfRange,
        _ => Code::FailedPrecondition,
    }
}

/// The errno a status stands for: the carried one, else one derived from
/// the code (transport failures become EIO).
pub fn errno_of(s: &Status) -> i32 {
    if let Some(e) = s
        .metadata()
        .get(ERRNO_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    {
        if e > 0 {
            return e;
        }
    }
    match s.code() {
        Code::NotFound => libc::ENOENT,
        Code::AlreadyExists => libc::EEXIST,
        Code::InvalidArgument | Code::OutOfRange => libc::EINVAL,
        Code::PermissionDenied | Code::Unauthenticated => libc::EACCES,
        Code::ResourceExhausted => libc::ENOSPC,
        Code::Unimplemented => libc::ENOSYS,
        Code::DeadlineExceeded => libc::ETIMEDOUT,
        _ => libc::EIO,
    }
}

/// Metadata key a follower MDS sets to the leader's address when it
/// refuses a request that only the leader may serve.
pub const LEADER_KEY: &str = "avalon-leader";

/// The status a non-leader MDS answers with, naming the leader if known.
pub fn not_leader(leader_addr: Option<&str>) -> Status {
    let mut s = Status::unavailable(match leader_addr {
        Some(a) => format!("not the metadata leader; leader is {a}"),
        None => "not the metadata leader; no leader elected yet".to_string(),
    });
    if let Some(v) = leader_addr.and_then(|a| a.parse().ok()) {
        s.metadata_mut().insert(LEADER_KEY, v);
    }
    s
}

/// The leader address carried by a [`not_leader`] status.
pub fn leader_hint(s: &Status) -> Option<String> {
    s.metadata()
        .get(LEADER_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Metadata key an OSD sets on every status it answers with: the OSD is
/// alive and reachable (peering, waiting for its replicas, stale map), as
/// opposed to a transport failure where another replica should be tried.
pub const OSD_ANSWERED_KEY: &str = "avalon-osd-answered";

/// True when a status carries an explicit errno (a definite answer from the
/// server, not a transport or availability failure worth retrying).
pub fn has_errno(s: &Status) -> bool {
    s.metadata().get(ERRNO_KEY).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        for e in [
            libc::ENOENT,
            libc::ENOTEMPTY,
            libc::EXDEV,
            libc::ENAMETOOLONG,
            libc::ENODATA,
        ] {
            let s = status(e, "x");
            assert!(has_errno(&s));
            assert_eq!(errno_of(&s), e);
        }
        assert_eq!(errno_of(&Status::unavailable("down")), libc::EIO);
        assert!(!has_errno(&Status::unavailable("down")));
    }
}
