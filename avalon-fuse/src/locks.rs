//! fcntl and flock locks, held by the MDS leader (so they exclude processes
//! on other clients). The leader keeps them in memory; this client keeps a
//! copy of its own (`mine`) and sends it to a new leader that asks for it
//! (`reclaim`: from the heartbeat reply, or a lock request refused with
//! "reclaim locks first"). So that the copy sent is exact, every lock
//! request holds `order` shared from its send until its answer is in the
//! copy, and a reclaim holds it exclusively: a request the old leader
//! answered is in the copy, one it did not is retried at the new leader
//! after the reclaim. Requests that change one file's locks go one at a
//! time (the file's turn, [`FileTurns`]), so that `mine` takes the leader's
//! answers in the order it decided them.
//!
//! The FUSE kernel module sends flock as a whole-file POSIX
//! lock whose owner is the open file; fuser does not pass the FLOCK flag, so
//! both kinds share one table on the MDS (a flock and an fcntl lock on the
//! same file by one process conflict here, unlike on a local filesystem).
//!
//! Lock cache: the leader may answer a lock request `cached` when no other
//! session competes for the file. From then on this client decides its
//! own processes' requests on that file against `mine`, with no round trip
//! (sqlite makes half a dozen lock calls per transaction), while its lease
//! holds and no reclaim is asked for; otherwise, and when the leader
//! recalls it (`Recall.locks`, another session wants the file), it first
//! sends its locks on the file back (`return_cache`). A local decision and
//! the copy a return sends are made under the cache's mutex, so the copy
//! is exact; requests of the file wait while its return is under way.
//! A return does not wait for `order`: a request of this client in flight
//! may itself wait at the leader for another client's return, which may
//! wait for ours. A reclaim sends every lock, cached or not, and forgets
//! every cache: caches belong to one leader.
//!
//! Blocking requests (F_SETLKW, flock without LOCK_NB) poll the MDS with
//! backoff; each FUSE request runs in its own task, so a waiter blocks
//! nothing else. A waiter gives up with EINTR as soon as the waiting thread
//! has a signal pending (fuser does not forward FUSE_INTERRUPT) or is gone.
//!
//! Releases: the kernel sends `flush` with the process's lock owner on every
//! close (POSIX: any close drops the process's locks on the file) and
//! `release` with the open file's owner for flock. To keep closes cheap, the
//! client remembers which (inode, owner) pairs it ever locked and only then
//! asks the MDS to drop them.
//!
//! OFD locks (F_OFD_SETLK) belong to the open file, like flock, but the
//! kernel tells FUSE nothing when one goes with its file: `release` carries
//! a lock owner only if flock was used. So every open file has its own
//! handle (fh), the client records which owners locked through which
//! handle, and the release of a handle drops those owners' locks. A POSIX
//! (process) owner is always gone from the handle's record by then: its
//! locks went with the flush of its own close of that file, which also
//! forgets it here, so a lock it took later through another handle stays.
//! The kernel sends release in the background, so a lock request that
//! arrives while a release of the same inode is under way waits for it
//! (another process may have closed and signalled us just before); and
//! since two threads handle requests side by side, a lock request on an
//! inode this client holds locks on first waits for the other FUSE threads
//! to finish what they read before it. A new open file may reuse a
//! released one's address as its owner, so lock requests wait for
//! releases before marking their owner held, and a release forgets only
//! its own file's record.

use crate::client::Client;
use crate::error::{ClientError, Result};
use avalon_proto::backoff::Backoff;
use avalon_proto::locks::{is_reclaim_first, LockKind, LockTable};
use avalon_proto::pb;
use dashmap::DashMap;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, RwLock};

/// First and largest pause between retries of a blocking lock request.
const FIRST_WAIT: Duration = Duration::from_millis(5);
const MAX_WAIT: Duration = Duration::from_millis(200);

/// A lock as F_GETLK reports it: (start, end, type, pid).
pub type LockInfo = (u64, u64, i32, u32);

/// An open file's inode and the lock owners that set locks through it.
type FileOwners = (u64, Vec<u64>);

