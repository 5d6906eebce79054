//! `avalonctl du` and `avalonctl quota`: recursive statistics and
//! directory quotas, through a mount's virtual xattrs (`avalon.dir.*`,
//! `avalon.quota.*`, computed by the MDS), so they work wherever the
//! directory is mounted and follow the mount's permissions.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What reading or setting a directory's statistics or quota can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DirQuotaError {
    #[error("{path}: {name}: {source}")]
    Xattr {
        path: String,
        name: String,
        source: std::io::Error,
    },
    #[error("{path}: unexpected value of {name}: {value:?}")]
    Parse {
        path: String,
        name: String,
        value: String,
    },
    #[error("{0}: path contains a NUL byte")]
    Path(String),
}

type Result<T> = std::result::Result<T, DirQuotaError>;

/// A directory's recursive statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirUsage {
    pub rbytes: u64,
    pub rfiles: u64,
    pub rsubdirs: u64,
    /// Latest ctime below, as the MDS prints it (`SECONDS.NANOSECONDS`).
    pub rctime_ns: i128,
}

/// A directory's limits (0: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_files: u64,
}

fn cpath(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| DirQuotaError::Path(path_str(path)))
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

/// Reads xattr `name` of `path`; `None` if it is not set (ENODATA).
pub fn get(path: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let p = cpath(path)?;
    let n = CString::new(name).map_err(|_| DirQuotaError::Path(name.into()))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: p and n are NUL-terminated; buf is valid for buf.len().
        let r =
            unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(Some(buf));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODATA) => return Ok(None),
            Some(libc::ERANGE) if buf.len() < 1 << 24 => buf.resize(buf.len() * 4, 0),
            _ => {
                return Err(DirQuotaError::Xattr {
                    path: path_str(path),
                    name: name.into(),
                    source: e,
                })
            }
        }
    }
}

/// Sets xattr `name` of `path` to `value`, or removes it when `None`.
pub fn set(path: &Path, name: &str, value: Option<&[u8]>) -> Result<()> {
    let p = cpath(path)?;
    let n = CString::new(name).map_err(|_| DirQuotaError::Path(name.into()))?;
    // SAFETY: p and n are NUL-terminated; value is valid for its length.
    let r = unsafe {
        match value {
            Some(v) => libc::setxattr(p.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0),
            None => libc::removexattr(p.as_ptr(), n.as_ptr()),
        }
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if value.is_none() && e.raw_os_error() == Some(libc::ENODATA) {
        return Ok(());
    }
    Err(DirQuotaError::Xattr {
        path: path_str(path),
        name: name.into(),
        source: e,
    })
}

fn number(path: &Path, name: &str) -> Result<u64> {
    let v = get(path, name)?.unwrap_or_else(|| b"0".to_vec());
    let s = String::from_utf8_lossy(&v).trim().to_string();
    s.parse().map_err(|_| DirQuotaError::Parse {
        path: path_str(path),
        name: name.into(),
        value: s,
    })
}

/// The recursive statistics of directory `path`.
pub fn du(path: &Path) -> Result<DirUsage> {
    let rctime = get(path, "avalon.dir.rctime")?.unwrap_or_default();
    let rctime = String::from_utf8_lossy(&rctime).trim().to_string();
    let (sec, ns) = rctime.split_once('.').unwrap_or((&rctime, "0"));
    let rctime_ns = match (sec.parse::<i128>(), ns.parse::<i128>()) {
        (Ok(s), Ok(n)) => s * 1_000_000_000 + n,
        _ => 0,
    };
    Ok(DirUsage {
        rbytes: number(path, "avalon.dir.rbytes")?,
        rfiles: number(path, "avalon.dir.rfiles")?,
        rsubdirs: number(path, "avalon.dir.rsubdirs")?,
        rctime_ns,
    })
}

/// The limits of directory `path`.
pub fn limits(path: &Path) -> Result<Limits> {
    Ok(Limits {
        max_bytes: number(path, "avalon.quota.max_bytes")?,
        max_files: number(path, "avalon.quota.max_files")?,
    })
}

/// Sets (a size like `10G`; `0` lifts) the byte and/or inode limit.
pub fn set_limits(path: &Path, max_bytes: Option<&str>, max_files: Option<&str>) -> Result<()> {
    if let Some(b) = max_bytes {
        set(path, "avalon.quota.max_bytes", Some(b.as_bytes()))?;
    }
    if let Some(f) = max_files {
        set(path, "avalon.quota.max_files", Some(f.as_bytes()))?;
    }
    Ok(())
}

/// One quota directory under a listed one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaDir {
    /// Relative to the listed directory.
    pub path: String,
    pub limits: Limits,
    pub used_bytes: u64,
    pub used_inodes: u64,
}

/// The quota directories at or below `path`.
pub fn list(path: &Path) -> Result<Vec<QuotaDir>> {
    let v = get(path, "avalon.quota.list")?.unwrap_or_default();
    let text = String::from_utf8_lossy(&v);
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
        match (f.first(), n(1), n(2), n(3), n(4)) {
            (Some(p), Some(mb), Some(ub), Some(mf), Some(uf)) => out.push(QuotaDir {
                path: p.to_string(),
                limits: Limits {
                    max_bytes: mb,
                    max_files: mf,
                },
                used_bytes: ub,
                used_inodes: uf,
            }),
            _ => {
                return Err(DirQuotaError::Parse {
                    path: path_str(path),
                    name: "avalon.quota.list".into(),
                    value: line.into(),
                })
            }
        }
    }
    Ok(out)
}

/// `n` bytes for people, as `du -h` writes them: 1023, 1.0K, 10.5M...
pub fn human(n: u64) -> String {
    if n < 1024 {
        return n.to_string();
    }
    bytesize::ByteSize::b(n).display().iec_short().to_string()
}

/// A limit for people: "-" when unset.
pub fn limit(n: u64, bytes: bool) -> String {
    match (n, bytes) {
        (0, _) => "-".into(),
        (n, true) => human(n),
        (n, false) => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_for_people() {
        assert_eq!(human(1023), "1023");
        assert_eq!(human(1024), "1.0K");
        assert_eq!(human((10 << 20) + (512 << 10)), "10.5M");
        assert_eq!(limit(0, true), "-");
        assert_eq!(limit(2 << 30, true), "2.0G");
    }
}
