//! The client's write-back buffer.
//!
//! Small writes the kernel hands over (its own writeback of dirty pages,
//! or direct writes; below [`DIRECT_WRITE_BYTES`], larger ones go straight
//! to the OSDs after the buffered data of their chunks) are copied here and
//! acknowledged at once; the buffer
//! sends them to the OSDs in the background, per chunk, as one vectored
//! `WriteChunk` (several extents under one version) carrying everything
//! that accumulated for that chunk. At most one RPC per chunk is in flight,
//! so a chunk's writes reach its primary in the order they were made;
//! different chunks flush in parallel.
//!
//! Memory is bounded: writers wait (backpressure) while the buffered bytes
//! (pending and in flight) would exceed the budget. A chunk is sent when
//! it holds [`FULL_CHUNK_BYTES`], when the buffer passes half its budget
//! (largest chunks first), when its oldest data is [`MAX_AGE`] old, and
//! whenever someone needs it: fsync, flush/close, a read of the chunk,
//! truncate, fallocate, an O_SYNC write. A failed background write is
//! remembered per file and reported by the next fsync or flush (as NFS
//! and Ceph do); the data of a failed write is dropped.
//!
//! This module is pure bookkeeping; `data_path` does the RPCs.

use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Default memory budget of the buffer.
pub const DEFAULT_BUDGET: u64 = 64 << 20;
/// Environment variable overriding the budget, in MiB (0 turns buffering
/// off: every write goes straight to the OSDs, as before).
pub const BUDGET_ENV: &str = "AVALON_WRITE_BUFFER_MB";
/// Writes at least this large bypass the buffer (none from the kernel,
/// whose writes are at most 1 MiB).
pub const DIRECT_WRITE_BYTES: u64 = 2 << 20;
/// A chunk holding this much pending data is sent at once.
pub const FULL_CHUNK_BYTES: u64 = 1 << 20;
/// Pending data older than this is sent by the background ticker.
pub const MAX_AGE: Duration = Duration::from_millis(500);
/// How often the ticker looks for old data.
pub const TICK: Duration = Duration::from_millis(100);
/// Background chunk RPCs in flight at most.
pub const MAX_BACKGROUND_RPCS: usize = 8;

/// Non-overlapping byte ranges of one chunk, by offset; a newer write
/// replaces the bytes of older ones it overlaps.
#[derive(Debug, Default, Clone)]
pub struct Extents {
    map: BTreeMap<u32, Bytes>,
    bytes: u64,
}

impl Extents {
    /// Adds `data` at `off`, replacing what older extents held there.
    /// Returns the change in stored bytes.
    pub fn insert(&mut self, off: u32, data: Bytes) -> i64 {
        let before = self.bytes as i64;
        if data.is_empty() {
            return 0;
        }
        let s = u64::from(off);
        let e = s + data.len() as u64;
        let overlapped: Vec<u32> = self
            .starting_before(e)
            .rev()
            .take_while(|(k, d)| u64::from(**k) + d.len() as u64 > s)
            .map(|(k, _)| *k)
            .collect();
        for k in overlapped {
            let Some(d) = self.map.remove(&k) else {
                continue;
            };
            self.bytes -= d.len() as u64;
            let ks = u64::from(k);
            let ke = ks + d.len() as u64;
            if ks < s {
                let head = d.slice(..(s - ks) as usize);
                self.bytes += head.len() as u64;
                self.map.insert(k, head);
            }
            if ke > e {
                let tail = d.slice((e - ks) as usize..);
                self.bytes += tail.len() as u64;
                self.map.insert(e as u32, tail);
            }
        }
        self.bytes += data.len() as u64;
        self.map.insert(off, data);
        self.bytes as i64 - before
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether any byte of `[off, off+len)` is held.
    pub fn overlaps(&self, off: u64, len: u64) -> bool {
        // Extents do not overlap each other: only the last one starting
        // before the end can reach into the range.
        self.starting_before(off.saturating_add(len))
            .next_back()
            .is_some_and(|(k, d)| u64::from(*k) + d.len() as u64 > off)
    }

    /// Copies `[off, off+dst.len())` into `dst` if extents hold every
    /// byte of it; false (and `dst` unspecified) otherwise.
    pub fn copy_if_covered(&self, off: u64, dst: &mut [u8]) -> bool {
        let end = off + dst.len() as u64;
        let mut at = off;
        // The extent holding `off` starts at or before it; the ones after
        // it must follow without a gap.
        let first = self.starting_before(off + 1).next_back();
        let rest = self
            .starting_before(end)
            .filter(|(k, _)| u64::from(**k) > off);
        for (k, d) in first.into_iter().chain(rest) {
            let (ks, ke) = (u64::from(*k), u64::from(*k) + d.len() as u64);
            if ks > at || ke <= at {
                return false;
            }
            let n = ke.min(end) - at;
            let (from, to) = ((at - ks) as usize, (at - off) as usize);
            dst[to..to + n as usize].copy_from_slice(&d[from..from + n as usize]);
            at += n;
            if at == end {
                return true;
            }
        }
        at == end
    }

    fn starting_before(&self, end: u64) -> std::collections::btree_map::Range<'_, u32, Bytes> {
        match u32::try_from(end) {
            Ok(e) => self.map.range(..e),
            Err(_) => self.map.range(..),
        }
    }

