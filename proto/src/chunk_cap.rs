//! Chunk capabilities: what lets a client read or write the chunks of one
//! inode on the OSDs (as HDFS's block access tokens).
//!
//! The MDS signs one when a client opens or creates a file, or asks for one
//! (`Meta.GetChunkCap`), with a key the MDS group shares with the OSDs (the
//! cluster's chunk-cap key, [`PEM_LABEL`] in the daemons' keyfiles). It names
//! the inode, the rights (read, or read and write), the identity and session
//! it was issued to, and its expiry; an HMAC-SHA256 tag covers all of it.
//! The client sends it in `RequestHeader.credential` of every chunk read,
//! write, truncate and extents query; the OSD checks tag, inode, rights,
//! holder (the identity of the TLS peer) and expiry ([`check`]). An expired
//! capability is answered with [`EXPIRED_KEY`] set, and the client asks the
//! MDS for a fresh one; anything else wrong is `PermissionDenied`.
//!
//! Encoding (little endian): `[u8 VERSION][u64 ino][u8 rights][u64 session]
//! [u64 expires_ms][u8 n][n bytes holder][32 bytes tag]`.

use bytes::{BufMut, Bytes};
use ring::hmac;
use tonic::Status;

/// The first byte of an encoded capability (its format).
pub const VERSION: u8 = 1;

/// Status metadata set when a capability was refused only for its age: the
/// client gets a fresh one from the MDS and retries.
pub const EXPIRED_KEY: &str = "avalon-cap-expired";

/// The PEM label of the chunk-cap key in MDS and OSD keyfiles.
pub const PEM_LABEL: &str = "AVALON CHUNK CAP KEY";

/// Bytes of a chunk-cap key.
pub const KEY_BYTES: usize = 32;

const TAG_BYTES: usize = 32;
const FIXED_BYTES: usize = 1 + 8 + 1 + 8 + 8 + 1;

/// What a capability allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rights {
    /// Reads and extents queries.
    Read,
    /// Reads, writes, hole punching and truncates.
    ReadWrite,
}

/// A capability's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkCap {
    /// The inode whose chunks it opens.
    pub ino: u64,
    /// What it allows.
    pub rights: Rights,
    /// The session it was issued to (for the record; the OSD checks the
    /// holder, which it can see).
    pub session_id: u64,
    /// The identity it was issued to (`client.NAME`).
    pub holder: String,
    /// Wall-clock expiry, milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

/// Why a capability was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapError {
    /// No capability sent.
    #[error("no chunk capability sent (ask the MDS: open the file)")]
    Missing,
    /// Not a capability at all.
    #[error("malformed chunk capability")]
    Malformed,
    /// The tag does not match: forged, or signed with another key.
    #[error("chunk capability not signed by this cluster's MDS")]
    BadSignature,
    /// For another inode.
    #[error("chunk capability is for inode {have:#x}, not {want:#x}")]
    WrongInode {
        /// The inode it names.
        have: u64,
        /// The inode asked for.
        want: u64,
    },
    /// Issued to another identity.
    #[error("chunk capability was issued to {holder}, not {caller}")]
    WrongHolder {
        /// Who it was issued to.
        holder: String,
        /// Who presented it.
        caller: String,
    },
    /// A read capability presented for a change.
    #[error("chunk capability allows reads only")]
    ReadOnly,
    /// Past its expiry.
    #[error("chunk capability expired {ago_ms} ms ago")]
    Expired {
        /// How long ago.
        ago_ms: u64,
    },
}

impl CapError {
    /// The status an OSD answers: `Unauthenticated` with [`EXPIRED_KEY`] for
    /// an expired capability (the client renews it), `PermissionDenied` for
    /// everything else.
    pub fn status(&self) -> Status {
        match self {
            CapError::Expired { .. } => {
                let mut s = Status::unauthenticated(self.to_string());
                s.metadata_mut()
                    .insert(EXPIRED_KEY, tonic::metadata::AsciiMetadataValue::from(1u64));
                s
            }
            _ => Status::permission_denied(self.to_string()),
        }
    }
}

