//! How full a filesystem is (statvfs), and how full it counts as: the one
//! definition the OSDs (full disks refuse writes), the MDS (its metadata
//! reserve) and `avalonctl status` share.

use crate::pb::DiskFill;
use std::path::Path;

/// Size and free space of one filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskUsage {
    /// Bytes in the filesystem.
    pub total: u64,
    /// Bytes an unprivileged writer can still allocate (`f_bavail`: the
    /// root reserve counts as used, so a daemon running as root does not
    /// fill the disk past what its admin sees as 100%).
    pub free: u64,
}

impl DiskUsage {
    /// The fill ratio, `1 - free / total` (1.0 for a filesystem of size 0).
    pub fn ratio(&self) -> f64 {
        if self.total == 0 {
            return 1.0;
        }
        1.0 - self.free.min(self.total) as f64 / self.total as f64
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
    Ok(DiskUsage {
        total: (st.f_blocks as u64).saturating_mul(frsize),
        free: (st.f_bavail as u64).saturating_mul(frsize),
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
        };
        assert!((u.ratio() - 0.9).abs() < 1e-9);
        assert_eq!(u.fill(0.85, 0.95), DiskFill::NearFull);
        assert_eq!(u.fill(0.95, 0.99), DiskFill::Ok);
        assert_eq!(u.fill(0.5, 0.9), DiskFill::Full);
        assert_eq!(DiskUsage::default().fill(0.85, 0.95), DiskFill::Full);
        let more_free_than_total = DiskUsage {
            total: 10,
            free: 20,
        };
        assert_eq!(more_free_than_total.ratio(), 0.0);
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
        assert!(u.total > 0 && u.free <= u.total);
        assert!(disk_usage(Path::new("/no/such/dir")).is_err());
    }
}
