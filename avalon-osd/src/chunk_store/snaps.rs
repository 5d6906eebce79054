//! Copy-on-write clones of chunks, for directory snapshots.
//!
//! Snapshot ids come from one increasing sequence kept by the MDS. A
//! change to a chunk carries the newest snapshot id covering its file
//! (`snap_seq`); the chunk's sidecar remembers the id of its last change
//! and the id it was created at ([`SnapStamp`]). A change with a newer id
//! than the chunk's last one means snapshots were taken since: before
//! applying it, the chunk's content is kept, immutable, as clone
//! `snaps/<bucket>/<ino>.<index>@<snap_seq>` (data file and sidecar, as a
//! chunk's). Clone `k` serves the snapshots `s` with `prev < s <= k`
//! (`prev`: the chunk's previous clone, or its creation id), so a
//! snapshot read takes the smallest clone with an id at least its own,
//! else the head (unless created after the snapshot), else a hole.
//!
//! A clone is written to `.tmp` names, fsynced, renamed data first and
//! sidecar last, and the directory fsynced before the chunk changes: a
//! crash before that leaves the head unchanged and at most a data file
//! without its sidecar, which the next open removes; a clone with a
//! sidecar is whole.

use super::disk::{DiskFile, OpenMode};
use super::error::{corrupt, io_err, Result, StoreError};
use super::layout::{
    chunk_name, parse_bucket_name, parse_hex_name, BUCKETS, META_SUFFIX, TMP_SUFFIX,
};
use super::open_cache::{lock_open, OpenChunk};
use super::read::BlockSpan;
use super::sidecar::{block_crcs, ChunkMeta, BLOCK_SIZE};
use super::{check_range, ChunkStore};
use avalon_proto::limits::MAX_CHUNK_SIZE;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Directory of the clones, beside the buckets (bucketed the same way).
pub(super) const SNAP_DIR: &str = "snaps";

/// What a file under `snaps/<bucket>/` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CloneFile {
    Data,
    Meta,
    Tmp,
}

/// Name of clone `seq` of a chunk (its sidecar adds [`META_SUFFIX`]).
fn clone_name(ino: u64, index: u64, seq: u64) -> String {
    format!("{}@{seq:016x}", chunk_name(ino, index))
}

/// `<ino>.<index>@<seq>[.meta|.tmp|.meta.tmp]`.
pub(super) fn parse_clone_name(name: &str) -> Option<(u64, u64, u64, CloneFile)> {
    let (stem, kind) = if let Some(s) = name.strip_suffix(TMP_SUFFIX) {
        (s.strip_suffix(META_SUFFIX).unwrap_or(s), CloneFile::Tmp)
    } else if let Some(s) = name.strip_suffix(META_SUFFIX) {
        (s, CloneFile::Meta)
    } else {
        (name, CloneFile::Data)
    };
    let (chunk, seq) = stem.split_once('@')?;
    let (ino, index) = chunk.split_once('.')?;
    Some((
        parse_hex_name(ino)?,
        parse_hex_name(index)?,
        parse_hex_name(seq)?,
        kind,
    ))
}

/// What [`ChunkStore::trim_clones`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Clones removed.
    pub clones: u64,
    /// Their stored bytes.
    pub bytes: u64,
}

impl ChunkStore {
    pub(super) fn snaps_root(&self) -> PathBuf {
        self.root.join(SNAP_DIR)
    }

    pub(super) fn snap_bucket(&self, ino: u64) -> PathBuf {
        self.snaps_root().join(format!("{:03x}", ino % BUCKETS))
    }

    pub(super) fn clone_path(&self, ino: u64, index: u64, seq: u64) -> PathBuf {
        self.snap_bucket(ino).join(clone_name(ino, index, seq))
    }

    pub(super) fn clone_meta_path(&self, ino: u64, index: u64, seq: u64) -> PathBuf {
        self.snap_bucket(ino)
            .join(format!("{}{META_SUFFIX}", clone_name(ino, index, seq)))
    }

