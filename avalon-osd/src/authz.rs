//! Who may call what on an OSD, from the caller's certificate identity
//! ([`avalon_proto::tls::Peer`]): [`policy`] for every gRPC request (by
//! path, through [`avalon_proto::tls::AuthzLayer`]), [`write`] and
//! [`internal_read`] for the flags that only another OSD may set, on gRPC
//! and the data port alike, and [`chunk_access`]: every other caller's
//! chunk read, write, truncate or extents query needs a chunk capability
//! the MDS signed ([`avalon_proto::chunk_cap`]). Plaintext (`insecure`)
//! connections are not checked.

use avalon_proto::chunk_cap::{self, CapKey, Verified};
use avalon_proto::pb::WriteChunkRequest;
use avalon_proto::tls::{Identity, Peer};
use bytes::Bytes;
use tonic::Status;

fn is_osd(i: &Identity) -> bool {
    i.osd_id().is_some()
}

/// The policy for one gRPC request, by its path.
pub fn policy(path: &str, peer: &Peer) -> Result<(), Status> {
    let method = path.rsplit('/').next().unwrap_or(path);
    match method {
        // The MDS's garbage collector, or an administrator.
        "DeleteObjects" => peer.require("delete objects (MDS or admin only)", |i: &Identity| {
            i.is_mds() || i.is_admin()
        }),
        // The MDS dropping snapshots' clones, or an administrator.
        "TrimSnapshots" => peer.require("trim snapshots (MDS or admin only)", |i: &Identity| {
            i.is_mds() || i.is_admin()
        }),
        // Peering, recovery and scrub between OSDs, or an administrator.
        "ListChunks" => peer.require("list chunks (OSD, MDS or admin only)", |i: &Identity| {
            is_osd(i) || i.is_mds() || i.is_admin()
        }),
        // Recovery copying chunks and snapshot clones between OSDs.
        "ReadCopy" => peer.require("read copies for recovery (OSD only)", is_osd),
        _ => peer.require("use this cluster", |_| true),
    }
}

/// A write marked `forwarded` (a primary's copy to its replicas: stored
/// as is, under the version it carries) is taken only from another OSD.
pub fn write(peer: &Peer, req: &WriteChunkRequest) -> Result<(), Status> {
    if req.forwarded {
        peer.require("send forwarded (replica) writes (OSD only)", is_osd)?;
    }
    Ok(())
}

/// A read marked internal (no peering admission) only from another OSD.
pub fn internal_read(peer: &Peer) -> Result<(), Status> {
    peer.require("read past the peering gate (OSD only)", is_osd)
}

/// Access to the chunks of `ino` (`write`: a change) by `peer`, which sent
/// `cred` (its request header's credential). Other OSDs (replication,
/// recovery, scrub) and the MDS need no capability; everyone else one for this inode,
/// issued to them, with the rights asked for and not expired. `seen`
/// remembers what a connection's capabilities verified to. Without a key
/// (a keyfile that predates capabilities, logged at start) nothing is
/// checked.
pub fn chunk_access(
    key: Option<&CapKey>,
    peer: &Peer,
    cred: &Bytes,
    ino: u64,
    write: bool,
    seen: Option<&mut Verified>,
) -> Result<(), Status> {
    if !peer.secured {
        return Ok(());
    }
    let Some(id) = &peer.identity else {
        return Err(Status::unauthenticated(
            "no identity in the client certificate; cannot access chunks",
        ));
    };
    // The MDS signs capabilities itself (and asks for chunk lengths when
    // it recovers a lost writer's size).
    if is_osd(id) || id.is_mds() {
        return Ok(());
    }
    let Some(key) = key else { return Ok(()) };
    let now = chunk_cap::now_ms();
    let r = match seen {
        Some(v) => v.check(key, cred, ino, write, &id.name, now),
        None => chunk_cap::check(key, cred, ino, write, &id.name, now).map(|_| ()),
    };
    r.map_err(|e| e.status())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str) -> Peer {
        Peer {
            addr: None,
            identity: Identity::from_uri(&format!("avalon://c/{name}")),
            secured: true,
        }
    }

    #[test]
    fn roles() {
        let del = "/avalon.v1.Osd/DeleteObjects";
        assert!(policy(del, &peer("mds.1")).is_ok());
        assert!(policy(del, &peer("client.x")).is_err());
        assert!(policy("/avalon.v1.Osd/ListChunks", &peer("osd.2")).is_ok());
        assert!(policy("/avalon.v1.Osd/ListChunks", &peer("client.x")).is_err());
        assert!(policy("/avalon.v1.Osd/ReadChunk", &peer("client.x")).is_ok());
        let fwd = WriteChunkRequest {
            forwarded: true,
            ..Default::default()
        };
        assert!(write(&peer("osd.1"), &fwd).is_ok());
        assert!(write(&peer("client.x"), &fwd).is_err());
        assert!(write(&peer("client.x"), &WriteChunkRequest::default()).is_ok());
        assert!(internal_read(&peer("client.x")).is_err());
        assert!(write(&Peer::default(), &fwd).is_ok(), "insecure");
    }

    #[test]
    fn chunk_access_needs_a_cap_except_between_osds() {
        use avalon_proto::chunk_cap::{ChunkCap, Rights};
        let key = CapKey::new(&[9u8; chunk_cap::KEY_BYTES]).unwrap();
        let cap = |ino, rights, holder: &str, expires_ms| {
            key.sign(&ChunkCap {
                ino,
                rights,
                session_id: 1,
                holder: holder.into(),
                expires_ms,
            })
        };
        let later = chunk_cap::now_ms() + 60_000;
        let x = peer("client.x");
        let rw = cap(5, Rights::ReadWrite, "client.x", later);
        let k = Some(&key);
        assert!(chunk_access(k, &x, &rw, 5, true, None).is_ok());
        let mut seen = Verified::default();
        assert!(chunk_access(k, &x, &rw, 5, true, Some(&mut seen)).is_ok());
        let denied = |r: Result<(), Status>| r.unwrap_err().code() == tonic::Code::PermissionDenied;
        assert!(denied(chunk_access(k, &x, &Bytes::new(), 5, false, None)));
        assert!(
            denied(chunk_access(k, &x, &rw, 6, false, None)),
            "other inode"
        );
        assert!(
            denied(chunk_access(k, &peer("client.y"), &rw, 5, false, None)),
            "other holder"
        );
        let ro = cap(5, Rights::Read, "client.x", later);
        assert!(
            denied(chunk_access(k, &x, &ro, 5, true, None)),
            "read cap for a write"
        );
        let other = CapKey::new(&[1u8; chunk_cap::KEY_BYTES]).unwrap();
        let forged = other.sign(&chunk_cap::decode(&rw).unwrap());
        assert!(
            denied(chunk_access(k, &x, &forged, 5, false, None)),
            "forged"
        );
        let old = cap(5, Rights::ReadWrite, "client.x", 1);
        let e = chunk_access(k, &x, &old, 5, false, None).unwrap_err();
        assert!(chunk_cap::is_expired(&e), "{e:?}");
        // OSDs, plaintext, and OSDs without a key: no capability.
        assert!(chunk_access(k, &peer("osd.2"), &Bytes::new(), 5, true, None).is_ok());
        assert!(chunk_access(k, &Peer::default(), &Bytes::new(), 5, true, None).is_ok());
        assert!(chunk_access(None, &x, &Bytes::new(), 5, true, None).is_ok());
    }
}
