//! The protocol version and feature bits every node advertises when it meets
//! a peer (client session, OSD registration and heartbeats, Raft RPCs).
//!
//! A peer that sends no version is a release from before versioning:
//! version 1. A node accepts any peer at or above [`MIN_PEER_VERSION`] and
//! refuses an older one with `FailedPrecondition` and a message naming both
//! versions ([`refusal`]); the refused side recognises it
//! ([`is_refusal`]) and stops instead of retrying. Newer peers are always
//! accepted: it is their minimum that decides whether they talk to us.

use crate::pb::NodeVersion;

/// The protocol this build speaks. 1: the first release (sends no version);
/// 2: version exchange, versioned on-disk formats.
pub const PROTOCOL_VERSION: u32 = 2;

/// The oldest protocol version this build still talks to.
pub const MIN_PEER_VERSION: u32 = 1;

/// The version of a peer that sends none (the releases before versioning).
pub const UNVERSIONED: u32 = 1;

/// Feature bit: the node sends and checks [`NodeVersion`].
pub const FEATURE_VERSION_EXCHANGE: u64 = 1 << 0;

/// Feature bit: Raft entries, snapshots and OSD sidecars carry a format
/// version and unknown newer formats are refused.
pub const FEATURE_VERSIONED_FORMATS: u64 = 1 << 1;

/// Feature bit: the MDS applies `Op::RegisterClientWithId` (random session
/// ids chosen by the leader).
pub const FEATURE_RANDOM_SESSIONS: u64 = 1 << 2;

/// Feature bit: the MDS applies directory quotas and the trash (an unlink
/// under `avalon.trash_seconds` keeps the inode, quota xattrs refuse growth,
/// the trash ops). A member without it would apply the same entries
/// differently, so those attributes are refused until every voter has it.
pub const FEATURE_DIR_POLICIES: u64 = 1 << 3;

/// Feature bit: the MDS applies the snapshot ops (`Op::SnapCreate`,
/// `Op::SnapRemove`, `Op::SnapTrimmed`) and keeps the snapshot table. A
/// member without it could not apply them, so snapshots are refused until
/// every voter has it.
pub const FEATURE_SNAPSHOTS: u64 = 1 << 4;

/// Feature bit: a client sends its callers' uid and gid with each
/// request (`RequestHeader.has_caller`) and the MDS checks permissions
/// against them (`avalon-mds/src/permission.rs`). A request without them
/// (an older client, a daemon, a tool) is limited by its key only.
pub const FEATURE_CALLER_CREDS: u64 = 1 << 5;

/// Feature bit: the MDS applies `Op::SetClientCapsMapped` and keeps the
/// per-key uid/gid mappings (`avalon-mds/src/caps.rs`). A member without
/// it could not apply that entry, so mapped keys are refused until every
/// voter has it.
pub const FEATURE_ID_MAP: u64 = 1 << 6;

/// Feature bit: byte-range locks live in the leader's memory, not in the
/// Raft log. A client with it marks its lock requests (`reclaims`), keeps
/// a copy of its locks and reclaims them from a new leader when asked
/// (`ClientHeartbeatReply.reclaim_locks`, `ReclaimLocks`). The leader
/// keeps locks out of the log only while every voter has the bit (a
/// leader without it would not know them); requests without the mark (an
/// older client) still go through the log.
pub const FEATURE_LOCK_RECLAIM: u64 = 1 << 7;

/// Feature bit: the OSD orders chunk versions by history (the map epoch
/// in a version's high bits, `avalon-osd/src/chunk_version.rs`) and
/// checks a forwarded write's `prev_version` and `primary_osd`. A primary
/// stamps a new epoch into a chunk's version only when every replica has
/// it (learned from their `ListChunksReply.features` while peering).
pub const FEATURE_EPOCH_VERSIONS: u64 = 1 << 8;

/// Feature bit: the client can keep a file's locks itself while no other
/// session locks it (`LockRequest.caches`, `SetLockReply.cached`), and
/// returns them when the leader recalls them (`Recall.locks`) with
/// `ReclaimLocksRequest.returned_ino`. The leader offers the cache only to
/// clients that set `caches`.
pub const FEATURE_LOCK_CACHE: u64 = 1 << 10;

/// Feature bit: write grants (`CommitWriteRequest.want_grant`). The MDS
/// records a session's grant to grow a file up to a size in its Raft
/// state; a client holding one may answer fsync/fdatasync once the OSDs
/// stored the data, leaving size and times to its next commit, and the
/// leader recovers them from the OSDs (`ChunkExtents.length`) when the
/// session is lost. Granted only while every voter has the bit (an older
/// voter could not apply the log entry).
pub const FEATURE_WRITE_GRANTS: u64 = 1 << 9;

/// Feature bit: conditional size commits (`CommitWriteRequest.expect_size`,
/// the MDS's `Op::CommitWriteIf`). Proposed only while every voter has the
/// bit; without it the MDS commits unconditionally, as an older MDS does
/// (an older one ignores the field).
pub const FEATURE_FENCED_APPENDS: u64 = 1 << 11;