    /// The runs, in offset order (the data is shared, not copied).
    pub fn runs(&self) -> Vec<(u32, Bytes)> {
        self.map.iter().map(|(k, d)| (*k, d.clone())).collect()
    }

    /// Takes everything, in offset order.
    #[cfg(test)]
    pub fn take(&mut self) -> Vec<(u32, Bytes)> {
        self.bytes = 0;
        std::mem::take(&mut self.map).into_iter().collect()
    }

    /// The bytes as they would read over zeros (tests and checks).
    pub fn overlay(&self, base: &mut [u8]) {
        for (k, d) in &self.map {
            let k = *k as usize;
            if k < base.len() {
                let n = d.len().min(base.len() - k);
                base[k..k + n].copy_from_slice(&d[..n]);
            }
        }
    }
}

#[derive(Debug)]
struct ChunkBuf {
    pending: Extents,
    /// Bytes of the RPC in flight for this chunk (0: none).
    inflight: u64,
    /// What that RPC sends: still read from here until it is stored.
    sending: Extents,
    /// When the oldest pending byte arrived.
    since: Instant,
}

#[derive(Debug, Default)]
struct FileBuf {
    chunks: BTreeMap<u64, ChunkBuf>,
    /// First error of a background write not yet reported.
    error: Option<(i32, String)>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Pending plus in-flight bytes.
    bytes: u64,
    /// Background RPCs in flight.
    background: usize,
    files: HashMap<u64, FileBuf>,
}

/// What [`WriteBuffer::take`] found for a chunk.
#[derive(Debug)]
pub enum Take {
    /// These extents are now in flight; report with [`WriteBuffer::done`].
    Send(Vec<(u32, Bytes)>),
    /// An RPC for the chunk is in flight already.
    Busy,
    /// Nothing pending or in flight.
    Idle,
}

/// The buffer of one client.
#[derive(Debug)]
pub struct WriteBuffer {
    budget: u64,
    inner: Mutex<Inner>,
    changed: Notify,
    ticker: AtomicBool,
}

impl WriteBuffer {
    /// A buffer holding at most `budget` bytes (0: buffering off).
    pub fn new(budget: u64) -> Self {
        WriteBuffer {
            budget,
            inner: Mutex::new(Inner::default()),
            changed: Notify::new(),
            ticker: AtomicBool::new(false),
        }
    }

