//! Where a chunk's files live: names, the 4096 bucket directories, and
//! the move of a store of the older layout into them.
//!
//! A chunk's bytes live in `ROOT/<bucket>/<ino as 16 hex>.<index as 16
//! hex>`, its sidecar next to it with [`META_SUFFIX`]; the bucket is `ino
//! % 4096` as 3 hex digits, a directory made with its first chunk and
//! kept. No directory per inode: on an ext4 without a journal every new
//! inode costs a scan past recently freed ones, and a small file's chunk
//! took three (directory, data, sidecar); the mkdir alone was a quarter of
//! an OSD's CPU while small files were written. A store of the older layout
//! (`ROOT/<ino>/<index>`) is moved into the buckets when opened.

use super::error::{io_err, Result};
use super::ChunkStore;
use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

/// Suffix of a chunk's checksum sidecar.
pub(super) const META_SUFFIX: &str = ".meta";
/// Suffix of a chunk being installed whole (renamed into place when done).
pub(super) const TMP_SUFFIX: &str = ".tmp";
/// Directory of the spare files (see `spare_files`), beside the buckets.
pub(super) const SPARE_DIR: &str = "spare";
/// Directories the chunk files are spread over (by inode number).
pub(super) const BUCKETS: u64 = 4096;

pub(super) fn parse_hex_name(name: &str) -> Option<u64> {
    if name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        u64::from_str_radix(name, 16).ok()
    } else {
        None
    }
}

pub(super) fn parse_bucket_name(name: &str) -> Option<u64> {
    if name.len() == 3 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        u64::from_str_radix(name, 16).ok()
    } else {
        None
    }
}

/// What a file in a bucket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FileKind {
    Data,
    Meta,
    Tmp,
}

/// `<ino>.<index>[.meta|.tmp|.meta.tmp]`: the chunk and the kind of file.
pub(super) fn parse_chunk_name(name: &str) -> Option<(u64, u64, FileKind)> {
    let (stem, kind) = if let Some(s) = name.strip_suffix(TMP_SUFFIX) {
        (s.strip_suffix(META_SUFFIX).unwrap_or(s), FileKind::Tmp)
    } else if let Some(s) = name.strip_suffix(META_SUFFIX) {
        (s, FileKind::Meta)
    } else {
        (name, FileKind::Data)
    };
    let (ino, index) = stem.split_once('.')?;
    Some((parse_hex_name(ino)?, parse_hex_name(index)?, kind))
}

/// Name of a chunk's data file (its sidecar adds [`META_SUFFIX`]).
pub(super) fn chunk_name(ino: u64, index: u64) -> String {
    format!("{ino:016x}.{index:016x}")
}

/// Path of chunk `(ino, index)`'s data file in the store rooted at `root`
/// (for tools and tests that look at the files).
pub fn chunk_file(root: &Path, ino: u64, index: u64) -> PathBuf {
    root.join(format!("{:03x}", ino % BUCKETS))
        .join(chunk_name(ino, index))
}

