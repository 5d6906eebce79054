//! Randomized lockstep test: the same random sequence of file operations
//! runs against the Avalon mount and a local ext4 directory; results,
//! errnos, file contents and directory listings must agree after every
//! step. A failure prints the seed; replay with
//! `AVALON_MODEL_SEED=<seed> AVALON_MODEL_OPS=<n> ./dev test e2e_model`.

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const DIRS: [&str; 4] = ["", "a", "a/b", "c"];
const NAMES: [&str; 6] = ["f1", "f2", "f3", "x", "y", "\u{e9}t\u{e9}"];

/// An operation's observable outcome: a value or an errno.
type Outcome = Result<String, i32>;

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn pick<'a>(r: &mut StdRng, xs: &[&'a str]) -> &'a str {
    xs[r.gen_range(0..xs.len())]
}

fn rel(r: &mut StdRng) -> PathBuf {
    let d = pick(r, &DIRS);
    Path::new(d).join(pick(r, &NAMES))
}

#[derive(Debug, Clone)]
enum Op {
    Create(PathBuf),
    Write(PathBuf, u64, usize, u64),
    Truncate(PathBuf, u64),
    Rename(PathBuf, PathBuf),
    Link(PathBuf, PathBuf),
    Unlink(PathBuf),
    Mkdir(PathBuf),
    Rmdir(PathBuf),
    SetXattr(PathBuf, String, usize),
    GetXattr(PathBuf, String),
    PunchHole(PathBuf, u64, u64),
    Chmod(PathBuf, u32),
    AppendFsync(PathBuf, usize, u64),
    ReadAll(PathBuf),
}

fn gen(r: &mut StdRng) -> Op {
    // Offsets reach past a 4 MiB chunk boundary now and then.
    let off = |r: &mut StdRng| -> u64 {
        match r.gen_range(0..4) {
            0 => r.gen_range(0..4096),
            1 => r.gen_range(0..300_000),
            2 => (4 << 20) - r.gen_range(0..70_000),
            _ => r.gen_range(0..9 << 20),
        }
    };
    match r.gen_range(0..14) {
        0 | 1 => Op::Create(rel(r)),
        2..=4 => {
            let o = off(r);
            Op::Write(rel(r), o, r.gen_range(0..150_000), r.gen())
        }
        5 => {
            let o = off(r);
            Op::Truncate(rel(r), o)
        }
        6 => Op::Rename(rel(r), rel(r)),
        7 => Op::Link(rel(r), rel(r)),
        8 => Op::Unlink(rel(r)),
        9 => match r.gen_range(0..2) {
            0 => Op::Mkdir(PathBuf::from(pick(r, &DIRS[1..])).join(pick(r, &["d", "e"]))),
            _ => Op::Rmdir(PathBuf::from(pick(r, &DIRS[1..])).join(pick(r, &["d", "e"]))),
        },
        10 => match r.gen_range(0..2) {
            0 => Op::SetXattr(
                rel(r),
                format!("user.k{}", r.gen_range(0..3)),
                r.gen_range(0..300),
            ),
            _ => Op::GetXattr(rel(r), format!("user.k{}", r.gen_range(0..3))),
        },
        11 => {
            let o = off(r);
            Op::PunchHole(rel(r), o, r.gen_range(1..200_000))
        }
        12 => Op::Chmod(rel(r), [0o600, 0o644, 0o755, 0o400][r.gen_range(0..4)]),
        _ => match r.gen_range(0..2) {
            0 => Op::AppendFsync(rel(r), r.gen_range(1..10_000), r.gen()),
            _ => Op::ReadAll(rel(r)),
        },
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn apply(root: &Path, op: &Op) -> Outcome {
    let j = |p: &PathBuf| root.join(p);
    match op {
        Op::Create(p) => OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(j(p))
            .map(|_| String::new())
            .map_err(errno),
        Op::Write(p, o, n, seed) => {
            let mut f = OpenOptions::new().write(true).open(j(p)).map_err(errno)?;
            f.seek(SeekFrom::Start(*o)).map_err(errno)?;
            f.write_all(&data(*n, *seed)).map_err(errno)?;
            Ok(String::new())
        }
        Op::Truncate(p, s) => {
            let f = OpenOptions::new().write(true).open(j(p)).map_err(errno)?;
            f.set_len(*s).map_err(errno).map(|_| String::new())
        }
        Op::Rename(a, b) => fs::rename(j(a), j(b)).map(|_| String::new()).map_err(errno),
        Op::Link(a, b) => fs::hard_link(j(a), j(b))
            .map(|_| String::new())
            .map_err(errno),
        Op::Unlink(p) => fs::remove_file(j(p)).map(|_| String::new()).map_err(errno),
        Op::Mkdir(p) => fs::create_dir(j(p)).map(|_| String::new()).map_err(errno),
        Op::Rmdir(p) => fs::remove_dir(j(p)).map(|_| String::new()).map_err(errno),
        Op::SetXattr(p, k, n) => {
            let v = data(*n, 7);
            let k = CString::new(k.as_str()).unwrap();
            let rc = unsafe {
                libc::setxattr(
                    cpath(&j(p)).as_ptr(),
                    k.as_ptr(),
                    v.as_ptr().cast(),
                    v.len(),
                    0,
                )
            };
            if rc == 0 {
                Ok(String::new())
            } else {
                Err(errno(std::io::Error::last_os_error()))
            }
        }
        Op::GetXattr(p, k) => {
            let k = CString::new(k.as_str()).unwrap();
            let mut buf = vec![0u8; 70_000];
            let rc = unsafe {
                libc::getxattr(
                    cpath(&j(p)).as_ptr(),
                    k.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if rc >= 0 {
                Ok(format!("{:x?}", sha(&buf[..rc as usize])))
            } else {
                Err(errno(std::io::Error::last_os_error()))
            }
        }
        Op::PunchHole(p, o, n) => {
            let f = OpenOptions::new().write(true).open(j(p)).map_err(errno)?;
            let rc = unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    *o as i64,
                    *n as i64,
                )
            };
            if rc == 0 {
                Ok(String::new())
            } else {
                Err(errno(std::io::Error::last_os_error()))
            }
        }
        Op::Chmod(p, m) => fs::set_permissions(j(p), fs::Permissions::from_mode(*m))
            .map(|_| String::new())
            .map_err(errno),
        Op::AppendFsync(p, n, seed) => {
            let mut f = OpenOptions::new().append(true).open(j(p)).map_err(errno)?;
            f.write_all(&data(*n, *seed)).map_err(errno)?;
            f.sync_all().map_err(errno).map(|_| String::new())
        }
        Op::ReadAll(p) => {
            let mut f = fs::File::open(j(p)).map_err(errno)?;
            let mut v = Vec::new();
            f.read_to_end(&mut v).map_err(errno)?;
            Ok(format!("{} {:x?}", v.len(), &sha(&v)[..8]))
        }
    }
}

/// Everything observable about a tree: per path, type, size, mode, nlink
/// and content digest.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let m = fs::symlink_metadata(&p).unwrap();
            let key = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if m.is_dir() {
                out.insert(
                    key,
                    format!("dir {:o} nlink={}", m.mode() & 0o7777, m.nlink()),
                );
                stack.push(p);
            } else {
                let content = fs::read(&p)
                    .map(|v| format!("{:x?}", &sha(&v)[..8]))
                    .unwrap_or_else(|e| format!("E{}", errno(e)));
                out.insert(
                    key,
                    format!(
                        "file {:o} nlink={} size={} {}",
                        m.mode() & 0o7777,
                        m.nlink(),
                        m.len(),
                        content
                    ),
                );
            }
        }
    }
    out
}

