//! Named fail points of the chunk store (the `fail` crate), compiled in
//! only with the crate's `failpoints` feature (tests), else nothing.
//!
//! Armed with `return(EIO)` (also the default), `return(ENOSPC)` or
//! another errno name, a point makes its operation fail with that error;
//! `return(EIO@text)` only on files whose path contains `text` (one OSD
//! of several in a process, by its data directory);
//! [`WRITE`] also takes `return(torn)`: the data up to a page boundary
//! near its middle is written, then the write fails with EIO, as a disk
//! that stopped midway.

use std::io;
use std::path::Path;

/// Before a write changes anything (data or sidecar).
pub const BEFORE_WRITE: &str = "osd-chunk-before-write";
/// The data write itself.
pub const WRITE: &str = "osd-chunk-write";
/// After the data is written, before the sidecar is.
pub const AFTER_DATA_WRITE: &str = "osd-chunk-after-data-write";
/// Before a chunk file is fsynced (nothing synced yet).
pub const BEFORE_FSYNC: &str = "osd-chunk-before-fsync";
/// The fsync of a chunk file or directory (the fsync is not done).
pub const FSYNC: &str = "osd-chunk-fsync";
/// A read of a chunk's data.
pub const READ: &str = "osd-chunk-read";

/// What an armed point's argument asks of an operation on `path`: its
/// error, or `None` when the path is not the one it is for.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn fault_for<'a>(arg: Option<&'a str>, path: &Path) -> Option<Option<&'a str>> {
    match arg.and_then(|a| a.split_once('@')) {
        Some((err, filter)) => path
            .to_str()
            .is_some_and(|p| p.contains(filter))
            .then_some(Some(err)),
        None => Some(arg),
    }
}

/// The error an armed point returns: the errno named by its argument.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn error_of(arg: Option<&str>) -> io::Error {
    let code = match arg {
        Some("ENOSPC") => libc::ENOSPC,
        Some("EDQUOT") => libc::EDQUOT,
        Some("EROFS") => libc::EROFS,
        Some("ENOMEM") => libc::ENOMEM,
        _ => libc::EIO,
    };
    io::Error::from_raw_os_error(code)
}

/// The injected error when the point `name` is armed (for `path`).
pub(super) fn check(name: &str, path: &Path) -> io::Result<()> {
    fail::fail_point!(name, |arg: Option<String>| {
        match fault_for(arg.as_deref(), path) {
            Some(e) => Err(error_of(e)),
            None => Ok(()),
        }
    });
    let _ = (name, path);
    Ok(())
}

/// For a data write of `len` bytes at `off` when [`WRITE`] is armed: how
/// many of the bytes to write before failing (a torn write stops at a
/// 4 KiB page boundary near the middle), and the error.
pub(super) fn write_fault(path: &Path, off: u64, len: usize) -> Option<(usize, io::Error)> {
    fail::fail_point!(WRITE, |arg: Option<String>| {
        match fault_for(arg.as_deref(), path)? {
            Some("torn") => {
                let mid = (off + len as u64 / 2) / 4096 * 4096;
                Some((mid.saturating_sub(off) as usize, error_of(None)))
            }
            a => Some((0, error_of(a))),
        }
    });
    let _ = (path, off, len);
    None
}
