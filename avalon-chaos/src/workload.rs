//! The workload: client threads doing real syscalls on the mounts, each
//! operation recorded in the history. Every client draws its operations
//! from its own seeded generator.
//!
//! Layout on the filesystem (the same through every mount):
//! `ns/dK/nI` (namespace operations on a few names per directory, shared
//! by all clients), `data/cC-K` (files only client C writes),
//! `appends/aK` (O_APPEND logs shared by all), `locks/flockK`,
//! `locks/ofdK` (lock files shared by all).

use crate::history::{append_record, pattern, LockKind, Op, Outcome, Recorder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Shape of the workload.
#[derive(Debug, Clone)]
pub struct Config {
    /// Mount points; clients are spread over them.
    pub mounts: Vec<PathBuf>,
    pub clients_per_mount: u32,
    /// Directories for namespace operations, and names in each.
    pub ns_dirs: u32,
    pub names: u32,
    pub append_files: u32,
    /// Lock files of each kind.
    pub lock_files: u32,
    pub seed: u64,
    /// Relative weights of namespace, data, append and lock operations.
    pub mix: [u32; 4],
}

/// Creates the directories and shared files (through the first mount).
pub fn setup(cfg: &Config) -> std::io::Result<()> {
    let m = &cfg.mounts[0];
    for d in ["ns", "data", "appends", "locks"] {
        std::fs::create_dir_all(m.join(d))?;
    }
    for k in 0..cfg.ns_dirs {
        std::fs::create_dir_all(m.join(format!("ns/d{k}")))?;
    }
    for k in 0..cfg.append_files {
        File::create(m.join(format!("appends/a{k}")))?.sync_all()?;
    }
    for k in 0..cfg.lock_files {
        File::create(m.join(format!("locks/flock{k}")))?;
        File::create(m.join(format!("locks/ofd{k}")))?;
    }
    Ok(())
}

/// The running clients.
pub struct Workload {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Workload {
    /// Starts every client.
    pub fn start(cfg: &Config, rec: Arc<Recorder>) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for (m, mount) in cfg.mounts.iter().enumerate() {
            for i in 0..cfg.clients_per_mount {
                let id = m as u32 * cfg.clients_per_mount + i;
                let mut c = Client {
                    id,
                    mount: mount.clone(),
                    cfg: cfg.clone(),
                    rng: StdRng::seed_from_u64(
                        cfg.seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    ),
                    rec: rec.clone(),
                    seq: 0,
                    file: None,
                    files_made: 0,
                };
                let stop = stop.clone();
                handles.push(
                    std::thread::Builder::new()
                        .name(format!("client{id}"))
                        .spawn(move || c.run(&stop))
                        .expect("spawn client thread"),
                );
            }
        }
        Workload { stop, handles }
    }

    /// Asks the clients to stop and waits up to `timeout` for them; returns
    /// how many are still blocked in a syscall (left behind: their pending
    /// operation stays Unknown in the history).
    pub fn stop(self, timeout: Duration) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && self.handles.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let stuck = self.handles.iter().filter(|h| !h.is_finished()).count();
        for h in self.handles {
            if h.is_finished() {
                let _ = h.join();
            }
        }
        stuck
    }
}

/// The data file a client is writing.
struct DataFile {
    rel: String,
    file: File,
    ops: u32,
}

struct Client {
    id: u32,
    mount: PathBuf,
    cfg: Config,
    rng: StdRng,
    rec: Arc<Recorder>,
    seq: u64,
    file: Option<DataFile>,
    files_made: u32,
}

