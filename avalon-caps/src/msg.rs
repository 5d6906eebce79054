//! The messages between a client's engine and the MDS's engine. Plain
//! values: the shells map them onto the existing RPCs and recall stream.
//! Changes themselves (a setattr, a write, a create) are the shells'
//! business: the engine only hears which right's state a change touches
//! (see [`crate::mds::Mds::on_change`]).

use crate::rights::Rights;
use crate::{Ino, Millis};

/// Inode numbers reserved for one session's creates under delegations:
/// `start..start + count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InoRange {
    /// The first number.
    pub start: Ino,
    /// How many.
    pub count: u64,
}

/// Client to MDS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToMds {
    /// Start the session; also its first renewal.
    Open {
        /// When the client sent it (the client's lease counts from here).
        sent_at: Millis,
    },
    /// Renew the session's lease.
    Renew {
        /// When the client sent it.
        sent_at: Millis,
    },
    /// Ask for rights on an inode (granted once no other session holds a
    /// conflicting one).
    Request {
        /// The inode.
        ino: Ino,
        /// The rights wanted (added to those held).
        want: Rights,
    },
    /// The rights of revoke `id` are dropped, and everything they covered
    /// that was dirty was sent before this message.
    RevokeAck {
        /// The inode.
        ino: Ino,
        /// The revoke's id.
        id: u64,
    },
}

/// MDS to client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToClient {
    /// The lease is renewed, counted from `sent_at` (the client's own time
    /// of sending, so its view ends before the MDS's).
    Renewed {
        /// The `sent_at` of the Open or Renew this answers.
        sent_at: Millis,
    },
    /// The MDS does not know the session (it ended): start a new one.
    Unknown,
    /// Rights granted (added to those held). The shell attaches the state
    /// they let the client cache, read when the grant was made.
    Grant {
        /// The inode.
        ino: Ino,
        /// The rights granted, added to those held.
        rights: Rights,
        /// Inode numbers for creates, with a delegation.
        reserved: Option<InoRange>,
    },
    /// Give up `rights` on `ino`: flush what they cover, drop them, ack.
    Revoke {
        /// The inode.
        ino: Ino,
        /// The rights to give up.
        rights: Rights,
        /// Echoed in the ack.
        id: u64,
    },
}
