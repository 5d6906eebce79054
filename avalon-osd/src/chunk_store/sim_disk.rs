//! A disk in memory that loses, at a simulated power loss, what was not
//! fsynced (tests only).
//!
//! The model is that of a journaling filesystem in ordered mode with a
//! volatile page cache: namespace changes (create, rename, remove, mkdir)
//! and file size changes go to a journal in order; an fsync of any file or
//! directory commits the whole journal, and makes that file's content
//! durable. At a crash a random prefix of the uncommitted journal
//! survives, and each 4 KiB page written since its file's last fsync holds
//! either its durable or its newest content, at random (a torn write).
//! Space freed by a shrinking size change reads as zeros afterwards.

use super::disk::{DirEntry, Disk, DiskFile, OpenMode};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Page size of the model: the unit a crash keeps or loses.
pub const PAGE: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    File(u64),
    Dir,
}

#[derive(Debug, Clone)]
enum Op {
    Link(PathBuf, Entry),
    Unlink(PathBuf),
    Rename(PathBuf, PathBuf),
    Size(u64, u64),
}

#[derive(Debug, Default)]
struct Inode {
    /// Content as of the last fsync (cut where a committed shrink cut it).
    durable: Vec<u8>,
    /// Size as of the committed journal.
    durable_len: u64,
    /// What reads see.
    current: Vec<u8>,
    /// Pages written since the last fsync.
    dirty: BTreeSet<u64>,
}

#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    names: BTreeMap<PathBuf, Entry>,
    durable_names: BTreeMap<PathBuf, Entry>,
    journal: Vec<Op>,
    next_ino: u64,
    rng: u64,
    /// Crashes so far (open files of an earlier "boot" fail).
    boot: u64,
    /// Changes left before the disk stops taking any (EIO until the next
    /// crash), to stop the store midway through an operation.
    budget: Option<u64>,
}

impl State {
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn apply_durable(&mut self, op: Op) {
        match op {
            Op::Link(p, e) => {
                self.durable_names.insert(p, e);
            }
            Op::Unlink(p) => {
                self.durable_names.remove(&p);
            }
            Op::Rename(from, to) => {
                if let Some(e) = self.durable_names.remove(&from) {
                    self.durable_names.insert(to, e);
                }
            }
            Op::Size(ino, len) => {
                if let Some(i) = self.inodes.get_mut(&ino) {
                    if (len as usize) < i.durable.len() {
                        i.durable.truncate(len as usize);
                    }
                    i.durable_len = len;
                }
            }
        }
    }

