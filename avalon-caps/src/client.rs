//! The client side: per inode the rights this session holds and what it
//! has changed locally under them (dirty), its lease (counted from the
//! sending of the renewal the MDS answered, so it ends before the MDS's
//! view of it), and for each operation whether it is answered locally or
//! what must be sent first. A revoke flushes what is dirty, THEN drops
//! the rights, THEN acknowledges.

use crate::msg::{InoRange, ToClient, ToMds};
use crate::rights::{Right, Rights};
use crate::{Ino, Millis};
use std::collections::{BTreeMap, VecDeque};

/// An operation on one inode, as the client's callers (FUSE) see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read the attributes.
    GetAttr,
    /// Change the attributes.
    SetAttr,
    /// Read data.
    Read,
    /// Write data.
    Write,
    /// Look a name up in a directory.
    Lookup {
        /// The cache has the name (positive or negative).
        name_cached: bool,
    },
    /// List a directory.
    Readdir,
    /// Create a name in a directory.
    Create {
        /// The cache has the name (positive or negative).
        name_cached: bool,
        /// The cache says the name exists.
        name_exists: bool,
    },
}

/// How to carry out an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Answer from the cache, or apply the change locally (it is now dirty
    /// and goes to the MDS later: at a revoke or a sync).
    Local,
    /// Create locally (dirty, like [`Decision::Local`]) with this inode
    /// number from the session's reservations.
    LocalCreate(Ino),
    /// Send this request; decide again when the inode's grant arrives.
    Ask(ToMds),
    /// Send the change to the MDS and wait for its answer.
    Sync,
    /// No lease yet (or the session is lost): decide again later.
    Wait,
}

/// What the client shell must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientCmd {
    /// Send a message to the MDS.
    Send(ToMds),
    /// Send now, as changes, what `rights` (exclusive ones) let this
    /// client change locally on `ino`: buffered attributes, written data,
    /// queued creates.
    Flush {
        /// The inode.
        ino: Ino,
        /// The rights whose dirty state to send.
        rights: Rights,
    },
    /// Forget what `rights` let this client cache about `ino`.
    Drop {
        /// The inode.
        ino: Ino,
        /// The rights given up.
        rights: Rights,
    },
    /// The session is lost (its lease ran out, or the MDS ended it): drop
    /// every cache and everything not sent, and start a new session.
    Reset,
}

#[derive(Debug, Default)]
struct Held {
    rights: Rights,
    dirty: Rights,
}

/// A client session's capability engine.
#[derive(Debug)]
pub struct Client {
    lease_ms: Millis,
    renew_ms: Millis,
    started_at: Millis,
    opened: bool,
    lost: bool,
    lease_until: Millis,
    last_renew: Millis,
    inodes: BTreeMap<Ino, Held>,
    reserved: VecDeque<InoRange>,
}

impl Client {
    /// A new session at `now`, with the MDS's `lease_ms`, renewing every
    /// `renew_ms`; the commands open it.
    pub fn new(lease_ms: Millis, renew_ms: Millis, now: Millis) -> (Client, Vec<ClientCmd>) {
        let c = Client {
            lease_ms,
            renew_ms,
            started_at: now,
            opened: false,
            lost: false,
            lease_until: 0,
            last_renew: now,
            inodes: BTreeMap::new(),
            reserved: VecDeque::new(),
        };
        (c, vec![ClientCmd::Send(ToMds::Open { sent_at: now })])
    }

    /// Time passed: renew the lease, or give the session up once it ran
    /// out (or was never opened within a lease).
    pub fn tick(&mut self, now: Millis) -> Vec<ClientCmd> {
        if self.lost {
            return Vec::new();
        }
        if self.expired(now) {
            return self.lose();
        }
        if self.opened && now >= self.last_renew + self.renew_ms {
            self.last_renew = now;
            return vec![ClientCmd::Send(ToMds::Renew { sent_at: now })];
        }
        Vec::new()
    }