    /// The budget from [`BUDGET_ENV`], else [`DEFAULT_BUDGET`].
    pub fn budget_from_env() -> u64 {
        std::env::var(BUDGET_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(DEFAULT_BUDGET, |mb| mb << 20)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The memory budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// True when writes of `len` bytes should be buffered. Large ones too:
    /// the kernel hands over one write at a time per writer (no writeback
    /// cache), so a sequential writer waited for each 1 MiB to be stored
    /// on two replicas; buffered, it goes on while up to
    /// [`MAX_BACKGROUND_RPCS`] chunks are on their way.
    pub fn accepts(&self, len: u64) -> bool {
        self.budget > 0 && len < DIRECT_WRITE_BYTES && len <= self.budget / 4
    }

    /// True the first time it is called (to start the ticker once).
    pub fn start_ticker(&self) -> bool {
        !self.ticker.swap(true, Ordering::AcqRel)
    }

    /// Bytes buffered (pending and in flight).
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// True when the buffer is past half its budget (time to flush).
    pub fn under_pressure(&self) -> bool {
        self.lock().bytes > self.budget / 2
    }

    /// Waits until `len` more bytes fit (always true for an empty buffer).
    /// `kick` is called before each wait so that flushing makes room.
    pub async fn reserve(&self, len: u64, mut kick: impl FnMut()) {
        loop {
            let notified = {
                let g = self.lock();
                if g.bytes == 0 || g.bytes + len <= self.budget {
                    return;
                }
                let n = self.changed.notified();
                drop(g);
                n
            };
            kick();
            notified.await;
        }
    }

    /// Buffers `data` at `off` of chunk `(ino, index)`. Returns true when
    /// the chunk now holds enough to be sent at once.
    pub fn add(&self, ino: u64, index: u64, off: u32, data: Bytes) -> bool {
        let mut g = self.lock();
        let f = g.files.entry(ino).or_default();
        let c = f.chunks.entry(index).or_insert_with(|| ChunkBuf {
            pending: Extents::default(),
            inflight: 0,
            sending: Extents::default(),
            since: Instant::now(),
        });
        if c.pending.is_empty() {
            c.since = Instant::now();
        }
        let delta = c.pending.insert(off, data);
        let full = c.inflight == 0 && c.pending.bytes() >= FULL_CHUNK_BYTES;
        g.bytes = (g.bytes as i64 + delta).max(0) as u64;
        full
    }

    /// Takes a chunk's pending data to send it (unless it is in flight).
    /// `background` counts it against [`MAX_BACKGROUND_RPCS`].
    pub fn take(&self, ino: u64, index: u64, background: bool) -> Take {
        let mut g = self.lock();
        let Some(c) = g.files.get_mut(&ino).and_then(|f| f.chunks.get_mut(&index)) else {
            return Take::Idle;
        };
        if c.inflight > 0 {
            return Take::Busy;
        }
        if c.pending.is_empty() {
            return Take::Idle;
        }
        c.inflight = c.pending.bytes();
        c.sending = std::mem::take(&mut c.pending);
        let ext = c.sending.runs();
        if background {
            g.background += 1;
        }
        Take::Send(ext)
    }

    /// A future that resolves at the next change (call before unlocking
    /// anything that the change depends on, then await it).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Reports the end of the RPC of a chunk that [`WriteBuffer::take`]
    /// handed out; an error is kept for the file's next fsync or flush.
    pub fn done(&self, ino: u64, index: u64, background: bool, error: Option<(i32, String)>) {
        self.done_then(ino, index, background, error, || {});
    }

    /// [`WriteBuffer::done`], calling `drained` under the buffer's lock if
    /// the chunk got no new data while its RPC was in flight: a write
    /// buffers its data before it drops cached copies of the chunk, so
    /// what `drained` caches is either current or dropped by that write.
    pub fn done_then(
        &self,
        ino: u64,
        index: u64,
        background: bool,
        error: Option<(i32, String)>,
        drained: impl FnOnce(),
    ) {
        let mut g = self.lock();
        if background {
            g.background = g.background.saturating_sub(1);
        }
        let mut freed = 0;
        if let Some(f) = g.files.get_mut(&ino) {
            if let Some(c) = f.chunks.get_mut(&index) {
                freed = c.inflight;
                c.inflight = 0;
                c.sending = Extents::default();
                if c.pending.is_empty() {
                    f.chunks.remove(&index);
                    if error.is_none() {
                        drained();
                    }
                }
            }
            if let Some(e) = error {
                f.error.get_or_insert(e);
            }
            if f.chunks.is_empty() && f.error.is_none() {
                g.files.remove(&ino);
            }
        }
        g.bytes = g.bytes.saturating_sub(freed);
        drop(g);
        self.changed.notify_waiters();
    }

    /// Keeps `error` for the next fsync or flush of `ino` (a flush that no
    /// application call waited for failed).
    pub fn keep_error(&self, ino: u64, error: (i32, String)) {
        self.lock()
            .files
            .entry(ino)
            .or_default()
            .error
            .get_or_insert(error);
    }

    /// The error a background write of `ino` left, if it is ENOSPC or
    /// EDQUOT (left in place for the next fsync or flush).
    pub fn no_space_error(&self, ino: u64) -> Option<(i32, String)> {
        let g = self.lock();
        let e = g.files.get(&ino)?.error.as_ref()?;
        (e.0 == libc::ENOSPC || e.0 == libc::EDQUOT).then(|| e.clone())
    }

    /// The error a background write of `ino` left, if any, left in place
    /// (a close reports it; the next fsync takes it).
    pub fn peek_error(&self, ino: u64) -> Option<(i32, String)> {
        self.lock().files.get(&ino)?.error.clone()
    }

    /// Takes the error a background write of `ino` left, if any.
    pub fn take_error(&self, ino: u64) -> Option<(i32, String)> {
        let mut g = self.lock();
        let f = g.files.get_mut(&ino)?;
        let e = f.error.take();
        if f.chunks.is_empty() {
            g.files.remove(&ino);
        }
        e
    }

    /// Chunks of `ino` with pending or in-flight data.
    pub fn chunks_of(&self, ino: u64) -> Vec<u64> {
        self.lock()
            .files
            .get(&ino)
            .map(|f| f.chunks.keys().copied().collect())
            .unwrap_or_default()
    }

    /// True when chunk `(ino, index)` has pending data overlapping
    /// `[off, off+len)`, or an RPC in flight.
    pub fn holds(&self, ino: u64, index: u64, off: u64, len: u64) -> bool {
        let g = self.lock();
        g.files
            .get(&ino)
            .and_then(|f| f.chunks.get(&index))
            .is_some_and(|c| c.inflight > 0 || c.pending.overlaps(off, len))
    }

    /// Copies `[off, off+dst.len())` of a chunk into `dst` if buffered
    /// writes hold all of it (the newest bytes there), pending or in
    /// flight; false otherwise.
    pub fn copy_if_covered(&self, ino: u64, index: u64, off: u64, dst: &mut [u8]) -> bool {
        let g = self.lock();
        g.files
            .get(&ino)
            .and_then(|f| f.chunks.get(&index))
            .is_some_and(|c| {
                c.pending.copy_if_covered(off, dst)
                    || (!c.pending.overlaps(off, dst.len() as u64)
                        && c.sending.copy_if_covered(off, dst))
            })
    }

    /// Inodes with buffered data or an unreported error.
    pub fn inos(&self) -> Vec<u64> {
        self.lock().files.keys().copied().collect()
    }

    /// Chunks the background should send now, at most as many as free
    /// background slots: full chunks and, past half the budget, the
    /// largest ones; with `aged`, also chunks whose data is older than
    /// [`MAX_AGE`].
    pub fn pick(&self, aged: bool) -> Vec<(u64, u64)> {
        let g = self.lock();
        let free = MAX_BACKGROUND_RPCS.saturating_sub(g.background);
        if free == 0 || g.files.is_empty() {
            return Vec::new();
        }
        let pressure = g.bytes > self.budget / 2;
        let now = Instant::now();
        let mut cand: Vec<(u64, (u64, u64))> = Vec::new();
        for (&ino, f) in &g.files {
            for (&index, c) in &f.chunks {
                if c.inflight > 0 || c.pending.is_empty() {
                    continue;
                }
                let b = c.pending.bytes();
                let old = aged && now.duration_since(c.since) >= MAX_AGE;
                if pressure || old || b >= FULL_CHUNK_BYTES {
                    cand.push((b, (ino, index)));
                }
            }
        }
        cand.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
        cand.into_iter().take(free).map(|(_, k)| k).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b(len: usize, v: u8) -> Bytes {
        Bytes::from(vec![v; len])
    }

    #[test]
    fn overlapping_inserts_keep_newest() {
        let mut e = Extents::default();
        assert_eq!(e.insert(100, b(100, 1)), 100);
        // Inside: splits the old extent.
        assert_eq!(e.insert(120, b(10, 2)), 0);
        assert_eq!(e.len(), 3);
        // Covering two and extending.
        assert_eq!(e.insert(90, b(50, 3)), 10);
        let mut img = vec![0u8; 250];
        e.overlay(&mut img);
        assert!(img[..90].iter().all(|&x| x == 0));
        assert!(img[90..140].iter().all(|&x| x == 3));
        assert!(img[140..200].iter().all(|&x| x == 1));
        assert!(img[200..].iter().all(|&x| x == 0));
        assert_eq!(e.bytes(), 110);
        // Adjacent ranges do not overlap.
        assert!(!e.overlaps(200, 10));
        assert!(!e.overlaps(0, 90));
        assert!(e.overlaps(89, 2));
        assert!(e.overlaps(199, 1));
        assert!(e.overlaps(0, 1000));
        let taken = e.take();
        assert_eq!(taken.iter().map(|x| x.0).collect::<Vec<_>>(), vec![90, 140]);
        assert!(e.is_empty());
        assert_eq!(e.bytes(), 0);
    }

    #[test]
    fn coalesces_per_chunk_and_tracks_budget() {
        let wb = WriteBuffer::new(1 << 20);
        assert!(!wb.add(7, 0, 0, b(4096, 1)));
        assert!(!wb.add(7, 0, 8192, b(4096, 2)));
        assert!(!wb.add(7, 1, 0, b(4096, 3)));
        assert!(!wb.add(7, 0, 0, b(4096, 4)));
        assert_eq!(wb.bytes(), 3 * 4096);
        assert_eq!(wb.chunks_of(7), vec![0, 1]);
        assert!(wb.holds(7, 0, 8000, 200));
        assert!(!wb.holds(7, 0, 4096, 4096));
        // One take per chunk carries all of its extents.
        let Take::Send(ext) = wb.take(7, 0, false) else {
            panic!("expected data")
        };
        assert_eq!(ext.len(), 2);
        assert_eq!(ext[0].1[0], 4);
        // In flight: a second sender waits; new writes queue behind it.
        assert!(matches!(wb.take(7, 0, false), Take::Busy));
        wb.add(7, 0, 0, b(10, 5));
        assert!(wb.holds(7, 0, 4096, 4096));
        assert_eq!(wb.bytes(), 3 * 4096 + 10);
        wb.done(7, 0, false, None);
        assert_eq!(wb.bytes(), 4096 + 10);
        let Take::Send(ext) = wb.take(7, 0, false) else {
            panic!("expected data")
        };
        assert_eq!(ext.len(), 1);
        wb.done(7, 0, false, Some((libc::EIO, "boom".into())));
        assert!(matches!(wb.take(7, 0, false), Take::Idle));
        // The error waits for the next fsync/flush, reported once.
        assert_eq!(wb.no_space_error(7), None, "EIO is not reported at write");
        assert_eq!(wb.take_error(7).map(|e| e.0), Some(libc::EIO));
        assert_eq!(wb.take_error(7), None);
        assert_eq!(wb.chunks_of(7), vec![1]);
    }

    #[test]
    fn a_full_cluster_is_reported_at_the_next_write_and_at_fsync() {
        let wb = WriteBuffer::new(1 << 20);
        wb.add(9, 0, 0, b(4096, 1));
        let Take::Send(_) = wb.take(9, 0, true) else {
            panic!("expected data")
        };
        wb.done(9, 0, true, Some((libc::ENOSPC, "osd 2 is full".into())));
        // Every write sees it until fsync or close takes it, once.
        assert_eq!(wb.no_space_error(9).map(|e| e.0), Some(libc::ENOSPC));
        assert_eq!(wb.no_space_error(9).map(|e| e.0), Some(libc::ENOSPC));
        assert_eq!(wb.take_error(9).map(|e| e.0), Some(libc::ENOSPC));
        assert_eq!(wb.no_space_error(9), None);
        assert_eq!(wb.take_error(9), None);
    }

    #[test]
    fn data_in_flight_is_read_from_the_buffer_until_stored() {
        let wb = WriteBuffer::new(1 << 20);
        wb.add(7, 0, 0, b(4096, 1));
        let Take::Send(_) = wb.take(7, 0, false) else {
            panic!("expected data")
        };
        let mut dst = [0u8; 100];
        assert!(wb.copy_if_covered(7, 0, 10, &mut dst), "in flight");
        assert_eq!(dst, [1u8; 100]);
        // Newer pending bytes win; a read across both is not answered.
        wb.add(7, 0, 50, b(20, 2));
        assert!(wb.copy_if_covered(7, 0, 50, &mut dst[..20]));
        assert_eq!(dst[..20], [2u8; 20]);
        assert!(!wb.copy_if_covered(7, 0, 40, &mut dst[..20]));
        assert!(wb.copy_if_covered(7, 0, 100, &mut dst[..20]));
        assert_eq!(dst[..20], [1u8; 20]);
        // Stored: what is left is the pending write only.
        let mut drained = false;
        wb.done_then(7, 0, false, None, || drained = true);
        assert!(!drained, "new data came in while in flight");
        assert!(!wb.copy_if_covered(7, 0, 100, &mut dst[..20]));
        let Take::Send(_) = wb.take(7, 0, false) else {
            panic!("expected data")
        };
        wb.done_then(7, 0, false, None, || drained = true);
        assert!(drained);
        assert!(!wb.copy_if_covered(7, 0, 50, &mut dst[..20]));
    }

    #[test]
    fn picks_full_then_pressure() {
        let wb = WriteBuffer::new(8 << 20);
        assert!(wb.pick(false).is_empty());
        assert!(wb.add(1, 0, 0, b(FULL_CHUNK_BYTES as usize, 1)));
        wb.add(1, 1, 0, b(4096, 1));
        assert_eq!(wb.pick(false), vec![(1, 0)]);
        // Past half the budget every chunk qualifies, largest first.
        wb.add(2, 0, 0, b(3 << 20, 1));
        assert!(wb.under_pressure());
        assert_eq!(wb.pick(false), vec![(2, 0), (1, 0), (1, 1)]);
        assert!(wb.accepts(64 << 10));
        assert!(!wb.accepts(DIRECT_WRITE_BYTES));
        assert!(!WriteBuffer::new(64 << 10).accepts(32 << 10));
        assert!(!WriteBuffer::new(0).accepts(1));
    }

    #[tokio::test]
    async fn reserve_waits_for_room() {
        let wb = std::sync::Arc::new(WriteBuffer::new(8192));
        wb.add(1, 0, 0, b(8192, 1));
        let Take::Send(_) = wb.take(1, 0, true) else {
            panic!("expected data")
        };
        let w2 = wb.clone();
        let waiter = tokio::spawn(async move { w2.reserve(4096, || {}).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        wb.done(1, 0, true, None);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("join");
    }

    proptest! {
        /// Any sequence of overlapping writes reads back as applying them
        /// in order, and the byte count matches what is held.
        #[test]
        fn extents_match_model(ops in proptest::collection::vec((0u32..4000, 1usize..700, any::<u8>()), 1..40)) {
            let mut e = Extents::default();
            let mut model = vec![0u8; 5000];
            let mut written = vec![false; 5000];
            for (off, len, v) in ops {
                e.insert(off, b(len, v));
                model[off as usize..off as usize + len].fill(v);
                written[off as usize..off as usize + len].fill(true);
            }
            let mut img = vec![0u8; 5000];
            e.overlay(&mut img);
            prop_assert_eq!(&img, &model);
            prop_assert_eq!(e.bytes(), written.iter().filter(|&&w| w).count() as u64);
            // A range reads from the extents exactly when all of it was written.
            for (from, n) in [(0usize, 5000usize), (0, 1), (100, 300), (999, 2), (3000, 700), (4500, 500)] {
                let mut dst = vec![0xeeu8; n];
                let covered = written[from..from + n].iter().all(|&w| w);
                prop_assert_eq!(e.copy_if_covered(from as u64, &mut dst), covered);
                if covered {
                    prop_assert_eq!(&dst[..], &model[from..from + n]);
                }
            }
            let mut last_end = 0u64;
            for (off, d) in e.take() {
                prop_assert!(u64::from(off) >= last_end);
                last_end = u64::from(off) + d.len() as u64;
            }
        }
    }
}
