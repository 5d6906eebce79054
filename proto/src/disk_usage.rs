//! How full a filesystem is (statvfs), and how full it counts as: the one
//! definition the OSDs (full disks refuse writes), the MDS (its metadata
//! reserve) and `avalonctl status` share.

use crate::pb::DiskFill;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Size and free space of one filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskUsage {
    /// Bytes in the filesystem.
    pub total: u64,
    /// Bytes an unprivileged writer can still allocate (`f_bavail`).
    pub free: u64,
    /// Bytes in use (`f_blocks - f_bfree`).
    pub used: u64,
}

impl DiskUsage {
    /// The fill ratio as `df` shows it (Use%): `used / (used + free)`, so
    /// 1.0 when an unprivileged writer gets ENOSPC, and the root reserve
    /// (ext4's 5%) counts neither way. 1.0 for a filesystem without room.
    pub fn ratio(&self) -> f64 {
        let room = self.used.saturating_add(self.free);
        if room == 0 {
            return 1.0;
        }
        self.used as f64 / room as f64
    }

    /// How full this counts as against the two thresholds.
    pub fn fill(&self, nearfull_ratio: f64, full_ratio: f64) -> DiskFill {
        let r = self.ratio();
        if r >= full_ratio {
            DiskFill::Full
        } else if r >= nearfull_ratio {
            DiskFill::NearFull
        } else {
            DiskFill::Ok
        }
    }
}

/// A directory's filesystem usage, statvfs'ed at most once per period:
/// requests that check for space share the last sample.
#[derive(Debug)]
pub struct DiskSampler {
    dir: PathBuf,
    every: Duration,
    last: Mutex<Option<(Instant, DiskUsage)>>,
}

impl DiskSampler {
    /// Samples the filesystem of `dir` at most once per `every`.
    pub fn new(dir: PathBuf, every: Duration) -> DiskSampler {
        DiskSampler {
            dir,
            every,
            last: Mutex::new(None),
        }
    }

    /// The directory sampled.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The usage, sampled at most one period ago; `None` if statvfs fails
    /// (then nothing is refused for space).
    pub fn usage(&self) -> Option<DiskUsage> {
        let now = Instant::now();
        if let Some((at, u)) = *self.last.lock().unwrap_or_else(|e| e.into_inner()) {
            if now.duration_since(at) < self.every {
                return Some(u);
            }
        }
        match disk_usage(&self.dir) {
            Ok(u) => {
                *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((now, u));
                Some(u)
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "statvfs failed");
                None
            }
        }
    }
}

/// Size and free space of the filesystem holding `path`.
pub fn disk_usage(path: &Path) -> std::io::Result<DiskUsage> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `st` is plain old data that statvfs fills in; `c` is a valid
    // NUL-terminated path that outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    let frsize = st.f_frsize as u64;
    #[allow(clippy::unnecessary_cast)]
    let (blocks, bfree, bavail) = (st.f_blocks as u64, st.f_bfree as u64, st.f_bavail as u64);
    Ok(DiskUsage {
        total: blocks.saturating_mul(frsize),
        free: bavail.saturating_mul(frsize),
        used: blocks.saturating_sub(bfree).saturating_mul(frsize),
    })
}

/// Checks a pair of thresholds: `0 < nearfull <= full <= 1`.
pub fn check_ratios(nearfull_ratio: f64, full_ratio: f64) -> Result<(), String> {
    let ok = |r: f64| r > 0.0 && r <= 1.0;
    if !ok(nearfull_ratio) || !ok(full_ratio) || nearfull_ratio > full_ratio {
        return Err(format!(
            "need 0 < nearfull_ratio ({nearfull_ratio}) <= full_ratio ({full_ratio}) <= 1"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_and_fill() {
        let u = DiskUsage {
            total: 1000,
            free: 100,
            used: 900,
        };
        assert!((u.ratio() - 0.9).abs() < 1e-9);
        assert_eq!(u.fill(0.85, 0.95), DiskFill::NearFull);
        assert_eq!(u.fill(0.95, 0.99), DiskFill::Ok);
        assert_eq!(u.fill(0.5, 0.9), DiskFill::Full);
        assert_eq!(DiskUsage::default().fill(0.85, 0.95), DiskFill::Full);
        // A root reserve (total > used + free) is counted neither way.
        let reserved = DiskUsage {
            total: 1000,
            free: 0,
            used: 950,
        };
        assert_eq!(reserved.ratio(), 1.0);
        let half = DiskUsage {
            total: 1000,
            free: 475,
            used: 475,
        };
        assert!((half.ratio() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn ratios_checked() {
        assert!(check_ratios(0.85, 0.95).is_ok());
        assert!(check_ratios(0.95, 0.95).is_ok());
        assert!(check_ratios(0.96, 0.95).is_err());
        assert!(check_ratios(0.0, 0.95).is_err());
        assert!(check_ratios(0.5, 1.5).is_err());
        assert!(check_ratios(f64::NAN, 0.9).is_err());
    }

    #[test]
    fn statvfs_of_a_real_dir() {
        let u = disk_usage(Path::new("/")).expect("statvfs /");
        assert!(u.total > 0 && u.free <= u.total && u.used <= u.total);
        assert!(disk_usage(Path::new("/no/such/dir")).is_err());
    }
}