    /// How to carry out `op` on `ino`. `buffer`: ask for the right to do
    /// it locally rather than sending it through (the shell's policy).
    /// [`Decision::Local`] and [`Decision::LocalCreate`] of a change mark
    /// the inode dirty.
    pub fn decide(&mut self, ino: Ino, op: Op, buffer: bool, now: Millis) -> Decision {
        use Right::*;
        let held = self.held(ino, now);
        if !self.opened || self.lost || now >= self.lease_until {
            return Decision::Wait;
        }
        let ask = |want: Rights| Decision::Ask(ToMds::Request { ino, want });
        let names = |cached: bool| held.has(Listing) || (held.has(Entries) && cached);
        match op {
            Op::GetAttr if held.has(AttrShared) || held.has(AttrExcl) => Decision::Local,
            Op::GetAttr => ask(AttrShared.into()),
            Op::SetAttr if held.has(AttrExcl) => self.dirty(ino, AttrExcl),
            Op::SetAttr if buffer => ask(Rights::of(&[AttrShared, AttrExcl])),
            Op::SetAttr => Decision::Sync,
            Op::Read if held.has(DataCache) || held.has(DataBuffer) => Decision::Local,
            Op::Read => ask(DataCache.into()),
            Op::Write if held.has(DataBuffer) => self.dirty(ino, DataBuffer),
            Op::Write if buffer => ask(Rights::of(&[DataCache, DataBuffer])),
            Op::Write => Decision::Sync,
            Op::Lookup { name_cached } if names(name_cached) => Decision::Local,
            Op::Lookup { .. } => ask(Entries.into()),
            Op::Readdir if held.has(Listing) => Decision::Local,
            Op::Readdir => ask(Rights::of(&[Entries, Listing])),
            Op::Create {
                name_cached,
                name_exists,
            } if held.has(Delegation) && names(name_cached) => {
                if name_exists {
                    // EEXIST, known from the cache.
                    return Decision::Local;
                }
                match self.take_ino() {
                    Some(new) => {
                        self.dirty(ino, Delegation);
                        Decision::LocalCreate(new)
                    }
                    // A grant of the delegation again brings new numbers.
                    None => ask(Delegation.into()),
                }
            }
            Op::Create { .. } if buffer => ask(Rights::of(&[Entries, Listing, Delegation])),
            Op::Create { .. } => Decision::Sync,
        }
    }

    /// A message from the MDS, at `now`. A lease that ran out is lost
    /// here too, before the message is looked at: a late renewal does not
    /// bring back rights whose lease lapsed (their cached state may have
    /// been dropped meanwhile).
    pub fn on_message(&mut self, msg: ToClient, now: Millis) -> Vec<ClientCmd> {
        if self.lost {
            return Vec::new();
        }
        if self.expired(now) {
            return self.lose();
        }
        match msg {
            ToClient::Renewed { sent_at } => {
                self.opened = true;
                self.lease_until = self.lease_until.max(sent_at + self.lease_ms);
                Vec::new()
            }
            ToClient::Unknown => self.lose(),
            ToClient::Grant {
                ino,
                rights,
                reserved,
            } => {
                let h = self.inodes.entry(ino).or_default();
                h.rights = h.rights.union(rights);
                self.reserved.extend(reserved);
                Vec::new()
            }
            ToClient::Revoke { ino, rights, id } => self.revoke(ino, rights, id),
        }
    }

    /// Send everything dirty (fsync of the whole session); the rights stay.
    pub fn sync_all(&mut self) -> Vec<ClientCmd> {
        let mut out = Vec::new();
        for (ino, h) in &mut self.inodes {
            if !h.dirty.is_empty() {
                out.push(ClientCmd::Flush {
                    ino: *ino,
                    rights: h.dirty,
                });
                h.dirty = Rights::NONE;
            }
        }
        out
    }

    /// The rights held on `ino` that may be used at `now` (none once the
    /// lease ran out).
    pub fn held(&self, ino: Ino, now: Millis) -> Rights {
        if self.lost || !self.opened || now >= self.lease_until {
            return Rights::NONE;
        }
        self.inodes.get(&ino).map_or(Rights::NONE, |h| h.rights)
    }

    /// What was changed locally under `ino`'s rights and not sent yet.
    pub fn dirty_rights(&self, ino: Ino) -> Rights {
        self.inodes.get(&ino).map_or(Rights::NONE, |h| h.dirty)
    }

    /// Until when the lease holds (0: none yet).
    pub fn lease_until(&self) -> Millis {
        self.lease_until
    }

    /// The lease ran out (or the session never opened within a lease).
    fn expired(&self, now: Millis) -> bool {
        let deadline = if self.opened {
            self.lease_until
        } else {
            self.started_at + self.lease_ms
        };
        now >= deadline
    }

    fn dirty(&mut self, ino: Ino, r: Right) -> Decision {
        let h = self.inodes.entry(ino).or_default();
        h.dirty = h.dirty.union(r.set());
        Decision::Local
    }

