//! TLS 1.3 record protection for OSD data-port connections, after rustls
//! has done the handshake.
//!
//! rustls authenticates both ends and derives the traffic keys; the data
//! port then takes the keys over (as kernel TLS does) and seals and opens
//! the records itself: with the same AEAD, nonces (IV xor sequence number)
//! and record format (RFC 8446 section 5), so what is on the wire is
//! ordinary TLS 1.3. Why: rustls's buffered stream reads at most one record
//! per call, copies each decrypted record into a fresh allocation and again
//! into the caller's buffer, and seals each record into a fresh allocation;
//! on a 4 MiB chunk write crossing three connections that doubled the CPU
//! per byte of the plaintext path. Here the socket is read in large slices
//! into one reused buffer, records are opened in place and copied once to
//! the caller; writes seal the caller's bytes (across its vectored slices,
//! so records are full) into one reused buffer sent with one write.
//!
//! The hand-over: the handshake ends with the client's Finished, after which
//! the client sends nothing until the server has sent [`READY`] through
//! this layer, so no application record is left behind in rustls. Session
//! tickets the server sends after the handshake are skipped; any other
//! post-handshake message (a key update) closes the connection, and so
//! does reaching [`MAX_RECORDS`] records under one key: clients reconnect.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use std::io::{self, IoSlice};
use std::ops::Range;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the server sends first through this layer: the client may speak.
pub const READY: &[u8; 8] = b"AVREADY\n";

/// Largest plaintext of one record.
const MAX_PLAIN: usize = 1 << 14;
/// Record header: type, legacy version, length.
const HEADER: usize = 5;
/// AEAD tag of every cipher suite in use.
const TAG: usize = 16;
/// Largest ciphertext a record may carry (RFC 8446 section 5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAIN + 256;
/// Records sealed under one key at most. RFC 8446 section 5.5 allows
/// 2^24.5 full-size records for AES-GCM; past this the connection ends.
pub const MAX_RECORDS: u64 = 1 << 24;
/// Receive buffer: the socket is read in slices up to this long (four
/// records). Every open data connection holds one, so it stays small.
const RX_BYTES: usize = 64 << 10;
/// Sealed bytes held before a write waits for the socket.
const TX_BYTES: usize = 128 << 10;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const NEW_SESSION_TICKET: u8 = 4;
const CLOSE_NOTIFY: u8 = 0;
const USER_CANCELED: u8 = 90;

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// One direction's key, IV and next sequence number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Direction {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Direction> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(invalid("data connection: unsupported cipher suite")),
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| invalid("data connection: bad traffic key"))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| invalid("data connection: bad traffic IV"))?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The next record's nonce: the IV xor the sequence number (each used
    /// once: the number only grows, and stops at [`MAX_RECORDS`]).
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        if self.seq >= MAX_RECORDS {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "data connection used up its key; reconnect",
            ));
        }
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

/// A byte stream protected by TLS 1.3 records, over `S` (a TCP stream).
pub struct RecordStream<S> {
    io: S,
    tx: Direction,
    rx: Direction,
    /// Sealed records; `out[sent..]` is still to be written.
    out: Vec<u8>,
    sent: usize,
    /// Bytes read: `inbuf[head..tail]` is not yet opened.
    inbuf: Box<[u8]>,
    head: usize,
    tail: usize,
    /// Opened plaintext not yet delivered (inside `inbuf`).
    plain: Range<usize>,
    /// The peer sent close_notify.
    closed: bool,
    /// This side sent close_notify.
    shut: bool,
}

impl<S> RecordStream<S> {
    /// Takes over a connection whose handshake produced `secrets`.
    pub fn new(io: S, secrets: ExtractedSecrets) -> io::Result<RecordStream<S>> {
        Ok(RecordStream {
            io,
            tx: Direction::new(secrets.tx)?,
            rx: Direction::new(secrets.rx)?,
            // Grows with the first large write, then is reused.
            out: Vec::new(),
            sent: 0,
            inbuf: vec![0u8; RX_BYTES].into_boxed_slice(),
            head: 0,
            tail: 0,
            plain: 0..0,
            closed: false,
            shut: false,
        })
    }