/// The lock owners of one mount: which may hold locks at the MDS, through
/// which open files, and which open files' releases are under way.
#[derive(Default)]
pub struct Locks {
    /// Inode -> the owners that may hold locks on it at the MDS (one entry
    /// per inode, so "any lock here on this inode?" is one lookup).
    held: DashMap<u64, Vec<u64>>,
    /// Open file (fh) -> the inode and the owners that set locks through it.
    by_file: DashMap<u64, FileOwners>,
    /// Inode -> releases of lock-holding open files under way.
    releasing: DashMap<u64, usize>,
    /// Wakes lock requests waiting for releases.
    released: Notify,
    /// The locks this session holds at the MDS, as it granted them (all
    /// under session 0): what a reclaim sends.
    mine: Mutex<LockTable>,
    /// Held shared by each lock request in flight, exclusively by a
    /// reclaim (see the module doc).
    order: RwLock<()>,
    /// The leader asked for this session's locks (heartbeat reply).
    reclaim_asked: AtomicBool,
    /// A reclaim the leader asked for is under way.
    reclaiming: AtomicBool,
    /// The files whose locks this session keeps itself.
    cache: Mutex<LockCache>,
    /// Turns of the requests that change `mine` (see [`FileTurns`]).
    turns: FileTurns,
}

/// One turn at a time per file (by inode, in shards) for the requests
/// that change `mine`, from the local check through the leader's answer
/// to its note: `mine` then changes in the order the leader decided, so
/// that a lock granted right after another owner's unlock is not noted
/// before that unlock (it would conflict in `mine` and be missing there,
/// and a cache decided or returned from `mine` would miss it).
struct FileTurns(Vec<tokio::sync::Mutex<()>>);

/// Shards of [`FileTurns`]: two files sharing one only wait for each other.
const TURN_SHARDS: usize = 64;

impl Default for FileTurns {
    fn default() -> Self {
        FileTurns((0..TURN_SHARDS).map(|_| Default::default()).collect())
    }
}

impl FileTurns {
    /// Waits for `ino`'s turn.
    async fn take(&self, ino: u64) -> tokio::sync::MutexGuard<'_, ()> {
        self.0[(ino % TURN_SHARDS as u64) as usize].lock().await
    }
}

/// Files whose locks this session keeps itself (lock cache): their lock
/// requests are decided here, against `mine`.
#[derive(Default)]
struct LockCache {
    cached: HashSet<u64>,
    /// Returns under way, woken when done.
    returning: HashMap<u64, Arc<Notify>>,
}

/// This client reclaims its locks (always, but for a test playing an
/// older release, `avalon_proto::version::features`).
static RECLAIMS: LazyLock<bool> = LazyLock::new(|| {
    avalon_proto::version::features() & avalon_proto::version::FEATURE_LOCK_RECLAIM != 0
});

/// This client can keep a file's locks itself (always, but for a test
/// playing an older release).
static CACHES: LazyLock<bool> = LazyLock::new(|| {
    avalon_proto::version::features() & avalon_proto::version::FEATURE_LOCK_CACHE != 0
});

/// How often one lock request reclaims and tries again before it gives up.
const RECLAIM_TRIES: usize = 3;

/// An open file's release that drops its owners' locks.
pub struct Release {
    ino: u64,
    owners: Vec<u64>,
}

impl Locks {
    /// True if `owner` may hold locks on `ino`.
    fn is_held(&self, ino: u64, owner: u64) -> bool {
        self.held
            .get(&ino)
            .is_some_and(|owners| owners.contains(&owner))
    }

    /// Notes that `owner` may hold locks on `ino`.
    fn mark_held(&self, ino: u64, owner: u64) {
        let mut owners = self.held.entry(ino).or_default();
        if !owners.contains(&owner) {
            owners.push(owner);
        }
    }

    /// Forgets `owner`'s mark on `ino`; false if it had none.
    fn unmark_held(&self, ino: u64, owner: u64) -> bool {
        let found = self.held.get_mut(&ino).is_some_and(|mut owners| {
            let before = owners.len();
            owners.retain(|o| *o != owner);
            owners.len() != before
        });
        self.held.remove_if(&ino, |_, owners| owners.is_empty());
        found
    }

