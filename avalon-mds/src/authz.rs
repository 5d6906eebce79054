//! Who may call what on an MDS, from the caller's certificate identity
//! ([`avalon_proto::tls::Peer`]). Applied to every gRPC request by
//! [`avalon_proto::tls::AuthzLayer`] before a service sees it; the OSD-id
//! check, which needs the request body, is [`osd_claim`]. Plaintext
//! (`insecure`) connections are not checked.

use avalon_proto::tls::{Identity, Peer};
use tonic::{Request, Status};

/// The policy for one request, by its gRPC path.
pub fn policy(path: &str, peer: &Peer) -> Result<(), Status> {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    match (service, method) {
        // Membership changes come from an administrator (avalonctl), or an
        // MDS passing one on.
        ("avalon.v1.Raft", "AddMds" | "RemoveMds") => peer
            .require("change the MDS membership (admin only)", |i: &Identity| {
                i.is_admin() || i.is_mds()
            }),
        ("avalon.v1.Raft", _) => peer.require("send Raft messages (MDS only)", Identity::is_mds),
        ("avalon.v1.Meta", "SetClientCaps" | "ListClientCaps") => peer.require(
            "change or list client capabilities (admin only)",
            Identity::is_admin,
        ),
        ("avalon.v1.Meta", "TrashList" | "TrashRestore" | "TrashPurge") => peer.require(
            "list, restore or purge the trash (admin only)",
            Identity::is_admin,
        ),
        ("avalon.v1.Meta", "SetOsdState" | "SetReplicas") => peer.require(
            "change OSD states or cluster settings (admin only)",
            Identity::is_admin,
        ),
        ("avalon.v1.Meta", "RegisterOsd" | "OsdHeartbeat") => peer.require(
            "register or heartbeat as an OSD (osd.N only)",
            |i: &Identity| i.osd_id().is_some(),
        ),
        _ => peer.require("use this cluster", |_| true),
    }
}

/// An OSD may speak only for the id in its certificate (`osd.N`), and may
/// not ask for a new one (id 0).
pub fn osd_claim<T>(req: &Request<T>, claimed: u64) -> Result<(), Status> {
    let peer = Peer::of(req);
    peer.require("speak for another OSD's id", |i: &Identity| {
        i.osd_id() == Some(claimed)
    })
    .map_err(|e| {
        Status::permission_denied(format!(
            "{}: the request claims OSD id {claimed}",
            e.message()
        ))
    })
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
        let vote = "/avalon.v1.Raft/Vote";
        assert!(policy(vote, &peer("mds.2")).is_ok());
        assert_eq!(
            policy(vote, &peer("client.admin"))
                .expect_err("client")
                .code(),
            tonic::Code::PermissionDenied
        );
        assert!(policy("/avalon.v1.Raft/AddMds", &peer("client.admin")).is_ok());
        assert!(policy("/avalon.v1.Raft/AddMds", &peer("client.x")).is_err());
        assert!(policy("/avalon.v1.Meta/SetOsdState", &peer("osd.1")).is_err());
        assert!(policy("/avalon.v1.Meta/SetReplicas", &peer("client.admin")).is_ok());
        assert!(policy("/avalon.v1.Meta/RegisterOsd", &peer("client.x")).is_err());
        assert!(policy("/avalon.v1.Meta/RegisterOsd", &peer("osd.4")).is_ok());
        assert!(policy("/avalon.v1.Meta/Lookup", &peer("client.x")).is_ok());
        assert!(policy("/avalon.v1.Meta/SetClientCaps", &peer("client.x")).is_err());
        assert!(policy("/avalon.v1.Meta/SetClientCaps", &peer("client.admin")).is_ok());
        assert!(policy("/avalon.v1.Meta/TrashRestore", &peer("client.x")).is_err());
        assert!(policy("/avalon.v1.Meta/TrashPurge", &peer("client.admin")).is_ok());
        assert!(policy(vote, &Peer::default()).is_ok(), "insecure");
    }

    #[test]
    fn osd_claims_only_its_own_id() {
        let mut r = Request::new(());
        r.extensions_mut().insert(peer("osd.3"));
        assert!(osd_claim(&r, 3).is_ok());
        assert!(osd_claim(&r, 4).is_err());
        assert!(osd_claim(&r, 0).is_err());
    }
}