    fn pending(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Seals up to `max` bytes of `bufs` into records of type `inner`
    /// (each as full as the bytes allow); returns how many were taken.
    fn seal(&mut self, inner: u8, bufs: &[IoSlice<'_>], max: usize) -> io::Result<usize> {
        let (mut i, mut off, mut taken) = (0usize, 0usize, 0usize);
        loop {
            while i < bufs.len() && off == bufs[i].len() {
                i += 1;
                off = 0;
            }
            if i == bufs.len() || taken == max {
                return Ok(taken);
            }
            let start = self.out.len();
            self.out.extend_from_slice(&[0u8; HEADER]);
            let mut n = 0;
            while n < MAX_PLAIN && taken < max && i < bufs.len() {
                let k = (bufs[i].len() - off).min(MAX_PLAIN - n).min(max - taken);
                self.out.extend_from_slice(&bufs[i][off..off + k]);
                (off, n, taken) = (off + k, n + k, taken + k);
                if off == bufs[i].len() {
                    i += 1;
                    off = 0;
                }
            }
            self.out.push(inner);
            if let Err(e) = self.seal_last(start, n) {
                self.out.truncate(start);
                return Err(e);
            }
        }
    }

    /// Seals the record begun at `out[start]` (header room, `n` bytes of
    /// plaintext and the inner type).
    fn seal_last(&mut self, start: usize, n: usize) -> io::Result<()> {
        let len = (n + 1 + TAG) as u16;
        let [hi, lo] = len.to_be_bytes();
        let header = [APPLICATION_DATA, 3, 3, hi, lo];
        self.out[start..start + HEADER].copy_from_slice(&header);
        let nonce = self.tx.next_nonce()?;
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut self.out[start + HEADER..])
            .map_err(|_| io::Error::other("data connection: sealing a record failed"))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// The length of the record at `inbuf[head]` when all of it is there.
    fn whole_record(&self) -> io::Result<Option<usize>> {
        let avail = self.tail - self.head;
        if avail < HEADER {
            return Ok(None);
        }
        let h = &self.inbuf[self.head..self.head + HEADER];
        if h[0] != APPLICATION_DATA || h[1] != 3 || h[2] != 3 {
            return Err(invalid("data connection: not a TLS 1.3 record"));
        }
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        if !(TAG + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(invalid(format!("data connection: record of {len} bytes")));
        }
        Ok((avail >= HEADER + len).then_some(len))
    }

    /// Opens the whole record of ciphertext length `len` at `inbuf[head]`
    /// in place: application data becomes `plain`, close_notify ends the
    /// stream, session tickets are skipped.
    fn open(&mut self, len: usize) -> io::Result<()> {
        let start = self.head;
        let mut header = [0u8; HEADER];
        header.copy_from_slice(&self.inbuf[start..start + HEADER]);
        let nonce = self.rx.next_nonce()?;
        let body = &mut self.inbuf[start + HEADER..start + HEADER + len];
        let opened = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| invalid("data connection: a record failed authentication"))?;
        // The inner type is the last non-zero byte (zeros are padding).
        let Some(end) = opened.iter().rposition(|&b| b != 0) else {
            return Err(invalid("data connection: record without a type"));
        };
        if end > MAX_PLAIN {
            return Err(invalid("data connection: record overflow"));
        }
        let (inner, content) = (opened[end], &opened[..end]);
        self.head = start + HEADER + len;
        match inner {
            APPLICATION_DATA => {
                self.plain = start + HEADER..start + HEADER + end;
                Ok(())
            }
            ALERT => match content {
                [_, CLOSE_NOTIFY] => {
                    self.closed = true;
                    Ok(())
                }
                [_, USER_CANCELED] => Ok(()),
                [_, d] => Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("data connection: TLS alert {d} from the peer"),
                )),
                _ => Err(invalid("data connection: malformed alert")),
            },
            HANDSHAKE => only_tickets(content),
            t => Err(invalid(format!("data connection: record of type {t}"))),
        }
    }

    /// Makes room after `tail` for at least one whole record.
    fn make_room(&mut self) {
        if self.head == self.tail {
            (self.head, self.tail) = (0, 0);
        } else if self.inbuf.len() - self.tail < HEADER + MAX_CIPHERTEXT {
            self.inbuf.copy_within(self.head..self.tail, 0);
            (self.head, self.tail) = (0, self.tail - self.head);
        }
    }
}