/// Every feature this build has.
pub const FEATURES: u64 = FEATURE_VERSION_EXCHANGE
    | FEATURE_VERSIONED_FORMATS
    | FEATURE_RANDOM_SESSIONS
    | FEATURE_DIR_POLICIES
    | FEATURE_SNAPSHOTS
    | FEATURE_CALLER_CREDS
    | FEATURE_ID_MAP
    | FEATURE_LOCK_RECLAIM
    | FEATURE_EPOCH_VERSIONS
    | FEATURE_LOCK_CACHE
    | FEATURE_WRITE_GRANTS
    | FEATURE_FENCED_APPENDS;

/// The crate (release) version, e.g. "0.1.0".
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// Text that starts every refusal's message (see [`is_refusal`]).
const REFUSAL_PREFIX: &str = "avalon protocol version mismatch";

/// The protocol version this node advertises. With the `failpoints`
/// feature only, `AVALON_TEST_PROTOCOL_VERSION` overrides it so that a test
/// can play a too-old peer.
pub fn advertised() -> u32 {
    #[cfg(feature = "failpoints")]
    if let Some(v) = std::env::var("AVALON_TEST_PROTOCOL_VERSION")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return v;
    }
    PROTOCOL_VERSION
}

/// The feature bits this node advertises: [`FEATURES`]. With the
/// `failpoints` feature only, those in `AVALON_TEST_FEATURES_OFF` (a
/// decimal mask) are left out, so that a test can play an older release.
pub fn features() -> u64 {
    #[cfg(feature = "failpoints")]
    if let Some(off) = std::env::var("AVALON_TEST_FEATURES_OFF")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        return FEATURES & !off;
    }
    FEATURES
}

/// This node's version, as sent to its peers.
pub fn local() -> NodeVersion {
    NodeVersion {
        protocol: advertised(),
        features: features(),
        release: RELEASE.to_string(),
    }
}

/// A peer's version as it sent it, or that of an unversioned release.
pub fn of_peer(v: Option<&NodeVersion>) -> NodeVersion {
    v.cloned().unwrap_or_else(|| NodeVersion {
        protocol: UNVERSIONED,
        features: 0,
        release: String::new(),
    })
}

/// `1 (0.1.0)`, or `1` when the peer did not say its release.
pub fn describe(v: &NodeVersion) -> String {
    if v.release.is_empty() {
        v.protocol.to_string()
    } else {
        format!("{} ({})", v.protocol, v.release)
    }
}

/// Checks a peer's version: `me` names this node ("this MDS"), `peer` the
/// other side ("OSD 4", "the client"). An absent version counts as
/// [`UNVERSIONED`]. Returns the peer's version, or the refusal to send it.
pub fn check(me: &str, peer: &str, v: Option<&NodeVersion>) -> Result<NodeVersion, tonic::Status> {
    let v = of_peer(v);
    if v.protocol >= MIN_PEER_VERSION {
        return Ok(v);
    }
    Err(refusal(me, peer, &v))
}

/// The `FailedPrecondition` status that refuses a too-old peer.
pub fn refusal(me: &str, peer: &str, v: &NodeVersion) -> tonic::Status {
    tonic::Status::failed_precondition(format!(
        "{REFUSAL_PREFIX}: {peer} speaks protocol version {}, {me} speaks {} (avalon {RELEASE}) \
         and accepts peers from version {MIN_PEER_VERSION}; upgrade {peer}",
        describe(v),
        advertised(),
    ))
}

/// Whether a status is a version refusal: retrying cannot help.
pub fn is_refusal(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::FailedPrecondition && s.message().starts_with(REFUSAL_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_is_the_unversioned_release_and_accepted() {
        let v = check("this MDS", "OSD 1", None).expect("accepted");
        assert_eq!(v.protocol, UNVERSIONED);
    }

    #[test]
    fn too_old_is_refused_naming_both_versions() {
        let old = NodeVersion {
            protocol: MIN_PEER_VERSION - 1,
            features: 0,
            release: "0.0.1".into(),
        };
        let s = check("this MDS", "OSD 1", Some(&old)).expect_err("refused");
        assert!(is_refusal(&s));
        let m = s.message();
        assert!(m.contains(&format!(
            "OSD 1 speaks protocol version {} (0.0.1)",
            old.protocol
        )));
        assert!(m.contains(&format!("this MDS speaks {PROTOCOL_VERSION}")));
        assert!(!is_refusal(&tonic::Status::failed_precondition("other")));
    }

    #[test]
    fn newer_peers_are_accepted() {
        let new = NodeVersion {
            protocol: PROTOCOL_VERSION + 5,
            features: u64::MAX,
            release: "9.0.0".into(),
        };
        assert_eq!(check("a", "b", Some(&new)).expect("ok"), new);
    }
}
