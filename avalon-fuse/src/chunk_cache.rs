//! A cache of whole chunks within a memory budget, filled by sequential
//! readahead and by this client's own writes.
//!
//! When a file is read sequentially, the client fetches the next chunks in
//! the background (each a single large RPC, several in flight) and serves
//! the kernel's reads from memory. Random reads bypass it. A chunk this
//! client wrote whole (every byte up to the end of file: a new small file)
//! is kept once stored, so that reading it back needs no OSD. Every local
//! change to a chunk (write, zeroing, truncation) drops it, and opening a
//! file another client changed drops all of its chunks (close-to-open). A
//! load that finishes after its chunk was dropped is never seen, because
//! readers only find slots through the cache map.

use bytes::Bytes;
use lru::LruCache;
use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

/// One cached chunk: the stored bytes (short = zeros to the chunk end),
/// filled once by whoever loads it first.
pub type Slot = Arc<OnceCell<Bytes>>;

/// How far ahead sequential readahead fetches, in chunks.
pub const READAHEAD_CHUNKS: u64 = 4;

/// How far from the expected position a read may land and still count as
/// sequential.
const SEQ_WINDOW: u64 = 2 << 20;

/// Per-file sequential-read tracking.
#[derive(Debug, Default, Clone, Copy)]
struct Stream {
    /// Where the next sequential read would start.
    next: u64,
    /// Consecutive sequential reads seen.
    run: u32,
}

/// What a slot costs beyond its bytes (map entries, the slot itself).
const SLOT_OVERHEAD: u64 = 256;

/// The cached chunks, least recently used first out.
struct Slots {
    /// (ino, index) → the slot and what it is charged.
    lru: LruCache<(u64, u64), (Slot, u64)>,
    /// The same keys in order, to drop a file's chunks without a scan.
    keys: BTreeSet<(u64, u64)>,
    used: u64,
    budget: u64,
}

impl Slots {
    fn put(&mut self, key: (u64, u64), slot: Slot, charge: u64) {
        let charge = charge + SLOT_OVERHEAD;
        if let Some((_, old)) = self.lru.put(key, (slot, charge)) {
            self.used -= old;
        }
        self.keys.insert(key);
        self.used += charge;
        while self.used > self.budget && self.lru.len() > 1 {
            match self.lru.pop_lru() {
                Some((k, (_, c))) => {
                    self.keys.remove(&k);
                    self.used -= c;
                }
                None => break,
            }
        }
    }

    fn pop(&mut self, key: &(u64, u64)) {
        if let Some((_, c)) = self.lru.pop(key) {
            self.keys.remove(key);
            self.used -= c;
        }
    }
}

/// The cache.
pub struct ChunkCache {
    slots: Mutex<Slots>,
    streams: Mutex<LruCache<u64, Stream>>,
}