#[test]
fn random_ops_match_a_local_filesystem() {
    let seed: u64 = std::env::var("AVALON_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let ops: usize = std::env::var("AVALON_MODEL_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    eprintln!("model test: AVALON_MODEL_SEED={seed} AVALON_MODEL_OPS={ops}");
    let t = TestCluster::start(1, 3);
    let mnt = t.mnt().join("model");
    let local_dir = tempfile::Builder::new()
        .prefix("avalon-model-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let local = local_dir.path().to_path_buf();
    for root in [&mnt, &local] {
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::create_dir_all(root.join("c")).unwrap();
    }
    let mut r = StdRng::seed_from_u64(seed);
    let mut history = Vec::new();
    for step in 0..ops {
        let op = gen(&mut r);
        let a = apply(&mnt, &op);
        let b = apply(&local, &op);
        history.push(format!("{step}: {op:?} -> {b:?}"));
        let ctx = || {
            format!(
                "seed {seed}, step {step}, op {op:?}\nlast ops:\n{}",
                history[history.len().saturating_sub(12)..].join("\n")
            )
        };
        assert_eq!(a, b, "outcome differs (avalon left, ext4 right); {}", ctx());
        if step % 10 == 9 || step + 1 == ops {
            let (sa, sb) = (snapshot(&mnt), snapshot(&local));
            if sa != sb {
                let diff: Vec<String> = sa
                    .iter()
                    .filter(|(k, v)| sb.get(*k) != Some(v))
                    .map(|(k, v)| format!("{k}: avalon {v} / ext4 {:?}", sb.get(k)))
                    .chain(
                        sb.keys()
                            .filter(|k| !sa.contains_key(*k))
                            .map(|k| format!("{k}: missing on avalon")),
                    )
                    .collect();
                panic!("trees differ:\n{}\n{}", diff.join("\n"), ctx());
            }
        }
    }
}
