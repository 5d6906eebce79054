//! Installing a whole chunk copied from another replica: written beside
//! the old one, fsynced, then renamed into place.

use super::disk::OpenMode;
use super::error::{io_err, Result, StoreError};
use super::layout::{chunk_name, META_SUFFIX, TMP_SUFFIX};
use super::sidecar::{blocks_for, ChunkMeta, SnapStamp, BLOCK_SIZE, DIRTY, SUSPECT};
use super::{check_range, ChunkStore};
use avalon_proto::limits::MAX_CHUNK_SIZE;
use std::sync::atomic::Ordering;

impl ChunkStore {
    /// Replaces a whole chunk by a copy from another replica: `data` (its
    /// full stored bytes) at `version`. Installed only when the local copy
    /// is older, missing or corrupt, or (with `replace_equal`) of the same
    /// version. Durable on return. Returns whether it was installed.
    pub fn install(
        &self,
        ino: u64,
        index: u64,
        data: &[u8],
        version: u64,
        replace_equal: bool,
    ) -> Result<bool> {
        self.install_stamped(
            ino,
            index,
            data,
            version,
            SnapStamp::default(),
            replace_equal,
        )
    }

    /// [`ChunkStore::install`] of a copy that carries its snapshot stamp
    /// (a chunk of a file snapshots cover): the stamp is installed with it,
    /// so this replica clones on the same later changes as the source and
    /// shows the chunk as a hole to the same snapshots.
    pub fn install_stamped(
        &self,
        ino: u64,
        index: u64,
        data: &[u8],
        version: u64,
        stamp: SnapStamp,
        replace_equal: bool,
    ) -> Result<bool> {
        if ino == 0 || version == 0 {
            return Err(StoreError::InvalidArgument(
                "install needs an ino and a version > 0".into(),
            ));
        }
        check_range(0, data.len() as u64, MAX_CHUNK_SIZE)?;
        let _i = self.locks.ino_shared(ino);
        let _c = self.locks.chunk(ino, index);
        let old = match self.meta_of(ino, index) {
            Err(e) if !matches!(e, StoreError::Corruption { .. }) => return Err(e),
            o => o,
        };
        let (existed, old_len) = match &old {
            // A copy that a crash left unverified yields to any other.
            Ok(Some(m)) if m.flags & SUSPECT != 0 || self.lost.contains(ino, index) => {
                (true, m.len)
            }
            Ok(Some(m)) => {
                if m.version > version || (m.version == version && !replace_equal) {
                    return Ok(false);
                }
                (true, m.len)
            }
            Ok(None) => (false, 0),
            Err(_) => match self.disk.stat(&self.data_path(ino, index)) {
                Ok((len, _)) => (true, len),
                Err(_) => (false, 0),
            },
        };
        self.make_bucket(ino)?;
        let dir = self.ino_dir(ino);
        let dpath = self.data_path(ino, index);
        let mpath = self.meta_path(ino, index);
        let name = chunk_name(ino, index);
        let dtmp = dir.join(format!("{name}{TMP_SUFFIX}"));
        let mtmp = dir.join(format!("{name}{META_SUFFIX}{TMP_SUFFIX}"));
        self.spares.take_to(&dtmp);
        self.spares.take_to(&mtmp);
        let f = self
            .disk
            .open(&dtmp, OpenMode::CreateTruncate)
            .map_err(io_err(&dtmp))?;
        let mut crcs = Vec::with_capacity(blocks_for(data.len() as u64));
        for (b, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
            crcs.push(crc32c::crc32c(block));
            if block.iter().any(|&x| x != 0) {
                f.write_all_at(block, b as u64 * BLOCK_SIZE)
                    .map_err(io_err(&dtmp))?;
            }
        }
        f.set_len(data.len() as u64).map_err(io_err(&dtmp))?;
        self.fsync(&*f, &dtmp)?;
        let meta = ChunkMeta {
            version,
            len: data.len() as u64,
            crcs,
            flags: 0,
            snap: stamp,
        };
        let mf = self
            .disk
            .open(&mtmp, OpenMode::CreateTruncate)
            .map_err(io_err(&mtmp))?;
        mf.write_all_at(&meta.encode(), 0).map_err(io_err(&mtmp))?;
        self.fsync(&*mf, &mtmp)?;
        // The open files (if any) are the replaced ones from here on.
        self.forget(ino, index);
        if let Ok(Some(m)) = old {
            // Durably dirty (and suspect) first: a crash between the two
            // renames leaves new data beside the old sidecar, which is then
            // checked and repaired again, never reported corrupt.
            let m = ChunkMeta {
                flags: m.flags | DIRTY | SUSPECT,
                ..m
            };
            self.store_meta(ino, index, &m, true)?;
        }
        self.disk.rename(&dtmp, &dpath).map_err(io_err(&dpath))?;
        self.disk.rename(&mtmp, &mpath).map_err(io_err(&mpath))?;
        self.sync_dir_of(ino)?;
        if existed {
            self.used.fetch_sub(old_len, Ordering::Relaxed);
        } else {
            self.chunks.fetch_add(1, Ordering::Relaxed);
        }
        self.used.fetch_add(meta.len, Ordering::Relaxed);
        self.lost.remove(ino, index);
        Ok(true)
    }
}