    /// Counts the clones when the store opens, removing what a crash left
    /// of unfinished ones (`.tmp` files, a data file without its sidecar).
    pub(super) fn open_snaps(&self) -> Result<()> {
        let top = self.snaps_root();
        let buckets = match self.disk.read_dir(&top) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&top)(e)),
        };
        self.snaps_made.store(true, Ordering::Release);
        let (mut count, mut bytes) = (0u64, 0u64);
        for b in buckets {
            let Some(bucket) = parse_bucket_name(&b.name).filter(|_| b.is_dir) else {
                continue;
            };
            let dir = top.join(&b.name);
            let mut metas = BTreeSet::new();
            let mut datas = BTreeSet::new();
            let mut removed = false;
            for f in self.disk.read_dir(&dir).map_err(io_err(&dir))? {
                match parse_clone_name(&f.name) {
                    Some((ino, index, seq, CloneFile::Meta)) => {
                        metas.insert((ino, index, seq));
                    }
                    Some((ino, index, seq, CloneFile::Data)) => {
                        datas.insert((ino, index, seq));
                    }
                    Some((_, _, _, CloneFile::Tmp)) => {
                        let p = dir.join(&f.name);
                        self.disk.remove_file(&p).map_err(io_err(&p))?;
                        removed = true;
                    }
                    None => {}
                }
            }
            for &(ino, index, seq) in datas.symmetric_difference(&metas) {
                tracing::warn!(ino, index, seq, "unfinished snapshot clone removed");
                for p in [
                    self.clone_path(ino, index, seq),
                    self.clone_meta_path(ino, index, seq),
                ] {
                    match self.disk.remove_file(&p) {
                        Ok(()) => removed = true,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err(&p)(e)),
                    }
                }
            }
            for &(ino, index, seq) in datas.intersection(&metas) {
                let p = self.clone_path(ino, index, seq);
                bytes += self.disk.stat(&p).map_err(io_err(&p))?.0;
                count += 1;
            }
            if removed {
                self.sync_dir(&dir)?;
            }
            self.snap_dirs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(bucket);
        }
        self.clones.store(count, Ordering::Relaxed);
        self.clone_bytes.store(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Makes (durably) the clone directory of `ino`.
    pub(super) fn make_snap_bucket(&self, ino: u64) -> Result<()> {
        let b = ino % BUCKETS;
        let mut made = self.snap_dirs.lock().unwrap_or_else(|e| e.into_inner());
        if made.contains(&b) {
            return Ok(());
        }
        let top = self.snaps_root();
        if !self.snaps_made.load(Ordering::Acquire) {
            create_dir(self, &top)?;
            self.sync_dir(&self.root)?;
            self.snaps_made.store(true, Ordering::Release);
        }
        create_dir(self, &self.snap_bucket(ino))?;
        self.sync_dir(&top)?;
        made.insert(b);
        Ok(())
    }

    /// True if clone `seq` of a chunk is whole (its sidecar exists).
    pub(super) fn has_clone(&self, ino: u64, index: u64, seq: u64) -> Result<bool> {
        let mpath = self.clone_meta_path(ino, index, seq);
        match self.disk.stat(&mpath) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&mpath)(e)),
        }
    }

    /// Keeps an open chunk's current content, durably, as its clone `seq`
    /// (the caller holds the chunk's lock), unless that clone exists: a
    /// change retried after a crash finds the content kept the first time.
    pub(super) fn preserve(&self, ino: u64, index: u64, oc: &OpenChunk, seq: u64) -> Result<()> {
        if self.has_clone(ino, index, seq)? {
            return Ok(());
        }
        self.make_snap_bucket(ino)?;
        let len = oc.meta.len;
        let dtmp = tmp_of(&self.clone_path(ino, index, seq));
        let f = match self.reflink_head(ino, index, &dtmp)? {
            Some(f) => f,
            None => self.copy_head(ino, index, oc, &dtmp)?,
        };
        let got = f.len().map_err(io_err(&dtmp))?;
        if got != len {
            return Err(corrupt(
                ino,
                index,
                format!("data file holds {got} bytes, metadata says {len}"),
            ));
        }
        let meta = ChunkMeta {
            version: oc.meta.version,
            len,
            crcs: oc.meta.crcs.clone(),
            flags: 0,
            snap: oc.meta.snap,
        };
        self.commit_clone(ino, index, seq, &*f, &meta)
    }

    /// Makes clone `seq` whole and durable: its data, written to the
    /// `.tmp` name in `f`, is fsynced, then `meta` goes to the sidecar's
    /// `.tmp` name and is fsynced, both are renamed (data first) and the
    /// directory fsynced.
    pub(super) fn commit_clone(
        &self,
        ino: u64,
        index: u64,
        seq: u64,
        f: &dyn DiskFile,
        meta: &ChunkMeta,
    ) -> Result<()> {
        let dpath = self.clone_path(ino, index, seq);
        let mpath = self.clone_meta_path(ino, index, seq);
        let (dtmp, mtmp) = (tmp_of(&dpath), tmp_of(&mpath));
        self.fsync(f, &dtmp)?;
        let mf = self
            .disk
            .open(&mtmp, OpenMode::CreateTruncate)
            .map_err(io_err(&mtmp))?;
        mf.write_all_at(&meta.encode(), 0).map_err(io_err(&mtmp))?;
        self.fsync(&*mf, &mtmp)?;
        self.disk.rename(&dtmp, &dpath).map_err(io_err(&dpath))?;
        self.disk.rename(&mtmp, &mpath).map_err(io_err(&mpath))?;
        self.sync_dir(&self.snap_bucket(ino))?;
        self.clones.fetch_add(1, Ordering::Relaxed);
        self.clone_bytes.fetch_add(meta.len, Ordering::Relaxed);
        Ok(())
    }

    /// The head's data file reflinked to `to` (its blocks shared, none
    /// copied; the clone keeps the head's crcs, so rot in them is found
    /// when read, never blessed); `None` where the filesystem cannot.
    fn reflink_head(&self, ino: u64, index: u64, to: &Path) -> Result<Option<Arc<dyn DiskFile>>> {
        if !self.reflinks.load(Ordering::Relaxed) {
            return Ok(None);
        }
        match self.disk.reflink(&self.data_path(ino, index), to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                tracing::info!("no reflinks on this filesystem: snapshot clones are copies");
                self.reflinks.store(false, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => return Err(io_err(to)(e)),
        }
        let f = self.disk.open(to, OpenMode::Write).map_err(io_err(to))?;
        Ok(Some(f))
    }

    /// The head's content copied to `to`, checked against its crcs first.
    fn copy_head(
        &self,
        ino: u64,
        index: u64,
        oc: &OpenChunk,
        to: &Path,
    ) -> Result<Arc<dyn DiskFile>> {
        let len = oc.meta.len;
        let mut data = vec![0u8; len as usize];
        oc.data
            .read_exact_at(&mut data, 0)
            .map_err(io_err(&self.data_path(ino, index)))?;
        // The bytes are read anyway: a rotten block fails the change now
        // rather than being copied into a clone.
        if block_crcs(&data) != oc.meta.crcs {
            return Err(corrupt(
                ino,
                index,
                "block checksum mismatch while keeping a snapshot clone",
            ));
        }
        let f = self
            .disk
            .open(to, OpenMode::CreateTruncate)
            .map_err(io_err(to))?;
        for (b, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
            // Holes stay holes.
            if block.iter().any(|&x| x != 0) {
                f.write_all_at(block, b as u64 * BLOCK_SIZE)
                    .map_err(io_err(to))?;
            }
        }
        f.set_len(len).map_err(io_err(to))?;
        Ok(f)
    }

    /// The ids of the clones of chunk `(ino, index)`, in order.
    pub fn clones_of(&self, ino: u64, index: u64) -> Result<Vec<u64>> {
        Ok(self
            .clone_files(ino)?
            .into_iter()
            .filter_map(|(i, k, seq, kind)| {
                (k == index && i == ino && kind == CloneFile::Meta).then_some(seq)
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect())
    }

    /// Every clone file of `ino`.
    fn clone_files(&self, ino: u64) -> Result<Vec<(u64, u64, u64, CloneFile)>> {
        if !self.snaps_made.load(Ordering::Acquire) {
            return Ok(Vec::new());
        }
        let dir = self.snap_bucket(ino);
        let ents = match self.disk.read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        Ok(ents
            .iter()
            .filter_map(|f| parse_clone_name(&f.name))
            .filter(|&(i, ..)| i == ino)
            .collect())
    }

    /// The sidecar of clone `seq` of a chunk.
    pub(super) fn clone_meta(&self, ino: u64, index: u64, seq: u64) -> Result<ChunkMeta> {
        let mpath = self.clone_meta_path(ino, index, seq);
        let raw = self.disk.read_file(&mpath).map_err(io_err(&mpath))?;
        ChunkMeta::decode_checked(&raw)
            .map(|(m, _)| m)
            .map_err(|e| corrupt(ino, index, format!("clone {seq}: {e}")))
    }

    /// Reads up to `len` bytes at `offset` of a chunk as snapshot `snap`
    /// saw it (0: the live chunk, as [`ChunkStore::read`]): from its
    /// smallest clone with an id at least `snap`, else from the head if it
    /// was created before the snapshot, else a hole. Returns the bytes and
    /// the version of the copy read (0 for a hole).
    pub fn read_snap(
        &self,
        ino: u64,
        index: u64,
        offset: u32,
        len: u32,
        snap: u64,
    ) -> Result<(Vec<u8>, u64)> {
        if snap == 0 {
            return self.read(ino, index, offset, len);
        }
        if ino == 0 {
            return Err(StoreError::InvalidArgument("ino must not be 0".into()));
        }
        check_range(u64::from(offset), u64::from(len), MAX_CHUNK_SIZE)?;
        let _i = self.locks.ino_shared(ino);
        let _c = self.locks.chunk(ino, index);
        let Some(seq) = self.clones_of(ino, index)?.into_iter().find(|&k| k >= snap) else {
            return self.read_head(ino, index, offset, len, Some(snap));
        };
        let meta = self.clone_meta(ino, index, seq)?;
        if meta.snap.born >= snap {
            return Ok((Vec::new(), 0));
        }
        let data = self.read_clone_span(ino, index, seq, &meta, offset, len)?;
        Ok((data, meta.version))
    }

    /// Bytes `offset..offset + len` of clone `seq` of a chunk (clipped to
    /// its length), verified against the clone's crcs (the caller holds the
    /// chunk's lock and read `meta`, the clone's sidecar).
    pub(super) fn read_clone_span(
        &self,
        ino: u64,
        index: u64,
        seq: u64,
        meta: &ChunkMeta,
        offset: u32,
        len: u32,
    ) -> Result<Vec<u8>> {
        let Some(span) = BlockSpan::of(offset, len, meta.len) else {
            return Ok(Vec::new());
        };
        let dpath = self.clone_path(ino, index, seq);
        let f = self
            .disk
            .open(&dpath, OpenMode::Read)
            .map_err(io_err(&dpath))?;
        let mut buf = span.buffer();
        f.read_exact_at(&mut buf, span.start).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                corrupt(ino, index, format!("clone {seq} shorter than its metadata"))
            } else {
                io_err(&dpath)(e)
            }
        })?;
        span.verify(&buf, &meta.crcs)
            .map_err(|m| corrupt(ino, index, format!("clone {seq}: {m}")))?;
        Ok(span.cut(buf))
    }

    /// Removes clone `seq` of a chunk (the caller holds the chunk's lock);
    /// its stored bytes.
    fn remove_clone(&self, ino: u64, index: u64, seq: u64) -> Result<u64> {
        let dpath = self.clone_path(ino, index, seq);
        let len = match self.disk.stat(&dpath) {
            Ok((l, _)) => l,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(&dpath)(e)),
        };
        // Sidecar first: a clone without one is unfinished, removed at
        // the next open if a crash stops this midway.
        for p in [self.clone_meta_path(ino, index, seq), dpath] {
            match self.disk.remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p)(e)),
            }
        }
        self.clones.fetch_sub(1, Ordering::Relaxed);
        self.clone_bytes.fetch_sub(len, Ordering::Relaxed);
        Ok(len)
    }

    /// Removes the clones no live snapshot needs: clone `k` of a chunk is
    /// needed iff a snapshot `s` in `live` has `prev < s <= k`, `prev`
    /// being the chunk's previous clone or the clone's creation id. Only
    /// clones up to `newest` (the newest snapshot id when `live` was taken)
    /// are judged: a newer one may belong to a snapshot `live` misses.
    pub fn trim_clones(&self, live: &BTreeSet<u64>, newest: u64) -> Result<Trimmed> {
        let mut out = Trimmed::default();
        if !self.snaps_made.load(Ordering::Acquire) {
            return Ok(out);
        }
        let top = self.snaps_root();
        for b in self.disk.read_dir(&top).map_err(io_err(&top))? {
            if !b.is_dir || parse_bucket_name(&b.name).is_none() {
                continue;
            }
            let dir = top.join(&b.name);
            let mut by_chunk: BTreeMap<(u64, u64), Vec<u64>> = BTreeMap::new();
            for f in self.disk.read_dir(&dir).map_err(io_err(&dir))? {
                if let Some((ino, index, seq, CloneFile::Meta)) = parse_clone_name(&f.name) {
                    by_chunk.entry((ino, index)).or_default().push(seq);
                }
            }
            let before = out.clones;
            for ((ino, index), mut seqs) in by_chunk {
                seqs.sort_unstable();
                let _i = self.locks.ino_shared(ino);
                let _c = self.locks.chunk(ino, index);
                let mut prev = 0;
                for k in seqs {
                    if k > newest {
                        break;
                    }
                    // An unreadable sidecar counts as born at 0: kept
                    // rather than lost.
                    let born = self.clone_meta(ino, index, k).map_or(0, |m| m.snap.born);
                    let lo = prev.max(born);
                    let needed = lo < k && live.range(lo + 1..=k).next().is_some();
                    if !needed {
                        out.bytes += self.remove_clone(ino, index, k)?;
                        out.clones += 1;
                    }
                    prev = k;
                }
            }
            if out.clones > before {
                self.sync_dir(&dir)?;
            }
        }
        Ok(out)
    }

    /// Number of clones stored.
    pub fn clone_count(&self) -> u64 {
        self.clones.load(Ordering::Relaxed)
    }

    /// Sum of the stored lengths of all clones.
    pub fn clone_bytes(&self) -> u64 {
        self.clone_bytes.load(Ordering::Relaxed)
    }

    /// Keeps every chunk of `ino` the snapshots up to `snap_seq` still see
    /// as a clone, before the object is deleted (the caller holds the
    /// inode's exclusive lock).
    pub(super) fn preserve_object(
        &self,
        ino: u64,
        indexes: &BTreeSet<u64>,
        snap_seq: u64,
    ) -> Result<()> {
        for &index in indexes {
            let entry = match self.open_chunk(ino, index) {
                Ok(Some(e)) => e,
                Ok(None) => continue,
                // This copy cannot be kept; the other replicas' are.
                Err(e @ StoreError::Corruption { .. }) => {
                    tracing::warn!(ino, index, error = %e, "corrupt chunk not kept for a snapshot");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let oc = lock_open(&entry);
            if snap_seq > oc.meta.snap.seq {
                self.preserve(ino, index, &oc, snap_seq)?;
            }
        }
        Ok(())
    }
}

/// The `.tmp` name a clone file is written under.
pub(super) fn tmp_of(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(TMP_SUFFIX);
    PathBuf::from(s)
}

/// Makes a directory, existing already being fine.
fn create_dir(store: &ChunkStore, dir: &Path) -> Result<()> {
    match store.disk.create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
}
