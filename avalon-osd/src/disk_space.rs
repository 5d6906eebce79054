//! Full-disk admission: how full this OSD's data directory is (statvfs,
//! sampled at most every [`SAMPLE_EVERY`]), which other OSDs the MDS
//! reports full, and the check that refuses a client write to a PG with a
//! full member (ENOSPC) before anything is stored. Reads, deletes,
//! truncates and recovery are never refused: they are what frees space.

use crate::error::OsdError;
use avalon_proto::disk_usage::{DiskSampler, DiskUsage};
use avalon_proto::pb::{DiskFill, OsdInfo, OsdReport};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How old a statvfs sample may be before a write takes a new one. A disk
/// fills at a few hundred MB/s at most, so 50 ms is well inside the margin
/// between the full ratio and a really full disk on any disk of some GB.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// This OSD's view of full disks, its own and its peers'.
pub struct DiskSpace {
    disk: DiskSampler,
    nearfull_ratio: f64,
    full_ratio: f64,
    /// Up OSDs the MDS leader last reported full (heartbeat replies).
    full_osds: RwLock<Arc<Vec<u64>>>,
}

impl DiskSpace {
    /// Watches the filesystem of `dir` with the given thresholds (checked
    /// by the config).
    pub fn new(dir: PathBuf, nearfull_ratio: f64, full_ratio: f64) -> DiskSpace {
        DiskSpace {
            disk: DiskSampler::new(dir, SAMPLE_EVERY),
            nearfull_ratio,
            full_ratio,
            full_osds: RwLock::new(Arc::new(Vec::new())),
        }
    }

    /// The data directory's usage, sampled at most [`SAMPLE_EVERY`] ago;
    /// `None` if statvfs fails (then nothing is refused for space).
    pub fn usage(&self) -> Option<DiskUsage> {
        self.disk.usage()
    }

    /// How full this OSD's disk is.
    pub fn fill(&self) -> DiskFill {
        self.usage().map_or(DiskFill::Ok, |u| {
            u.fill(self.nearfull_ratio, self.full_ratio)
        })
    }

    /// Adds the disk's size, free space and fill to a heartbeat report.
    pub fn report_into(&self, r: &mut OsdReport) {
        if let Some(u) = self.usage() {
            r.disk_total_bytes = u.total;
            r.disk_free_bytes = u.free;
            r.disk_used_bytes = u.used;
            r.disk_fill = u.fill(self.nearfull_ratio, self.full_ratio) as i32;
        }
    }

    /// Takes the set of full OSDs from a heartbeat reply.
    pub fn set_full_osds(&self, mut ids: Vec<u64>) {
        ids.sort_unstable();
        ids.dedup();
        let mut g = self.full_osds.write().unwrap_or_else(|e| e.into_inner());
        if **g != ids {
            tracing::info!(full = ?ids, "OSDs with full disks");
            *g = Arc::new(ids);
        }
    }

    /// Refuses (ENOSPC) a client write to a chunk whose PG has `members`
    /// when this OSD's disk is full or the MDS reports a member full: as
    /// Ceph's full flag, any write, since an overwrite of a chunk copy may
    /// allocate too (holes, a new copy on another member).
    pub fn admit_write(&self, me: u64, members: &[&OsdInfo]) -> Result<(), OsdError> {
        if let Some(u) = self.usage() {
            if u.fill(self.nearfull_ratio, self.full_ratio) == DiskFill::Full {
                return Err(OsdError::NoSpace(format!(
                    "osd {me} is full: {:.1}% used, {} bytes free (full_ratio {})",
                    u.ratio() * 100.0,
                    u.free,
                    self.full_ratio
                )));
            }
        }
        let full = self
            .full_osds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if full.is_empty() {
            return Ok(());
        }
        match members.iter().find(|o| o.id != me && full.contains(&o.id)) {
            Some(o) => Err(OsdError::NoSpace(format!(
                "osd {} ({}), a member of this chunk's placement group, is full",
                o.id, o.addr
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn osd(id: u64) -> OsdInfo {
        OsdInfo {
            id,
            addr: format!("127.0.0.1:{id}"),
            ..Default::default()
        }
    }

    #[test]
    fn a_full_member_refuses_writes_until_it_is_not() {
        let d = tempfile::tempdir().expect("tempdir");
        // Ratios the real disk is surely under.
        let s = DiskSpace::new(d.path().to_path_buf(), 0.999_998, 0.999_999);
        let (a, b, c) = (osd(1), osd(2), osd(3));
        let members = [&a, &b, &c];
        assert!(s.admit_write(1, &members).is_ok());
        s.set_full_osds(vec![3]);
        let e = s.admit_write(1, &members).expect_err("member 3 is full");
        assert!(matches!(e, OsdError::NoSpace(_)), "{e:?}");
        assert!(e.to_string().contains("osd 3"));
        assert!(s.admit_write(1, &[&a, &b]).is_ok(), "other PGs go on");
        s.set_full_osds(Vec::new());
        assert!(s.admit_write(1, &members).is_ok());
    }

    #[test]
    fn own_disk_over_the_ratio_refuses() {
        let d = tempfile::tempdir().expect("tempdir");
        // Any disk with a byte used is over this ratio.
        let s = DiskSpace::new(d.path().to_path_buf(), 1e-12, 1e-12);
        assert_eq!(s.fill(), DiskFill::Full);
        let a = osd(1);
        assert!(matches!(s.admit_write(1, &[&a]), Err(OsdError::NoSpace(_))));
        let mut r = OsdReport::default();
        s.report_into(&mut r);
        assert!(r.disk_total_bytes > 0);
        assert_eq!(r.disk_fill, DiskFill::Full as i32);
    }
}
