//! The MDS side: which session holds which rights on which inode, who is
//! waiting for what, and the revokes under way. It decides grants,
//! revokes conflicting holders first, applies a holder's own changes at
//! once and queues everyone else's behind the revokes they need, and ends
//! sessions whose lease ran out (which ends their revokes too).
//!
//! Per inode, waiters are served in arrival order: a waiter is served once
//! no *other* live session holds a right conflicting with what it needs,
//! so a stream of shared requests cannot starve an exclusive one.

use crate::msg::{InoRange, ToClient, ToMds};
use crate::rights::{Right, Rights};
use crate::{Ino, Millis, SessionId};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// What the MDS shell must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MdsCmd {
    /// Send `msg` to `session` (grants: with the state they let it cache,
    /// read now).
    Send {
        /// The session.
        session: SessionId,
        /// The message.
        msg: ToClient,
    },
    /// Apply change `req` of `session` (held by the shell) and answer it.
    Apply {
        /// The session.
        session: SessionId,
        /// The shell's id of the change.
        req: u64,
        /// The inode it changes.
        ino: Ino,
    },
    /// Refuse change `req`: its session has ended.
    Reject {
        /// The session.
        session: SessionId,
        /// The shell's id of the change.
        req: u64,
    },
    /// The session's lease ran out: its rights, reservations and waiters
    /// are gone, and so is whatever it buffered and had not sent.
    Ended {
        /// The session.
        session: SessionId,
    },
}

/// What a waiter needs before it is served.
#[derive(Clone, Copy, Debug)]
enum Need {
    /// Rights to grant.
    Grant(Rights),
    /// A change of a session that does not hold `aspect`: applied once
    /// nobody else holds anything conflicting with `aspect`.
    Change { req: u64, aspect: Right },
}

impl Need {
    fn rights(self) -> Rights {
        match self {
            Need::Grant(r) => r,
            Need::Change { aspect, .. } => aspect.set(),
        }
    }
}

#[derive(Debug)]
struct Waiter {
    session: SessionId,
    need: Need,
}

#[derive(Debug, Default)]
struct Holder {
    rights: Rights,
    /// Rights asked back and not yet acknowledged.
    revoking: Rights,
}

#[derive(Debug, Default)]
struct InodeCaps {
    holders: BTreeMap<SessionId, Holder>,
    waiters: VecDeque<Waiter>,
}

/// One revoke under way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevokeState {
    /// The holder.
    pub session: SessionId,
    /// The inode.
    pub ino: Ino,
    /// The rights asked back.
    pub rights: Rights,
    /// When it was sent.
    pub sent_at: Millis,
}

/// The MDS's capability engine.
#[derive(Debug)]
pub struct Mds {
    lease_ms: Millis,
    reserve: u64,
    next_ino: Ino,
    /// Live sessions and when their lease ends (counted from the receipt
    /// of their last renewal).
    sessions: BTreeMap<SessionId, Millis>,
    ended: BTreeSet<SessionId>,
    inodes: BTreeMap<Ino, InodeCaps>,
    revokes: BTreeMap<u64, RevokeState>,
    next_revoke: u64,
    reserved: BTreeMap<SessionId, Vec<InoRange>>,
}

impl Mds {
    /// An engine granting leases of `lease_ms`, reserving `reserve` inode
    /// numbers at a time from `first_ino` on.
    pub fn new(lease_ms: Millis, reserve: u64, first_ino: Ino) -> Mds {
        Mds {
            lease_ms,
            reserve,
            next_ino: first_ino,
            sessions: BTreeMap::new(),
            ended: BTreeSet::new(),
            inodes: BTreeMap::new(),
            revokes: BTreeMap::new(),
            next_revoke: 1,
            reserved: BTreeMap::new(),
        }
    }

    /// A message from `session`.
    pub fn on_message(&mut self, session: SessionId, msg: ToMds, now: Millis) -> Vec<MdsCmd> {
        let mut out = Vec::new();
        match msg {
            ToMds::Open { sent_at } if !self.ended.contains(&session) => {
                let until = self.sessions.entry(session).or_insert(0);
                *until = (*until).max(now + self.lease_ms);
                out.push(send(session, ToClient::Renewed { sent_at }));
            }
            ToMds::Renew { sent_at } if self.is_live(session) => {
                let until = self.sessions.get_mut(&session).expect("live");
                *until = (*until).max(now + self.lease_ms);
                out.push(send(session, ToClient::Renewed { sent_at }));
            }
            ToMds::Request { ino, want } if self.is_live(session) => {
                self.inode(ino).waiters.push_back(Waiter {
                    session,
                    need: Need::Grant(want),
                });
                self.serve(ino, now, &mut out);
            }
            ToMds::RevokeAck { ino, id } if self.is_live(session) => {
                if let Some(r) = self.revokes.get(&id).copied() {
                    if r.session == session && r.ino == ino {
                        self.revokes.remove(&id);
                        if let Some(h) = self.inode(ino).holders.get_mut(&session) {
                            h.rights = h.rights.minus(r.rights);
                            h.revoking = h.revoking.minus(r.rights);
                        }
                        self.serve(ino, now, &mut out);
                    }
                }
            }
            _ => out.push(send(session, ToClient::Unknown)),
        }
        out
    }

