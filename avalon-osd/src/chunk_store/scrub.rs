//! The scrubber's check of a whole chunk.

use super::disk::OpenMode;
use super::error::{corrupt, io_err, Result};
use super::open_cache::lock_open;
use super::sidecar::BLOCK_SIZE;
use super::ChunkStore;
use std::io;

impl ChunkStore {
    /// Verifies a whole chunk for the scrubber: every block against its
    /// checksum and, for a chunk held open, the sidecar on disk against the
    /// verified copy in memory (so a damaged sidecar is found before a
    /// restart would trip over it). Does not open the chunk for later use.
    /// Returns the bytes verified.
    pub fn scrub_chunk(&self, ino: u64, index: u64) -> Result<u64> {
        let _i = self.locks.ino_shared(ino);
        let _c = self.locks.chunk(ino, index);
        if self.lost.contains(ino, index) {
            return Err(Self::lost_copy(ino, index));
        }
        let meta = match self.cached(ino, index) {
            Some(c) => {
                let meta = lock_open(&c).meta.clone();
                let mpath = self.meta_path(ino, index);
                let raw = self.disk.read_file(&mpath).map_err(io_err(&mpath))?;
                if raw != meta.encode() {
                    return Err(corrupt(
                        ino,
                        index,
                        "metadata sidecar on disk differs from the verified copy",
                    ));
                }
                meta
            }
            None => match self.load_meta(ino, index)? {
                Some(m) => m,
                None => return Ok(0),
            },
        };
        let dpath = self.data_path(ino, index);
        let file = self
            .disk
            .open(&dpath, OpenMode::Read)
            .map_err(io_err(&dpath))?;
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        for (b, want) in meta.crcs.iter().enumerate() {
            let bs = b as u64 * BLOCK_SIZE;
            let n = (meta.len - bs).min(BLOCK_SIZE) as usize;
            file.read_exact_at(&mut buf[..n], bs).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    corrupt(ino, index, "data file shorter than its metadata")
                } else {
                    io_err(&dpath)(e)
                }
            })?;
            let got = crc32c::crc32c(&buf[..n]);
            if got != *want {
                return Err(corrupt(
                    ino,
                    index,
                    format!("block {b} checksum mismatch (stored {want:08x}, computed {got:08x})"),
                ));
            }
        }
        Ok(meta.len)
    }
}