/// Ok when `msgs` holds only NewSessionTicket messages (which a data
/// connection has no use for).
fn only_tickets(mut msgs: &[u8]) -> io::Result<()> {
    while !msgs.is_empty() {
        if msgs.len() < 4 {
            return Err(invalid("data connection: truncated handshake message"));
        }
        let len = (usize::from(msgs[1]) << 16) | (usize::from(msgs[2]) << 8) | usize::from(msgs[3]);
        if msgs[0] != NEW_SESSION_TICKET || msgs.len() < 4 + len {
            return Err(invalid(format!(
                "data connection: unexpected handshake message {}",
                msgs[0]
            )));
        }
        msgs = &msgs[4 + len..];
    }
    Ok(())
}

impl<S: AsyncWrite + Unpin> RecordStream<S> {
    /// Writes out what is sealed.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        // Keep the capacity: the next frame reuses it.
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RecordStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let mut delivered = false;
        loop {
            if !me.plain.is_empty() {
                let n = me.plain.len().min(buf.remaining());
                buf.put_slice(&me.inbuf[me.plain.start..me.plain.start + n]);
                me.plain.start += n;
                delivered |= n > 0;
                if buf.remaining() == 0 {
                    return Poll::Ready(Ok(()));
                }
            }
            if me.closed {
                return Poll::Ready(Ok(()));
            }
            // Every record already read goes out in this call.
            if let Some(len) = me.whole_record()? {
                me.open(len)?;
                continue;
            }
            if delivered {
                return Poll::Ready(Ok(()));
            }
            me.make_room();
            let mut rb = ReadBuf::new(&mut me.inbuf[me.tail..]);
            ready!(Pin::new(&mut me.io).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                // TCP closed without close_notify: possibly truncated.
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            me.tail += n;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RecordStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        if me.pending() > TX_BYTES - MAX_PLAIN {
            ready!(me.poll_drain(cx))?;
        }
        // Whole records' worth, so only a write's last record is short.
        let room = (TX_BYTES - me.pending()) / MAX_PLAIN * MAX_PLAIN;
        let n = me.seal(APPLICATION_DATA, bufs, room)?;
        // Start sending now; what the socket does not take goes on the
        // next write or the flush.
        if let Poll::Ready(Err(e)) = me.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.shut {
            me.shut = true;
            // Warning level, close_notify.
            me.seal(ALERT, &[IoSlice::new(&[1, CLOSE_NOTIFY])], 2)?;
        }
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn secrets(a: u8, b: u8) -> ExtractedSecrets {
        let s = |k: u8| ConnectionTrafficSecrets::Aes256Gcm {
            key: [k; 32].into(),
            iv: [k ^ 0x5a; 12].into(),
        };
        ExtractedSecrets {
            tx: (0, s(a)),
            rx: (0, s(b)),
        }
    }

    /// Two ends of a connection with mirrored keys.
    fn pair(buffer: usize) -> (RecordStream<DuplexStream>, RecordStream<DuplexStream>) {
        let (x, y) = tokio::io::duplex(buffer);
        (
            RecordStream::new(x, secrets(1, 2)).unwrap(),
            RecordStream::new(y, secrets(2, 1)).unwrap(),
        )
    }

    #[tokio::test]
    async fn large_vectored_and_small_writes_arrive_whole_and_in_order() {
        let (mut a, mut b) = pair(64 << 10);
        let big: Vec<u8> = (0..3_000_000u32).map(|i| ((i * 31) >> 3) as u8).collect();
        let head = b"header";
        let expect = [&head[..], &big[..], b"x", b"tail"].concat();
        let writer = tokio::spawn(async move {
            let mut chain = bytes::Buf::chain(&head[..], &big[..]);
            a.write_all_buf(&mut chain).await.unwrap();
            a.write_all(b"x").await.unwrap();
            a.write_all(b"tail").await.unwrap();
            a.flush().await.unwrap();
            a.shutdown().await.unwrap();
            a
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), expect.len());
        assert!(got == expect);
        let a = writer.await.unwrap();
        // Full records: 16 KiB of plaintext each, not one per slice.
        assert!(
            a.tx.seq <= (expect.len() / MAX_PLAIN) as u64 + 8,
            "{}",
            a.tx.seq
        );
    }

    #[tokio::test]
    async fn a_changed_byte_or_a_wrong_key_is_refused() {
        let (x, mut y) = tokio::io::duplex(1 << 20);
        let mut a = RecordStream::new(x, secrets(1, 2)).unwrap();
        a.write_all(b"secret bytes").await.unwrap();
        a.flush().await.unwrap();
        let mut wire = vec![0u8; HEADER + 12 + 1 + TAG];
        y.read_exact(&mut wire).await.unwrap();
        assert!(!wire.windows(6).any(|w| w == b"secret"), "encrypted");
        for (flip, keys) in [(Some(HEADER + 3), secrets(2, 1)), (None, secrets(2, 3))] {
            let mut w = wire.clone();
            if let Some(i) = flip {
                w[i] ^= 1;
            }
            let (mut p, q) = tokio::io::duplex(1 << 20);
            let mut b = RecordStream::new(q, keys).unwrap();
            p.write_all(&w).await.unwrap();
            let mut buf = [0u8; 12];
            let e = b.read_exact(&mut buf).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        }
        // Replayed: the second copy is under the wrong sequence number.
        let (mut p, q) = tokio::io::duplex(1 << 20);
        let mut b = RecordStream::new(q, secrets(2, 1)).unwrap();
        p.write_all(&[&wire[..], &wire[..]].concat()).await.unwrap();
        let mut buf = [0u8; 12];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"secret bytes");
        assert!(b.read_exact(&mut buf).await.is_err());
    }

    #[tokio::test]
    async fn tickets_are_skipped_and_other_handshake_messages_refused() {
        let (mut a, mut b) = pair(1 << 20);
        // A NewSessionTicket (type 4, 3 bytes), then data.
        a.seal(HANDSHAKE, &[IoSlice::new(&[4, 0, 0, 3, 9, 9, 9])], 7)
            .unwrap();
        a.write_all(b"data").await.unwrap();
        a.flush().await.unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"data");
        // A KeyUpdate (type 24) is not followed.
        a.seal(HANDSHAKE, &[IoSlice::new(&[24, 0, 0, 1, 0])], 5)
            .unwrap();
        a.flush().await.unwrap();
        assert!(b.read(&mut buf).await.is_err());
    }

    #[tokio::test]
    async fn a_stream_cut_without_close_notify_is_an_error() {
        let (mut a, mut b) = pair(1 << 20);
        a.write_all(b"abc").await.unwrap();
        a.flush().await.unwrap();
        drop(a);
        let mut got = [0u8; 3];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abc");
        let e = b.read(&mut got).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_key_is_not_used_past_its_record_limit() {
        let (mut a, _b) = pair(1 << 20);
        a.tx.seq = MAX_RECORDS - 1;
        a.write_all(b"last").await.unwrap();
        let e = a.write_all(b"one too many").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
    }
}