    /// F_GETLK: the first lock of another owner that conflicts, or F_UNLCK.
    #[allow(clippy::too_many_arguments)]
    pub async fn getlk(
        &self,
        c: &Client,
        ino: u64,
        owner: u64,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
    ) -> Result<LockInfo> {
        let req = lock_req(c, ino, owner, start, end, typ, pid)?;
        self.wait_releases(ino).await;
        let kind = lock_kind(typ)?;
        let local = self.try_local(c, ino, |mine| {
            mine.conflict(ino, 0, owner, start, end, kind)
        });
        if let Some(found) = local {
            return Ok(found.map_or((0, 0, libc::F_UNLCK, 0), |l| {
                (l.start, l.end, l.kind.to_type() as i32, l.pid)
            }));
        }
        self.return_if_cached(c, ino).await?;
        let r = self
            .call(
                c,
                || c.rpc(req.clone(), |mut m, r| async move { m.get_lock(r).await }),
                |_| {},
            )
            .await?;
        Ok((r.start, r.end, r.r#type as i32, r.pid))
    }

    /// Records that `owner` sets a lock through open file `fh` (called in
    /// the order the kernel sent the requests, before the lock is set, so
    /// that the file's release finds it).
    pub fn note_lock(&self, fh: u64, ino: u64, owner: u64) {
        let mut e = self.by_file.entry(fh).or_insert_with(|| (ino, Vec::new()));
        if !e.1.contains(&owner) {
            e.1.push(owner);
        }
    }

    /// Starts the release of open file `fh` (called in the order the
    /// kernel sent the requests): takes the owners that locked through it,
    /// plus the flock owner the kernel names, and makes lock requests on
    /// the inode wait until [`Locks::finish_release`] dropped them.
    pub fn begin_release(&self, fh: u64, ino: u64, flock_owner: Option<u64>) -> Option<Release> {
        let mut owners = self
            .by_file
            .remove(&fh)
            .map(|(_, (_, o))| o)
            .unwrap_or_default();
        if let Some(o) = flock_owner {
            if !owners.contains(&o) {
                owners.push(o);
            }
        }
        owners.retain(|o| self.is_held(ino, *o));
        if owners.is_empty() {
            return None;
        }
        *self.releasing.entry(ino).or_insert(0) += 1;
        Some(Release { ino, owners })
    }

    /// Drops the locks of a release begun by [`Locks::begin_release`].
    pub async fn finish_release(&self, c: &Client, r: Release) -> Result<()> {
        let mut res = Ok(());
        for o in &r.owners {
            if let Err(e) = self.drop_locks(c, r.ino, *o).await {
                res = Err(e);
            }
        }
        if let Some(mut n) = self.releasing.get_mut(&r.ino) {
            *n = n.saturating_sub(1);
        }
        self.releasing.remove_if(&r.ino, |_, n| *n == 0);
        self.released.notify_waiters();
        res
    }

    /// Waits until no release of a lock-holding open file of `ino` is
    /// under way.
    async fn wait_releases(&self, ino: u64) {
        if self.held.contains_key(&ino) {
            earlier_requests_handled().await;
        }
        loop {
            // Created before the check: notify_waiters wakes it from now on.
            let woken = self.released.notified();
            if !self.releasing.contains_key(&ino) {
                return;
            }
            woken.await;
        }
    }

    /// F_SETLK / F_SETLKW / flock: sets or clears a lock; with `sleep`,
    /// waits until it can be had (or the caller `tid` is interrupted).
    #[allow(clippy::too_many_arguments)]
    pub async fn setlk(
        &self,
        c: &Client,
        ino: u64,
        owner: u64,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        tid: u32,
    ) -> Result<()> {
        let req = lock_req(c, ino, owner, start, end, typ, pid)?;
        // The releases first: the kernel reuses a closed file's address as
        // the owner of the next open file's OFD locks, and the old file's
        // release must not take the new owner's locks (nor its held mark)
        // with it.
        self.wait_releases(ino).await;
        if typ != libc::F_UNLCK {
            // Before the request: a close racing with it must not skip the
            // release.
            self.mark_held(ino, owner);
        }
        let mut wait = Backoff::new(FIRST_WAIT, MAX_WAIT);
        loop {
            match self.try_setlk(c, &req).await {
                Err(e) if sleep && e.errno() == libc::EAGAIN => {
                    if interrupted(tid) {
                        return Err(ClientError::posix(libc::EINTR, "lock wait interrupted"));
                    }
                    wait.wait().await;
                }
                r => return r,
            }
        }
    }

    /// A close (flush): drops every lock the process `owner` holds on
    /// `ino`, if this client ever took one.
    pub async fn release_owner(&self, c: &Client, ino: u64, owner: u64) -> Result<()> {
        if !self.is_held(ino, owner) {
            return Ok(());
        }
        // The process's locks go now: open files it locked through must
        // not drop the locks it may take later through another one.
        for mut e in self.by_file.iter_mut() {
            if e.0 == ino {
                e.1.retain(|o| *o != owner);
            }
        }
        self.drop_locks(c, ino, owner).await
    }

    /// Drops every lock `owner` holds on `ino`, if this client ever took
    /// one. (Not the other open files' records of the owner: after a
    /// release the owner's address may already name a newly opened file.)
    async fn drop_locks(&self, c: &Client, ino: u64, owner: u64) -> Result<()> {
        if !self.unmark_held(ino, owner) {
            return Ok(());
        }
        let _turn = self.turns.take(ino).await;
        let local = self.try_local(c, ino, |mine| mine.release_owner(ino, 0, owner));
        if local.is_some() {
            return Ok(());
        }
        self.return_if_cached(c, ino).await?;
        let req = pb::ReleaseLocksRequest {
            header: c.session.header(),
            ino,
            owner,
            reclaims: *RECLAIMS,
        };
        self.call(
            c,
            || {
                c.rpc(
                    req.clone(),
                    |mut m, r| async move { m.release_locks(r).await },
                )
            },
            |_| self.mine().release_owner(ino, 0, owner),
        )
        .await?;
        Ok(())
    }

    fn mine(&self) -> MutexGuard<'_, LockTable> {
        self.mine.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cache(&self) -> MutexGuard<'_, LockCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on `mine` if this client decides `ino`'s locks itself now:
    /// it keeps them (lock cache), its lease holds (a leader that lost
    /// track of it may have moved on only after the lease) and no reclaim
    /// is due (a new leader knows no caches). None: ask the leader.
    fn try_local<T>(&self, c: &Client, ino: u64, f: impl FnOnce(&mut LockTable) -> T) -> Option<T> {
        let cache = self.cache();
        let usable = cache.cached.contains(&ino)
            && !c.meta.ttl().is_zero()
            && !self.reclaim_asked.load(Ordering::Acquire)
            && !self.reclaiming.load(Ordering::Acquire);
        usable.then(|| f(&mut self.mine()))
    }

    /// Before a request about `ino` goes to the leader: the file's lock
    /// cache goes back first (or the return under way ends), so that the
    /// leader decides with every lock.
    async fn return_if_cached(&self, c: &Client, ino: u64) -> Result<()> {
        loop {
            let done = {
                let cache = self.cache();
                if cache.cached.contains(&ino) {
                    break;
                }
                match cache.returning.get(&ino) {
                    // Registered before the lock goes: the return's
                    // notify_waiters cannot be missed.
                    Some(n) => n.clone().notified_owned(),
                    None => return Ok(()),
                }
            };
            done.await;
        }
        self.return_cache(c, ino).await
    }

    /// Sends this session's locks on `ino` back to the leader and stops
    /// deciding them here (the leader recalled the cache, or this client
    /// can no longer use it). Nothing to do if the file is not cached.
    pub async fn return_cache(&self, c: &Client, ino: u64) -> Result<()> {
        // Forgotten even if the return fails: the leader then still
        // counts the cache as ours and answers our next request on the
        // file with "reclaim first", and a reclaim sends every lock.
        let (locks, done) = {
            let mut cache = self.cache();
            if !cache.cached.remove(&ino) {
                return Ok(());
            }
            let done = Arc::new(Notify::new());
            cache.returning.insert(ino, done.clone());
            let locks: Vec<pb::HeldLock> = self
                .mine()
                .file_locks(ino)
                .iter()
                .map(|l| l.to_held(ino))
                .collect();
            (locks, done)
        };
        let req = pb::ReclaimLocksRequest {
            header: c.session.header(),
            locks,
            returned_ino: ino,
        };
        let r = c
            .rpc(req, |mut m, r| async move { m.reclaim_locks(r).await })
            .await;
        self.cache().returning.remove(&ino);
        done.notify_waiters();
        match r {
            Ok(r) => {
                self.forget_lost(&r.lost);
                Ok(())
            }
            // A new leader: it wants every lock.
            Err(s) if is_reclaim_first(&s) => self.reclaim(c).await,
            Err(s) => Err(s.into()),
        }
    }

    /// Forgets locks the leader could not give back (another session took
    /// them while this one could not be reached).
    fn forget_lost(&self, lost: &[pb::HeldLock]) {
        let mut mine = self.mine();
        for l in lost {
            tracing::error!(
                ino = l.ino,
                start = l.start,
                end = l.end,
                "lock lost: another client took it while this one was out of reach"
            );
            let _ = mine.set(l.ino, 0, l.owner, 0, l.start, l.end, LockKind::Unlock);
        }
    }

    /// One lock request (`send`), with `done` applied to the answer before
    /// a reclaim can copy `mine`; reclaims first when the leader asks.
    async fn call<T, Fut>(
        &self,
        c: &Client,
        mut send: impl FnMut() -> Fut,
        done: impl Fn(&T),
    ) -> Result<T>
    where
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        for _ in 0..RECLAIM_TRIES {
            {
                let _shared = self.order.read().await;
                match send().await {
                    Ok(v) => {
                        done(&v);
                        return Ok(v);
                    }
                    Err(s) if is_reclaim_first(&s) => {}
                    Err(s) => return Err(s.into()),
                }
            }
            self.reclaim(c).await?;
        }
        Err(ClientError::posix(
            libc::EIO,
            "the MDS kept asking for this session's locks",
        ))
    }

    /// Notes that the leader asked for this session's locks.
    pub fn ask_reclaim(&self) {
        self.reclaim_asked.store(true, Ordering::Relaxed);
    }

    /// Starts the reclaim the leader asked for, in its own task (a lock
    /// request in flight may hold it up, and the heartbeats must go on),
    /// unless one is under way.
    pub fn spawn_asked_reclaim(c: &Arc<Client>) {
        let l = &c.locks;
        if !l.reclaim_asked.swap(false, Ordering::Relaxed)
            || l.reclaiming.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let c = c.clone();
        tokio::spawn(async move {
            if let Err(e) = c.locks.reclaim(&c).await {
                tracing::warn!(error = %e, "could not reclaim locks");
            }
            c.locks.reclaiming.store(false, Ordering::Release);
        });
    }

    /// Sends every lock this session holds to the leader (which changed
    /// and asked for them). Locks another session took meanwhile (this
    /// client reclaimed after the grace period) are lost: logged and
    /// forgotten.
    pub async fn reclaim(&self, c: &Client) -> Result<()> {
        let _alone = self.order.write().await;
        // Caches belong to the leader that gave them; this one has none.
        self.cache().cached.clear();
        let locks: Vec<pb::HeldLock> = self
            .mine()
            .session_locks(0)
            .iter()
            .map(|(ino, l)| l.to_held(*ino))
            .collect();
        let n = locks.len();
        let req = pb::ReclaimLocksRequest {
            header: c.session.header(),
            locks,
            returned_ino: 0,
        };
        let r = c
            .rpc(req, |mut m, r| async move { m.reclaim_locks(r).await })
            .await?;
        self.forget_lost(&r.lost);
        tracing::info!(
            locks = n,
            lost = r.lost.len(),
            "locks reclaimed from a new MDS leader"
        );
        Ok(())
    }

    /// One attempt at setting a lock, noted in `mine` once granted.
    async fn try_setlk(&self, c: &Client, req: &pb::LockRequest) -> Result<()> {
        let kind = LockKind::from_type(req.r#type)
            .ok_or_else(|| ClientError::posix(libc::EINVAL, "bad lock type"))?;
        let _turn = self.turns.take(req.ino).await;
        let local = self.try_local(c, req.ino, |mine| {
            mine.set(req.ino, 0, req.owner, req.pid, req.start, req.end, kind)
        });
        if let Some(r) = local {
            return r.map_err(|errno| ClientError::posix(errno, "lock held by another owner"));
        }
        self.return_if_cached(c, req.ino).await?;
        let send = || {
            let mut req = req.clone();
            // A fresh request id per attempt: the MDS remembers answers by id.
            req.header = c.session.header();
            c.rpc(req, |mut m, r| async move { m.set_lock(r).await })
        };
        let note = |r: &pb::SetLockReply| {
            let noted = self
                .mine()
                .set(req.ino, 0, req.owner, req.pid, req.start, req.end, kind);
            if noted.is_err() {
                // The leader granted it: `mine` was out of step.
                tracing::warn!(
                    ino = req.ino,
                    "a granted lock conflicts with this client's copy"
                );
            }
            if r.cached {
                self.cache().cached.insert(req.ino);
            }
        };
        self.call(c, send, note).await?;
        Ok(())
    }
}

fn lock_req(
    c: &Client,
    ino: u64,
    owner: u64,
    start: u64,
    end: u64,
    typ: i32,
    pid: u32,
) -> Result<pb::LockRequest> {
    if !(libc::F_RDLCK..=libc::F_UNLCK).contains(&typ) {
        return Err(ClientError::posix(libc::EINVAL, "bad lock type"));
    }
    Ok(pb::LockRequest {
        header: c.session.header(),
        ino,
        owner,
        start,
        end,
        r#type: typ as u32,
        pid,
        reclaims: *RECLAIMS,
        caches: *RECLAIMS && *CACHES,
    })
}

/// The kind of a checked lock type.
fn lock_kind(typ: i32) -> Result<LockKind> {
    u32::try_from(typ)
        .ok()
        .and_then(LockKind::from_type)
        .ok_or_else(|| ClientError::posix(libc::EINVAL, "bad lock type"))
}

/// Waits (at most [`ORDER_WAIT`]) until every other FUSE thread is back
/// reading the device. The kernel queues requests in order, but two
/// threads read and handle them side by side: one may still hold, unhandled,
/// the release of a file closed just before this lock request was sent.
/// A thread blocked reading holds nothing.
async fn earlier_requests_handled() {
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::syscall(libc::SYS_gettid) };
    let start = tokio::time::Instant::now();
    for &tid in FUSE_THREADS.iter().filter(|t| i64::from(**t) != me) {
        while !reading_device(tid) && start.elapsed() < ORDER_WAIT {
            // Usually the other thread is only on its way back from
            // sending its last reply: a timer tick (1 ms or more) would
            // cost more than the lock request itself, once it is local.
            if start.elapsed() < ORDER_SPIN {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// The longest a lock request waits for the other FUSE threads.
const ORDER_WAIT: Duration = Duration::from_millis(50);

/// How long it looks again at once before it sleeps between looks.
const ORDER_SPIN: Duration = Duration::from_micros(300);

/// This process's FUSE threads (fuser names them `fuser-N`; all exist
/// before the first request is read).
static FUSE_THREADS: LazyLock<Vec<u32>> = LazyLock::new(|| {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            comm.starts_with("fuser-")
                .then(|| t.file_name().to_str()?.parse().ok())?
        })
        .collect()
});

/// True if thread `tid` is blocked in read(2) (or gone).
fn reading_device(tid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")) {
        // "running", or the number and arguments of the syscall it waits in.
        Ok(s) => s.split(' ').next().and_then(|n| n.parse().ok()) == Some(libc::SYS_read),
        Err(_) => true,
    }
}

/// True if thread `tid` has an unblocked, unignored signal pending, or is
/// gone: a blocked lock wait must end with EINTR.
fn interrupted(tid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return true;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    if status
        .lines()
        .any(|l| l.starts_with("State:") && (l.contains('Z') || l.contains('X')))
    {
        return true;
    }
    let pending = field("SigPnd:") | field("ShdPnd:");
    pending & !field("SigBlk:") & !field("SigIgn:") != 0
}