    fn take_ino(&mut self) -> Option<Ino> {
        let r = self.reserved.front_mut()?;
        let ino = r.start;
        r.start += 1;
        r.count -= 1;
        if r.count == 0 {
            self.reserved.pop_front();
        }
        Some(ino)
    }

    fn revoke(&mut self, ino: Ino, rights: Rights, id: u64) -> Vec<ClientCmd> {
        let h = self.inodes.entry(ino).or_default();
        let flush = h.dirty.intersect(rights);
        h.dirty = h.dirty.minus(rights);
        let mut dropped = rights;
        if cfg!(feature = "plant-keep-listing") {
            // Planted bug: the names and listing survive the revoke.
            dropped = dropped.minus(Rights::of(&[Right::Entries, Right::Listing]));
        }
        h.rights = h.rights.minus(dropped);
        let ack = ClientCmd::Send(ToMds::RevokeAck { ino, id });
        let mut out = Vec::new();
        if cfg!(feature = "plant-ack-before-flush") {
            // Planted bug: the ack goes before the flush.
            out.push(ack.clone());
        }
        if !flush.is_empty() {
            out.push(ClientCmd::Flush { ino, rights: flush });
        }
        out.push(ClientCmd::Drop {
            ino,
            rights: dropped,
        });
        if !cfg!(feature = "plant-ack-before-flush") {
            out.push(ack);
        }
        out
    }

