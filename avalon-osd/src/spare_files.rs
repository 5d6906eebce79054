//! Empty files kept for reuse, instead of deleting chunk files and
//! creating new ones.
//!
//! Creating a file costs the filesystem an inode allocation, and ext4
//! without a journal (the root filesystem of our test machines) checks at
//! every allocation each inode of the group deleted in the last minutes:
//! after a large delete, a new chunk file cost ~0.7 ms of CPU there, and
//! an OSD storing small files starved its own reads. So a removed chunk's
//! files are moved here and emptied, and a new chunk takes one back with a
//! rename (no allocation). Bounded: past [`MAX_SPARES`] files are deleted.
//!
//! Spares do not outlive the process: after a power loss a name here might
//! still refer to a file that was renamed into a bucket, so the store
//! deletes whatever it finds here when it opens.

use crate::chunk_store::disk::{Disk, OpenMode};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Most spare files kept per store.
pub const MAX_SPARES: usize = 65536;

/// The spare files of one store.
pub struct SpareFiles {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    /// Names (numbers) of the spares ready for use.
    free: Mutex<Vec<u64>>,
    next: AtomicU64,
    max: usize,
}

impl SpareFiles {
    /// Opens the spare directory `dir` (made if missing), deleting what
    /// an earlier process left there.
    pub fn open(disk: Arc<dyn Disk>, dir: PathBuf, max: usize) -> io::Result<SpareFiles> {
        disk.create_dir_all(&dir)?;
        for ent in disk.read_dir(&dir)? {
            let p = dir.join(ent.name);
            match disk.remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(SpareFiles {
            disk,
            dir,
            free: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            max,
        })
    }

    fn path(&self, n: u64) -> PathBuf {
        self.dir.join(format!("{n:x}"))
    }

    /// Removes the file at `path`: moved here and emptied when there is
    /// room, else deleted. A missing file is `NotFound`, as for a delete.
    /// (Concurrent discards may each find the last free place: the bound
    /// can be passed by as many as run at once.)
    pub fn discard(&self, path: &Path) -> io::Result<()> {
        if self.count() >= self.max {
            return self.disk.remove_file(path);
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let to = self.path(n);
        self.disk.rename(path, &to)?;
        // The name is gone from the bucket either way: a spare that cannot
        // be emptied (its blocks freed now) is deleted instead.
        match self
            .disk
            .open(&to, OpenMode::Write)
            .and_then(|f| f.set_len(0))
        {
            Ok(()) => self.lock().push(n),
            Err(e) => {
                tracing::debug!(error = %e, path = %to.display(), "spare file not emptied");
                let _ = self.disk.remove_file(&to);
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts an empty spare at `path`, replacing any file there; false when
    /// none is left (the caller creates the file as usual).
    pub fn take_to(&self, path: &Path) -> bool {
        let Some(n) = self.lock().pop() else {
            return false;
        };
        self.disk.rename(&self.path(n), path).is_ok()
    }

    /// Spares ready for use.
    pub fn count(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk_store::disk::StdDisk;
    use std::fs;

    #[test]
    fn discarded_files_come_back_empty_and_the_pool_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        let s = SpareFiles::open(Arc::new(StdDisk), d.path().join("spare"), 2).unwrap();
        let f = |n: &str| d.path().join(n);
        for n in ["a", "b", "c"] {
            fs::write(f(n), b"chunk bytes").unwrap();
        }
        for n in ["a", "b", "c"] {
            s.discard(&f(n)).unwrap();
            assert!(!f(n).exists());
        }
        // The third went beyond the bound: deleted.
        assert_eq!(s.count(), 2);
        assert_eq!(fs::read_dir(d.path().join("spare")).unwrap().count(), 2);
        assert_eq!(
            s.discard(&f("a")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        fs::write(f("x"), b"old").unwrap();
        assert!(s.take_to(&f("x")));
        assert_eq!(fs::read(f("x")).unwrap(), b"");
        assert!(s.take_to(&f("y")));
        assert!(!s.take_to(&f("z")));
        assert!(!f("z").exists());
        // Leftovers of an earlier process are deleted, not reused.
        s.discard(&f("x")).unwrap();
        let s2 = SpareFiles::open(Arc::new(StdDisk), d.path().join("spare"), 2).unwrap();
        assert_eq!(s2.count(), 0);
        assert_eq!(fs::read_dir(d.path().join("spare")).unwrap().count(), 0);
    }
}
