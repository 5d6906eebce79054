//! The OSD data port's framing: chunk reads and writes without gRPC.
//!
//! A unary gRPC call costs several task hand-offs on each side (HTTP/2
//! connection task, stream task, buffer worker); on a small machine each is
//! a thread wake-up, and a 4 KiB read spent ~4 loopback round trips' worth
//! of time in them. On this framing the task that asks writes the request
//! and reads the reply on its own connection (one request at a time per
//! connection, connections pooled by the client). Writes (a client's to a
//! chunk's primary, the primary's to its replicas) come here too: through
//! gRPC every write's data was copied into a growing, zeroed encode buffer
//! and framed again by HTTP/2, a fifth of an OSD's CPU in a streaming write.
//!
//! The OSD serves it on its gRPC port: a connection that opens with
//! [`MAGIC`] speaks this framing, any other is HTTP/2. Messages stay the
//! protobuf ones, so the request header (session, credential) travels as it
//! does over gRPC. A frame is `[u32 LE length][u8 kind][payload]`, the
//! length counting the kind byte and the payload.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, KeyAndValueRef};
use tonic::{Code, Status};

/// First bytes a data-port client sends on a new connection.
pub const MAGIC: &[u8; 8] = b"AVDATA1\n";

/// Request kind: a `ReadChunkRequest`.
pub const READ_CHUNK: u8 = 1;
/// Request kind: a `WriteChunkRequest`; answered by a `WriteChunkReply`.
pub const WRITE_CHUNK: u8 = 2;

/// Reply kind: success, `[u64 LE version][data]`.
pub const REPLY_OK: u8 = 0;
/// Reply kind: failure, an encoded status (see [`encode_status`]).
pub const REPLY_ERR: u8 = 1;

/// Largest request frame accepted: a write of a whole chunk.
pub const MAX_REQUEST_BYTES: usize = crate::limits::MAX_MESSAGE_BYTES;

/// Bytes before the data in a successful reply frame.
pub const OK_HEADER_BYTES: usize = 4 + 1 + 8;

/// A request frame: `kind` then the protobuf message.
pub fn encode_request(kind: u8, msg: &impl prost::Message) -> Vec<u8> {
    let len = 1 + msg.encoded_len();
    let mut b = Vec::with_capacity(4 + len);
    b.put_u32_le(len as u32);
    b.put_u8(kind);
    // Encoding into a Vec with room cannot fail.
    let _ = msg.encode(&mut b);
    b
}

/// A `WriteChunkRequest` frame in parts, the chunk data (`data` and each
/// extent's) being the request's own buffers rather than copies: written
/// with [`write_parts`], a 4 MiB write costs no copy before the socket (or
/// the TLS record layer). Protobuf decoders take fields in any order, so
/// the data fields follow the others; the frame decodes to `req`.
pub fn write_request_parts(req: &crate::pb::WriteChunkRequest) -> Vec<Bytes> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    use prost::Message as _;
    let rest = crate::pb::WriteChunkRequest {
        data: Bytes::new(),
        extents: Vec::new(),
        ..req.clone()
    };
    let mut small = Vec::with_capacity(64 + rest.encoded_len());
    small.put_u32_le(0); // length, set below
    small.put_u8(WRITE_CHUNK);
    // Encoding into a Vec with room cannot fail.
    let _ = rest.encode(&mut small);
    let mut parts = Vec::with_capacity(2 + 2 * req.extents.len());
    let mut push = |small: &mut Vec<u8>, data: &Bytes| {
        parts.push(Bytes::from(std::mem::take(small)));
        if !data.is_empty() {
            parts.push(data.clone());
        }
    };
    if !req.data.is_empty() {
        encode_key(4, WireType::LengthDelimited, &mut small);
        encode_varint(req.data.len() as u64, &mut small);
        push(&mut small, &req.data);
    }
    for e in &req.extents {
        let off_len = if e.offset != 0 {
            1 + encoded_len_varint(u64::from(e.offset))
        } else {
            0
        };
        let data_len = if e.data.is_empty() {
            0
        } else {
            1 + encoded_len_varint(e.data.len() as u64) + e.data.len()
        };
        encode_key(11, WireType::LengthDelimited, &mut small);
        encode_varint((off_len + data_len) as u64, &mut small);
        if e.offset != 0 {
            encode_key(1, WireType::Varint, &mut small);
            encode_varint(u64::from(e.offset), &mut small);
        }
        if !e.data.is_empty() {
            encode_key(2, WireType::LengthDelimited, &mut small);
            encode_varint(e.data.len() as u64, &mut small);
            push(&mut small, &e.data);
        }
    }
    if !small.is_empty() {
        parts.push(Bytes::from(small));
    }
    let len = parts.iter().map(Bytes::len).sum::<usize>() - 4;
    let mut first = BytesMut::from(&parts[0][..]);
    first[..4].copy_from_slice(&(len as u32).to_le_bytes());
    parts[0] = first.freeze();
    parts.retain(|p| !p.is_empty());
    parts
}