    fn lose(&mut self) -> Vec<ClientCmd> {
        self.lost = true;
        self.inodes.clear();
        self.reserved.clear();
        vec![ClientCmd::Reset]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Right::*;

    fn opened(now: Millis) -> Client {
        let (mut c, _) = Client::new(1000, 250, now);
        c.on_message(ToClient::Renewed { sent_at: now }, now);
        c
    }

    fn grant(c: &mut Client, ino: Ino, rights: Rights) {
        c.on_message(
            ToClient::Grant {
                ino,
                rights,
                reserved: None,
            },
            1,
        );
    }

    #[test]
    fn nothing_local_without_a_lease() {
        let (mut c, cmds) = Client::new(1000, 250, 0);
        assert_eq!(cmds, vec![ClientCmd::Send(ToMds::Open { sent_at: 0 })]);
        assert_eq!(c.decide(1, Op::GetAttr, false, 1), Decision::Wait);
    }

    #[test]
    fn reads_are_local_only_under_their_rights() {
        let mut c = opened(0);
        assert_eq!(
            c.decide(1, Op::GetAttr, false, 1),
            Decision::Ask(ToMds::Request {
                ino: 1,
                want: AttrShared.into()
            })
        );
        grant(&mut c, 1, Rights::of(&[AttrShared, DataCache]));
        assert_eq!(c.decide(1, Op::GetAttr, false, 1), Decision::Local);
        assert_eq!(c.decide(1, Op::Read, false, 1), Decision::Local);
        assert!(matches!(
            c.decide(1, Op::Readdir, false, 1),
            Decision::Ask(_)
        ));
        // Lease counted from the renewal's sending: gone at 1000.
        assert_eq!(c.decide(1, Op::GetAttr, false, 999), Decision::Local);
        assert_eq!(c.held(1, 1000), Rights::NONE);
    }

    #[test]
    fn names_local_with_listing_or_a_cached_entry() {
        let mut c = opened(0);
        grant(&mut c, 2, Entries.into());
        assert_eq!(
            c.decide(2, Op::Lookup { name_cached: true }, false, 1),
            Decision::Local
        );
        assert!(matches!(
            c.decide(2, Op::Lookup { name_cached: false }, false, 1),
            Decision::Ask(_)
        ));
        grant(&mut c, 2, Listing.into());
        assert_eq!(
            c.decide(2, Op::Lookup { name_cached: false }, false, 1),
            Decision::Local
        );
        assert_eq!(c.decide(2, Op::Readdir, false, 1), Decision::Local);
    }

    #[test]
    fn writes_buffer_under_their_right_or_go_through() {
        let mut c = opened(0);
        assert_eq!(c.decide(3, Op::Write, false, 1), Decision::Sync);
        assert_eq!(
            c.decide(3, Op::Write, true, 1),
            Decision::Ask(ToMds::Request {
                ino: 3,
                want: Rights::of(&[DataCache, DataBuffer])
            })
        );
        grant(&mut c, 3, Rights::of(&[DataCache, DataBuffer]));
        assert_eq!(c.decide(3, Op::Write, false, 1), Decision::Local);
        assert_eq!(c.dirty_rights(3), DataBuffer.into());
        assert_eq!(c.decide(3, Op::SetAttr, false, 1), Decision::Sync);
    }

    #[test]
    fn creates_under_a_delegation_use_reserved_numbers() {
        let mut c = opened(0);
        let create = Op::Create {
            name_cached: false,
            name_exists: false,
        };
        assert_eq!(c.decide(2, create, false, 1), Decision::Sync);
        c.on_message(
            ToClient::Grant {
                ino: 2,
                rights: Rights::of(&[Entries, Listing, Delegation]),
                reserved: Some(InoRange {
                    start: 50,
                    count: 2,
                }),
            },
            1,
        );
        assert_eq!(c.decide(2, create, false, 1), Decision::LocalCreate(50));
        assert_eq!(c.decide(2, create, false, 1), Decision::LocalCreate(51));
        assert_eq!(
            c.decide(2, create, false, 1),
            Decision::Ask(ToMds::Request {
                ino: 2,
                want: Delegation.into()
            })
        );
        let exists = Op::Create {
            name_cached: true,
            name_exists: true,
        };
        assert_eq!(c.decide(2, exists, false, 1), Decision::Local);
        assert_eq!(c.dirty_rights(2), Delegation.into());
    }

    #[cfg(not(feature = "plant-ack-before-flush"))]
    #[test]
    fn revoke_flushes_then_drops_then_acks() {
        let mut c = opened(0);
        grant(&mut c, 3, Rights::of(&[DataCache, DataBuffer, AttrShared]));
        c.decide(3, Op::Write, false, 1);
        let out = c.on_message(
            ToClient::Revoke {
                ino: 3,
                rights: Rights::of(&[DataCache, DataBuffer]),
                id: 9,
            },
            1,
        );
        assert_eq!(
            out,
            vec![
                ClientCmd::Flush {
                    ino: 3,
                    rights: DataBuffer.into()
                },
                ClientCmd::Drop {
                    ino: 3,
                    rights: Rights::of(&[DataCache, DataBuffer])
                },
                ClientCmd::Send(ToMds::RevokeAck { ino: 3, id: 9 }),
            ]
        );
        assert_eq!(c.held(3, 1), AttrShared.into());
        assert_eq!(c.dirty_rights(3), Rights::NONE);
        // Nothing dirty: drop and ack only.
        let out = c.on_message(
            ToClient::Revoke {
                ino: 3,
                rights: AttrShared.into(),
                id: 10,
            },
            1,
        );
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn renewals_and_loss() {
        let mut c = opened(0);
        assert!(c.tick(100).is_empty());
        assert_eq!(
            c.tick(250),
            vec![ClientCmd::Send(ToMds::Renew { sent_at: 250 })]
        );
        c.on_message(ToClient::Renewed { sent_at: 250 }, 260);
        assert_eq!(c.lease_until(), 1250);
        assert_eq!(c.tick(1250), vec![ClientCmd::Reset]);
        assert_eq!(c.decide(1, Op::GetAttr, false, 1251), Decision::Wait);
        assert!(c.tick(1300).is_empty());
    }

    #[test]
    fn a_late_renewal_does_not_revive_a_lapsed_lease() {
        let mut c = opened(0);
        grant(&mut c, 3, DataCache.into());
        c.tick(250);
        // The renewal sent at 250 is answered only at 1000, when the
        // lease counted from 0 has run out.
        assert_eq!(
            c.on_message(ToClient::Renewed { sent_at: 250 }, 1000),
            vec![ClientCmd::Reset]
        );
        assert_eq!(c.held(3, 1001), Rights::NONE);
        assert_eq!(c.decide(3, Op::Read, false, 1001), Decision::Wait);
    }

    #[test]
    fn unknown_session_resets_and_sync_all_flushes_everything() {
        let mut c = opened(0);
        grant(&mut c, 3, Rights::of(&[DataBuffer]));
        grant(&mut c, 4, Rights::of(&[AttrExcl]));
        c.decide(3, Op::Write, false, 1);
        c.decide(4, Op::SetAttr, false, 1);
        assert_eq!(c.sync_all().len(), 2);
        assert!(c.sync_all().is_empty());
        assert_eq!(c.held(3, 1), DataBuffer.into());
        assert_eq!(c.on_message(ToClient::Unknown, 1), vec![ClientCmd::Reset]);
        assert_eq!(c.held(3, 1), Rights::NONE);
    }
}
