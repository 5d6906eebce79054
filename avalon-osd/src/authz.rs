//! Who may call what on an OSD, from the caller's certificate identity
//! ([`avalon_proto::tls::Peer`]): [`policy`] for every gRPC request (by
//! path, through [`avalon_proto::tls::AuthzLayer`]), [`write`] and
//! [`internal_read`] for the flags that only another OSD may set, on gRPC
//! and the data port alike. Plaintext (`insecure`) connections are not
//! checked.

use avalon_proto::pb::WriteChunkRequest;
use avalon_proto::tls::{Identity, Peer};
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
        // Peering, recovery and scrub between OSDs, or an administrator.
        "ListChunks" => peer.require("list chunks (OSD, MDS or admin only)", |i: &Identity| {
            is_osd(i) || i.is_mds() || i.is_admin()
        }),
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
}