/// Writes `parts` in order, several per (vectored) write.
pub async fn write_parts<W: AsyncWrite + Unpin>(w: &mut W, parts: &[Bytes]) -> io::Result<()> {
    let (mut i, mut off) = (0, 0);
    while i < parts.len() {
        let slices: Vec<io::IoSlice<'_>> = std::iter::once(&parts[i][off..])
            .chain(parts[i + 1..].iter().map(|p| &p[..]))
            .take(64)
            .map(io::IoSlice::new)
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 && i < parts.len() {
            let left = parts[i].len() - off;
            if n < left {
                off += n;
                n = 0;
            } else {
                n -= left;
                (i, off) = (i + 1, 0);
            }
        }
    }
    Ok(())
}

/// The header of a successful reply carrying `data_len` bytes.
pub fn ok_header(version: u64, data_len: usize) -> [u8; OK_HEADER_BYTES] {
    let mut h = [0u8; OK_HEADER_BYTES];
    let mut w = &mut h[..];
    w.put_u32_le((1 + 8 + data_len) as u32);
    w.put_u8(REPLY_OK);
    w.put_u64_le(version);
    h
}

/// Buffer a frame body starts with; it grows fourfold each time it fills,
/// so a peer that claims a large frame and sends little holds little
/// memory (at most four times what it sent), and a 4 MiB body costs three
/// reallocations (copying 1.3 MiB), not six (copying 4 MiB).
const FIRST_BODY_BYTES: usize = 64 << 10;

/// Reads one frame: its kind and payload. Frames longer than `max` bytes
/// are refused (`InvalidData`) before anything is allocated for them, and
/// the claimed length is never allocated ahead of the bytes themselves.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> io::Result<(u8, Bytes)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await?;
    read_body(r, head, max, None).await
}

/// The body of the frame whose 5 header bytes are `head`, read into a
/// buffer of `pool` if it has one, else into a new one.
async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    head: [u8; 5],
    max: usize,
    pool: Option<&Arc<BodyPool>>,
) -> io::Result<(u8, Bytes)> {
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len == 0 || len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("data frame of {len} bytes (limit {max})"),
        ));
    }
    let want = len - 1;
    // Small frames (requests, acks) take no pooled buffer.
    let pool = pool.filter(|_| want > FIRST_BODY_BYTES);
    let mut body = pool.map_or_else(Vec::new, |p| p.take(want));
    if body.capacity() < want.min(FIRST_BODY_BYTES) {
        body.reserve_exact(want.min(FIRST_BODY_BYTES));
    }
    while body.len() < want {
        if body.len() == body.capacity() {
            // Four times as large, up to what is still to come, rounded
            // up to 64 KiB: a pooled buffer then also fits the next frame
            // of about this size (whose header may be a few bytes longer).
            let end = (4 * body.capacity())
                .max(1)
                .min(want.next_multiple_of(FIRST_BODY_BYTES));
            body.reserve_exact(end - body.len());
        }
        // Never past this frame: a pooled buffer may be larger than it.
        let rest = (want - body.len()) as u64;
        if (&mut *r).take(rest).read_buf(&mut body).await? == 0 {
            if let Some(p) = pool {
                p.give(body);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    let payload = match pool {
        Some(p) => Bytes::from_owner(Pooled {
            body,
            pool: p.clone(),
        }),
        None => Bytes::from(body),
    };
    Ok((head[4], payload))
}

/// Frame buffers a server reuses. Every frame of a streaming write would
/// otherwise get fresh memory, which the kernel zeroes page by page (a
/// 2 MiB huge page at a time) and the buffer's growth copies again: a
/// fifth of an OSD's CPU. A frame's payload gives its buffer back when
/// its last reference drops (after a primary's forwards too). At most
/// [`BodyPool::KEEP`] buffers are kept; a frame finding none grows a new
/// one with the bytes received, as without a pool, so a peer that claims
/// a large frame and sends little never makes the server allocate more.
#[derive(Default)]
pub struct BodyPool {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl BodyPool {
    /// Buffers kept.
    pub const KEEP: usize = 8;
    /// Largest buffer kept (a frame of a whole default-sized chunk fits):
    /// at most 64 MiB are kept in all.
    pub const KEEP_BYTES_EACH: usize = 8 << 20;

    /// The smallest kept buffer that holds `want` bytes, else the largest.
    fn take(&self, want: usize) -> Vec<u8> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let fits = free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= want)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        let at = fits.or_else(|| {
            free.iter()
                .enumerate()
                .max_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)
        });
        at.map(|i| free.swap_remove(i)).unwrap_or_default()
    }

    fn give(&self, mut body: Vec<u8>) {
        body.clear();
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < Self::KEEP && (1..=Self::KEEP_BYTES_EACH).contains(&body.capacity()) {
            free.push(body);
        }
    }

    /// Buffers kept now.
    pub fn kept(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A payload's buffer, back to its pool when the last reference drops.
struct Pooled {
    body: Vec<u8>,
    pool: Arc<BodyPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.body));
    }
}