    /// A change of `session` to `ino` arrived, touching the state that
    /// `aspect` (an exclusive right) covers. A holder of `aspect` is
    /// applied at once (it is flushing what it buffered); anyone else
    /// waits until no other session holds a conflicting right.
    pub fn on_change(
        &mut self,
        session: SessionId,
        req: u64,
        ino: Ino,
        aspect: Right,
        now: Millis,
    ) -> Vec<MdsCmd> {
        let mut out = Vec::new();
        if !self.is_live(session) {
            out.push(MdsCmd::Reject { session, req });
            return out;
        }
        if self.held(session, ino).has(aspect) {
            out.push(MdsCmd::Apply { session, req, ino });
            return out;
        }
        self.inode(ino).waiters.push_back(Waiter {
            session,
            need: Need::Change { req, aspect },
        });
        self.serve(ino, now, &mut out);
        out
    }

    /// Time passed: end the sessions whose lease ran out.
    pub fn tick(&mut self, now: Millis) -> Vec<MdsCmd> {
        let mut out = Vec::new();
        let expired: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, until)| now > **until)
            .map(|(s, _)| *s)
            .collect();
        for s in expired {
            self.end(s, &mut out);
        }
        if !out.is_empty() {
            let inos: Vec<Ino> = self.inodes.keys().copied().collect();
            for ino in inos {
                self.serve(ino, now, &mut out);
            }
        }
        out
    }

    /// A fresh inode number (for a create the MDS makes itself).
    pub fn alloc_ino(&mut self) -> Ino {
        self.next_ino += 1;
        self.next_ino - 1
    }

    /// Whether `ino` was reserved for `session` (a create it made under a
    /// delegation may use it).
    pub fn reserved_for(&self, session: SessionId, ino: Ino) -> bool {
        self.reserved.get(&session).is_some_and(|rs| {
            rs.iter()
                .any(|r| (r.start..r.start + r.count).contains(&ino))
        })
    }

    /// The rights `session` holds on `ino` (as far as the MDS knows: the
    /// client may already have dropped some).
    pub fn held(&self, session: SessionId, ino: Ino) -> Rights {
        self.inodes
            .get(&ino)
            .and_then(|i| i.holders.get(&session))
            .map_or(Rights::NONE, |h| h.rights)
    }

    /// Whether `session` is live.
    pub fn is_live(&self, session: SessionId) -> bool {
        self.sessions.contains_key(&session)
    }

    /// The revokes under way, by id.
    pub fn revokes(&self) -> impl Iterator<Item = (u64, &RevokeState)> {
        self.revokes.iter().map(|(id, r)| (*id, r))
    }

    /// How many requests and changes wait for revokes.
    pub fn waiting(&self) -> usize {
        self.inodes.values().map(|i| i.waiters.len()).sum()
    }

    fn inode(&mut self, ino: Ino) -> &mut InodeCaps {
        self.inodes.entry(ino).or_default()
    }

    fn end(&mut self, session: SessionId, out: &mut Vec<MdsCmd>) {
        self.sessions.remove(&session);
        self.ended.insert(session);
        self.reserved.remove(&session);
        self.revokes.retain(|_, r| r.session != session);
        for i in self.inodes.values_mut() {
            i.holders.remove(&session);
            i.waiters.retain(|w| w.session != session);
        }
        out.push(MdsCmd::Ended { session });
    }

    /// Serves the waiters of `ino` in order, revoking what the first one
    /// that cannot be served yet needs.
    fn serve(&mut self, ino: Ino, now: Millis, out: &mut Vec<MdsCmd>) {
        loop {
            let Some(head) = self.inodes.get(&ino).and_then(|i| i.waiters.front()) else {
                return;
            };
            let (session, need) = (head.session, head.need);
            let wanted = need.rights();
            let caps = self.inodes.get(&ino).expect("has waiters");
            let conflicts: Vec<(SessionId, Rights)> = caps
                .holders
                .iter()
                .filter(|(s, _)| **s != session)
                .map(|(s, h)| {
                    (
                        *s,
                        plant_filter(Rights::conflicting(h.rights, wanted), need),
                    )
                })
                .filter(|(_, c)| !c.is_empty())
                .collect();
            if conflicts.is_empty() {
                self.inode(ino).waiters.pop_front();
                match need {
                    Need::Grant(want) => self.grant(session, ino, want, out),
                    Need::Change { req, .. } => out.push(MdsCmd::Apply { session, req, ino }),
                }
                continue;
            }
            for (holder, rights) in conflicts {
                let h = self.inode(ino).holders.get_mut(&holder).expect("holder");
                let fresh = rights.minus(h.revoking);
                if fresh.is_empty() {
                    continue;
                }
                h.revoking = h.revoking.union(fresh);
                let id = self.next_revoke;
                self.next_revoke += 1;
                self.revokes.insert(
                    id,
                    RevokeState {
                        session: holder,
                        ino,
                        rights: fresh,
                        sent_at: now,
                    },
                );
                out.push(send(
                    holder,
                    ToClient::Revoke {
                        ino,
                        rights: fresh,
                        id,
                    },
                ));
            }
            return;
        }
    }

    fn grant(&mut self, session: SessionId, ino: Ino, want: Rights, out: &mut Vec<MdsCmd>) {
        let h = self.inode(ino).holders.entry(session).or_default();
        h.rights = h.rights.union(want);
        // A revoke of these rights still on its way was overtaken: the
        // client drops them before it reads this grant (one ordered
        // stream), so its ack must not take them away here.
        h.revoking = h.revoking.minus(want);
        for r in self.revokes.values_mut() {
            if r.session == session && r.ino == ino {
                r.rights = r.rights.minus(want);
            }
        }
        let reserved = want.has(Right::Delegation).then(|| {
            let r = InoRange {
                start: self.next_ino,
                count: self.reserve,
            };
            self.next_ino += self.reserve;
            self.reserved.entry(session).or_default().push(r);
            r
        });
        out.push(send(
            session,
            ToClient::Grant {
                ino,
                rights: want,
                reserved,
            },
        ));
    }
}

