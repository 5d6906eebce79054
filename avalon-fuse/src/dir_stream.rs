//! Open directory streams: which entries each readdir(plus) of a stream
//! returns, from the MDS or from the client's cache.
//!
//! A directory whose entries the client holds all of (made here, see
//! `MetaCache::complete_listing`) is listed from its cache: no MDS round
//! trip, and no wait for the queue of changes made under its delegation
//! (a `find` or `rm -r` right after an untar). Such a stream keeps the
//! listing it started with and gives hash cookies (`local_cookie`); every
//! other stream pages through the MDS with the MDS's cookies.

use crate::client::Client;
use crate::error::Result;
use crate::meta_cache::{is_local_cookie, local_cookie};
use avalon_proto::pb::{DirEntry, ReadDirReply};
use dashmap::DashMap;
use fuser::{Errno, INodeNo};
use std::sync::Arc;

/// Directory entries fetched per readdir RPC.
const READDIR_PAGE: u32 = 512;
/// Cookies 1 and 2 are "." and ".."; the MDS numbers real entries from 3.
pub const DOTDOT_COOKIE: u64 = 2;

/// What a directory listing adds to a readdir or readdirplus reply.
pub enum DirItem<'a> {
    /// ".", at offset 0.
    Dot,
    /// "..", with the parent's kernel node id.
    DotDot(INodeNo),
    /// An entry of the directory.
    Entry(&'a DirEntry),
}

/// What is kept of open directory streams, by file handle.
#[derive(Default)]
pub struct DirStreams {
    /// fh → the directory's next cookie when the stream started (or was
    /// rewound). Entries from there on were added later and are left
    /// out, so a listing ends even while entries are renamed away and
    /// back (each rename gives a new, larger cookie).
    marks: DashMap<u64, u64>,
    /// Streams known to have ended: fh → the cookie of the last entry
    /// given. The kernel asks once more after the last page and is
    /// answered from here (nothing with a cookie past it and below the
    /// stream's mark can appear: new entries get larger cookies).
    ends: DashMap<u64, u64>,
    /// Streams listed from the cache: fh → the listing they started with.
    listed: DashMap<u64, Arc<ReadDirReply>>,
}

impl DirStreams {
    /// True if stream `fh` is known to end before `offset`; a rewind
    /// (offset 0) starts it over.
    pub fn ended(&self, fh: u64, offset: u64) -> bool {
        if offset == 0 {
            self.ends.remove(&fh);
            return false;
        }
        self.ends.get(&fh).is_some_and(|end| offset >= *end)
    }

    /// Forgets stream `fh` (closed).
    pub fn release(&self, fh: u64) {
        self.marks.remove(&fh);
        self.ends.remove(&fh);
        self.listed.remove(&fh);
    }

    /// The high-water mark of a stream: taken from the first page of the
    /// stream (or of a rewind), kept for its later pages. 0 from an MDS
    /// that does not report it: no limit.
    fn mark(&self, fh: u64, offset: u64, next_cookie: u64) -> u64 {
        let next = if next_cookie == 0 {
            u64::MAX
        } else {
            next_cookie
        };
        if offset == 0 {
            self.marks.insert(fh, next);
            return next;
        }
        *self.marks.entry(fh).or_insert(next)
    }

    /// The cached listing stream `fh` of `dir` reads from at `offset`, if
    /// it reads from one: chosen at the start (or a rewind), kept after.
    /// A stream resuming at a cache cookie it did not give (an NFS export
    /// opens the directory anew for each page) lists the whole directory
    /// again in that order.
    async fn listed(
        &self,
        c: &Arc<Client>,
        dir: u64,
        fh: u64,
        offset: u64,
        plus: bool,
    ) -> Result<Option<Arc<ReadDirReply>>> {
        if offset == 0 {
            let Some(l) = c.meta.complete_listing(dir).map(Arc::new) else {
                self.listed.remove(&fh);
                return Ok(None);
            };
            c.read_ahead_dirs(&l, DOTDOT_COOKIE, READDIR_PAGE);
            self.listed.insert(fh, l.clone());
            return Ok(Some(l));
        }
        if let Some(l) = self.listed.get(&fh) {
            return Ok(Some(l.clone()));
        }
        if !is_local_cookie(offset) {
            return Ok(None);
        }
        let l = Arc::new(listing_in_cache_order(c, dir, plus).await?);
        self.listed.insert(fh, l.clone());
        Ok(Some(l))
    }
}