impl ChunkCache {
    /// A cache of at most `budget` bytes (it holds at least one chunk).
    pub fn new(budget: u64) -> Self {
        let streams = NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN);
        ChunkCache {
            slots: Mutex::new(Slots {
                lru: LruCache::unbounded(),
                keys: BTreeSet::new(),
                used: 0,
                budget,
            }),
            streams: Mutex::new(LruCache::new(streams)),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a read of `[offset, offset+len)` and says whether the file is
    /// being read sequentially (the second consecutive read on).
    pub fn note_read(&self, ino: u64, offset: u64, len: u64) -> bool {
        let mut s = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let st = s.get_or_insert_mut(ino, Stream::default);
        // The kernel's own readahead sends several reads at once, and they
        // may arrive out of order: anything near the expected position
        // continues the stream.
        let near = offset <= st.next.saturating_add(SEQ_WINDOW)
            && offset.saturating_add(SEQ_WINDOW) >= st.next;
        if (near && st.next != 0) || (offset == 0 && st.run == 0) {
            st.run = st.run.saturating_add(1);
            st.next = st.next.max(offset.saturating_add(len));
        } else {
            st.run = 0;
            st.next = offset.saturating_add(len);
        }
        st.run >= 2
    }

    /// The slot of a chunk if it is cached or loading.
    pub fn get(&self, ino: u64, index: u64) -> Option<Slot> {
        self.slots().lru.get(&(ino, index)).map(|s| s.0.clone())
    }

    /// The slot of a chunk, created empty if absent and charged `size`
    /// bytes (what loading it may bring); `true` if new (the caller should
    /// start loading it).
    pub fn get_or_insert(&self, ino: u64, index: u64, size: u64) -> (Slot, bool) {
        let mut m = self.slots();
        let hit = m.lru.get(&(ino, index)).map(|s| s.0.clone());
        crate::metrics::cache_lookup(crate::metrics::Cache::Chunk, hit.is_some());
        if let Some(s) = hit {
            return (s, false);
        }
        let s: Slot = Arc::new(OnceCell::new());
        m.put((ino, index), s.clone(), size);
        (s, true)
    }

    /// Caches a chunk's stored bytes (short: zeros to the chunk end).
    pub fn put(&self, ino: u64, index: u64, bytes: Bytes) {
        let size = bytes.len() as u64;
        let s: Slot = Arc::new(OnceCell::new_with(Some(bytes)));
        self.slots().put((ino, index), s, size);
    }

    /// Drops one chunk (it changed).
    pub fn invalidate(&self, ino: u64, index: u64) {
        self.slots().pop(&(ino, index));
    }

    /// Drops every chunk of a file (truncation, open).
    pub fn invalidate_file(&self, ino: u64) {
        let mut m = self.slots();
        let keys: Vec<(u64, u64)> = m.keys.range((ino, 0)..=(ino, u64::MAX)).copied().collect();
        for k in keys {
            m.pop(&k);
        }
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop(&ino);
    }
}

/// Copies `[off, off+n)` of a cached chunk into `out`, zero-filling past
/// the stored end.
pub fn copy_out(chunk: &[u8], off: usize, n: usize, out: &mut [u8]) {
    let avail = chunk.len().saturating_sub(off).min(n);
    if avail > 0 {
        out[..avail].copy_from_slice(&chunk[off..off + avail]);
    }
    out[avail..n].fill(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_detection() {
        let c = ChunkCache::new(4);
        assert!(!c.note_read(1, 0, 100));
        assert!(c.note_read(1, 100, 100));
        assert!(c.note_read(1, 200, 100));
        // Out of order but close: still sequential.
        assert!(c.note_read(1, 250, 50));
        assert!(!c.note_read(1, 50 << 20, 100));
        assert!(!c.note_read(1, (50 << 20) + 100, 100));
        assert!(c.note_read(1, (50 << 20) + 200, 100));
    }

    #[test]
    fn invalidation_and_capacity() {
        let c = ChunkCache::new(2 * (1000 + SLOT_OVERHEAD));
        let (_, new) = c.get_or_insert(1, 0, 1000);
        assert!(new);
        let (_, new) = c.get_or_insert(1, 0, 1000);
        assert!(!new);
        c.get_or_insert(1, 1, 1000);
        c.get_or_insert(2, 0, 1000);
        assert!(c.get(1, 0).is_none(), "evicted as least recently used");
        c.invalidate_file(1);
        assert!(c.get(1, 1).is_none());
        assert!(c.get(2, 0).is_some());
        c.invalidate(2, 0);
        assert!(c.get(2, 0).is_none());
    }

    #[test]
    fn the_budget_counts_bytes_so_small_chunks_fit_many() {
        let c = ChunkCache::new(100 * (4096 + SLOT_OVERHEAD));
        for ino in 0..100 {
            c.put(ino, 0, Bytes::from(vec![ino as u8; 4096]));
        }
        for ino in 0..100 {
            let s = c.get(ino, 0).expect("all 100 fit");
            assert_eq!(s.get().unwrap()[..], [ino as u8; 4096][..]);
        }
        c.put(100, 0, Bytes::from(vec![1u8; 4096]));
        assert!(c.get(0, 0).is_none(), "least recently used goes");
        assert!(c.get(100, 0).is_some());
        // One chunk larger than the budget is still kept (alone).
        c.get_or_insert(7, 3, 1 << 30);
        assert!(c.get(7, 3).is_some());
        assert!(c.get(100, 0).is_none());
        c.invalidate_file(7);
        assert_eq!(c.slots().used, 0);
        assert!(c.slots().keys.is_empty());
    }

    #[test]
    fn copy_out_zero_fills() {
        let mut out = [9u8; 6];
        copy_out(b"abcd", 2, 6, &mut out);
        assert_eq!(&out, b"cd\0\0\0\0");
        let mut out = [9u8; 3];
        copy_out(b"ab", 5, 3, &mut out);
        assert_eq!(&out, b"\0\0\0");
    }
}
