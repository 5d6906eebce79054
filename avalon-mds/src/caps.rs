//! Client capabilities (`avalonctl auth add|caps|rm`): what each client
//! identity may do, kept in the replicated state ([`ClientTable`]) so that
//! every MDS enforces the same table and an admin changes it with one raft
//! entry. [`check`] refuses, before any handler runs, every request of
//! a revoked identity and every namespace change of a read-only one; the
//! handlers apply what needs the request body (write opens, root_squash,
//! the subtree of the mount's root, session ownership).
//!
//! A key may also map ids ([`IdMap`], `auth add --map-uid/--map-gid`): the
//! uids and gids its clients report (callers, creates' owners, chown
//! targets, ACL entries) become cluster ids on the way in ([`ClientCaps::uid`],
//! [`ClientCaps::gid`]) and go back on the way out ([`ClientCaps::uid_out`],
//! [`ClientCaps::gid_out`]: attributes and ACLs in replies). The mappings
//! are kept beside the table ([`IdMaps`], a later state field) so that the
//! older encoding of [`ClientCaps`] in snapshots and raft entries stays
//! as it was; [`of_peer`] joins them.
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
    /// The identity's uid/gid mapping: kept in [`IdMaps`] (not encoded
    /// here, so that the older encoding stays), joined by [`of_peer`].
    #[serde(skip)]
    pub ids: IdMap,
}

/// `count` ids from `client` on the client are the ids from `cluster` in
/// the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    pub client: u32,
    pub cluster: u32,
    pub count: u32,
}

impl IdRange {
    /// Refuses an empty range or one past the last id.
    fn check(&self) -> Result<(), String> {
        let fits = |from: u32| u64::from(from) + u64::from(self.count) <= 1 << 32;
        if self.count == 0 || !fits(self.client) || !fits(self.cluster) {
            return Err(format!(
                "bad id range {}:{}:{} (count >= 1, within 32 bits)",
                self.client, self.cluster, self.count
            ));
        }
        Ok(())
    }

    /// `id` translated from the `from` side to the other, if in range.
    fn translate(&self, id: u32, from: u32, to: u32) -> Option<u32> {
        let off = id.checked_sub(from)?;
        (off < self.count).then(|| to.wrapping_add(off))
    }

    fn to_pb(self) -> pb::IdRange {
        pb::IdRange {
            client: self.client,
            cluster: self.cluster,
            count: self.count,
        }
    }

    fn from_pb(r: &pb::IdRange) -> IdRange {
        IdRange {
            client: r.client,
            cluster: r.cluster,
            count: r.count,
        }
    }
}

/// A key's uid and gid mappings; an empty list leaves that kind of id as
/// the client reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    pub uids: Vec<IdRange>,
    pub gids: Vec<IdRange>,
}

impl IdMap {
    /// True when neither uids nor gids are mapped.
    pub fn is_empty(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty()
    }