/// True if `s` refused a capability only because it expired.
pub fn is_expired(s: &Status) -> bool {
    s.metadata().contains_key(EXPIRED_KEY)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The key capabilities are signed with.
#[derive(Clone)]
pub struct CapKey(hmac::Key);

impl std::fmt::Debug for CapKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CapKey(..)")
    }
}

impl CapKey {
    /// A key from its bytes ([`KEY_BYTES`] of them).
    pub fn new(bytes: &[u8]) -> Result<CapKey, String> {
        if bytes.len() != KEY_BYTES {
            return Err(format!(
                "chunk-cap key of {} bytes, want {KEY_BYTES}",
                bytes.len()
            ));
        }
        Ok(CapKey(hmac::Key::new(hmac::HMAC_SHA256, bytes)))
    }

    /// The key in the PEM-style block [`PEM_LABEL`] of a keyfile (hex
    /// inside): `None` if there is no such block.
    pub fn from_pem(pem: &[u8]) -> Option<Result<CapKey, String>> {
        let text = std::str::from_utf8(pem).ok()?;
        let begin = format!("-----BEGIN {PEM_LABEL}-----");
        let end = format!("-----END {PEM_LABEL}-----");
        let start = text.find(&begin)? + begin.len();
        let Some(len) = text[start..].find(&end) else {
            return Some(Err(format!("{PEM_LABEL} block without its END line")));
        };
        let hex: String = text[start..start + len]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        Some(decode_hex(&hex).and_then(|b| CapKey::new(&b)))
    }

    /// Signs `cap`.
    pub fn sign(&self, cap: &ChunkCap) -> Bytes {
        let holder = &cap.holder.as_bytes()[..cap.holder.len().min(255)];
        let mut b = Vec::with_capacity(FIXED_BYTES + holder.len() + TAG_BYTES);
        b.put_u8(VERSION);
        b.put_u64_le(cap.ino);
        b.put_u8(match cap.rights {
            Rights::Read => 1,
            Rights::ReadWrite => 3,
        });
        b.put_u64_le(cap.session_id);
        b.put_u64_le(cap.expires_ms);
        b.put_u8(holder.len() as u8);
        b.put_slice(holder);
        let tag = hmac::sign(&self.0, &b);
        b.put_slice(tag.as_ref());
        b.into()
    }

    /// The capability `bytes` stands for, if this key signed it (expiry,
    /// inode and holder not judged: see [`check`]).
    pub fn verify(&self, bytes: &[u8]) -> Result<ChunkCap, CapError> {
        let cap = decode(bytes)?;
        let (body, tag) = bytes.split_at(bytes.len() - TAG_BYTES);
        hmac::verify(&self.0, body, tag).map_err(|_| CapError::BadSignature)?;
        Ok(cap)
    }
}

/// A PEM-style block carrying `key` for a keyfile.
pub fn pem_block(key: &[u8]) -> String {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    format!("-----BEGIN {PEM_LABEL}-----\n{hex}\n-----END {PEM_LABEL}-----\n")
}

fn decode_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return Err("chunk-cap key is not hex".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| "chunk-cap key is not hex".into())
        })
        .collect()
}

/// The content of an encoded capability, unverified (a client reads the
/// expiry of its own capabilities this way).
pub fn decode(b: &[u8]) -> Result<ChunkCap, CapError> {
    if b.is_empty() {
        return Err(CapError::Missing);
    }
    if b.len() < FIXED_BYTES + TAG_BYTES || b[0] != VERSION {
        return Err(CapError::Malformed);
    }
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    let rights = match b[9] {
        1 => Rights::Read,
        3 => Rights::ReadWrite,
        _ => return Err(CapError::Malformed),
    };
    let n = b[FIXED_BYTES - 1] as usize;
    if b.len() != FIXED_BYTES + n + TAG_BYTES {
        return Err(CapError::Malformed);
    }
    let holder = std::str::from_utf8(&b[FIXED_BYTES..FIXED_BYTES + n])
        .map_err(|_| CapError::Malformed)?
        .to_string();
    Ok(ChunkCap {
        ino: u64_at(1),
        rights,
        session_id: u64_at(10),
        expires_ms: u64_at(18),
        holder,
    })
}

