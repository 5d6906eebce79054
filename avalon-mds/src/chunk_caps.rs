//! Signing chunk capabilities ([`avalon_proto::chunk_cap`]) for the clients
//! this MDS serves: at open and create, and on request (renewal, truncates,
//! files whose data a client writes back after a reopen, delegated creates).

use avalon_proto::chunk_cap::{CapKey, ChunkCap, Rights};
use avalon_proto::tls::Peer;
use prost::bytes::Bytes;

/// The key and lifetime capabilities are signed with.
pub struct CapIssuer {
    key: Option<CapKey>,
    ttl_ms: u64,
}

impl CapIssuer {
    /// Signs with `key` (none: no capabilities, e.g. insecure) for `secs`.
    pub fn new(key: Option<CapKey>, secs: u64) -> CapIssuer {
        CapIssuer {
            key,
            ttl_ms: secs.saturating_mul(1000),
        }
    }

    /// A capability for `peer`'s identity and session `sid` on `ino`
    /// (read-write if `write`); empty when this MDS signs none or the
    /// caller has no identity (plaintext: the OSDs check nothing then).
    pub fn issue(&self, peer: &Peer, sid: u64, ino: u64, write: bool) -> Bytes {
        let (Some(key), Some(id)) = (&self.key, peer.identity.as_ref().filter(|_| peer.secured))
        else {
            return Bytes::new();
        };
        key.sign(&ChunkCap {
            ino,
            rights: if write {
                Rights::ReadWrite
            } else {
                Rights::Read
            },
            session_id: sid,
            holder: id.name.clone(),
            expires_ms: avalon_proto::chunk_cap::now_ms().saturating_add(self.ttl_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use avalon_proto::tls::Identity;

    #[test]
    fn caps_name_the_caller_and_only_secured_callers_get_one() {
        let key = CapKey::new(&[5u8; avalon_proto::chunk_cap::KEY_BYTES]).unwrap();
        let i = CapIssuer::new(Some(key.clone()), 30);
        let peer = Peer {
            addr: None,
            identity: Identity::from_uri("avalon://c/client.x"),
            secured: true,
        };
        let c = key.verify(&i.issue(&peer, 77, 9, false)).unwrap();
        assert_eq!((c.ino, c.rights, c.session_id), (9, Rights::Read, 77));
        assert_eq!(c.holder, "client.x");
        let now = avalon_proto::chunk_cap::now_ms();
        assert!(c.expires_ms > now + 25_000 && c.expires_ms <= now + 30_000);
        assert!(i.issue(&Peer::default(), 77, 9, true).is_empty());
        assert!(CapIssuer::new(None, 30).issue(&peer, 1, 9, true).is_empty());
    }
}
