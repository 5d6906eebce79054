//! Copies between replicas that keep what snapshots need: a chunk's
//! snapshot stamp travels with its bytes, and snapshot clones are listed,
//! read and installed one by one, so a replica that missed a change made
//! under a snapshot (down, or replaced after a loss) ends up with the same
//! clones as the others. Clones are immutable and named by (ino, index,
//! snapshot id): a missing one is simply copied.

use super::disk::OpenMode;
use super::error::{io_err, Result, StoreError};
use super::layout::parse_bucket_name;
use super::sidecar::{block_crcs, ChunkMeta, SnapStamp, BLOCK_SIZE};
use super::snaps::{parse_clone_name, tmp_of, CloneFile};
use super::{check_range, ChunkStore};
use avalon_proto::limits::MAX_CHUNK_SIZE;
use std::io;

/// A range of a chunk or clone as stored, with what a copy must keep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StampedCopy {
    pub data: Vec<u8>,
    /// The copy's version (0: not stored here).
    pub version: u64,
    pub stamp: SnapStamp,
}

impl ChunkStore {
    /// Reads `len` bytes at `offset` of a chunk's head (`clone == 0`) or of
    /// its clone `clone`, with the version and snapshot stamp of the copy
    /// read; a copy not stored here reads as version 0.
    pub fn read_stamped(
        &self,
        ino: u64,
        index: u64,
        offset: u32,
        len: u32,
        clone: u64,
    ) -> Result<StampedCopy> {
        if ino == 0 {
            return Err(StoreError::InvalidArgument("ino must not be 0".into()));
        }
        check_range(u64::from(offset), u64::from(len), MAX_CHUNK_SIZE)?;
        let _i = self.locks.ino_shared(ino);
        let _c = self.locks.chunk(ino, index);
        if clone == 0 {
            let (data, version, stamp) = self.read_head_stamped(ino, index, offset, len, None)?;
            return Ok(StampedCopy {
                data,
                version,
                stamp,
            });
        }
        if !self.has_clone(ino, index, clone)? {
            return Ok(StampedCopy::default());
        }
        let meta = self.clone_meta(ino, index, clone)?;
        let data = self.read_clone_span(ino, index, clone, &meta, offset, len)?;
        Ok(StampedCopy {
            data,
            version: meta.version,
            stamp: meta.snap,
        })
    }

    /// Installs clone `seq` of a chunk copied from another replica (its
    /// whole content, version and stamp), durably; nothing when this
    /// replica has it already. Returns whether it was installed.
    pub fn install_clone(
        &self,
        ino: u64,
        index: u64,
        seq: u64,
        copy: &StampedCopy,
    ) -> Result<bool> {
        if ino == 0 || seq == 0 || copy.version == 0 {
            return Err(StoreError::InvalidArgument(
                "a clone needs an ino, a snapshot id and a version > 0".into(),
            ));
        }
        check_range(0, copy.data.len() as u64, MAX_CHUNK_SIZE)?;
        let _i = self.locks.ino_shared(ino);
        let _c = self.locks.chunk(ino, index);
        if self.has_clone(ino, index, seq)? {
            return Ok(false);
        }
        self.make_snap_bucket(ino)?;
        let dtmp = tmp_of(&self.clone_path(ino, index, seq));
        let f = self
            .disk
            .open(&dtmp, OpenMode::CreateTruncate)
            .map_err(io_err(&dtmp))?;
        for (b, block) in copy.data.chunks(BLOCK_SIZE as usize).enumerate() {
            // Holes stay holes.
            if block.iter().any(|&x| x != 0) {
                f.write_all_at(block, b as u64 * BLOCK_SIZE)
                    .map_err(io_err(&dtmp))?;
            }
        }
        f.set_len(copy.data.len() as u64).map_err(io_err(&dtmp))?;
        let meta = ChunkMeta {
            version: copy.version,
            len: copy.data.len() as u64,
            crcs: block_crcs(&copy.data),
            flags: 0,
            snap: copy.stamp,
        };
        self.commit_clone(ino, index, seq, &*f, &meta)?;
        Ok(true)
    }

    /// The clones stored here, as (ino, index, snapshot id), of the chunks
    /// `want` selects. A clone whose sidecar is unreadable is left out:
    /// peers holding it whole copy it back over it.
    pub fn list_clones(
        &self,
        mut want: impl FnMut(u64, u64) -> bool,
    ) -> Result<Vec<(u64, u64, u64)>> {
        let mut out = Vec::new();
        if !self.snaps_made.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(out);
        }
        let top = self.snaps_root();
        let buckets = match self.disk.read_dir(&top) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(&top)(e)),
        };
        for b in buckets {
            if !b.is_dir || parse_bucket_name(&b.name).is_none() {
                continue;
            }
            let dir = top.join(&b.name);
            for f in self.disk.read_dir(&dir).map_err(io_err(&dir))? {
                if let Some((ino, index, seq, CloneFile::Meta)) = parse_clone_name(&f.name) {
                    if want(ino, index) {
                        out.push((ino, index, seq));
                    }
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }
}