/// The whole listing of `dir` with cache cookies, in their order: from
/// the cache, else read whole from the MDS.
async fn listing_in_cache_order(c: &Arc<Client>, dir: u64, plus: bool) -> Result<ReadDirReply> {
    if let Some(l) = c.meta.complete_listing(dir) {
        return Ok(l);
    }
    let mut all = c.readdir(dir, DOTDOT_COOKIE, READDIR_PAGE, plus).await?;
    while !all.eof {
        let Some(last) = all.entries.last().map(|e| e.cookie) else {
            break;
        };
        let page = c.readdir(dir, last, READDIR_PAGE, plus).await?;
        all.eof = page.eof || page.entries.is_empty();
        all.entries.extend(page.entries);
    }
    for e in &mut all.entries {
        e.cookie = local_cookie(&e.name);
    }
    all.entries.sort_unstable_by_key(|e| e.cookie);
    Ok(all)
}

/// A page of directory `dir` from the MDS after `cookie`; starts reading
/// ahead the subdirectories it lists (a tree walk lists them next).
async fn dir_page(c: &Arc<Client>, dir: u64, cookie: u64, plus: bool) -> Result<ReadDirReply> {
    let page = c.readdir(dir, cookie, READDIR_PAGE, plus).await?;
    c.read_ahead_dirs(&page, DOTDOT_COOKIE, READDIR_PAGE);
    Ok(page)
}

/// Kernel node id of ".." of directory `dir` whose parent is `parent`:
/// the mount root is its own parent (its real parent is outside the
/// mount).
fn dotdot(c: &Client, dir: u64, parent: u64) -> u64 {
    if dir == c.root_ino || parent == 0 {
        fuse_ino(c, dir)
    } else {
        fuse_ino(c, parent)
    }
}

/// Adds "." and ".." (parent `parent`) where a stream at `offset` still
/// has them; true if the reply is full.
fn add_dots(
    c: &Client,
    dir: u64,
    offset: u64,
    parent: u64,
    add: &mut impl FnMut(DirItem<'_>) -> std::result::Result<bool, Errno>,
) -> std::result::Result<bool, Errno> {
    Ok((offset == 0 && add(DirItem::Dot)?)
        || (offset <= 1 && add(DirItem::DotDot(INodeNo(dotdot(c, dir, parent))))?))
}

/// Kernel node id of an MDS inode.
pub fn fuse_ino(c: &Client, ino: u64) -> u64 {
    if ino == c.root_ino {
        1
    } else {
        ino
    }
}

/// One readdir(plus) request of a directory stream.
pub struct DirStream {
    /// The directory (MDS inode).
    pub dir: u64,
    /// The stream's file handle.
    pub fh: u64,
    /// Where the kernel asks to go on from.
    pub offset: u64,
    /// A readdirplus (entries with attributes).
    pub plus: bool,
}

impl DirStream {
    /// Hands the stream's items from `offset` on to `add` until it says
    /// the reply is full (`Ok(true)`) or the stream ends (then noted in
    /// `s.ends`, as is its end at the stream's mark).
    pub async fn fill(
        self,
        c: &Arc<Client>,
        s: &DirStreams,
        mut add: impl FnMut(DirItem<'_>) -> std::result::Result<bool, Errno>,
    ) -> std::result::Result<(), Errno> {
        let (dir, fh, offset) = (self.dir, self.fh, self.offset);
        let errno = |e: crate::error::ClientError| Errno::from_i32(e.errno());
        if let Some(l) = s
            .listed(c, dir, fh, offset, self.plus)
            .await
            .map_err(errno)?
        {
            return self.fill_listed(c, s, &l, add);
        }
        let mut cookie = offset.max(DOTDOT_COOKIE);
        let mut page = dir_page(c, dir, cookie, self.plus).await.map_err(errno)?;
        let mark = s.mark(fh, offset, page.next_cookie);
        if add_dots(c, dir, offset, page.parent, &mut add)? {
            return Ok(());
        }
        loop {
            for e in &page.entries {
                if e.cookie >= mark {
                    s.ends.insert(fh, cookie);
                    return Ok(());
                }
                if add(DirItem::Entry(e))? {
                    return Ok(());
                }
                cookie = e.cookie;
            }
            if page.eof || page.entries.is_empty() {
                s.ends.insert(fh, cookie);
                return Ok(());
            }
            page = dir_page(c, dir, cookie, self.plus).await.map_err(errno)?;
        }
    }

    /// `fill` from a listing in cookie order.
    fn fill_listed(
        self,
        c: &Client,
        s: &DirStreams,
        l: &ReadDirReply,
        mut add: impl FnMut(DirItem<'_>) -> std::result::Result<bool, Errno>,
    ) -> std::result::Result<(), Errno> {
        let (dir, fh, offset) = (self.dir, self.fh, self.offset);
        if add_dots(c, dir, offset, l.parent, &mut add)? {
            return Ok(());
        }
        let mut cookie = offset.max(DOTDOT_COOKIE);
        let from = l.entries.partition_point(|e| e.cookie <= cookie);
        for e in &l.entries[from..] {
            if add(DirItem::Entry(e))? {
                return Ok(());
            }
            cookie = e.cookie;
        }
        s.ends.insert(fh, cookie);
        Ok(())
    }
}
