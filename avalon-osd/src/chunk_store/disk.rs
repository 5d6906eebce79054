//! The seam between the chunk store and the filesystem under it.
//!
//! Every file operation whose outcome matters for durability (open and
//! create, `pwrite`, `pread`, `set_len`, fsync, rename, remove, fsync of a
//! directory) goes through [`Disk`] and [`DiskFile`], so that tests can run
//! the store on a disk that fails or loses unsynced writes on purpose
//! (tikv/raft-engine's `env` module does the same). [`StdDisk`] is the real
//! one, on std and libc. Hints that change no content (readahead, early
//! writeback, non-blocking cached reads, hole maps) are methods with
//! harmless defaults, so a test disk need not model them.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

/// How [`Disk::open`] opens a file. Every mode but `Read` reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// An existing file, for reading.
    Read,
    /// An existing file, for reading and writing.
    Write,
    /// Created when missing, kept as it is otherwise.
    Create,
    /// Created when missing, emptied otherwise.
    CreateTruncate,
}

/// An entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The entry's name (entries whose names are not UTF-8 are left out).
    pub name: String,
    /// It is a directory.
    pub is_dir: bool,
}

/// The filesystem operations of the chunk store.
pub trait Disk: Send + Sync + fmt::Debug {
    /// Opens the file at `path`.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn DiskFile>>;
    /// Opens an existing file for direct (`O_DIRECT`) writes; `EINVAL`
    /// where the filesystem takes none.
    fn open_direct(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>>;
    /// Length of the file at `path` and whether it is a regular file.
    fn stat(&self, path: &Path) -> io::Result<(u64, bool)>;
    /// The entries of a directory.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>>;
    /// Makes a directory (`AlreadyExists` when it exists).
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Makes a directory and its missing parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Removes a directory and everything in it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Renames a file, replacing any file at `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// fsyncs a directory (its entries become durable).
    fn sync_dir(&self, path: &Path) -> io::Result<()>;

    /// Makes `to` (created or emptied) share `from`'s blocks, copying
    /// none (`FICLONE`); `Unsupported` where the filesystem cannot, and
    /// then `to` is left absent. Not durable until `to` is fsynced.
    fn reflink(&self, _from: &Path, _to: &Path) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// The whole content of a file.
    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let f = self.open(path, OpenMode::Read)?;
        let mut buf = vec![0u8; f.len()? as usize];
        let n = read_full(&*f, &mut buf, 0)?;
        buf.truncate(n);
        Ok(buf)
    }
}

/// An open file of a [`Disk`].
#[allow(clippy::len_without_is_empty)] // a file's length, not a collection's
pub trait DiskFile: Send + Sync + fmt::Debug {
    /// `pread`: up to `buf.len()` bytes at `off` (0 at the end).
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// `pwrite`: up to `buf.len()` bytes at `off`.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<usize>;
    /// Sets the file's length (cutting or extending with zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The file's length.
    fn len(&self) -> io::Result<u64>;
    /// fdatasync: content and what reading it back needs (length,
    /// blocks) durable; not times, which no chunk reader looks at (an
    /// fsync of an overwritten chunk wrote its inode for the mtime alone).
    fn sync_data(&self) -> io::Result<()>;

    /// Writes all of `buf` at `off`.
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        write_full(self, buf, off)
    }
    /// Fills `buf` from `off`; `UnexpectedEof` when the file ends first.
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        read_exact(self, buf, off)
    }

    /// Makes `[off, off+len)` read as zeros without changing the length;
    /// `Unsupported` when the file cannot punch holes (the caller writes
    /// zeros).
    fn punch_hole(&self, _off: u64, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// A read served only from the page cache without blocking; `None`
    /// when not all of it is cached (or unsupported).
    fn read_nowait(&self, _buf: &mut [u8], _off: u64) -> Option<usize> {
        None
    }
    /// Hint: reads are random (no readahead).
    fn advise_random(&self) {}
    /// Hint: start writing `[off, off+len)` back now.
    fn start_writeback(&self, _off: u64, _len: usize) {}
    /// The data (non-hole) ranges of the first `len` bytes.
    fn data_ranges(&self, len: u64) -> Vec<(u64, u64)> {
        if len == 0 {
            Vec::new()
        } else {
            vec![(0, len)]
        }
    }
    /// A write through a descriptor from [`Disk::open_direct`] (aligned in
    /// offset and length); returns how much it wrote.
    fn write_direct(&self, data: &[u8], off: u64) -> io::Result<usize> {
        write_full(self, data, off).map(|()| data.len())
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
pub fn read_full(f: &(impl DiskFile + ?Sized), buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Fills `buf` from `off`; `UnexpectedEof` when the file ends first.
pub fn read_exact(f: &(impl DiskFile + ?Sized), buf: &mut [u8], off: u64) -> io::Result<()> {
    if read_full(f, buf, off)? == buf.len() {
        Ok(())
    } else {
        Err(io::ErrorKind::UnexpectedEof.into())
    }
}

/// Writes all of `buf` at `off`.
pub fn write_full(f: &(impl DiskFile + ?Sized), buf: &[u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.write_at(&buf[done..], off + done as u64) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The real disk: std and libc calls on the local filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdDisk;

/// A file of [`StdDisk`].
#[derive(Debug)]
pub struct StdFile(File);

impl Disk for StdDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn DiskFile>> {
        let mut o = OpenOptions::new();
        match mode {
            OpenMode::Read => o.read(true),
            OpenMode::Write => o.read(true).write(true),
            OpenMode::Create => o.read(true).write(true).create(true).truncate(false),
            OpenMode::CreateTruncate => o.read(true).write(true).create(true).truncate(true),
        };
        Ok(Arc::new(StdFile(o.open(path)?)))
    }

    fn open_direct(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>> {
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        Ok(Arc::new(StdFile(f)))
    }

    fn stat(&self, path: &Path) -> io::Result<(u64, bool)> {
        let m = fs::metadata(path)?;
        Ok((m.len(), m.is_file()))
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        for ent in fs::read_dir(path)? {
            let ent = ent?;
            let Ok(name) = ent.file_name().into_string() else {
                continue;
            };
            let is_dir = ent.file_type()?.is_dir();
            out.push(DirEntry { name, is_dir });
        }
        Ok(out)
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn reflink(&self, from: &Path, to: &Path) -> io::Result<()> {
        /// `_IOW(0x94, 9, int)` from linux/fs.h.
        const FICLONE: u32 = 0x4004_9409;
        let src = File::open(from)?;
        let dst = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(to)?;
        // SAFETY: both descriptors are open for the duration of the call;
        // FICLONE takes the source descriptor as its argument.
        let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        let _ = fs::remove_file(to);
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY) => {
                Err(io::ErrorKind::Unsupported.into())
            }
            _ => Err(e),
        }
    }
}

impl DiskFile for StdFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.0.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<usize> {
        self.0.write_at(buf, off)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on a valid open descriptor.
        let r = unsafe {
            libc::fallocate(
                self.0.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                Err(io::ErrorKind::Unsupported.into())
            }
            _ => Err(e),
        }
    }

    fn read_nowait(&self, buf: &mut [u8], off: u64) -> Option<usize> {
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: one iovec over `buf`, which outlives the call.
        let n = unsafe {
            libc::preadv2(
                self.0.as_raw_fd(),
                &iov,
                1,
                off as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        (n >= 0).then_some(n as usize)
    }

    /// Turns off the kernel's readahead: every read asks for exactly what
    /// it needs (a few checksum blocks, or the whole chunk for a client's
    /// sequential readahead), while the disk's readahead (often megabytes)
    /// would turn each small random read into a large one.
    fn advise_random(&self) {
        // SAFETY: a valid open descriptor; the call only sets a hint.
        // A failure only leaves the default readahead: nothing to report.
        let _ = unsafe { libc::posix_fadvise(self.0.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    }

    /// Starts writing the range back to the disk without waiting for it:
    /// a large write's later fsync then finds most of it there already,
    /// instead of flushing gigabytes at the end of a stream. A hint only:
    /// its failure shows in the fsync that matters.
    fn start_writeback(&self, off: u64, len: usize) {
        // SAFETY: a valid descriptor; the call only reads its arguments.
        let r = unsafe {
            libc::sync_file_range(
                self.0.as_raw_fd(),
                off as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "sync_file_range");
        }
    }

    /// Per SEEK_DATA and SEEK_HOLE; all of it when the filesystem cannot
    /// tell.
    fn data_ranges(&self, len: u64) -> Vec<(u64, u64)> {
        let fd = self.0.as_raw_fd();
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < len {
            // SAFETY: lseek on a valid descriptor has no memory effects.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                    break; // only a hole up to the end
                }
                out.push((pos, len));
                break;
            }
            let start = data as u64;
            if start >= len {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
            let end = if hole < 0 {
                len
            } else {
                (hole as u64).min(len)
            };
            out.push((start, end));
            pos = end;
        }
        out
    }

    fn write_direct(&self, data: &[u8], off: u64) -> io::Result<usize> {
        crate::direct_io::write(&self.0, data, off)
    }
}
