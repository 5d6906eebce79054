//! The chunk capabilities this client holds ([`avalon_proto::chunk_cap`]):
//! one per inode, from the MDS's open and create replies or asked for
//! (`GetChunkCap`) when none is held, when a change needs a read-write one,
//! or when half its lifetime has passed (so a file open for long keeps
//! working: renewed on use, and again when an OSD calls one expired).

use crate::error::Result;
use crate::session::Session;
use avalon_proto::chunk_cap::{self, Rights};
use avalon_proto::pb;
use bytes::Bytes;
use dashmap::DashMap;
use std::time::{Duration, Instant};

/// How long an empty capability (the MDS signs none) is used before the
/// MDS is asked again (it may have been given a key meanwhile).
const EMPTY_FOR: Duration = Duration::from_secs(60);

/// Capabilities held before expired ones are dropped.
const PRUNE_ABOVE: usize = 16_384;

struct Held {
    cap: Bytes,
    write: bool,
    renew_at: Instant,
}

/// The capabilities held, by inode.
pub struct ChunkCaps {
    /// Off for plaintext mounts: the OSDs check nothing then.
    enabled: bool,
    held: DashMap<u64, Held>,
}

impl ChunkCaps {
    /// An empty set; `enabled` unless the mount is plaintext.
    pub fn new(enabled: bool) -> ChunkCaps {
        ChunkCaps {
            enabled,
            held: DashMap::new(),
        }
    }

    /// Keeps `cap` (as the MDS sent it) for `ino`, unless a read-write one
    /// still fresh would be replaced by a read one.
    pub fn put(&self, ino: u64, cap: Bytes) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let new = match chunk_cap::decode(&cap) {
            Ok(c) => {
                // Renew at half the lifetime left as the MDS counted it (its
                // clock and ours need not agree).
                let left = c.expires_ms.saturating_sub(chunk_cap::now_ms());
                Held {
                    write: c.rights == Rights::ReadWrite,
                    renew_at: now + Duration::from_millis(left / 2),
                    cap,
                }
            }
            Err(_) => Held {
                cap: Bytes::new(),
                write: true,
                renew_at: now + EMPTY_FOR,
            },
        };
        if self.held.len() > PRUNE_ABOVE {
            self.held.retain(|_, h| h.renew_at > now);
        }
        let mut e = self.held.entry(ino).or_insert_with(|| Held {
            cap: Bytes::new(),
            write: false,
            renew_at: now,
        });
        if !(e.write && !new.write && e.renew_at > now) {
            *e = new;
        }
    }

    /// The capability held for `ino` if it allows `write` and is fresh.
    fn fresh(&self, ino: u64, write: bool) -> Option<Bytes> {
        let h = self.held.get(&ino)?;
        ((h.write || !write) && Instant::now() < h.renew_at).then(|| h.cap.clone())
    }

    /// Whether the one held for `ino` is read-write.
    fn held_write(&self, ino: u64) -> bool {
        self.held.get(&ino).is_some_and(|h| h.write)
    }

    /// Drops what is held for `ino` (an OSD called it expired).
    pub fn forget(&self, ino: u64) {
        self.held.remove(&ino);
    }
}

impl ChunkCaps {
    /// The capability to send with a chunk request on `ino` (`write`: a
    /// change): the one held, or a fresh one from the MDS through
    /// `session`. Empty for plaintext mounts.
    pub async fn get(&self, session: &Session, ino: u64, write: bool) -> Result<Bytes> {
        if !self.enabled {
            return Ok(Bytes::new());
        }
        if let Some(c) = self.fresh(ino, write) {
            return Ok(c);
        }
        // Renewing keeps the rights held (a write-back may follow a read).
        let write = write || self.held_write(ino);
        let req = pb::ChunkCapRequest {
            header: session.header(),
            ino,
            write,
        };
        // Straight to the MDS, not after the queue of delegated changes: a
        // capability does not wait for them (their flush may need this very
        // capability).
        let cap = match session
            .mds
            .request(req, |mut c, r| async move { c.get_chunk_cap(r).await })
            .await
        {
            Ok(r) => r.cap,
            // An MDS that predates capabilities signs none.
            Err(s) if s.code() == tonic::Code::Unimplemented => Bytes::new(),
            Err(s) => return Err(s.into()),
        };
        self.put(ino, cap.clone());
        Ok(cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use avalon_proto::chunk_cap::{CapKey, ChunkCap, KEY_BYTES};

    fn signed(ino: u64, rights: Rights, ttl_ms: u64) -> Bytes {
        CapKey::new(&[1u8; KEY_BYTES]).unwrap().sign(&ChunkCap {
            ino,
            rights,
            session_id: 1,
            holder: "client.x".into(),
            expires_ms: chunk_cap::now_ms() + ttl_ms,
        })
    }

    #[test]
    fn fresh_caps_serve_and_weaker_ones_do_not_replace_them() {
        let c = ChunkCaps::new(true);
        assert!(c.fresh(5, false).is_none());
        let ro = signed(5, Rights::Read, 60_000);
        c.put(5, ro.clone());
        assert_eq!(c.fresh(5, false), Some(ro.clone()));
        assert!(c.fresh(5, true).is_none(), "a read cap does not write");
        let rw = signed(5, Rights::ReadWrite, 60_000);
        c.put(5, rw.clone());
        assert_eq!(c.fresh(5, true), Some(rw.clone()));
        c.put(5, ro);
        assert_eq!(c.fresh(5, true), Some(rw), "kept the read-write one");
        // Past half its life a cap is renewed (here: at once).
        c.put(6, signed(6, Rights::ReadWrite, 0));
        assert!(c.fresh(6, false).is_none());
        c.forget(5);
        assert!(c.fresh(5, false).is_none());
        // An MDS without a key: an empty cap serves for a while.
        c.put(7, Bytes::new());
        assert_eq!(c.fresh(7, true), Some(Bytes::new()));
        let off = ChunkCaps::new(false);
        off.put(8, signed(8, Rights::Read, 60_000));
        assert!(off.fresh(8, false).is_none());
    }
}