    /// Refuses bad or overlapping ranges (on either side: each id must map
    /// one way and back to one id).
    pub fn check(&self) -> Result<(), String> {
        for (kind, list) in [("uid", &self.uids), ("gid", &self.gids)] {
            for r in list {
                r.check()?;
            }
            let overlap = |a: u32, b: u32, n: u32, m: u32| {
                u64::from(a) < u64::from(b) + u64::from(m)
                    && u64::from(b) < u64::from(a) + u64::from(n)
            };
            for (i, a) in list.iter().enumerate() {
                for b in &list[i + 1..] {
                    if overlap(a.client, b.client, a.count, b.count)
                        || overlap(a.cluster, b.cluster, a.count, b.count)
                    {
                        return Err(format!(
                            "{kind} ranges {}:{}:{} and {}:{}:{} overlap",
                            a.client, a.cluster, a.count, b.client, b.cluster, b.count
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The client id `id` as a cluster id, if `list` maps it.
fn map_in(list: &[IdRange], id: u32) -> Option<u32> {
    list.iter()
        .find_map(|r| r.translate(id, r.client, r.cluster))
}

/// The cluster id `id` as a client id, if `list` maps it.
fn map_out(list: &[IdRange], id: u32) -> Option<u32> {
    list.iter()
        .find_map(|r| r.translate(id, r.cluster, r.client))
}

/// The mappings by identity name (a state field of its own: see the
/// module's comment).
pub type IdMaps = BTreeMap<String, IdMap>;

/// Reads the state's trailing mappings; a state written before they
/// existed ends before them: none.
pub fn absent_maps_as_default<'de, D: Deserializer<'de>>(d: D) -> Result<IdMaps, D::Error> {
    Ok(IdMaps::deserialize(d).unwrap_or_default())
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
            ids: IdMap {
                uids: c.uid_map.iter().map(IdRange::from_pb).collect(),
                gids: c.gid_map.iter().map(IdRange::from_pb).collect(),
            },
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
            uid_map: self.ids.uids.iter().map(|r| r.to_pb()).collect(),
            gid_map: self.ids.gids.iter().map(|r| r.to_pb()).collect(),
        }
    }

    /// True when confined to a subtree below the root.
    pub fn confined(&self) -> bool {
        self.path.split('/').any(|c| !c.is_empty() && c != ".")
    }

    /// A uid the client reported, as a cluster uid: root_squash, then the
    /// mapping (an unmapped uid is the squash uid).
    pub fn uid(&self, uid: u32) -> u32 {
        if self.root_squash && uid == 0 {
            return self.squash_uid;
        }
        if self.ids.uids.is_empty() {
            return uid;
        }
        map_in(&self.ids.uids, uid).unwrap_or(self.squash_uid)
    }

    /// A gid the client reported, as a cluster gid (see [`Self::uid`]).
    pub fn gid(&self, gid: u32) -> u32 {
        if self.root_squash && gid == 0 {
            return self.squash_gid;
        }
        if self.ids.gids.is_empty() {
            return gid;
        }
        map_in(&self.ids.gids, gid).unwrap_or(self.squash_gid)
    }

    /// A cluster uid as the client sees it: mapped back (an id outside the
    /// mapping shows as the squash uid).
    pub fn uid_out(&self, uid: u32) -> u32 {
        if self.ids.uids.is_empty() {
            return uid;
        }
        map_out(&self.ids.uids, uid).unwrap_or(self.squash_uid)
    }

    /// A cluster gid as the client sees it (see [`Self::uid_out`]).
    pub fn gid_out(&self, gid: u32) -> u32 {
        if self.ids.gids.is_empty() {
            return gid;
        }
        map_out(&self.ids.gids, gid).unwrap_or(self.squash_gid)
    }

    /// Whether ids are mapped (replies need translating back).
    pub fn maps(&self) -> bool {
        !self.ids.is_empty()
    }
}

/// A POSIX ACL xattr value (`acl.rs`) with the ids of its named user and
/// group entries translated for `c`: client to cluster ids if `inbound`,
/// else back. `None` when nothing changes (no mapping, not an ACL, or
/// malformed: the operation judges it as it is).
pub fn map_acl(c: &ClientCaps, name: &[u8], value: &[u8], inbound: bool) -> Option<Vec<u8>> {
    if !c.maps() || (name != crate::acl::ACCESS && name != crate::acl::DEFAULT) {
        return None;
    }
    let mut entries = crate::acl::parse(value)?;
    for e in &mut entries {
        e.2 = match (e.0, inbound) {
            (crate::acl::USER, true) => c.uid(e.2),
            (crate::acl::USER, false) => c.uid_out(e.2),
            (crate::acl::GROUP, true) => c.gid(e.2),
            (crate::acl::GROUP, false) => c.gid_out(e.2),
            _ => e.2,
        };
    }
    Some(crate::acl::encode(&entries))
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
    node.read_local(|s| joined(s, name))
}

/// `name`'s capabilities in `s` with its mapping joined.
pub fn joined(s: &crate::namespace::State, name: &str) -> Option<ClientCaps> {
    let mut c = s.clients.caps.get(name).cloned()?;
    if let Some(m) = s.id_maps.get(name) {
        c.ids = m.clone();
    }
    Some(c)
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

    fn range(client: u32, cluster: u32, count: u32) -> IdRange {
        IdRange {
            client,
            cluster,
            count,
        }
    }

    fn mapped() -> ClientCaps {
        let mut c = ClientCaps::from_pb(&pb::ClientCaps::default());
        c.ids = IdMap {
            uids: vec![range(1000, 5000, 10), range(0, 0, 1)],
            gids: vec![range(100, 6000, 1)],
        };
        c
    }

    #[test]
    fn mapping_in_and_out() {
        let c = mapped();
        assert!(c.maps());
        // In range: offset kept; ranges of one.
        assert_eq!((c.uid(1000), c.uid(1009), c.uid(0)), (5000, 5009, 0));
        assert_eq!(c.gid(100), 6000);
        // Outside: the squash ids.
        assert_eq!((c.uid(1010), c.uid(999)), (NOBODY, NOBODY));
        assert_eq!(c.gid(0), NOBODY, "gid 0 is not mapped");
        // Back out, and unmapped cluster ids show as the squash ids.
        assert_eq!(
            (c.uid_out(5000), c.uid_out(5009), c.uid_out(0)),
            (1000, 1009, 0)
        );
        assert_eq!(
            (c.uid_out(5010), c.gid_out(6000), c.gid_out(7)),
            (NOBODY, 100, NOBODY)
        );
        for u in [0, 1000, 1005, 1009] {
            assert_eq!(c.uid_out(c.uid(u)), u, "round trip {u}");
        }
        // root_squash comes first: a mapped 0 is still squashed.
        let sq = ClientCaps {
            root_squash: true,
            ..mapped()
        };
        assert_eq!(sq.uid(0), NOBODY);
        // Only uids mapped: gids pass as they are.
        let mut u_only = mapped();
        u_only.ids.gids.clear();
        assert_eq!((u_only.gid(42), u_only.gid_out(42)), (42, 42));
        // No mapping: nothing changes.
        let plain = ClientCaps::default();
        assert!(!plain.maps());
        assert_eq!((plain.uid(7), plain.uid_out(7)), (7, 7));
    }

    #[test]
    fn mapping_ranges_are_checked() {
        assert!(mapped().ids.check().is_ok());
        let bad = |uids: Vec<IdRange>| IdMap { uids, gids: vec![] }.check().is_err();
        assert!(bad(vec![range(1, 1, 0)]), "empty");
        assert!(bad(vec![range(u32::MAX, 1, 2)]), "past the last id");
        assert!(
            bad(vec![range(10, 100, 5), range(14, 200, 1)]),
            "client overlap"
        );
        assert!(
            bad(vec![range(10, 100, 5), range(20, 104, 1)]),
            "cluster overlap"
        );
        assert!(!bad(vec![range(10, 100, 5), range(15, 105, 1)]));
        assert!(!bad(vec![range(u32::MAX, 7, 1)]));
        // The wire form keeps the ranges.
        let c = mapped();
        assert_eq!(ClientCaps::from_pb(&c.to_pb("client.m")).ids, c.ids);
    }

    #[test]
    fn acl_entries_are_mapped_both_ways() {
        use crate::acl::{encode, parse, ACCESS, GROUP, GROUP_OBJ, MASK, OTHER, USER, USER_OBJ};
        let c = mapped();
        let client = encode(&[
            (USER_OBJ, 6, u32::MAX),
            (USER, 6, 1003),
            (GROUP_OBJ, 4, u32::MAX),
            (GROUP, 4, 100),
            (MASK, 6, u32::MAX),
            (OTHER, 0, u32::MAX),
        ]);
        let stored = map_acl(&c, ACCESS, &client, true).expect("mapped");
        let e = parse(&stored).unwrap();
        assert_eq!((e[1].2, e[3].2), (5003, 6000));
        assert_eq!(e[0].2, u32::MAX, "USER_OBJ has no id");
        assert_eq!(map_acl(&c, ACCESS, &stored, false), Some(client.clone()));
        assert!(map_acl(&c, b"user.x", &client, true).is_none());
        assert!(map_acl(&ClientCaps::default(), ACCESS, &client, true).is_none());
        assert!(map_acl(&c, ACCESS, b"junk", true).is_none());
    }

    #[test]
    fn mappings_stay_out_of_the_caps_encoding() {
        // Snapshots and raft entries encode ClientCaps as before: the
        // mapping lives in State::id_maps.
        let plain = ClientCaps::from_pb(&pb::ClientCaps::default());
        let mut with = plain.clone();
        with.ids = mapped().ids;
        assert_eq!(
            postcard::to_allocvec(&plain).unwrap(),
            postcard::to_allocvec(&with).unwrap()
        );
    }

    #[test]
    fn mappings_are_replicated_beside_the_table_and_older_states_load() {
        use crate::command::{MetaCommand, Op};
        use crate::namespace::State;
        let apply = |s: &mut State, op: Op| {
            let r = s.apply(&MetaCommand {
                now_ns: 1,
                session_id: 0,
                request_id: 0,
                op,
            });
            assert!(r.0.is_ok(), "{r:?}");
        };
        let mut s = State::new();
        let caps = ClientCaps::from_pb(&pb::ClientCaps::default());
        apply(
            &mut s,
            Op::SetClientCapsMapped {
                name: "client.m".into(),
                caps: Some(caps.clone()),
                ids: mapped().ids,
            },
        );
        assert_eq!(s.clients.caps.get("client.m"), Some(&caps));
        assert_eq!(s.id_maps.get("client.m"), Some(&mapped().ids));
        // A state (snapshot) keeps them; one written before the field
        // existed ends before it and loads without any.
        let bytes = postcard::to_allocvec(&s).unwrap();
        assert_eq!(postcard::from_bytes::<State>(&bytes).unwrap(), s);
        let mut old = s.clone();
        old.id_maps.clear();
        let old_bytes = postcard::to_allocvec(&old).unwrap();
        let before_field = &old_bytes[..old_bytes.len() - 1];
        assert_eq!(postcard::from_bytes::<State>(before_field).unwrap(), old);
        // Dropping the caps (or setting them without ranges) drops them.
        apply(
            &mut s,
            Op::SetClientCaps {
                name: "client.m".into(),
                caps: None,
            },
        );
        assert!(s.id_maps.is_empty() && s.clients.caps.is_empty());
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
