//! The delivery the engines rely on between a session and the MDS: every
//! message delivered once, in the order sent, over a network that delays,
//! reorders and drops packets. Today's shells get it from one gRPC stream
//! per direction plus request ids (and recall marks to order replies
//! against recalls); the simulation gets it from this: sequence numbers,
//! cumulative acks and retransmission, pure like the engines.
//!
//! Order matters for correctness: a grant must reach the client before a
//! later revoke of the same rights, and a client's flushed changes must
//! reach the MDS before its revoke acknowledgement.

use crate::Millis;
use std::collections::{BTreeMap, VecDeque};

/// One packet: a message with its sequence number and/or an ack of
/// everything received in order up to `ack`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet<M> {
    /// The message and its sequence number (from 1), if any.
    pub msg: Option<(u64, M)>,
    /// Every message up to this sequence number was received.
    pub ack: u64,
}

/// One end of a link.
#[derive(Debug)]
pub struct Link<M> {
    rto: Millis,
    next_seq: u64,
    /// Sent, not acked: (seq, message, last sent).
    unacked: VecDeque<(u64, M, Millis)>,
    /// The next sequence number to deliver.
    expect: u64,
    early: BTreeMap<u64, M>,
    ack_due: bool,
}

impl<M: Clone> Link<M> {
    /// A link end retransmitting after `rto` without an ack.
    pub fn new(rto: Millis) -> Link<M> {
        Link {
            rto,
            next_seq: 1,
            unacked: VecDeque::new(),
            expect: 1,
            early: BTreeMap::new(),
            ack_due: false,
        }
    }

    /// Sends `msg`: the packet to put on the network.
    pub fn send(&mut self, msg: M, now: Millis) -> Packet<M> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked.push_back((seq, msg.clone(), now));
        self.ack_due = false;
        Packet {
            msg: Some((seq, msg)),
            ack: self.expect - 1,
        }
    }

    /// A packet arrived: the messages now deliverable, in order.
    pub fn receive(&mut self, p: Packet<M>) -> Vec<M> {
        while self.unacked.front().is_some_and(|(s, _, _)| *s <= p.ack) {
            self.unacked.pop_front();
        }
        let mut out = Vec::new();
        if let Some((seq, msg)) = p.msg {
            self.ack_due = true;
            if seq >= self.expect {
                self.early.insert(seq, msg);
            }
            while let Some(m) = self.early.remove(&self.expect) {
                out.push(m);
                self.expect += 1;
            }
        }
        out
    }

    /// Time passed: retransmissions, and an ack if one is owed.
    pub fn tick(&mut self, now: Millis) -> Vec<Packet<M>> {
        let ack = self.expect - 1;
        let mut out = Vec::new();
        for (seq, msg, sent) in &mut self.unacked {
            if now >= *sent + self.rto {
                *sent = now;
                out.push(Packet {
                    msg: Some((*seq, msg.clone())),
                    ack,
                });
            }
        }
        if self.ack_due && out.is_empty() {
            out.push(Packet { msg: None, ack });
        }
        self.ack_due = false;
        out
    }

    /// Whether everything sent was acknowledged.
    pub fn idle(&self) -> bool {
        self.unacked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_in_order_once_despite_reordering_and_loss() {
        let mut a: Link<u32> = Link::new(10);
        let mut b: Link<u32> = Link::new(10);
        let p1 = a.send(1, 0);
        let _lost = a.send(2, 0);
        let p3 = a.send(3, 0);
        assert!(b.receive(p3).is_empty());
        assert_eq!(b.receive(p1.clone()), vec![1]);
        assert!(b.receive(p1).is_empty());
        let acks = b.tick(1);
        assert_eq!(acks, vec![Packet { msg: None, ack: 1 }]);
        for p in acks {
            a.receive(p);
        }
        assert!(a.tick(5).is_empty());
        let again = a.tick(10);
        assert_eq!(again.len(), 2);
        let mut got = Vec::new();
        for p in again {
            got.extend(b.receive(p));
        }
        assert_eq!(got, vec![2, 3]);
        for p in b.tick(11) {
            a.receive(p);
        }
        assert!(a.idle());
    }
}
