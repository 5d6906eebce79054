//! The metadata reserve: when the filesystem of this node's data directory
//! has less than [`reserve_bytes`] free, the leader refuses changes that
//! grow the namespace (creates, links, xattrs, new delegations) with
//! ENOSPC and still serves removals, so the raft log always has room for
//! the deletes that free space (on the OSDs and here).

use crate::node::MdsError;
use avalon_proto::disk_usage::{DiskSampler, DiskUsage};
use std::path::PathBuf;

use std::time::Duration;

/// How old a statvfs sample may be before a request takes a new one.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// The reserve on a filesystem of `total` bytes: `min_bytes`, or 2% of a
/// larger disk (a log entry is small; 2% of a large disk is many deletes).
pub fn reserve_bytes(total: u64, min_bytes: u64) -> u64 {
    min_bytes.max(total / 50)
}

/// Watches this node's data directory.
pub struct DiskReserve {
    disk: DiskSampler,
    min_bytes: u64,
}

impl DiskReserve {
    /// A reserve of at least `min_bytes` on the filesystem of `dir`.
    pub fn new(dir: PathBuf, min_bytes: u64) -> DiskReserve {
        DiskReserve {
            disk: DiskSampler::new(dir, SAMPLE_EVERY),
            min_bytes,
        }
    }

    /// The data directory's usage (sampled at most [`SAMPLE_EVERY`] ago);
    /// `None` when statvfs fails (nothing is refused then).
    pub fn usage(&self) -> Option<DiskUsage> {
        self.disk.usage()
    }

    /// True when the free space is under the reserve.
    pub fn low(&self) -> bool {
        self.usage()
            .is_some_and(|u| u.free < reserve_bytes(u.total, self.min_bytes))
    }

    /// ENOSPC when the free space is under the reserve: for requests that
    /// grow the namespace.
    pub fn check_growth(&self) -> Result<(), MdsError> {
        if self.low() {
            tracing::debug!(dir = %self.disk.dir().display(), "metadata disk under its reserve; refusing a create");
            return Err(MdsError::Errno(libc::ENOSPC));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_is_the_larger_of_floor_and_two_percent() {
        assert_eq!(reserve_bytes(1 << 30, 256 << 20), 256 << 20);
        assert_eq!(reserve_bytes(100 << 30, 256 << 20), 2 << 30);
        assert_eq!(reserve_bytes(0, 0), 0);
    }

    #[test]
    fn growth_refused_only_under_the_reserve() {
        let d = tempfile::tempdir().expect("tempdir");
        let roomy = DiskReserve::new(d.path().to_path_buf(), 0);
        let u = roomy.usage().expect("statvfs");
        assert!(u.total > 0);
        // A floor larger than any disk: always under it.
        let tight = DiskReserve::new(d.path().to_path_buf(), u64::MAX);
        assert!(tight.low());
        assert!(matches!(
            tight.check_growth(),
            Err(MdsError::Errno(libc::ENOSPC))
        ));
        // No floor: refused only if the disk is more than 98% full.
        if u.free > u.total / 50 + (64 << 20) {
            assert!(roomy.check_growth().is_ok());
        }
    }
}