    /// Counts one change against the budget: EIO once it is spent.
    fn spend(&mut self) -> io::Result<()> {
        match &mut self.budget {
            Some(0) => Err(io::Error::from_raw_os_error(libc::EIO)),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn commit(&mut self) {
        for op in std::mem::take(&mut self.journal) {
            self.apply_durable(op);
        }
    }

    fn parent_is_dir(&self, path: &Path) -> bool {
        path.parent()
            .is_none_or(|p| p.parent().is_none() || self.names.get(p) == Some(&Entry::Dir))
    }
}

/// The simulated disk; clones share it.
#[derive(Debug, Clone, Default)]
pub struct SimDisk(Arc<Mutex<State>>);

/// An open file of a [`SimDisk`].
#[derive(Debug)]
pub struct SimFile {
    disk: SimDisk,
    ino: u64,
    boot: u64,
}

fn not_found() -> io::Error {
    io::ErrorKind::NotFound.into()
}

impl SimDisk {
    /// A disk whose crashes draw from `seed`.
    pub fn new(seed: u64) -> SimDisk {
        let d = SimDisk::default();
        d.lock().rng = seed | 1;
        d
    }

    /// After `n` more changes (creates, writes, renames, removes, fsyncs)
    /// every change fails with EIO, until the next [`SimDisk::crash`].
    pub fn fail_after(&self, n: u64) {
        self.lock().budget = Some(n);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Power loss: keeps a random prefix of the uncommitted journal and,
    /// of each page written since its file's last fsync, its durable or
    /// its newest content. Files opened before fail from now on.
    pub fn crash(&self) {
        let mut s = self.lock();
        let n = s.journal.len() as u64;
        let keep = (s.random() % (n + 1)) as usize;
        let ops: Vec<Op> = s.journal.drain(..).take(keep).collect();
        for op in ops {
            s.apply_durable(op);
        }
        let inos: Vec<u64> = s.inodes.keys().copied().collect();
        for ino in inos {
            let pick: Vec<(u64, bool)> = {
                let dirty: Vec<u64> = s.inodes[&ino].dirty.iter().copied().collect();
                dirty
                    .into_iter()
                    .map(|p| (p, s.random() & 1 == 1))
                    .collect()
            };
            let i = s.inodes.get_mut(&ino).expect("inode");
            let len = i.durable_len as usize;
            let mut content = std::mem::take(&mut i.durable);
            content.resize(len, 0);
            for (p, newer) in pick {
                if !newer {
                    continue;
                }
                let lo = (p * PAGE) as usize;
                let hi = (lo + PAGE as usize).min(len);
                for (b, slot) in content.iter_mut().enumerate().take(hi).skip(lo) {
                    *slot = i.current.get(b).copied().unwrap_or(0);
                }
            }
            i.current = content.clone();
            i.durable = content;
            i.dirty.clear();
        }
        s.names = s.durable_names.clone();
        s.boot += 1;
        s.budget = None;
    }

    fn file(&self, ino: u64) -> Arc<dyn DiskFile> {
        let boot = self.lock().boot;
        Arc::new(SimFile {
            disk: self.clone(),
            ino,
            boot,
        })
    }
}

impl Disk for SimDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn DiskFile>> {
        let mut s = self.lock();
        if mode != OpenMode::Read {
            s.spend()?;
        }
        match s.names.get(path).copied() {
            Some(Entry::Dir) => Err(io::ErrorKind::IsADirectory.into()),
            Some(Entry::File(ino)) => {
                if mode == OpenMode::CreateTruncate {
                    s.inodes.get_mut(&ino).expect("inode").current.clear();
                    s.journal.push(Op::Size(ino, 0));
                }
                drop(s);
                Ok(self.file(ino))
            }
            None if matches!(mode, OpenMode::Create | OpenMode::CreateTruncate) => {
                if !s.parent_is_dir(path) {
                    return Err(not_found());
                }
                s.next_ino += 1;
                let ino = s.next_ino;
                s.inodes.insert(ino, Inode::default());
                s.names.insert(path.to_path_buf(), Entry::File(ino));
                s.journal
                    .push(Op::Link(path.to_path_buf(), Entry::File(ino)));
                drop(s);
                Ok(self.file(ino))
            }
            None => Err(not_found()),
        }
    }

    fn open_direct(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>> {
        self.open(path, OpenMode::Write)
    }

    fn stat(&self, path: &Path) -> io::Result<(u64, bool)> {
        let s = self.lock();
        match s.names.get(path) {
            Some(Entry::File(ino)) => Ok((s.inodes[ino].current.len() as u64, true)),
            Some(Entry::Dir) => Ok((0, false)),
            None => Err(not_found()),
        }
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let s = self.lock();
        if s.names.get(path) != Some(&Entry::Dir) {
            return Err(not_found());
        }
        Ok(s.names
            .iter()
            .filter(|(p, _)| p.parent() == Some(path))
            .filter_map(|(p, e)| {
                Some(DirEntry {
                    name: p.file_name()?.to_str()?.to_string(),
                    is_dir: *e == Entry::Dir,
                })
            })
            .collect())
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.spend()?;
        if s.names.contains_key(path) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        if !s.parent_is_dir(path) {
            return Err(not_found());
        }
        s.names.insert(path.to_path_buf(), Entry::Dir);
        s.journal.push(Op::Link(path.to_path_buf(), Entry::Dir));
        Ok(())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut todo: Vec<&Path> = path.ancestors().collect();
        todo.reverse();
        for p in todo {
            if p.as_os_str().is_empty() || p == Path::new("/") {
                continue;
            }
            match self.create_dir(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        let gone: Vec<PathBuf> = s
            .names
            .keys()
            .filter(|p| p.starts_with(path))
            .cloned()
            .collect();
        for p in gone.into_iter().rev() {
            s.names.remove(&p);
            s.journal.push(Op::Unlink(p));
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.spend()?;
        let Some(e) = s.names.remove(from) else {
            return Err(not_found());
        };
        s.names.insert(to.to_path_buf(), e);
        s.journal
            .push(Op::Rename(from.to_path_buf(), to.to_path_buf()));
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.spend()?;
        match s.names.get(path) {
            Some(Entry::File(_)) => {
                s.names.remove(path);
                s.journal.push(Op::Unlink(path.to_path_buf()));
                Ok(())
            }
            Some(Entry::Dir) => Err(io::ErrorKind::IsADirectory.into()),
            None => Err(not_found()),
        }
    }

    /// A copy of what reads see, through a new file (as a reflink: the
    /// blocks are durable with the new file's first fsync).
    fn reflink(&self, from: &Path, to: &Path) -> io::Result<()> {
        let data = {
            let s = self.lock();
            match s.names.get(from) {
                Some(Entry::File(ino)) => s.inodes[ino].current.clone(),
                _ => return Err(not_found()),
            }
        };
        let f = self.open(to, OpenMode::CreateTruncate)?;
        f.set_len(data.len() as u64)?;
        f.write_all_at(&data, 0)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.spend()?;
        if s.names.get(path) != Some(&Entry::Dir) {
            return Err(not_found());
        }
        s.commit();
        Ok(())
    }
}

impl SimFile {
    /// The disk's state, if this file was opened since the last crash.
    fn state(&self) -> io::Result<MutexGuard<'_, State>> {
        let s = self.disk.lock();
        if s.boot != self.boot {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(s)
    }
}

impl DiskFile for SimFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let s = self.state()?;
        let cur = &s.inodes[&self.ino].current;
        let lo = (off as usize).min(cur.len());
        let n = buf.len().min(cur.len() - lo);
        buf[..n].copy_from_slice(&cur[lo..lo + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<usize> {
        let mut s = self.state()?;
        s.spend()?;
        let ino = self.ino;
        let end = off as usize + buf.len();
        let i = s.inodes.get_mut(&ino).expect("inode");
        let grew = end > i.current.len();
        if grew {
            i.current.resize(end, 0);
        }
        i.current[off as usize..end].copy_from_slice(buf);
        if !buf.is_empty() {
            for p in off / PAGE..=(end as u64 - 1) / PAGE {
                i.dirty.insert(p);
            }
        }
        if grew {
            s.journal.push(Op::Size(ino, end as u64));
        }
        Ok(buf.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state()?;
        s.spend()?;
        let ino = self.ino;
        let i = s.inodes.get_mut(&ino).expect("inode");
        i.current.resize(len as usize, 0);
        s.journal.push(Op::Size(ino, len));
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.state()?.inodes[&self.ino].current.len() as u64)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.state()?;
        s.spend()?;
        s.commit();
        let i = s.inodes.get_mut(&self.ino).expect("inode");
        i.durable = i.current.clone();
        i.durable_len = i.current.len() as u64;
        i.dirty.clear();
        Ok(())
    }
}
