//! Large chunk writes that bypass the page cache (`O_DIRECT`).
//!
//! Copying a stream of large writes into the page cache costs an OSD more
//! CPU than anything else it does (fresh pages allocated, charged, copied
//! into, written back and reclaimed), and those pages are seldom read from
//! here again: clients cache what they read, and the disk takes a direct
//! write faster than the same bytes through writeback. So the aligned
//! middle of a large write goes to the disk straight from an aligned
//! buffer; small writes and unaligned edges stay buffered. Durability does
//! not change: the file is fsynced at the same points either way.

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Offset, length and memory alignment of a direct write: the page size,
/// which covers every block size and DMA alignment a disk asks for.
pub const ALIGN: usize = 4096;

/// Writes with an aligned part at least this long go direct.
pub const MIN_DIRECT: usize = 256 << 10;

/// The part of a write of `len` bytes at `off` that can go direct, as a
/// range of the write's bytes; `None` when it is too small.
pub fn aligned_part(off: u64, len: usize) -> Option<std::ops::Range<usize>> {
    let a = ALIGN as u64;
    let start = off.div_ceil(a) * a;
    let end = (off + len as u64) / a * a;
    (end >= start && (end - start) as usize >= MIN_DIRECT)
        .then(|| (start - off) as usize..(end - off) as usize)
}

/// Opens `path` for direct writes.
pub fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// A heap buffer aligned to [`ALIGN`].
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    fn new(cap: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(cap.max(ALIGN), ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc(layout) };
        let ptr = std::ptr::NonNull::new(p).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, layout }
    }

    fn cap(&self) -> usize {
        self.layout.size()
    }

    /// The first `len` bytes (`len <= cap`), filled from `src`.
    fn fill(&mut self, src: &[u8]) -> &[u8] {
        assert!(src.len() <= self.cap());
        // SAFETY: the buffer holds at least `src.len()` bytes, owned by
        // `self`, and cannot overlap `src` (a shared borrow elsewhere).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr(), src.len());
            std::slice::from_raw_parts(self.ptr.as_ptr(), src.len())
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

thread_local! {
    /// One bounce buffer per thread, kept: its pages stay mapped, so a
    /// stream of writes does not fault fresh memory in for every one.
    static BOUNCE: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

/// Writes `data` (aligned in offset and length) at `off` of a file opened
/// with [`open`], from `data` itself when it is aligned in memory, else
/// through this thread's bounce buffer. Returns how many bytes it wrote,
/// which is short only when the disk stopped early (the caller writes the
/// rest the buffered way, which reports the reason).
pub fn write(file: &File, data: &[u8], off: u64) -> io::Result<usize> {
    debug_assert!(off.is_multiple_of(ALIGN as u64) && data.len().is_multiple_of(ALIGN));
    if (data.as_ptr() as usize).is_multiple_of(ALIGN) {
        return write_loop(file, data, off);
    }
    BOUNCE.with(|b| {
        let mut b = b.borrow_mut();
        if b.as_ref().is_none_or(|b| b.cap() < data.len()) {
            // Whole MiBs, so that a slightly larger write does not make
            // it allocate again.
            *b = Some(AlignedBuf::new(data.len().next_multiple_of(1 << 20)));
        }
        let buf = b.as_mut().expect("just set").fill(data);
        write_loop(file, buf, off)
    })
}

fn write_loop(file: &File, data: &[u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match file.write_at(&data[done..], off + done as u64) {
            Ok(0) => break,
            // A short direct write may end unaligned: the rest is not
            // ours to finish.
            Ok(n) if !n.is_multiple_of(ALIGN) => return Ok(done + n),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_parts() {
        assert_eq!(aligned_part(0, MIN_DIRECT), Some(0..MIN_DIRECT));
        assert_eq!(aligned_part(0, MIN_DIRECT - 1), None);
        assert_eq!(aligned_part(100, MIN_DIRECT), None);
        assert_eq!(
            aligned_part(100, MIN_DIRECT + ALIGN + 10),
            Some(ALIGN - 100..ALIGN - 100 + MIN_DIRECT)
        );
        assert_eq!(aligned_part(1 << 20, 10), None);
    }

    #[test]
    fn unaligned_memory_goes_through_the_bounce_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"").unwrap();
        let f = match open(&p) {
            Ok(f) => f,
            // tmpfs and some others refuse O_DIRECT: nothing to test there.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => panic!("{e}"),
        };
        let src: Vec<u8> = (0..3 * ALIGN + 1).map(|i| (i * 7) as u8).collect();
        let n = write(&f, &src[1..], ALIGN as u64).unwrap();
        assert_eq!(n, 3 * ALIGN);
        let back = std::fs::read(&p).unwrap();
        assert_eq!(back.len(), 4 * ALIGN);
        assert!(back[..ALIGN].iter().all(|&b| b == 0));
        assert_eq!(&back[ALIGN..], &src[1..]);
    }
}
