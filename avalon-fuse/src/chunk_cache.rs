//! A bounded cache of whole chunks, filled by sequential readahead.
//!
//! When a file is read sequentially, the client fetches the next chunks in
//! the background (each a single large RPC, several in flight) and serves
//! the kernel's reads from memory. Random reads bypass it. Every local
//! change to a chunk (write, zeroing, truncation) drops it, and opening a
//! file drops all of its chunks (close-to-open: another client may have
//! written). A load that finishes after its chunk was dropped is never
//! seen, because readers only find slots through the cache map.

use bytes::Bytes;
use lru::LruCache;
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

/// The cache. Capacity is a number of chunks (memory budget / chunk size).
pub struct ChunkCache {
    slots: Mutex<LruCache<(u64, u64), Slot>>,
    streams: Mutex<LruCache<u64, Stream>>,
}

impl ChunkCache {
    /// A cache holding at most `chunks` chunks (at least 1).
    pub fn new(chunks: usize) -> Self {
        let cap = NonZeroUsize::new(chunks.max(1)).unwrap_or(NonZeroUsize::MIN);
        let streams = NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN);
        ChunkCache {
            slots: Mutex::new(LruCache::new(cap)),
            streams: Mutex::new(LruCache::new(streams)),
        }
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
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(ino, index))
            .cloned()
    }

    /// The slot of a chunk, created empty if absent; `true` if new (the
    /// caller should start loading it).
    pub fn get_or_insert(&self, ino: u64, index: u64) -> (Slot, bool) {
        let mut m = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = m.get(&(ino, index)) {
            return (s.clone(), false);
        }
        let s: Slot = Arc::new(OnceCell::new());
        m.put((ino, index), s.clone());
        (s, true)
    }

    /// Drops one chunk (it changed).
    pub fn invalidate(&self, ino: u64, index: u64) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop(&(ino, index));
    }

    /// Drops every chunk of a file (truncation, open).
    pub fn invalidate_file(&self, ino: u64) {
        let mut m = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<(u64, u64)> = m
            .iter()
            .filter(|(k, _)| k.0 == ino)
            .map(|(k, _)| *k)
            .collect();
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
        let c = ChunkCache::new(2);
        let (_, new) = c.get_or_insert(1, 0);
        assert!(new);
        let (_, new) = c.get_or_insert(1, 0);
        assert!(!new);
        c.get_or_insert(1, 1);
        c.get_or_insert(2, 0);
        assert!(c.get(1, 0).is_none(), "evicted as least recently used");
        c.invalidate_file(1);
        assert!(c.get(1, 1).is_none());
        assert!(c.get(2, 0).is_some());
        c.invalidate(2, 0);
        assert!(c.get(2, 0).is_none());
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