/// Judges a capability presented by `caller` for `ino` (`write`: a change)
/// at `now_ms`.
pub fn check(
    key: &CapKey,
    cred: &[u8],
    ino: u64,
    write: bool,
    caller: &str,
    now_ms: u64,
) -> Result<ChunkCap, CapError> {
    let cap = key.verify(cred)?;
    judge(&cap, ino, write, caller, now_ms)?;
    Ok(cap)
}

/// The checks of a verified capability (see [`check`]). Expiry is judged
/// last: a forged or misdirected capability must not be renewed.
fn judge(cap: &ChunkCap, ino: u64, write: bool, caller: &str, now_ms: u64) -> Result<(), CapError> {
    if cap.ino != ino {
        return Err(CapError::WrongInode {
            have: cap.ino,
            want: ino,
        });
    }
    if cap.holder != caller {
        return Err(CapError::WrongHolder {
            holder: cap.holder.clone(),
            caller: caller.to_string(),
        });
    }
    if write && cap.rights != Rights::ReadWrite {
        return Err(CapError::ReadOnly);
    }
    if now_ms >= cap.expires_ms {
        return Err(CapError::Expired {
            ago_ms: now_ms - cap.expires_ms,
        });
    }
    Ok(())
}

/// The capabilities one connection presented that verified, so a stream
/// of requests with the same capability costs one HMAC (the tag is
/// compared byte for byte; the other checks are redone each time).
#[derive(Default)]
pub struct Verified {
    recent: Vec<(Bytes, ChunkCap)>,
}

/// Capabilities remembered per connection (a client works on a few files
/// at once over one pooled connection).
const VERIFIED_PER_CONN: usize = 8;

