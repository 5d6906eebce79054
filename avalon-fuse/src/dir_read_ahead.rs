//! Read-ahead of directory listings for tree walks.
//!
//! `find`, `du`, `rm -r` and `ls -R` list a directory, then each of its
//! subdirectories in turn: one MDS round trip per directory, one after the
//! other. When a listing shows subdirectories, their first pages are read
//! in the background, a few at a time, and kept in the metadata cache
//! (`MetaCache::put_listing`) for one use (`Client::read_ahead_dirs`); a walk that reaches a directory
//! whose read-ahead is under way waits for it instead of asking again.
//! What is kept is dropped by any change to the directory's entries this
//! client makes or hears of (recalls), and served with the attributes
//! cached at the time of use.

use dashmap::{mapref::entry::Entry, DashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

/// Listings read ahead at a time.
const AT_ONCE: usize = 4;
/// Most subdirectories of one listing read ahead.
pub const PER_LISTING: usize = 128;
/// Longest wait for a read-ahead under way before asking the MDS.
const WAIT_AT_MOST: Duration = Duration::from_secs(2);

/// Read-ahead state of one client.
pub struct DirReadAhead {
    permits: Arc<Semaphore>,
    /// Directories being read ahead now → woken when done.
    running: Arc<DashMap<u64, Arc<Notify>>>,
}

impl Default for DirReadAhead {
    fn default() -> Self {
        Self {
            permits: Arc::new(Semaphore::new(AT_ONCE)),
            running: Arc::default(),
        }
    }
}

impl DirReadAhead {
    /// True if `dir` is being read ahead now.
    pub fn running(&self, dir: u64) -> bool {
        self.running.contains_key(&dir)
    }

    /// Reads `dir` ahead in the background, a few directories at a time
    /// and one read-ahead per directory: once a turn comes, `load` gives
    /// the read (None: no longer needed), which stores what it read.
    pub fn start<F, Fut>(&self, dir: u64, load: F)
    where
        F: FnOnce() -> Option<Fut> + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let permits = self.permits.clone();
        let running = self.running.clone();
        tokio::spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let Some(read) = load() else {
                return;
            };
            let done = Arc::new(Notify::new());
            match running.entry(dir) {
                Entry::Occupied(_) => return,
                Entry::Vacant(v) => {
                    v.insert(done.clone());
                }
            }
            read.await;
            running.remove(&dir);
            done.notify_waiters();
        });
    }

    /// Waits (a bounded time) for a read-ahead of `dir` under way.
    pub async fn wait(&self, dir: u64) {
        if let Some(done) = self.running.get(&dir).map(|d| d.clone()) {
            let woken = done.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.running.contains_key(&dir) {
                let _ = tokio::time::timeout(WAIT_AT_MOST, woken).await;
            }
        }
    }
}
