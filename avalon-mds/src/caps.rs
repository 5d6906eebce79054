//! Client capabilities (`avalonctl auth add|caps|rm`): what each client
//! identity may do, kept in the replicated state ([`ClientTable`]) so that
//! every MDS enforces the same table and an admin changes it with one raft
//! entry. [`check`] refuses, before any handler runs, every request of
//! a revoked identity and every namespace change of a read-only one; the
//! handlers apply what needs the request body (write opens, root_squash,
//! the subtree of the mount's root, session ownership).
//!
//! An identity without an entry has full access: the keys made before
//! capabilities existed, the local clusters and the test clusters all use
//! such keys, and `auth add` without capability flags keeps doing what it
//! did. Admin, MDS and OSD identities are never limited here (their roles
//! are `authz.rs`'s business), nor are plaintext (`insecure`) connections.

use crate::node::MdsNode;
use avalon_proto::pb;
use avalon_proto::tls::{Identity, Peer, ADMIN_NAME};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use tonic::Status;

/// The unprivileged uid/gid root is squashed to by default (nobody).
pub const NOBODY: u32 = 65534;

/// One client identity's capabilities.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCaps {
    /// Subtree the identity is confined to ("" or "/": all).
    pub path: String,
    /// Refuse every change with EROFS.
    pub read_only: bool,
    /// uid 0 / gid 0 in requests become `squash_uid` / `squash_gid`.
    pub root_squash: bool,
    pub squash_uid: u32,
    pub squash_gid: u32,
    /// Refuse everything; the identity's sessions are dropped.
    pub revoked: bool,
}

impl ClientCaps {
    /// From the wire form (0 squash ids mean nobody).
    pub fn from_pb(c: &pb::ClientCaps) -> ClientCaps {
        ClientCaps {
            path: c.path.clone(),
            read_only: c.read_only,
            root_squash: c.root_squash,
            squash_uid: if c.squash_uid == 0 {
                NOBODY
            } else {
                c.squash_uid
            },
            squash_gid: if c.squash_gid == 0 {
                NOBODY
            } else {
                c.squash_gid
            },
            revoked: c.revoked,
        }
    }

    /// The wire form, named.
    pub fn to_pb(&self, name: &str) -> pb::ClientCaps {
        pb::ClientCaps {
            name: name.to_string(),
            path: self.path.clone(),
            read_only: self.read_only,
            root_squash: self.root_squash,
            squash_uid: self.squash_uid,
            squash_gid: self.squash_gid,
            revoked: self.revoked,
        }
    }

    /// True when confined to a subtree below the root.
    pub fn confined(&self) -> bool {
        self.path.split('/').any(|c| !c.is_empty() && c != ".")
    }

    /// A request's uid after root_squash.
    pub fn uid(&self, uid: u32) -> u32 {
        if self.root_squash && uid == 0 {
            self.squash_uid
        } else {
            uid
        }
    }

    /// A request's gid after root_squash.
    pub fn gid(&self, gid: u32) -> u32 {
        if self.root_squash && gid == 0 {
            self.squash_gid
        } else {
            gid
        }
    }
}

/// The replicated table: capabilities by identity name, and which identity
/// opened each session (a session id is usable only by its owner).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTable {
    pub caps: BTreeMap<String, ClientCaps>,
    pub owners: BTreeMap<u64, String>,
}

/// Reads the state's trailing client table; a state written before it
/// existed (postcard, not self-describing) ends there: an empty table.
pub fn absent_as_default<'de, D: Deserializer<'de>>(d: D) -> Result<ClientTable, D::Error> {
    Ok(ClientTable::deserialize(d).unwrap_or_default())
}

/// The client identity a request is limited as: `None` for plaintext
/// connections, the administrator and the daemons.
pub fn client_name(peer: &Peer) -> Option<&str> {
    if !peer.secured {
        return None;
    }
    let i: &Identity = peer.identity.as_ref()?;
    (i.name.starts_with("client.") && i.name != ADMIN_NAME).then_some(i.name.as_str())
}

/// The capabilities that limit `peer` now (`None`: full access).
pub fn of_peer(node: &MdsNode, peer: &Peer) -> Option<ClientCaps> {
    let name = client_name(peer)?;
    node.read_local(|s| s.clients.caps.get(name).cloned())
}

/// Meta methods that change the namespace or file data's metadata; a
/// read-only identity gets EROFS for each. SetAttr (atime updates of
/// reads pass) and Open (reads pass) are judged by their handlers.
const CHANGES: &[&str] = &[
    "Mknod",
    "Mkdir",
    "Symlink",
    "Unlink",
    "Rmdir",
    "Link",
    "Rename",
    "SetXattr",
    "RemoveXattr",
    "CommitWrite",
    "AppendWrite",
];

/// The refusal of a request by `name` with `caps` to `method` of Meta, if
/// any.
pub fn refusal(name: &str, caps: &ClientCaps, method: &str) -> Option<Status> {
    if caps.revoked {
        return Some(Status::permission_denied(format!(
            "the key of {name} was revoked (avalonctl auth rm)"
        )));
    }
    // Delegated changes are applied without the checks below (their
    // creates carry ids and parents the handlers would judge): a limited
    // identity makes its changes synchronously.
    if method == "Delegate" || method == "Apply" {
        return Some(avalon_proto::errno::status(
            libc::EOPNOTSUPP,
            format!("{name} has a limited key: no write delegations"),
        ));
    }
    if caps.read_only && CHANGES.contains(&method) {
        return Some(avalon_proto::errno::status(
            libc::EROFS,
            format!("{name} has a read-only key"),
        ));
    }
    None
}

/// The policy (for [`avalon_proto::tls::AuthzLayer`]) that applies
/// [`refusal`] to every Meta request of a client identity.
pub fn check(node: &MdsNode, path: &str, peer: &Peer) -> Result<(), Status> {
    let refused = match (path.strip_prefix("/avalon.v1.Meta/"), client_name(peer)) {
        (Some(method), Some(name)) => {
            of_peer(node, peer).and_then(|caps| refusal(name, &caps, method))
        }
        _ => None,
    };
    refused.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals() {
        let ro = ClientCaps {
            read_only: true,
            ..ClientCaps::default()
        };
        assert!(refusal("client.a", &ro, "Lookup").is_none());
        let st = refusal("client.a", &ro, "Rename").expect("refused");
        assert_eq!(avalon_proto::errno::errno_of(&st), libc::EROFS);
        let gone = ClientCaps {
            revoked: true,
            ..ClientCaps::default()
        };
        let st = refusal("client.a", &gone, "Lookup").expect("refused");
        assert_eq!(st.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn limited_keys_get_no_delegations() {
        // Delegated changes are checked by the client's kernel only: a
        // squashed key must make every change through the MDS's check.
        let sq = ClientCaps {
            root_squash: true,
            ..ClientCaps::default()
        };
        for m in ["Delegate", "Apply"] {
            let st = refusal("client.a", &sq, m).expect("refused");
            assert_eq!(avalon_proto::errno::errno_of(&st), libc::EOPNOTSUPP, "{m}");
        }
        assert!(refusal("client.a", &sq, "Mkdir").is_none());
    }

    #[test]
    fn squash() {
        let c = ClientCaps::from_pb(&pb::ClientCaps {
            root_squash: true,
            path: "/projects/x".into(),
            ..Default::default()
        });
        assert_eq!((c.uid(0), c.gid(0), c.uid(7)), (NOBODY, NOBODY, 7));
        assert!(c.confined());
        assert!(!ClientCaps::default().confined());
    }
}