/// Every file (data, sidecar, unfinished install) of inode `ino` in the
/// store rooted at `root`, sorted.
pub fn files_of(root: &Path, ino: u64) -> io::Result<Vec<PathBuf>> {
    let dir = root.join(format!("{:03x}", ino % BUCKETS));
    let mut out = Vec::new();
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for ent in rd {
        let ent = ent?;
        if let Some((i, _, _)) = ent.file_name().to_str().and_then(parse_chunk_name) {
            if i == ino {
                out.push(ent.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

impl ChunkStore {
    pub(super) fn bucket(&self, b: u64) -> PathBuf {
        self.root.join(format!("{b:03x}"))
    }

    /// The directory holding `ino`'s chunk files.
    pub(super) fn ino_dir(&self, ino: u64) -> PathBuf {
        self.bucket(ino % BUCKETS)
    }

    /// The buckets that exist.
    pub(super) fn made_buckets(&self) -> impl Iterator<Item = u64> + '_ {
        (0..BUCKETS).filter(|&b| self.buckets[b as usize].load(Ordering::Relaxed))
    }

    /// Makes `ino`'s bucket if it does not exist yet (durably: a chunk
    /// synced in it must not vanish with it).
    pub(super) fn make_bucket(&self, ino: u64) -> Result<()> {
        let b = ino % BUCKETS;
        if self.buckets[b as usize].load(Ordering::Acquire) {
            return Ok(());
        }
        let dir = self.bucket(b);
        match self.disk.create_dir(&dir) {
            // Also when another thread just made it: it may not have
            // marked the root yet.
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
        *self.root_dirty.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.buckets[b as usize].store(true, Ordering::Release);
        Ok(())
    }

    /// fsyncs the directory of `ino`'s chunks, and first the root if a
    /// bucket was made since its last fsync. The root waits for the first
    /// sync that needs it: a fresh store makes a bucket for nearly every
    /// new file, and an fsync of the root for each was most of the disk
    /// traffic of writing small files.
    pub(super) fn sync_dir_of(&self, ino: u64) -> Result<()> {
        let b = (ino % BUCKETS) as usize;
        // Names made before the fsync starts are covered by it.
        let made = self.names_made[b].load(Ordering::Acquire);
        {
            // Held across the fsync: a sync that finds the flag cleared by
            // another must not return before that one's fsync is done.
            let mut dirty = self.root_dirty.lock().unwrap_or_else(|e| e.into_inner());
            if *dirty {
                self.sync_dir(&self.root)?;
                *dirty = false;
            }
        }
        self.sync_dir(&self.ino_dir(ino))?;
        self.names_synced[b].fetch_max(made, Ordering::AcqRel);
        Ok(())
    }

    /// Counts a chunk name made in `ino`'s bucket (after the rename or
    /// create that made it).
    pub(super) fn name_made(&self, ino: u64) {
        self.names_made[(ino % BUCKETS) as usize].fetch_add(1, Ordering::AcqRel);
    }

    /// Whether a chunk name in `ino`'s bucket may not be durable yet: a
    /// sync of a chunk there must fsync the bucket ([`Self::sync_dir_of`]).
    pub(super) fn name_pending(&self, ino: u64) -> bool {
        let b = (ino % BUCKETS) as usize;
        self.names_made[b].load(Ordering::Acquire) > self.names_synced[b].load(Ordering::Acquire)
    }

    /// Path of a chunk's data file.
    pub fn data_path(&self, ino: u64, index: u64) -> PathBuf {
        chunk_file(&self.root, ino, index)
    }

    pub(super) fn meta_path(&self, ino: u64, index: u64) -> PathBuf {
        self.ino_dir(ino)
            .join(format!("{}{META_SUFFIX}", chunk_name(ino, index)))
    }

    /// Moves the chunks of a store written with a directory per inode
    /// (`ROOT/<ino>/<index>[.meta]`) into the buckets, then drops the
    /// emptied directories. Files are renamed, so a crash midway leaves
    /// every chunk in one place or the other, and the next open goes on.
    pub(super) fn move_old_layout(&self) -> Result<()> {
        let mut moved = false;
        for ent in self.disk.read_dir(&self.root).map_err(io_err(&self.root))? {
            let Some(ino) = parse_hex_name(&ent.name) else {
                continue;
            };
            let old = self.root.join(&ent.name);
            if !ent.is_dir {
                continue;
            }
            self.make_bucket(ino)?;
            for f in self.disk.read_dir(&old).map_err(io_err(&old))? {
                let name = f.name.as_str();
                let (stem, suffix) = match name.strip_suffix(META_SUFFIX) {
                    Some(stem) => (stem, META_SUFFIX),
                    None => (name, ""),
                };
                let Some(index) = parse_hex_name(stem) else {
                    continue; // an unfinished install: dropped with the directory
                };
                let to = self
                    .ino_dir(ino)
                    .join(format!("{}{suffix}", chunk_name(ino, index)));
                self.disk
                    .rename(&old.join(name), &to)
                    .map_err(io_err(&to))?;
            }
            self.sync_dir(&self.ino_dir(ino))?;
            self.disk.remove_dir_all(&old).map_err(io_err(&old))?;
            moved = true;
        }
        if moved {
            self.sync_dir(&self.root)?;
        }
        Ok(())
    }

    /// Chunk indexes present for `ino` (data or metadata file).
    pub(super) fn indexes(&self, ino: u64) -> Result<BTreeSet<u64>> {
        let dir = self.ino_dir(ino);
        let mut out = BTreeSet::new();
        if !self.buckets[(ino % BUCKETS) as usize].load(Ordering::Acquire) {
            return Ok(out);
        }
        for ent in self.disk.read_dir(&dir).map_err(io_err(&dir))? {
            match parse_chunk_name(&ent.name) {
                Some((i, index, FileKind::Data | FileKind::Meta)) if i == ino => {
                    out.insert(index);
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Every chunk stored here (data or metadata file), in order.
    pub(super) fn all_chunks(&self) -> Result<BTreeSet<(u64, u64)>> {
        let mut out = BTreeSet::new();
        for b in self.made_buckets() {
            let dir = self.bucket(b);
            for ent in self.disk.read_dir(&dir).map_err(io_err(&dir))? {
                if let Some((ino, index, FileKind::Data | FileKind::Meta)) =
                    parse_chunk_name(&ent.name)
                {
                    out.insert((ino, index));
                }
            }
        }
        Ok(out)
    }

    /// fsyncs a directory.
    pub(super) fn sync_dir(&self, path: &Path) -> Result<()> {
        super::faults::check(super::faults::FSYNC, path)
            .and_then(|()| self.disk.sync_dir(path))
            .map_err(io_err(path))
    }
}