/// [`read_frame`] for a server: waits up to `idle` for a frame to begin
/// (`TimedOut` after), then up to `whole` for all of it, so a peer that
/// sends part of a frame and stalls is dropped. The body goes into a
/// buffer of `pool`.
pub async fn read_frame_within<R: AsyncRead + Unpin>(
    r: &mut R,
    pool: &Arc<BodyPool>,
    max: usize,
    idle: std::time::Duration,
    whole: std::time::Duration,
) -> io::Result<(u8, Bytes)> {
    let mut head = [0u8; 5];
    let first = tokio::time::timeout(idle, r.read(&mut head))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "idle data connection"))??;
    if first == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    tokio::time::timeout(whole, async {
        r.read_exact(&mut head[first..]).await?;
        read_body(r, head, max, Some(pool)).await
    })
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("data frame not complete within {whole:?}"),
        )
    })?
}

/// A failure as a whole reply frame: code, message and the `avalon-*`
/// metadata (errno, "the OSD answered"), which the client relies on.
pub fn encode_status(s: &Status) -> Vec<u8> {
    let mut p = Vec::with_capacity(64 + s.message().len());
    p.put_u32_le(0); // length, set below
    p.put_u8(REPLY_ERR);
    p.put_i32_le(s.code() as i32);
    put_str(&mut p, s.message().as_bytes());
    let meta: Vec<(&str, &[u8])> = s
        .metadata()
        .iter()
        .filter_map(|kv| match kv {
            KeyAndValueRef::Ascii(k, v) if k.as_str().starts_with("avalon-") => {
                Some((k.as_str(), v.as_encoded_bytes()))
            }
            _ => None,
        })
        .collect();
    p.put_u16_le(meta.len() as u16);
    for (k, v) in meta {
        put_str(&mut p, k.as_bytes());
        put_str(&mut p, v);
    }
    let len = (p.len() - 4) as u32;
    p[..4].copy_from_slice(&len.to_le_bytes());
    p
}

fn put_str(p: &mut Vec<u8>, s: &[u8]) {
    let s = &s[..s.len().min(u16::MAX as usize)];
    p.put_u16_le(s.len() as u16);
    p.put_slice(s);
}

/// The status an error payload stands for (a garbled one becomes
/// `Internal`, which callers treat as "try another replica").
pub fn decode_status(mut p: Bytes) -> Status {
    fn take_str(p: &mut Bytes) -> Option<Bytes> {
        if p.remaining() < 2 {
            return None;
        }
        let n = p.get_u16_le() as usize;
        (p.remaining() >= n).then(|| p.split_to(n))
    }
    let garbled = || Status::internal("garbled error reply on the OSD data port");
    if p.remaining() < 4 {
        return garbled();
    }
    let code = Code::from_i32(p.get_i32_le());
    let Some(msg) = take_str(&mut p) else {
        return garbled();
    };
    let mut s = Status::new(code, String::from_utf8_lossy(&msg).into_owned());
    if p.remaining() < 2 {
        return garbled();
    }
    for _ in 0..p.get_u16_le() {
        let (Some(k), Some(v)) = (take_str(&mut p), take_str(&mut p)) else {
            return garbled();
        };
        if let (Ok(k), Ok(v)) = (
            AsciiMetadataKey::from_bytes(&k),
            AsciiMetadataValue::try_from(&v[..]),
        ) {
            s.metadata_mut().insert(k, v);
        }
    }
    s
}