fn outcome<T>(r: std::io::Result<T>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::Err(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// `close(2)` of `file`, with its error (a drop would hide it).
fn close(file: File) -> std::io::Result<()> {
    // SAFETY: the descriptor is owned by `file`, given up here and closed once.
    if unsafe { libc::close(file.into_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn cvt(r: libc::c_int) -> std::io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Takes (`lock`) or drops an exclusive lock of `kind` on `file`, without waiting.
fn lock_call(file: &File, kind: LockKind, lock: bool) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    match kind {
        // SAFETY: plain syscalls on a descriptor `file` owns.
        LockKind::Flock => cvt(unsafe {
            libc::flock(
                fd,
                if lock {
                    libc::LOCK_EX | libc::LOCK_NB
                } else {
                    libc::LOCK_UN
                },
            )
        }),
        LockKind::Ofd => {
            // SAFETY: an all-zero flock is valid; the fields are set below.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = if lock { libc::F_WRLCK } else { libc::F_UNLCK } as _;
            fl.l_whence = libc::SEEK_SET as _;
            // SAFETY: `fl` outlives the call.
            cvt(unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &mut fl) }.min(0))
        }
    }
}

impl Client {
    fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let [ns, data, append, lock] = self.cfg.mix;
            let r = self.rng.gen_range(0..(ns + data + append + lock).max(1));
            if r < ns {
                self.namespace_op();
            } else if r < ns + data {
                self.data_op();
            } else if r < ns + data + append {
                self.append_op();
            } else {
                self.lock_op();
            }
            let pause = self.rng.gen_range(0..4);
            std::thread::sleep(Duration::from_millis(pause));
        }
        if let Some(f) = self.file.take() {
            self.do_op(Op::Close { file: f.rel }, || close(f.file));
        }
    }

    /// Runs `f` as operation `op`, recording invocation and result.
    fn do_op<T>(&self, op: Op, f: impl FnOnce() -> std::io::Result<T>) -> Outcome {
        let idx = self.rec.invoke(self.id, op);
        let o = outcome(f());
        self.rec.complete(idx, o);
        o
    }

    fn namespace_op(&mut self) {
        let dir = format!("ns/d{}", self.rng.gen_range(0..self.cfg.ns_dirs));
        let n = self.cfg.names;
        let a = self.rng.gen_range(0..n);
        let name = format!("n{a}");
        let path = self.mount.join(&dir).join(&name);
        match self.rng.gen_range(0..4) {
            0 => {
                self.do_op(Op::Create { dir, name }, || {
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .map(drop)
                });
            }
            1 => {
                self.do_op(Op::Unlink { dir, name }, || std::fs::remove_file(&path));
            }
            2 => {
                let b = (a + self.rng.gen_range(1..n)) % n;
                let to = format!("n{b}");
                let target = self.mount.join(&dir).join(&to);
                self.do_op(
                    Op::Rename {
                        dir,
                        from: name,
                        to,
                    },
                    || std::fs::rename(&path, &target),
                );
            }
            _ => {
                let idx = self.rec.invoke(self.id, Op::Exists { dir, name });
                let o = match std::fs::symlink_metadata(&path) {
                    Ok(_) => Outcome::Exists(true),
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Outcome::Exists(false),
                    Err(e) => Outcome::Err(e.raw_os_error().unwrap_or(libc::EIO)),
                };
                self.rec.complete(idx, o);
            }
        }
    }

    fn data_op(&mut self) {
        if self.file.as_ref().is_some_and(|f| f.ops >= 12) {
            if let Some(f) = self.file.take() {
                self.do_op(Op::Close { file: f.rel }, || close(f.file));
            }
        }
        if self.file.is_none() {
            let rel = format!("data/c{}-{}", self.id, self.files_made);
            self.files_made += 1;
            let path = self.mount.join(&rel);
            let idx = self
                .rec
                .invoke(self.id, Op::FileCreate { file: rel.clone() });
            let r = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path);
            match r {
                Ok(file) => {
                    self.rec.complete(idx, Outcome::Ok);
                    self.file = Some(DataFile { rel, file, ops: 0 });
                }
                Err(e) => {
                    self.rec.complete(idx, outcome::<()>(Err(e)));
                    return;
                }
            }
        }
        let Some(mut f) = self.file.take() else {
            return;
        };
        f.ops += 1;
        let rel = f.rel.clone();
        let r = self.rng.gen_range(0..100);
        let o = if r < 60 {
            self.seq += 1;
            let seed = (self.id as u64) << 40 | self.seq;
            let offset = self.rng.gen_range(0..48u64 << 10);
            let len = self.rng.gen_range(1..16u64 << 10);
            let buf = pattern(seed, len as usize);
            self.do_op(
                Op::Write {
                    file: rel,
                    offset,
                    len,
                    seed,
                },
                || f.file.write_all_at(&buf, offset),
            )
        } else if r < 75 {
            let len = self.rng.gen_range(0..64u64 << 10);
            self.do_op(Op::Truncate { file: rel, len }, || f.file.set_len(len))
        } else {
            self.do_op(Op::Fsync { file: rel }, || f.file.sync_all())
        };
        // After an error the descriptor's state is unclear: start a new file.
        if o == Outcome::Ok {
            self.file = Some(f);
        } else {
            self.do_op(Op::Close { file: f.rel }, || close(f.file));
        }
    }

    fn append_op(&mut self) {
        self.seq += 1;
        let file = format!("appends/a{}", self.rng.gen_range(0..self.cfg.append_files));
        let record = append_record(self.id, self.seq);
        let path = self.mount.join(&file);
        self.do_op(
            Op::Append {
                file,
                record: record.clone(),
            },
            || {
                let mut f = OpenOptions::new().append(true).open(&path)?;
                f.write_all(record.as_bytes())?;
                f.sync_all()?;
                close(f)
            },
        );
    }

    fn lock_op(&mut self) {
        let kind = if self.rng.gen_bool(0.5) {
            LockKind::Flock
        } else {
            LockKind::Ofd
        };
        let k = self.rng.gen_range(0..self.cfg.lock_files);
        let file = match kind {
            LockKind::Flock => format!("locks/flock{k}"),
            LockKind::Ofd => format!("locks/ofd{k}"),
        };
        let hold = Duration::from_millis(self.rng.gen_range(5..60));
        let Ok(fd) = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.mount.join(&file))
        else {
            return;
        };
        let got = self.do_op(
            Op::Lock {
                file: file.clone(),
                kind,
            },
            || lock_call(&fd, kind, true),
        );
        if got == Outcome::Ok {
            std::thread::sleep(hold);
            self.do_op(Op::Unlock { file, kind }, || lock_call(&fd, kind, false));
        }
        let _ = close(fd);
    }
}

/// What the files of the workload hold, read through `mount`: every path
/// under `data/` and `appends/` → content. Errors other than a missing
/// file are returned (the checkers cannot judge what they cannot read).
pub fn observe(mount: &Path) -> Result<BTreeMap<String, Option<Vec<u8>>>, String> {
    let mut m = BTreeMap::new();
    for d in ["data", "appends"] {
        let rd = std::fs::read_dir(mount.join(d)).map_err(|e| format!("readdir {d}: {e}"))?;
        for e in rd {
            let e = e.map_err(|e| format!("readdir {d}: {e}"))?;
            let rel = format!("{d}/{}", e.file_name().to_string_lossy());
            let content =
                std::fs::read(mount.join(&rel)).map_err(|e| format!("read {rel}: {e}"))?;
            m.insert(rel, Some(content));
        }
    }
    Ok(m)
}
