//! Read-ahead of directory listings for tree walks.
//!
//! `find`, `du`, `rm -r` and `ls -R` list a directory, then each of its
//! subdirectories in turn: one MDS round trip per directory, one after the
//! other. When a listing shows subdirectories, their first pages are read
//! in the background, a few at a time, and kept in the metadata cache
//! (`MetaCache::put_listing`) for one use; a walk that reaches a directory
//! whose read-ahead is under way waits for it instead of asking again.
//! What is kept is dropped by any change to the directory's entries this
//! client makes or hears of (recalls), and served with the attributes
//! cached at the time of use.

use crate::client::Client;
use avalon_proto::pb;
use dashmap::{mapref::entry::Entry, DashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

/// Listings read ahead at a time.
const AT_ONCE: usize = 4;
/// Most subdirectories of one listing read ahead.
const PER_LISTING: usize = 128;
/// Longest wait for a read-ahead under way before asking the MDS.
const WAIT_AT_MOST: Duration = Duration::from_secs(2);

/// Read-ahead state of one client.
pub struct DirReadAhead {
    permits: Arc<Semaphore>,
    /// Directories being read ahead now → woken when done.
    running: DashMap<u64, Arc<Notify>>,
}

impl Default for DirReadAhead {
    fn default() -> Self {
        Self {
            permits: Arc::new(Semaphore::new(AT_ONCE)),
            running: DashMap::new(),
        }
    }
}

impl Client {
    /// Starts reading ahead the subdirectories listed in `page` (entries
    /// after `cookie`, at most `max` per page, as the walk will ask).
    pub fn read_ahead_dirs(self: &Arc<Self>, page: &pb::ReadDirReply, cookie: u64, max: u32) {
        let dirs = page
            .entries
            .iter()
            .filter(|e| e.mode & libc::S_IFMT == libc::S_IFDIR)
            .map(|e| e.ino)
            // One with changes queued here would wait for them (the walk
            // would wait for that): the walk lists it itself. One whose
            // entries are all cached is listed from the cache.
            .filter(|ino| {
                !self.meta.is_complete(*ino)
                    && !self.meta.has_listing(*ino)
                    && !self.dir_ahead.running.contains_key(ino)
                    && !self.deleg.changes_dir(*ino)
            })
            .take(PER_LISTING);
        for dir in dirs {
            let c = self.clone();
            tokio::spawn(async move {
                let Ok(_permit) = c.dir_ahead.permits.clone().acquire_owned().await else {
                    return;
                };
                if c.meta.has_listing(dir) {
                    return;
                }
                let done = Arc::new(Notify::new());
                match c.dir_ahead.running.entry(dir) {
                    Entry::Occupied(_) => return,
                    Entry::Vacant(v) => {
                        v.insert(done.clone());
                    }
                }
                let (epoch, gen) = (c.meta.epoch(), c.meta.ns_gen());
                let req = pb::ReadDirRequest {
                    header: c.session.header(),
                    ino: dir,
                    cookie,
                    max_entries: max,
                    plus: true,
                };
                // Its entries go into the cache only when it is used: a
                // change of ours may run beside this (no kernel lock).
                if let Some(Ok((_, r))) = c.readdir_unqueued(&req).await {
                    c.meta.put_listing(epoch, gen, dir, cookie, r);
                }
                c.dir_ahead.running.remove(&dir);
                done.notify_waiters();
            });
        }
    }

    /// The listing of `dir` after `cookie` if it was read ahead, waiting
    /// for a read-ahead under way.
    pub(crate) async fn listing_read_ahead(
        &self,
        dir: u64,
        cookie: u64,
    ) -> Option<pb::ReadDirReply> {
        if let Some(done) = self.dir_ahead.running.get(&dir).map(|d| d.clone()) {
            let woken = done.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.dir_ahead.running.contains_key(&dir) {
                let _ = tokio::time::timeout(WAIT_AT_MOST, woken).await;
            }
        }
        self.meta.take_listing(dir, cookie)
    }
}