/// A successful reply frame carrying a protobuf message (writes).
pub fn encode_reply(msg: &impl prost::Message) -> Vec<u8> {
    encode_request(REPLY_OK, msg)
}

/// A write's reply frame: the OSD's answer, or the failure.
pub fn decode_write_reply(kind: u8, payload: Bytes) -> Result<crate::pb::WriteChunkReply, Status> {
    match kind {
        REPLY_OK => prost::Message::decode(payload).map_err(|e| {
            Status::internal(format!("garbled write reply on the OSD data port: {e}"))
        }),
        REPLY_ERR => Err(decode_status(payload)),
        _ => Err(Status::internal(format!(
            "unknown reply kind {kind} on the OSD data port"
        ))),
    }
}

/// A reply frame's result: the chunk version and data, or the failure.
pub fn decode_read_reply(kind: u8, mut payload: Bytes) -> Result<(u64, Bytes), Status> {
    match kind {
        REPLY_OK if payload.len() >= 8 => {
            let version = payload.get_u64_le();
            Ok((version, payload))
        }
        REPLY_ERR => Err(decode_status(payload)),
        _ => Err(Status::internal(format!(
            "unknown reply kind {kind} on the OSD data port"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_status_keeps_code_message_and_avalon_metadata() {
        let mut s = crate::errno::status(libc::ENOSPC, "disk full");
        s.metadata_mut()
            .insert(crate::errno::OSD_ANSWERED_KEY, "1".parse().unwrap());
        s.metadata_mut().insert("other", "x".parse().unwrap());
        let frame = encode_status(&s);
        let (kind, payload) = read_frame(&mut &frame[..], 1 << 20).await.unwrap();
        let got = decode_read_reply(kind, payload).unwrap_err();
        assert_eq!(got.code(), s.code());
        assert_eq!(got.message(), "disk full");
        assert_eq!(crate::errno::errno_of(&got), libc::ENOSPC);
        assert!(got.metadata().contains_key(crate::errno::OSD_ANSWERED_KEY));
        assert!(!got.metadata().contains_key("other"));
    }

    #[tokio::test]
    async fn an_ok_reply_and_a_request_round_trip() {
        let mut frame = ok_header(7, 3).to_vec();
        frame.extend_from_slice(b"abc");
        let (kind, payload) = read_frame(&mut &frame[..], 1 << 20).await.unwrap();
        assert_eq!(
            decode_read_reply(kind, payload).unwrap(),
            (7, Bytes::from("abc"))
        );

        let req = crate::pb::ReadChunkRequest {
            offset: 4096,
            length: 512,
            ..Default::default()
        };
        let frame = encode_request(READ_CHUNK, &req);
        let (kind, payload) = read_frame(&mut &frame[..], MAX_REQUEST_BYTES)
            .await
            .unwrap();
        assert_eq!(kind, READ_CHUNK);
        let back: crate::pb::ReadChunkRequest = prost::Message::decode(payload).unwrap();
        assert_eq!(back, req);
    }

    #[tokio::test]
    async fn a_write_and_its_reply_round_trip() {
        let req = crate::pb::WriteChunkRequest {
            offset: 512,
            data: Bytes::from(vec![7u8; 100_000]),
            extents: vec![crate::pb::WriteExtent {
                offset: 9,
                data: Bytes::from_static(b"xyz"),
            }],
            ..Default::default()
        };
        let frame = encode_request(WRITE_CHUNK, &req);
        let (kind, payload) = read_frame(&mut &frame[..], MAX_REQUEST_BYTES)
            .await
            .unwrap();
        assert_eq!(kind, WRITE_CHUNK);
        let back: crate::pb::WriteChunkRequest = prost::Message::decode(payload).unwrap();
        assert_eq!(back, req);

        let reply = crate::pb::WriteChunkReply {
            version: 5,
            acks: 3,
        };
        let frame = encode_reply(&reply);
        let (kind, payload) = read_frame(&mut &frame[..], 1 << 10).await.unwrap();
        assert_eq!(decode_write_reply(kind, payload).unwrap(), reply);
        let e = decode_write_reply(REPLY_OK, Bytes::from_static(&[0xff])).unwrap_err();
        assert_eq!(e.code(), Code::Internal);
    }

    #[tokio::test]
    async fn a_write_in_parts_decodes_to_the_request() {
        let big = Bytes::from((0..300_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let extents = vec![
            crate::pb::WriteExtent {
                offset: 0,
                data: big.slice(..70_000),
            },
            crate::pb::WriteExtent {
                offset: 1 << 20,
                data: Bytes::new(),
            },
            crate::pb::WriteExtent {
                offset: 300,
                data: big.slice(5..200),
            },
        ];
        let header = Some(crate::pb::RequestHeader {
            credential: Bytes::from_static(b"cap"),
            ..Default::default()
        });
        for req in [
            crate::pb::WriteChunkRequest {
                header: header.clone(),
                offset: 512,
                data: big.clone(),
                sync: true,
                version: 9,
                ..Default::default()
            },
            crate::pb::WriteChunkRequest {
                header,
                offset: u32::MAX,
                extents,
                ..Default::default()
            },
            crate::pb::WriteChunkRequest::default(),
        ] {
            let parts = write_request_parts(&req);
            // The big data travels as the request's own buffer.
            assert!(req.data.is_empty() || parts.iter().any(|p| p.as_ptr() == big.as_ptr()));
            let mut wire = Vec::new();
            write_parts(&mut wire, &parts).await.unwrap();
            assert_eq!(wire.len(), encode_request(WRITE_CHUNK, &req).len());
            let (kind, payload) = read_frame(&mut &wire[..], MAX_REQUEST_BYTES).await.unwrap();
            assert_eq!(kind, WRITE_CHUNK);
            let back: crate::pb::WriteChunkRequest = prost::Message::decode(payload).unwrap();
            assert_eq!(back, req);
        }
    }

    #[tokio::test]
    async fn bad_frames_are_refused() {
        // Too long, empty, cut short.
        let mut long = Vec::new();
        long.put_u32_le(MAX_REQUEST_BYTES as u32 + 1);
        long.put_u8(READ_CHUNK);
        assert!(read_frame(&mut &long[..], MAX_REQUEST_BYTES).await.is_err());
        let zero = [0u8, 0, 0, 0, 1];
        assert!(read_frame(&mut &zero[..], MAX_REQUEST_BYTES).await.is_err());
        let mut short = Vec::new();
        short.put_u32_le(10);
        short.put_u8(READ_CHUNK);
        short.put_slice(b"abc");
        assert!(read_frame(&mut &short[..], MAX_REQUEST_BYTES)
            .await
            .is_err());
        // A claimed length the peer never sends: refused at EOF, and the
        // buffer grew only with what came.
        let mut big = Vec::new();
        big.put_u32_le(MAX_REQUEST_BYTES as u32);
        big.put_u8(WRITE_CHUNK);
        big.put_slice(&[0u8; 100]);
        assert!(read_frame(&mut &big[..], MAX_REQUEST_BYTES).await.is_err());
        // Garbage error payloads and unknown kinds become errors, not panics.
        let e = decode_read_reply(REPLY_ERR, Bytes::from_static(&[1, 2])).unwrap_err();
        assert_eq!(e.code(), Code::Internal);
        assert!(decode_read_reply(9, Bytes::new()).is_err());
        assert!(decode_read_reply(REPLY_OK, Bytes::from_static(&[1])).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_frame_is_dropped_holding_little() {
        use std::time::Duration;
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        let mut head = Vec::new();
        head.put_u32_le(MAX_REQUEST_BYTES as u32);
        head.put_u8(WRITE_CHUNK);
        head.put_slice(&[1u8; 1000]);
        client.write_all(&head).await.unwrap();
        let (idle, whole) = (Duration::from_secs(300), Duration::from_secs(30));
        let pool = Arc::new(BodyPool::default());
        let e = read_frame_within(&mut server, &pool, MAX_REQUEST_BYTES, idle, whole)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // A silent connection times out as idle; a complete frame passes.
        let e = read_frame_within(&mut server, &pool, MAX_REQUEST_BYTES, idle, whole)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        client
            .write_all(&encode_request(
                READ_CHUNK,
                &crate::pb::ReadChunkRequest::default(),
            ))
            .await
            .unwrap();
        let (kind, _) = read_frame_within(&mut server, &pool, MAX_REQUEST_BYTES, idle, whole)
            .await
            .unwrap();
        assert_eq!(kind, READ_CHUNK);
    }

    #[tokio::test]
    async fn frames_are_read_into_buffers_their_payloads_give_back() {
        use std::time::Duration;
        use tokio::io::AsyncWriteExt;
        let frame = |n: usize, seed: u8| {
            let mut f = Vec::new();
            f.put_u32_le(1 + n as u32);
            f.put_u8(WRITE_CHUNK);
            f.extend((0..n).map(|i| (i as u8).wrapping_mul(seed)));
            f
        };
        // A large frame, then a small one and a large one sent at once: the
        // pooled buffer is larger than the small one, which must not take
        // bytes of the next.
        let mut wire = frame(1 << 20, 3);
        wire.extend(frame(1000, 5));
        wire.extend(frame(1 << 20, 7));
        wire.extend(frame(1 << 20, 9));
        let (mut client, mut server) = tokio::io::duplex(64 << 10);
        let writer = tokio::spawn(async move { client.write_all(&wire).await.unwrap() });
        let (idle, whole) = (Duration::from_secs(300), Duration::from_secs(300));
        let pool = Arc::new(BodyPool::default());
        macro_rules! next {
            () => {
                read_frame_within(&mut server, &pool, MAX_REQUEST_BYTES, idle, whole)
            };
        }
        let (_, first) = next!().await.unwrap();
        assert_eq!(&first[..], &frame(1 << 20, 3)[5..]);
        let at = first.as_ptr();
        assert_eq!(pool.kept(), 0);
        drop(first);
        assert_eq!(pool.kept(), 1, "the payload gave its buffer back");
        let (_, small) = next!().await.unwrap();
        assert_eq!(&small[..], &frame(1000, 5)[5..]);
        drop(small);
        // The first payload is gone: the third frame lands in its buffer
        // (the smallest that fits).
        let (_, third) = next!().await.unwrap();
        assert_eq!(&third[..], &frame(1 << 20, 7)[5..]);
        assert_eq!(third.as_ptr(), at, "read into the pooled buffer");
        // A payload still held keeps its bytes: the next frame goes to
        // another buffer.
        let (_, fourth) = next!().await.unwrap();
        assert_eq!(&fourth[..], &frame(1 << 20, 9)[5..]);
        assert_eq!(&third[..], &frame(1 << 20, 7)[5..]);
        assert_ne!(fourth.as_ptr(), third.as_ptr());
        drop((third, fourth));
        assert_eq!(pool.kept(), 2, "every buffer came back");
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn the_growing_buffer_tracks_the_bytes_received() {
        // A body in many small reads ends whole and equal.
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        let mut frame = Vec::new();
        frame.put_u32_le(1 + payload.len() as u32);
        frame.put_u8(WRITE_CHUNK);
        frame.extend_from_slice(&payload);
        let (mut client, mut server) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            client.write_all(&frame).await.unwrap();
        });
        let (kind, body) = read_frame(&mut server, MAX_REQUEST_BYTES).await.unwrap();
        writer.await.unwrap();
        assert_eq!(kind, WRITE_CHUNK);
        assert_eq!(&body[..], &payload[..]);
    }

    #[tokio::test]
    async fn random_bytes_never_panic_the_decoders() {
        // A bounded fuzz loop (xorshift) over the frame reader, the reply
        // and status decoders and the request messages.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..5000 {
            let len = (next() % 200) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if b.len() >= 4 && next() % 2 == 0 {
                // A plausible length, so the body paths run too.
                let l = (next() % 256) as u32;
                b[..4].copy_from_slice(&l.to_le_bytes());
            }
            if let Ok((kind, payload)) = read_frame(&mut &b[..], 1 << 16).await {
                let _ = decode_read_reply(kind, payload.clone());
                let _ = decode_write_reply(kind, payload.clone());
                let _ = <crate::pb::WriteChunkRequest as prost::Message>::decode(payload.clone());
                let _ = <crate::pb::ReadChunkRequest as prost::Message>::decode(payload);
            }
            let _ = decode_status(Bytes::from(b));
        }
    }
}