impl Verified {
    /// As [`check`], skipping the HMAC for a capability verified before.
    pub fn check(
        &mut self,
        key: &CapKey,
        cred: &Bytes,
        ino: u64,
        write: bool,
        caller: &str,
        now_ms: u64,
    ) -> Result<(), CapError> {
        if let Some((_, cap)) = self.recent.iter().find(|(b, _)| b == cred) {
            return judge(cap, ino, write, caller, now_ms);
        }
        let cap = check(key, cred, ino, write, caller, now_ms)?;
        if self.recent.len() >= VERIFIED_PER_CONN {
            self.recent.remove(0);
        }
        self.recent.push((cred.clone(), cap));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> CapKey {
        CapKey::new(&[b; KEY_BYTES]).unwrap()
    }

    fn cap(ino: u64, rights: Rights, expires_ms: u64) -> ChunkCap {
        ChunkCap {
            ino,
            rights,
            session_id: 0xfeed,
            holder: "client.x".into(),
            expires_ms,
        }
    }

    #[test]
    fn a_signed_cap_round_trips_and_passes() {
        let k = key(1);
        let c = cap(42, Rights::ReadWrite, 10_000);
        let b = k.sign(&c);
        assert_eq!(decode(&b).unwrap(), c);
        assert_eq!(check(&k, &b, 42, true, "client.x", 9_999).unwrap(), c);
        assert!(check(&k, &b, 42, false, "client.x", 0).is_ok());
    }

    #[test]
    fn every_wrong_cap_is_refused_with_its_reason() {
        let k = key(1);
        let rw = k.sign(&cap(42, Rights::ReadWrite, 10_000));
        let ro = k.sign(&cap(42, Rights::Read, 10_000));
        assert_eq!(
            check(&k, &[], 42, false, "client.x", 0),
            Err(CapError::Missing)
        );
        assert_eq!(
            check(&k, b"junk", 42, false, "client.x", 0),
            Err(CapError::Malformed)
        );
        // Another cluster's key, and a flipped bit anywhere.
        assert_eq!(
            check(&key(2), &rw, 42, false, "client.x", 0),
            Err(CapError::BadSignature)
        );
        for i in 0..rw.len() {
            let mut f = rw.to_vec();
            f[i] ^= 0x10;
            assert!(
                check(&k, &f, 42, false, "client.x", 0).is_err(),
                "bit in byte {i}"
            );
        }
        assert!(matches!(
            check(&k, &rw, 43, false, "client.x", 0),
            Err(CapError::WrongInode { have: 42, want: 43 })
        ));
        assert!(matches!(
            check(&k, &rw, 42, false, "client.y", 0),
            Err(CapError::WrongHolder { .. })
        ));
        assert_eq!(
            check(&k, &ro, 42, true, "client.x", 0),
            Err(CapError::ReadOnly)
        );
        let e = check(&k, &rw, 42, true, "client.x", 10_500).unwrap_err();
        assert_eq!(e, CapError::Expired { ago_ms: 500 });
        assert!(is_expired(&e.status()));
        assert_eq!(e.status().code(), tonic::Code::Unauthenticated);
        let denied = CapError::ReadOnly.status();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(!is_expired(&denied));
        // A forged cap is never reported as merely expired.
        let mut forged = rw.to_vec();
        forged[1] ^= 1;
        assert_eq!(
            check(&k, &forged, 42, false, "client.x", 99_999),
            Err(CapError::BadSignature)
        );
    }

    #[test]
    fn the_connection_cache_redoes_all_but_the_hmac() {
        let k = key(1);
        let rw = k.sign(&cap(42, Rights::ReadWrite, 10_000));
        let ro = k.sign(&cap(7, Rights::Read, 10_000));
        let mut v = Verified::default();
        assert!(v.check(&k, &rw, 42, true, "client.x", 0).is_ok());
        assert!(v.check(&k, &rw, 42, true, "client.x", 1).is_ok());
        assert!(v.check(&k, &rw, 43, true, "client.x", 1).is_err());
        assert!(v.check(&k, &rw, 42, true, "client.y", 1).is_err());
        assert!(v.check(&k, &rw, 42, true, "client.x", 10_000).is_err());
        assert!(v.check(&k, &ro, 7, true, "client.x", 1).is_err());
        assert!(v.check(&k, &ro, 7, false, "client.x", 1).is_ok());
        // A forgery that is not byte-identical is verified and refused.
        let mut f = rw.to_vec();
        f[5] ^= 1;
        assert!(v
            .check(&k, &Bytes::from(f), 42, true, "client.x", 1)
            .is_err());
        for i in 0..20u64 {
            let c = k.sign(&cap(100 + i, Rights::Read, 10_000));
            assert!(v.check(&k, &c, 100 + i, false, "client.x", 1).is_ok());
        }
        assert!(v.recent.len() <= VERIFIED_PER_CONN);
    }

    #[test]
    fn keys_travel_in_keyfile_blocks() {
        let raw = [0xabu8; KEY_BYTES];
        let text = format!(
            "-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n{}",
            pem_block(&raw)
        );
        let k = CapKey::from_pem(text.as_bytes()).unwrap().unwrap();
        let c = cap(1, Rights::Read, 5);
        assert!(CapKey::new(&raw).unwrap().verify(&k.sign(&c)).is_ok());
        assert!(CapKey::from_pem(b"no block").is_none());
        let short = pem_block(&[1, 2, 3]);
        assert!(CapKey::from_pem(short.as_bytes()).unwrap().is_err());
        let bad = format!("-----BEGIN {PEM_LABEL}-----\nzz\n");
        assert!(CapKey::from_pem(bad.as_bytes()).unwrap().is_err());
    }

    #[test]
    fn random_bytes_never_panic_the_decoder() {
        // A bounded fuzz loop (xorshift): decode and verify any input.
        let k = key(3);
        let good = k.sign(&cap(9, Rights::ReadWrite, 1));
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 120) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next() % 2 == 0 && !b.is_empty() {
                // Mutations of a valid capability reach deeper.
                b = good.to_vec();
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
                b.truncate(b.len() - (next() % 3) as usize);
            }
            let _ = decode(&b);
            let _ = check(&k, &b, 9, true, "client.x", 0);
        }
    }
}