/// The planted bug `plant-grant-without-revoke` asks back only exclusive
/// rights when granting (shared holders keep theirs); without it, every
/// conflict counts.
fn plant_filter(conflicts: Rights, need: Need) -> Rights {
    if cfg!(feature = "plant-grant-without-revoke") && matches!(need, Need::Grant(_)) {
        conflicts.intersect(Rights::EXCLUSIVE)
    } else {
        conflicts
    }
}

fn send(session: SessionId, msg: ToClient) -> MdsCmd {
    MdsCmd::Send { session, msg }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Right::*;

    fn open(m: &mut Mds, s: SessionId) {
        m.on_message(s, ToMds::Open { sent_at: 0 }, 0);
    }

    /// Session `s` asks for `want` on inode 5 at `now`.
    fn request(m: &mut Mds, s: SessionId, want: Rights, now: Millis) -> Vec<MdsCmd> {
        m.on_message(s, ToMds::Request { ino: 5, want }, now)
    }

    fn grants(out: &[MdsCmd]) -> Vec<(SessionId, Rights)> {
        out.iter()
            .filter_map(|c| match c {
                MdsCmd::Send {
                    session,
                    msg: ToClient::Grant { rights, .. },
                } => Some((*session, *rights)),
                _ => None,
            })
            .collect()
    }

    fn revokes(out: &[MdsCmd]) -> Vec<(SessionId, Rights, u64)> {
        out.iter()
            .filter_map(|c| match c {
                MdsCmd::Send {
                    session,
                    msg: ToClient::Revoke { rights, id, .. },
                } => Some((*session, *rights, *id)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn shared_rights_are_granted_together() {
        let mut m = Mds::new(1000, 16, 100);
        open(&mut m, 1);
        open(&mut m, 2);
        let want = Rights::of(&[AttrShared, DataCache]);
        let a = request(&mut m, 1, want, 1);
        let b = request(&mut m, 2, want, 1);
        assert_eq!(grants(&a), vec![(1, want)]);
        assert_eq!(grants(&b), vec![(2, want)]);
    }

    #[cfg(not(feature = "plant-grant-without-revoke"))]
    #[test]
    fn exclusive_request_revokes_shared_holders_and_waits_for_the_ack() {
        let mut m = Mds::new(1000, 16, 100);
        open(&mut m, 1);
        open(&mut m, 2);
        let shared = Rights::of(&[AttrShared, DataCache]);
        request(&mut m, 1, shared, 1);
        let out = request(&mut m, 2, DataBuffer.into(), 2);
        assert!(grants(&out).is_empty());
        let rv = revokes(&out);
        assert_eq!(rv.len(), 1);
        assert_eq!((rv[0].0, rv[0].1), (1, shared));
        assert_eq!(m.revokes().count(), 1);
        // A second request meanwhile queues behind, no second revoke.
        let out = request(&mut m, 2, AttrShared.into(), 3);
        assert!(out.is_empty());
        let out = m.on_message(
            1,
            ToMds::RevokeAck {
                ino: 5,
                id: rv[0].2,
            },
            4,
        );
        assert_eq!(
            grants(&out),
            vec![(2, DataBuffer.into()), (2, AttrShared.into())]
        );
        assert_eq!(m.held(1, 5), Rights::NONE);
        assert_eq!(m.revokes().count(), 0);
    }

    #[test]
    fn holder_changes_apply_at_once_others_wait_for_revokes() {
        let mut m = Mds::new(1000, 16, 100);
        open(&mut m, 1);
        open(&mut m, 2);
        request(&mut m, 1, DataBuffer.into(), 1);
        assert_eq!(
            m.on_change(1, 7, 5, DataBuffer, 2),
            vec![MdsCmd::Apply {
                session: 1,
                req: 7,
                ino: 5
            }]
        );
        let out = m.on_change(2, 8, 5, DataBuffer, 3);
        assert_eq!(revokes(&out).len(), 1);
        assert!(!out.iter().any(|c| matches!(c, MdsCmd::Apply { .. })));
        // The holder flushes (applied at once), then acks.
        assert!(matches!(
            m.on_change(1, 9, 5, DataBuffer, 4)[..],
            [MdsCmd::Apply { req: 9, .. }]
        ));
        let id = revokes(&out)[0].2;
        let out = m.on_message(1, ToMds::RevokeAck { ino: 5, id }, 5);
        assert_eq!(
            out,
            vec![MdsCmd::Apply {
                session: 2,
                req: 8,
                ino: 5
            }]
        );
    }

    #[test]
    fn lease_expiry_ends_the_holder_and_its_revokes() {
        let mut m = Mds::new(1000, 16, 100);
        open(&mut m, 1);
        m.on_message(2, ToMds::Open { sent_at: 500 }, 500);
        request(&mut m, 1, Listing.into(), 1);
        let out = request(&mut m, 2, Delegation.into(), 600);
        assert_eq!(revokes(&out).len(), 1);
        assert!(m.tick(1000).is_empty());
        let out = m.tick(1001);
        assert_eq!(out[0], MdsCmd::Ended { session: 1 });
        let g: Vec<_> = out
            .iter()
            .filter_map(|c| match c {
                MdsCmd::Send {
                    session: 2,
                    msg: ToClient::Grant { reserved, .. },
                } => *reserved,
                _ => None,
            })
            .collect();
        assert_eq!(
            g,
            vec![InoRange {
                start: 100,
                count: 16
            }]
        );
        assert!(m.reserved_for(2, 115) && !m.reserved_for(2, 116));
        assert_eq!(m.revokes().count(), 0);
        // The ended session stays ended.
        assert_eq!(
            m.on_message(1, ToMds::Renew { sent_at: 1 }, 1002),
            vec![send(1, ToClient::Unknown)]
        );
        assert_eq!(
            m.on_change(1, 3, 5, AttrExcl, 1002),
            vec![MdsCmd::Reject { session: 1, req: 3 }]
        );
    }

    #[test]
    fn renewal_extends_from_receipt() {
        let mut m = Mds::new(1000, 16, 100);
        open(&mut m, 1);
        m.on_message(1, ToMds::Renew { sent_at: 800 }, 900);
        assert!(m.tick(1800).is_empty());
        assert_eq!(m.tick(1901), vec![MdsCmd::Ended { session: 1 }]);
    }

    #[cfg(not(feature = "plant-grant-without-revoke"))]
    #[test]
    fn a_grant_overtaking_a_revoke_is_not_taken_back_by_its_ack() {
        let mut m = Mds::new(1000, 16, 100);
        open(&mut m, 1);
        open(&mut m, 2);
        request(&mut m, 1, DataCache.into(), 1);
        let out = request(&mut m, 2, DataBuffer.into(), 1);
        let id = revokes(&out)[0].2;
        // Session 2 ends before 1 acks; 1 asks for DataCache again.
        m.sessions.insert(2, 0);
        m.tick(2);
        let out = request(&mut m, 1, DataCache.into(), 3);
        assert_eq!(grants(&out), vec![(1, DataCache.into())]);
        m.on_message(1, ToMds::RevokeAck { ino: 5, id }, 4);
        assert_eq!(m.held(1, 5), DataCache.into());
    }
}
