//! Attributes and directory entries cached under the session's metadata
//! lease (see avalon-mds `leases.rs`).
//!
//! Everything here is trusted only while the lease holds: heartbeats renew
//! it, the MDS recalls entries another session changes before that change
//! is acknowledged, and a lapsed lease empties the cache. A reply that was
//! in flight while a recall arrived may predate the change, so it is not
//! cached: every store names the recall epoch its request started in.

use crate::metrics::Cache;
use avalon_proto::pb::{Attr, DirEntry, ReadDirReply, Recall};
use bytes::Bytes;
use dashmap::DashMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most entries kept before the cache starts over (a coarse bound on
/// memory; the MDS side forgets a session's leases when it lapses).
const MAX_ENTRIES: usize = 1 << 20;
/// Most listings read ahead and not used yet.
const MAX_LISTINGS: usize = 4096;
/// Cookies of listings made from this cache have this bit set: the MDS
/// numbers entries from 3 up, far below it.
pub const LOCAL_COOKIE: u64 = 1 << 62;
/// Set in the epochs that a change's own stores use (see
/// [`MetaCache::own_change`]): the rest is the epoch its request started in.
const OWN: u64 = 1 << 63;
/// Inodes whose last own change is remembered before the record starts
/// over (voiding every request in flight, as a recall does).
const OWN_TOUCHED_MAX: usize = 1 << 16;

/// What a lookup found in the cache.
#[derive(Debug, Clone, PartialEq)]
pub enum Cached {
    /// The name exists with these attributes.
    Found(Attr),
    /// The name does not exist.
    Absent,
}

/// The client's metadata cache.
#[derive(Default)]
pub struct MetaCache {
    lease_until: Mutex<Option<Instant>>,
    /// Bumped (under `lease_until`'s lock) whenever the lease is lost or
    /// found lapsed: a write grant is used only under the lease it was
    /// recorded under (see [`MetaCache::lease_held`]).
    lease_gen: AtomicU64,
    /// Bumped by every recall and lease loss, and by this client's own
    /// namespace changes.
    epoch: AtomicU64,
    /// The epoch the latest recall or emptying made: it voids every store
    /// of a request started before it.
    recalled: AtomicU64,
    /// Inodes and directories this client's own namespace changes touched,
    /// with the epoch each change made: a reply read at the MDS before such
    /// a change is not stored about them (other stores of that reply are).
    own_touched: DashMap<u64, u64>,
    attrs: DashMap<u64, Attr>,
    /// (directory, name) → inode; 0 records that the name is absent.
    entries: DashMap<(u64, Bytes), u64>,
    /// Directories all of whose entries are in `entries` (made here).
    complete: DashMap<u64, Known>,
    /// Extended attributes asked for, per inode. They go with the inode's
    /// attributes: a setxattr recalls those.
    xattrs: DashMap<u64, Xattrs>,
    /// Listings read ahead (see `Client::read_ahead_dirs`): directory →
    /// the cookie it starts after and the reply. Each is used once.
    listings: DashMap<u64, (u64, ReadDirReply)>,
    /// Bumped by every change of entries this cache hears of: a listing
    /// read across one is not kept.
    ns_gen: AtomicU64,
    /// Emptied since the last heartbeat (the MDS may forget our leases).
    dropped: std::sync::atomic::AtomicBool,
    /// Names recalls took away a moment ago, with the inodes they named.
    pub moved: crate::moved_names::MovedNames,
}

/// A directory all of whose entries the cache holds.
struct Known {
    /// Its parent, for "..": kept only while the cache holds the
    /// directory's own entry in it (see [`MetaCache::lost`]).
    parent: u64,
    /// Its positive entries: name → inode.
    children: HashMap<Bytes, u64>,
}

/// The cookie of `name` in a listing made from the cache: its FNV-1a hash
/// with [`LOCAL_COOKIE`] set. A hash rather than a position, so that it
/// stays valid across changes and streams (an NFS export reopens the
/// directory for each page).
pub fn local_cookie(name: &[u8]) -> u64 {
    let h = name.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    LOCAL_COOKIE | (h >> 2)
}

/// True if `cookie` was given by a listing made from the cache.
pub fn is_local_cookie(cookie: u64) -> bool {
    cookie & LOCAL_COOKIE != 0
}

/// What is known of one inode's extended attributes.
#[derive(Default)]
struct Xattrs {
    /// Name → value; None: absent.
    known: HashMap<Bytes, Option<Bytes>>,
    /// Every attribute is in `known` (a file this client created bare).
    all: bool,
}

impl MetaCache {
    /// An empty cache without a lease.
    pub fn new() -> Self {
        Self::default()
    }

    /// The epoch to pass to the stores of a request starting now.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn lease_left(&self) -> Duration {
        let l = self.lease_until.lock().unwrap_or_else(|e| e.into_inner());
        l.map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// How long the kernel may cache what it is told now.
    pub fn ttl(&self) -> Duration {
        self.lease_left()
    }

    fn valid(&self) -> bool {
        !self.lease_left().is_zero()
    }

    /// True if a lease was held and has run out without renewal.
    pub fn lapsed(&self) -> bool {
        let l = self.lease_until.lock().unwrap_or_else(|e| e.into_inner());
        l.is_some_and(|t| t <= Instant::now())
    }

    /// The lease's generation if the lease holds now: the same value later
    /// means it held without a break in between (never lapsed, never
    /// dropped). The MDS forgets a session only after its lease ran out,
    /// so what the OSDs acknowledged while this holds is there when it
    /// recovers the session's write grants.
    pub fn lease_held(&self) -> Option<u64> {
        let l = self.lease_until.lock().unwrap_or_else(|e| e.into_inner());
        l.filter(|t| *t > Instant::now())
            .map(|_| self.lease_gen.load(Ordering::Acquire))
    }

    /// A heartbeat sent at `sent` was answered with a lease of `lease`
    /// (zero: none; the cache is void).
    pub fn renew(&self, sent: Instant, lease: Duration) {
        if lease.is_zero() {
            self.clear();
            return;
        }
        let mut l = self.lease_until.lock().unwrap_or_else(|e| e.into_inner());
        // A lease lapsed in between: what is cached may be stale.
        if l.is_none_or(|t| t <= Instant::now()) {
            self.lease_gen.fetch_add(1, Ordering::AcqRel);
            self.empty();
        }
        *l = Some(sent + lease);
    }

    /// Drops everything and the lease (stream lost, leader changed, too
    /// many entries): nothing is cached again before the next heartbeat.
    pub fn clear(&self) {
        {
            let mut l = self.lease_until.lock().unwrap_or_else(|e| e.into_inner());
            *l = None;
            self.lease_gen.fetch_add(1, Ordering::AcqRel);
        }
        self.dropped.store(true, Ordering::Release);
        self.empty();
    }

    /// Forgets every entry and voids replies in flight.
    fn empty(&self) {
        self.bump_recalled();
        self.attrs.clear();
        self.entries.clear();
        self.complete.clear();
        self.xattrs.clear();
        self.ns_gen.fetch_add(1, Ordering::AcqRel);
        self.listings.clear();
    }

    /// The generation to pass to [`MetaCache::put_listing`] for a listing
    /// read starting now.
    pub fn ns_gen(&self) -> u64 {
        self.ns_gen.load(Ordering::Acquire)
    }

    /// Entries of `dir` changed: a listing of it read ahead is stale.
    fn changed_dir(&self, dir: u64) {
        self.ns_gen.fetch_add(1, Ordering::AcqRel);
        self.listings.remove(&dir);
    }

    /// Keeps a whole listing of `dir` (entries after `cookie`) read ahead
    /// in `epoch` and namespace generation `gen`, for one later use.
    pub fn put_listing(&self, epoch: u64, gen: u64, dir: u64, cookie: u64, r: ReadDirReply) {
        if !r.eof || !self.may_store(epoch, &[dir]) {
            return;
        }
        if self.listings.len() >= MAX_LISTINGS {
            self.listings.clear();
        }
        // The generation is checked under the entry's lock, which
        // `changed_dir` takes after bumping it: a change either shows
        // here or drops what this stores.
        let slot = self.listings.entry(dir);
        if self.ns_gen() == gen {
            slot.insert((cookie, r));
        }
    }

    /// True if a listing of `dir` read ahead waits to be used.
    pub fn has_listing(&self, dir: u64) -> bool {
        self.listings.contains_key(&dir)
    }

    /// Takes the listing of `dir` after `cookie` read ahead, with each
    /// entry's attributes as cached now; None if there is none or an
    /// entry's attributes are no longer cached (changed since).
    pub fn take_listing(&self, dir: u64, cookie: u64) -> Option<ReadDirReply> {
        if !self.valid() {
            return None;
        }
        let (_, (_, mut r)) = self.listings.remove_if(&dir, |_, l| l.0 == cookie)?;
        for e in &mut r.entries {
            if let Some(a) = &mut e.attr {
                *a = *self.attrs.get(&a.ino)?;
                e.no_xattrs = e.no_xattrs && self.bare(a.ino);
            }
        }
        Some(r)
    }

    /// Cached attributes of `ino`.
    pub fn attr(&self, ino: u64) -> Option<Attr> {
        if !self.valid() {
            return None;
        }
        crate::metrics::cached(Cache::Attr, self.attrs.get(&ino).map(|a| *a))
    }

    /// What the cache knows of `name` in `dir`.
    pub fn lookup(&self, dir: u64, name: &[u8]) -> Option<Cached> {
        if !self.valid() {
            return None;
        }
        let r = match self
            .entries
            .get(&(dir, Bytes::copy_from_slice(name)))
            .map(|e| *e)
        {
            Some(0) => Some(Cached::Absent),
            Some(ino) => self.attrs.get(&ino).map(|a| Cached::Found(*a)),
            None if self.complete.contains_key(&dir) => Some(Cached::Absent),
            None => None,
        };
        crate::metrics::cached(Cache::Entry, r)
    }

    /// Bumps the epoch for a recall or an emptying, which voids every
    /// store of a request under way, a change's own included.
    fn bump_recalled(&self) {
        let now = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.recalled.fetch_max(now, Ordering::AcqRel);
    }

    /// Whether a store about `about` from a request started in `epoch` is
    /// still current: no recall or emptying came since, and, for a reply
    /// read at the MDS, no own change of this client touched them since. A
    /// change's own stores are not voided by other own changes (other
    /// threads' changes in other directories, which the kernel does not
    /// serialize with it).
    fn current(&self, epoch: u64, about: &[u64]) -> bool {
        let start = epoch & !OWN;
        if self.recalled.load(Ordering::Acquire) > start {
            return false;
        }
        epoch & OWN != 0
            || about
                .iter()
                .all(|x| self.own_touched.get(x).is_none_or(|e| *e <= start))
    }

    /// Whether the kernel may cache, for the lease, a reply about `about`
    /// to a request started in `epoch`: as [`MetaCache::put_entry`] would
    /// keep it. A reply read before the lease was renewed after a lapse
    /// (the MDS registers no reader then) or across a recall is not
    /// known to the MDS as cached here: nothing would recall it.
    pub fn kernel_may_cache(&self, epoch: u64, about: &[u64]) -> bool {
        self.current(epoch, about) && self.valid()
    }

    fn may_store(&self, epoch: u64, about: &[u64]) -> bool {
        if !self.current(epoch, about) || !self.valid() {
            return false;
        }
        if self.entries.len() + self.attrs.len() > MAX_ENTRIES {
            self.clear();
            return false;
        }
        true
    }

    /// True once after the cache was emptied (told in the next heartbeat).
    pub fn take_dropped(&self) -> bool {
        self.dropped.swap(false, Ordering::AcqRel)
    }

    /// Caches attributes from a reply to a request started in `epoch`.
    /// A reply that may not be cached still voids what was: it may be
    /// this client's own change, which no recall announces.
    pub fn put_attr(&self, epoch: u64, a: &Attr) {
        if self.may_store(epoch, &[a.ino]) {
            self.attrs.insert(a.ino, *a);
        } else {
            self.drop_inode(a.ino);
        }
    }

    /// Caches that `name` in `dir` is `ino` (0: absent). As with
    /// attributes, a reply that may not be cached voids the old entry (a
    /// negative entry must not outlive this client's own create).
    pub fn put_entry(&self, epoch: u64, dir: u64, name: &[u8], ino: u64) {
        if is_dot(name) {
            return;
        }
        let name = Bytes::copy_from_slice(name);
        if self.may_store(epoch, &[dir]) {
            let old = self.entries.insert((dir, name.clone()), ino);
            if old.is_some_and(|o| o != ino) {
                self.lost(old);
            }
            self.set_child(dir, name, ino);
        } else {
            self.lost(self.entries.remove(&(dir, name)).map(|(_, ino)| ino));
            self.complete.remove(&dir);
            self.changed_dir(dir);
        }
    }

    /// The cache no longer holds an entry naming `ino` (other than by its
    /// own rename, which moves it): if `ino` is a directory whose entries
    /// it holds, its parent is no longer known, so it is dropped.
    fn lost(&self, ino: Option<u64>) {
        if let Some(ino) = ino.filter(|i| *i != 0) {
            self.complete.remove(&ino);
        }
    }

    /// This client's own namespace change of `touched` (directories and
    /// inodes), from a request started in `epoch`: a reply read at the MDS
    /// before the change and stored after it would undo it here, so replies
    /// in flight are voided for what it touched. Returns the epoch the
    /// change's own stores use: they store nothing if a recall came since
    /// the request started.
    fn own_change(&self, epoch: u64, touched: &[u64]) -> u64 {
        let now = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        if self.own_touched.len() >= OWN_TOUCHED_MAX {
            // Forgetting who was touched when: void all in flight instead.
            self.own_touched.clear();
            self.recalled.fetch_max(now, Ordering::AcqRel);
        }
        for &x in touched.iter().filter(|x| **x != 0) {
            self.own_touched
                .entry(x)
                .and_modify(|e| *e = (*e).max(now))
                .or_insert(now);
        }
        OWN | (epoch & !OWN)
    }

    /// This client made `name` in `dir` (inode `ino`). Returns the epoch
    /// for the change's further stores (see `own_change`); so do
    /// [`MetaCache::removed`] and [`MetaCache::renamed`].
    pub fn created(&self, epoch: u64, dir: u64, name: &[u8], ino: u64) -> u64 {
        let epoch = self.own_change(epoch, &[dir, ino]);
        self.changed_dir(dir);
        self.put_entry(epoch, dir, name, ino);
        epoch
    }

    /// What the cached entry `name` of `dir` names (0: absent or unknown).
    fn cached_entry(&self, dir: u64, name: &[u8]) -> u64 {
        self.entries
            .get(&(dir, Bytes::copy_from_slice(name)))
            .map_or(0, |i| *i)
    }

    /// Removes the cached entry `name` of `dir`; returns what it named.
    fn unset_entry(&self, dir: u64, name: &[u8]) -> Option<u64> {
        let name = Bytes::copy_from_slice(name);
        let old = self
            .entries
            .remove(&(dir, name.clone()))
            .map(|(_, ino)| ino);
        self.set_child(dir, name, 0);
        old
    }

    /// Keeps the entries of a complete `dir` as its entry `name` becomes
    /// `ino` (0: absent).
    fn set_child(&self, dir: u64, name: Bytes, ino: u64) {
        if let Some(mut k) = self.complete.get_mut(&dir) {
            if ino == 0 {
                k.children.remove(&name);
            } else {
                k.children.insert(name, ino);
            }
        }
    }

    /// Directory `dir`, `name` in `parent`, was just created by this
    /// client: it has no entries but ours. Kept only while its own entry
    /// is cached (that is what keeps its parent known).
    pub fn put_complete(&self, epoch: u64, parent: u64, name: &[u8], dir: u64) {
        if !self.may_store(epoch, &[parent, dir]) {
            return;
        }
        // Checked under the slot's lock: a recall bumps the epoch before
        // it drops the slot, so it either shows here or drops this.
        let slot = self.complete.entry(dir);
        let named = self
            .entries
            .get(&(parent, Bytes::copy_from_slice(name)))
            .is_some_and(|i| *i == dir);
        if named && self.current(epoch, &[parent, dir]) {
            slot.insert(Known {
                parent,
                children: HashMap::new(),
            });
        }
    }

    /// True if `dir` is known to have no entries (it was created here
    /// and everything put in it since was removed again).
    pub fn empty_dir(&self, dir: u64) -> bool {
        self.valid()
            && self
                .complete
                .get(&dir)
                .is_some_and(|k| k.children.is_empty())
    }

    /// True if the cache holds every entry of `dir`.
    pub fn is_complete(&self, dir: u64) -> bool {
        self.valid() && self.complete.contains_key(&dir)
    }

    /// The whole listing of `dir` made from the cache, if it holds every
    /// entry and their attributes: in cookie order ([`local_cookie`]),
    /// with attributes, and `parent` set.
    pub fn complete_listing(&self, dir: u64) -> Option<ReadDirReply> {
        if !self.valid() {
            return None;
        }
        let (parent, children) = {
            let k = self.complete.get(&dir)?;
            let c: Vec<(Bytes, u64)> = k.children.iter().map(|(n, i)| (n.clone(), *i)).collect();
            (k.parent, c)
        };
        let mut entries = Vec::with_capacity(children.len());
        for (name, ino) in children {
            let a = *self.attrs.get(&ino)?;
            entries.push(DirEntry {
                cookie: local_cookie(&name),
                ino,
                mode: a.mode,
                no_xattrs: self.bare(ino),
                attr: Some(a),
                name,
            });
        }
        entries.sort_unstable_by_key(|e| e.cookie);
        // Two names of one hash could not be told apart by a cookie.
        if entries.windows(2).any(|w| w[0].cookie == w[1].cookie) {
            return None;
        }
        Some(ReadDirReply {
            entries,
            eof: true,
            parent,
            next_cookie: 0,
        })
    }

    /// This client removed `name` from `dir` (the inode's link count and
    /// ctime changed: its attributes are dropped).
    pub fn removed(&self, epoch: u64, dir: u64, name: &[u8]) -> u64 {
        let gone = self.cached_entry(dir, name);
        let epoch = self.own_change(epoch, &[dir, gone]);
        self.changed_dir(dir);
        if let Some(ino) = self.unset_entry(dir, name) {
            self.drop_inode(ino);
            self.lost(Some(ino));
        }
        self.put_entry(epoch, dir, name, 0);
        epoch
    }

    /// This client moved `name` in `dir` to `new_name` in `new_dir` (over
    /// whatever was there). The moved inode's ctime changed: its
    /// attributes are dropped, its new name kept if it was known.
    pub fn renamed(&self, epoch: u64, dir: u64, name: &[u8], new_dir: u64, new_name: &[u8]) -> u64 {
        let (moving, replaced) = (
            self.cached_entry(dir, name),
            self.cached_entry(new_dir, new_name),
        );
        let epoch = self.own_change(epoch, &[dir, new_dir, moving, replaced]);
        self.changed_dir(dir);
        self.changed_dir(new_dir);
        let moved = self.unset_entry(dir, name).filter(|ino| *ino != 0);
        if let Some(ino) = moved {
            self.drop_inode(ino);
            if let Some(mut k) = self.complete.get_mut(&ino) {
                k.parent = new_dir;
            }
        }
        if let Some(old) = self.unset_entry(new_dir, new_name) {
            self.drop_inode(old);
            self.lost(Some(old));
        }
        self.put_entry(epoch, dir, name, 0);
        match moved {
            Some(ino) => self.put_entry(epoch, new_dir, new_name, ino),
            // Unknown: a complete listing would now wrongly say "absent".
            None => {
                self.complete.remove(&new_dir);
            }
        }
        epoch
    }

    /// Forgets what is cached of `name` in `dir`, positive or negative.
    pub fn forget_entry(&self, dir: u64, name: &[u8]) {
        self.changed_dir(dir);
        self.complete.remove(&dir);
        if let Some((_, ino)) = self.entries.remove(&(dir, Bytes::copy_from_slice(name))) {
            self.drop_inode(ino);
            self.lost(Some(ino));
        }
    }

    /// Forgets `ino`'s attributes (changed by this client in a way the
    /// reply does not show).
    pub fn forget_attr(&self, ino: u64) {
        self.drop_inode(ino);
    }

    fn drop_inode(&self, ino: u64) {
        self.attrs.remove(&ino);
        self.xattrs.remove(&ino);
    }

    /// What the cache knows of extended attribute `name` of `ino`:
    /// Some(None) if it is absent.
    pub fn xattr(&self, ino: u64, name: &[u8]) -> Option<Option<Bytes>> {
        if !self.valid() {
            return None;
        }
        let x = self.xattrs.get(&ino)?;
        match x.known.get(name) {
            Some(v) => Some(v.clone()),
            None if x.all => Some(None),
            None => None,
        }
    }

    /// True if `ino` is known to have no extended attributes at all.
    pub fn bare(&self, ino: u64) -> bool {
        self.valid()
            && self
                .xattrs
                .get(&ino)
                .is_some_and(|x| x.all && x.known.values().all(|v| v.is_none()))
    }

    /// Changes the cached attributes of `ino` in place (this client's own
    /// change under a delegation); nothing if they are not cached.
    pub fn update_attr(&self, ino: u64, f: impl FnOnce(&mut Attr)) {
        if let Some(mut a) = self.attrs.get_mut(&ino) {
            f(&mut a);
        }
    }

    /// Records that `ino` has no extended attributes at all.
    pub fn put_no_xattrs(&self, epoch: u64, ino: u64) {
        if self.may_store(epoch, &[ino]) {
            self.xattrs.insert(
                ino,
                Xattrs {
                    known: HashMap::new(),
                    all: true,
                },
            );
        }
    }

    /// Caches the value (None: absence) of xattr `name` of `ino`.
    pub fn put_xattr(&self, epoch: u64, ino: u64, name: &[u8], value: Option<Bytes>) {
        if self.may_store(epoch, &[ino]) {
            self.xattrs
                .entry(ino)
                .or_default()
                .known
                .insert(Bytes::copy_from_slice(name), value);
        }
    }

    /// Applies one recall from the MDS.
    pub fn recall(&self, r: &Recall) {
        self.bump_recalled();
        self.changed_dir(r.ino);
        if r.entry {
            let old = self.entries.remove(&(r.ino, r.name.clone()));
            // The MDS says what the name named (the kernel may hold it
            // even where this cache did not, e.g. after our own create).
            let child = match r.child {
                0 => old.as_ref().map_or(0, |e| e.1),
                c => c,
            };
            self.moved.recalled(r.ino, &r.name, child);
            if let Some((_, ino)) = old {
                self.drop_inode(ino);
                self.lost(Some(ino));
            }
            self.complete.remove(&r.ino);
        }
        self.drop_inode(r.ino);
    }
}

fn is_dot(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ino: u64) -> Attr {
        Attr {
            ino,
            mode: libc::S_IFREG | 0o644,
            nlink: 1,
            ..Default::default()
        }
    }

    /// Directory `dir` made here (named in directory 100).
    fn made(c: &MetaCache, e: u64, dir: u64) {
        let name = format!("d{dir}");
        c.put_entry(e, 100, name.as_bytes(), dir);
        c.put_complete(e, 100, name.as_bytes(), dir);
    }

    fn leased() -> MetaCache {
        let c = MetaCache::new();
        c.renew(Instant::now(), Duration::from_secs(60));
        c
    }

    /// What the kernel may keep follows what this cache would: nothing
    /// read across a recall or before a lapsed lease was renewed (the
    /// MDS registered no reader then), nor without a lease.
    #[test]
    fn the_kernel_caches_only_answers_the_mds_knows_of() {
        let c = leased();
        let e = c.epoch();
        assert!(c.kernel_may_cache(e, &[1]));
        c.recall(&Recall {
            ino: 9,
            ..Default::default()
        });
        assert!(!c.kernel_may_cache(e, &[1]), "read across a recall");
        assert!(c.kernel_may_cache(c.epoch(), &[1]));

        // A lease that ran out, then renewed: an answer read before the
        // renewal is not cached by the kernel.
        let c = MetaCache::new();
        c.renew(Instant::now(), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        let e = c.epoch();
        assert!(!c.kernel_may_cache(e, &[1]), "no lease");
        c.renew(Instant::now(), Duration::from_secs(60));
        assert!(!c.kernel_may_cache(e, &[1]), "read before the renewal");
        assert!(c.kernel_may_cache(c.epoch(), &[1]));
    }

    #[test]
    fn nothing_is_trusted_without_a_lease() {
        let c = MetaCache::new();
        let e = c.epoch();
        c.put_attr(e, &attr(5));
        assert_eq!(c.attr(5), None);
        let c = leased();
        let e = c.epoch();
        c.put_attr(e, &attr(5));
        assert_eq!(c.attr(5), Some(attr(5)));
        c.renew(Instant::now(), Duration::ZERO);
        assert_eq!(c.attr(5), None);
    }

    #[test]
    fn entries_negative_entries_and_complete_directories() {
        let c = leased();
        let e = c.epoch();
        c.put_attr(e, &attr(7));
        c.put_entry(e, 1, b"a", 7);
        c.put_entry(e, 1, b"gone", 0);
        assert_eq!(c.lookup(1, b"a"), Some(Cached::Found(attr(7))));
        assert_eq!(c.lookup(1, b"gone"), Some(Cached::Absent));
        assert_eq!(c.lookup(1, b"other"), None);
        made(&c, e, 1);
        assert_eq!(c.lookup(1, b"other"), Some(Cached::Absent));
        // "." and ".." are the kernel's business.
        c.put_entry(e, 1, b"..", 9);
        assert_eq!(c.lookup(1, b".."), Some(Cached::Absent));
        c.removed(e, 1, b"a");
        assert_eq!(c.lookup(1, b"a"), Some(Cached::Absent));
        assert_eq!(c.attr(7), None);
    }

    #[test]
    fn a_recall_drops_the_entry_and_voids_replies_in_flight() {
        let c = leased();
        let e = c.epoch();
        c.put_attr(e, &attr(7));
        c.put_attr(e, &attr(1));
        c.put_entry(e, 1, b"a", 7);
        made(&c, e, 1);
        c.recall(&Recall {
            ino: 1,
            name: Bytes::from_static(b"a"),
            entry: true,
            data: false,
            ..Default::default()
        });
        assert_eq!(c.lookup(1, b"a"), None);
        assert_eq!(c.attr(7), None);
        assert_eq!(c.attr(1), None);
        assert_eq!(c.lookup(1, b"b"), None, "no longer complete");
        // A reply to a request sent before the recall is not cached.
        c.put_attr(e, &attr(8));
        assert_eq!(c.attr(8), None);
        // Nor does it leave an older entry in place: a negative entry
        // followed by our own create must not answer "absent".
        c.put_entry(c.epoch(), 1, b"new", 0);
        assert_eq!(c.lookup(1, b"new"), Some(Cached::Absent));
        c.put_entry(e, 1, b"new", 8);
        assert_eq!(c.lookup(1, b"new"), None);
        c.put_attr(c.epoch(), &attr(8));
        assert_eq!(c.attr(8), Some(attr(8)));
    }

    #[test]
    fn a_reply_read_before_an_own_change_is_not_stored_after_it() {
        let c = leased();
        // A lookup of "f" starts, then this client's own rename of "f"
        // (answered by the MDS after the lookup read) is noted first.
        let lookup = c.epoch();
        c.put_entry(c.epoch(), 1, b"f", 7);
        let later = c.renamed(c.epoch(), 1, b"f", 1, b"g");
        c.put_entry(lookup, 1, b"f", 7);
        assert_ne!(c.lookup(1, b"f"), Some(Cached::Found(attr(7))));
        // The change's own further stores count.
        c.put_attr(later, &attr(7));
        assert_eq!(c.lookup(1, b"g"), Some(Cached::Found(attr(7))));
    }

    #[test]
    fn own_changes_side_by_side_keep_their_stores_a_recall_voids_them() {
        let c = leased();
        made(&c, c.epoch(), 1);
        made(&c, c.epoch(), 2);
        // Two threads create in two directories at once: each started
        // before the other's change was noted.
        let (a, b) = (c.epoch(), c.epoch());
        let a = c.created(a, 1, b"x", 7);
        let b = c.created(b, 2, b"y", 8);
        c.put_attr(a, &attr(7));
        c.put_attr(b, &attr(8));
        assert_eq!(c.lookup(1, b"x"), Some(Cached::Found(attr(7))));
        assert_eq!(c.lookup(2, b"y"), Some(Cached::Found(attr(8))));
        // Both directories stay complete: absent names are still known.
        assert_eq!(c.lookup(1, b"z"), Some(Cached::Absent));
        assert_eq!(c.lookup(2, b"z"), Some(Cached::Absent));
        // A reply read at the MDS before either change is voided for what
        // the changes touched, and kept for the rest.
        let read = a & !OWN;
        c.put_attr(read, &attr(7));
        assert_eq!(c.attr(7), None);
        c.put_entry(read, 2, b"y", 0);
        assert_eq!(c.lookup(2, b"y"), None);
        c.put_attr(read, &attr(9));
        assert_eq!(c.attr(9), Some(attr(9)));
        // A recall during a change's request voids the change's stores.
        let started = c.epoch();
        c.recall(&Recall {
            ino: 5,
            ..Default::default()
        });
        let late = c.created(started, 1, b"w", 10);
        c.put_attr(late, &attr(10));
        assert_eq!(c.attr(10), None);
    }

    #[test]
    fn a_rename_moves_the_entry_and_never_hides_the_new_name() {
        let c = leased();
        made(&c, c.epoch(), 1);
        c.put_attr(c.epoch(), &attr(7));
        c.put_entry(c.epoch(), 1, b"f", 7);
        c.renamed(c.epoch(), 1, b"f", 1, b"g");
        assert_eq!(c.lookup(1, b"f"), Some(Cached::Absent));
        // The entry is known, the attributes (ctime) are asked for again.
        assert_eq!(c.lookup(1, b"g"), None);
        c.put_attr(c.epoch(), &attr(7));
        assert_eq!(c.lookup(1, b"g"), Some(Cached::Found(attr(7))));
        // A rename of a name the cache never saw voids completeness.
        c.renamed(c.epoch(), 2, b"x", 1, b"h");
        assert_eq!(c.lookup(1, b"h"), None);
    }

    #[test]
    fn xattrs_go_with_their_inode() {
        let c = leased();
        let e = c.epoch();
        c.put_xattr(e, 7, b"security.capability", None);
        c.put_xattr(e, 7, b"user.a", Some(Bytes::from_static(b"v")));
        assert_eq!(c.xattr(7, b"security.capability"), Some(None));
        assert_eq!(c.xattr(7, b"user.a"), Some(Some(Bytes::from_static(b"v"))));
        assert_eq!(c.xattr(7, b"user.b"), None);
        c.recall(&Recall {
            ino: 7,
            name: Bytes::new(),
            entry: false,
            data: false,
            ..Default::default()
        });
        assert_eq!(c.xattr(7, b"user.a"), None);
        c.put_xattr(c.epoch(), 7, b"user.a", None);
        c.forget_attr(7);
        assert_eq!(c.xattr(7, b"user.a"), None);
        // A bare new file: every name is known absent, until a recall.
        c.put_no_xattrs(c.epoch(), 8);
        assert_eq!(c.xattr(8, b"security.capability"), Some(None));
        c.recall(&Recall {
            ino: 8,
            name: Bytes::new(),
            entry: false,
            data: false,
            ..Default::default()
        });
        assert_eq!(c.xattr(8, b"security.capability"), None);
    }

    #[test]
    fn a_lapsed_lease_starts_over_empty() {
        let c = MetaCache::new();
        c.renew(Instant::now(), Duration::from_millis(1));
        let e = c.epoch();
        c.put_attr(e, &attr(3));
        std::thread::sleep(Duration::from_millis(5));
        c.renew(Instant::now(), Duration::from_secs(60));
        assert_eq!(c.attr(3), None);
    }

    #[test]
    fn a_directory_made_here_is_known_empty_while_its_entries_are_tracked() {
        let c = leased();
        assert!(!c.empty_dir(1), "not made here: unknown");
        made(&c, c.epoch(), 1);
        assert!(c.empty_dir(1));
        c.put_attr(c.epoch(), &attr(7));
        c.created(c.epoch(), 1, b"a", 7);
        c.created(c.epoch(), 1, b"b", 8);
        assert!(!c.empty_dir(1));
        // A lookup of a known name changes nothing.
        c.put_entry(c.epoch(), 1, b"a", 7);
        c.removed(c.epoch(), 1, b"a");
        assert!(!c.empty_dir(1), "b is still there");
        // Moved out: the directory is empty again; moved in: it is not.
        c.renamed(c.epoch(), 1, b"b", 2, b"b");
        assert!(c.empty_dir(1));
        made(&c, c.epoch(), 3);
        c.put_entry(c.epoch(), 2, b"c", 9);
        c.renamed(c.epoch(), 2, b"c", 3, b"c");
        assert!(!c.empty_dir(3));
        // Whatever voids completeness voids emptiness.
        c.forget_entry(1, b"x");
        assert!(!c.empty_dir(1));
        made(&c, c.epoch(), 4);
        c.recall(&Recall {
            ino: 4,
            name: Bytes::from_static(b"y"),
            entry: true,
            ..Default::default()
        });
        assert!(!c.empty_dir(4));
    }

    fn names(l: &ReadDirReply) -> Vec<&[u8]> {
        let mut n: Vec<&[u8]> = l.entries.iter().map(|e| &e.name[..]).collect();
        n.sort();
        n
    }

    #[test]
    fn a_directory_made_here_is_listed_from_the_cache_while_it_is_known_whole() {
        let c = leased();
        assert!(c.complete_listing(1).is_none(), "not made here");
        made(&c, c.epoch(), 1);
        let l = c.complete_listing(1).expect("made here, empty");
        assert!(l.entries.is_empty() && l.eof);
        assert_eq!(l.parent, 100);
        for (ino, name) in [(7, &b"a"[..]), (8, b"b"), (9, b"c")] {
            c.put_attr(c.epoch(), &attr(ino));
            c.created(c.epoch(), 1, name, ino);
        }
        c.removed(c.epoch(), 1, b"b");
        let l = c.complete_listing(1).unwrap();
        assert_eq!(names(&l), [&b"a"[..], b"c"]);
        assert!(l.entries.windows(2).all(|w| w[0].cookie < w[1].cookie));
        for e in &l.entries {
            assert_eq!(e.cookie, local_cookie(&e.name));
            assert!(is_local_cookie(e.cookie) && e.cookie > 2);
            assert_eq!(e.attr.unwrap().ino, e.ino);
        }
        // An entry whose attributes are not cached: asked of the MDS.
        c.forget_attr(9);
        assert!(c.complete_listing(1).is_none());
        c.put_attr(c.epoch(), &attr(9));

        // Moved by this client: its parent follows.
        made(&c, c.epoch(), 2);
        c.renamed(c.epoch(), 100, b"d1", 2, b"moved");
        assert_eq!(c.complete_listing(1).unwrap().parent, 2);
        assert!(
            c.complete_listing(2).is_none(),
            "moved: its ctime is asked for"
        );
        c.put_attr(c.epoch(), &attr(1));
        assert_eq!(names(&c.complete_listing(2).unwrap()), [&b"moved"[..]]);
        // Its name dropped any other way: its parent is unknown, so is
        // the listing.
        c.forget_entry(2, b"moved");
        assert!(c.complete_listing(1).is_none());
        made(&c, c.epoch(), 3);
        c.recall(&Recall {
            ino: 100,
            name: Bytes::from_static(b"d3"),
            entry: true,
            ..Default::default()
        });
        assert!(c.complete_listing(3).is_none());
        // A directory put in place of another drops the one replaced.
        made(&c, c.epoch(), 4);
        made(&c, c.epoch(), 5);
        c.renamed(c.epoch(), 100, b"d4", 100, b"d5");
        assert!(c.complete_listing(5).is_none());
        assert_eq!(c.complete_listing(4).unwrap().parent, 100);
        // Not without a lease.
        c.renew(Instant::now(), Duration::ZERO);
        assert!(c.complete_listing(4).is_none());
    }

    fn listing(entries: &[(u64, &'static [u8])]) -> ReadDirReply {
        ReadDirReply {
            entries: entries
                .iter()
                .map(|(ino, name)| avalon_proto::pb::DirEntry {
                    name: Bytes::from_static(name),
                    ino: *ino,
                    mode: libc::S_IFREG,
                    cookie: *ino,
                    attr: Some(attr(*ino)),
                    no_xattrs: true,
                })
                .collect(),
            eof: true,
            ..Default::default()
        }
    }

    #[test]
    fn a_listing_read_ahead_is_used_once_and_only_while_nothing_changed() {
        let c = leased();
        let (e, g) = (c.epoch(), c.ns_gen());
        c.put_attr(e, &attr(5));
        c.put_attr(e, &attr(6));
        c.put_listing(e, g, 1, 2, listing(&[(5, b"a"), (6, b"b")]));
        assert!(c.take_listing(1, 9).is_none(), "another starting point");
        let got = c.take_listing(1, 2).expect("kept");
        assert_eq!(got.entries.len(), 2);
        assert!(c.take_listing(1, 2).is_none(), "used once");

        // Attributes are the cache's at the time of use; an entry whose
        // attributes were dropped makes the listing unusable.
        c.put_listing(e, g, 1, 2, listing(&[(5, b"a"), (6, b"b")]));
        c.update_attr(5, |a| a.size = 42);
        assert_eq!(
            c.take_listing(1, 2).unwrap().entries[0].attr.unwrap().size,
            42
        );
        c.put_listing(e, g, 1, 2, listing(&[(5, b"a"), (6, b"b")]));
        c.forget_attr(6);
        assert!(c.take_listing(1, 2).is_none());

        // A change of the directory's entries drops it, and a listing
        // read across any change is not kept.
        c.put_attr(e, &attr(6));
        let g = c.ns_gen();
        c.put_listing(e, g, 1, 2, listing(&[(5, b"a")]));
        c.created(e, 1, b"new", 6);
        assert!(c.take_listing(1, 2).is_none());
        c.put_listing(e, g, 1, 2, listing(&[(5, b"a")]));
        assert!(c.take_listing(1, 2).is_none(), "read before the create");
        let g = c.ns_gen();
        c.put_listing(e, g, 1, 2, listing(&[(5, b"a")]));
        c.recall(&Recall {
            ino: 1,
            name: Bytes::from_static(b"x"),
            entry: true,
            ..Default::default()
        });
        assert!(c.take_listing(1, 2).is_none());
        // Only whole listings are kept.
        let (e, g) = (c.epoch(), c.ns_gen());
        c.put_attr(e, &attr(5));
        let mut part = listing(&[(5, b"a")]);
        part.eof = false;
        c.put_listing(e, g, 1, 2, part);
        assert!(!c.has_listing(1));
    }
}
