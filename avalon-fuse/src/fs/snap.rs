//! The kernel's view of snapshots (`crate::snapshots`): `DIR/.snap` and
//! the frozen trees under it. Everything there is read-only (EROFS) but
//! `mkdir` and `rmdir` in a `.snap` directory, which take and remove
//! snapshots.

use super::{errno, AvalonFs};
use crate::client::Client;
use crate::error::{ClientError, Result};
use crate::snapshots::{Node, SNAP_DIR};
use avalon_proto::pb::Attr;
use fuser::{
    FileAttr, FopenFlags, Generation, INodeNo, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

/// How long the kernel keeps frozen inodes and their entries: they never
/// change (a removed snapshot's are refused once this runs out).
const FROZEN_TTL: Duration = Duration::from_secs(60);
/// How long it keeps `.snap` and its entries, which snapshots change.
const SNAP_DIR_TTL: Duration = Duration::from_secs(1);

/// True if `name` is the virtual snapshot directory's.
pub(super) fn is_snap_name(name: &[u8]) -> bool {
    name == SNAP_DIR
}

fn ttl_of(node: u64) -> Duration {
    match Node::of(node) {
        Some(Node::Frozen { .. }) => FROZEN_TTL,
        _ => SNAP_DIR_TTL,
    }
}

fn kernel_attr(a: &Attr) -> FileAttr {
    crate::attr::to_fuse(a, a.ino, a.size)
}

fn read_only() -> ClientError {
    ClientError::posix(libc::EROFS, "snapshots are read-only")
}

/// The attributes of snapshot node `node`.
async fn attr_of(c: &Client, node: u64) -> Result<Attr> {
    match Node::of(node) {
        Some(Node::SnapDir { dir }) => c.snap_dir_attr(dir).await,
        Some(Node::Frozen { id, ino }) => c.snap_lookup(id, ino, b"").await,
        None => Err(ClientError::posix(libc::EINVAL, "not a snapshot node")),
    }
}

/// Entry `name` of `parent` (a snapshot node, or a live directory whose
/// `.snap` is looked up).
async fn lookup(c: &Client, parent: u64, name: &[u8]) -> Result<Attr> {
    match Node::of(parent) {
        None => c.snap_dir_attr(parent).await,
        Some(Node::SnapDir { dir }) => c.snap_root(dir, name).await,
        Some(Node::Frozen { id, ino }) => c.snap_lookup(id, ino, name).await,
    }
}

/// One entry of a listing.
struct Item {
    node: u64,
    offset: u64,
    name: Vec<u8>,
    attr: Attr,
}

/// The entries of snapshot directory `node` after `offset` (one MDS page
/// of a frozen directory; a `.snap` directory whole, offsets id + 2),
/// "." and ".." first. Without `plus`, attributes carry only the mode.
async fn listing(c: &Client, node: u64, offset: u64, plus: bool) -> Result<Vec<Item>> {
    let me = attr_of(c, node).await?;
    let mut items = Vec::new();
    let dots = |items: &mut Vec<Item>, up: u64| {
        if offset < 1 {
            items.push(Item {
                node,
                offset: 1,
                name: b".".to_vec(),
                attr: me,
            });
        }
        if offset < 2 {
            items.push(Item {
                node: up,
                offset: 2,
                name: b"..".to_vec(),
                attr: Attr { ino: up, ..me },
            });
        }
    };
    match Node::of(node) {
        Some(Node::SnapDir { dir }) => {
            dots(&mut items, crate::dir_stream::fuse_ino(c, dir));
            for s in c.snapshots_of(dir).await? {
                if s.id + 2 <= offset {
                    continue;
                }
                let attr = if plus {
                    c.snap_lookup(s.id, dir, b"").await?
                } else {
                    Attr {
                        ino: Node::Frozen { id: s.id, ino: dir }.id()?,
                        mode: libc::S_IFDIR,
                        ..Attr::default()
                    }
                };
                items.push(Item {
                    node: attr.ino,
                    offset: s.id + 2,
                    name: s.name,
                    attr,
                });
            }
        }
        Some(Node::Frozen { id, ino }) => {
            let (entries, _, up) = c.snap_readdir(id, ino, offset.max(2), plus).await?;
            dots(&mut items, up);
            for e in entries {
                let attr = e.attr.unwrap_or(Attr {
                    ino: e.ino,
                    mode: e.mode,
                    ..Attr::default()
                });
                items.push(Item {
                    node: e.ino,
                    offset: e.cookie,
                    name: e.name.to_vec(),
                    attr,
                });
            }
        }
        None => return Err(ClientError::posix(libc::ENOTDIR, "not a snapshot node")),
    }
    Ok(items)
}

impl AvalonFs {
    /// LOOKUP in a snapshot node, or of `.snap` in live `parent`.
    pub(super) fn snap_lookup(&self, parent: u64, name: Vec<u8>, reply: ReplyEntry) {
        let c = self.client.clone();
        self.spawn(async move {
            match lookup(&c, parent, &name).await {
                Ok(a) => reply.entry(&ttl_of(a.ino), &kernel_attr(&a), Generation(a.generation)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    pub(super) fn snap_getattr(&self, node: u64, reply: ReplyAttr) {
        let c = self.client.clone();
        self.spawn(async move {
            match attr_of(&c, node).await {
                Ok(a) => reply.attr(&ttl_of(node), &kernel_attr(&a)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    pub(super) fn snap_readlink(&self, node: u64, reply: ReplyData) {
        let Some(Node::Frozen { id, ino }) = Node::of(node) else {
            return reply.error(fuser::Errno::EINVAL);
        };
        let c = self.client.clone();
        self.spawn(async move {
            match c.snap_readlink(id, ino).await {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    /// GETXATTR of a frozen node: its extended attributes as they were
    /// (the `.snap` directories have none).
    pub(super) fn snap_getxattr(&self, node: u64, name: Vec<u8>, size: u32, reply: ReplyXattr) {
        let Some(Node::Frozen { id, ino }) = Node::of(node) else {
            return reply.error(fuser::Errno::ENODATA);
        };
        let c = self.client.clone();
        self.spawn(async move {
            match c.snap_xattr(id, ino, &name).await {
                Ok(r) => super::xattr_reply(&r.value, size, reply),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    /// LISTXATTR of a frozen node.
    pub(super) fn snap_listxattr(&self, node: u64, size: u32, reply: ReplyXattr) {
        let Some(Node::Frozen { id, ino }) = Node::of(node) else {
            return super::xattr_reply(&[], size, reply);
        };
        let c = self.client.clone();
        self.spawn(async move {
            match c.snap_xattr(id, ino, b"").await {
                Ok(r) => super::xattr_reply(&super::xattr_names(&r.names), size, reply),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    /// MKDIR in a snapshot node: in `DIR/.snap`, takes a snapshot.
    pub(super) fn snap_mkdir(&self, parent: u64, name: Vec<u8>, uid: u32, reply: ReplyEntry) {
        let Some(Node::SnapDir { dir }) = Node::of(parent) else {
            return reply.error(errno(&read_only()));
        };
        let c = self.client.clone();
        self.spawn(async move {
            match c.snap_create(dir, &name, uid).await {
                Ok(a) => reply.entry(&ttl_of(a.ino), &kernel_attr(&a), Generation(a.generation)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    /// RMDIR in a snapshot node: in `DIR/.snap`, removes a snapshot.
    pub(super) fn snap_rmdir(&self, parent: u64, name: Vec<u8>, uid: u32, reply: ReplyEmpty) {
        let Some(Node::SnapDir { dir }) = Node::of(parent) else {
            return reply.error(errno(&read_only()));
        };
        let c = self.client.clone();
        self.spawn(async move {
            match c.snap_remove(dir, &name, uid).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    /// OPEN of a frozen file: reads only; its pages stay valid.
    pub(super) fn snap_open(&self, flags: OpenFlags, reply: ReplyOpen) {
        let how = flags.0;
        if how & libc::O_ACCMODE != libc::O_RDONLY || how & libc::O_TRUNC != 0 {
            return reply.error(errno(&read_only()));
        }
        reply.opened(self.new_fh(), FopenFlags::FOPEN_KEEP_CACHE);
    }

    pub(super) fn snap_read(&self, node: u64, offset: u64, size: u32, reply: ReplyData) {
        let Some(Node::Frozen { id, ino }) = Node::of(node) else {
            return reply.error(fuser::Errno::EISDIR);
        };
        let c = self.client.clone();
        self.spawn(async move {
            match c.snap_read(id, ino, offset, size).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    /// OPENDIR of a snapshot node: nothing to count at the MDS.
    pub(super) fn snap_opendir(&self, reply: ReplyOpen) {
        reply.opened(self.new_fh(), FopenFlags::empty());
    }

    pub(super) fn snap_readdir(&self, node: u64, offset: u64, mut reply: ReplyDirectory) {
        let c = self.client.clone();
        self.spawn(async move {
            match listing(&c, node, offset, false).await {
                Ok(items) => {
                    for it in items {
                        let kind = crate::attr::kind_of(it.attr.mode);
                        if reply.add(
                            INodeNo(it.node),
                            it.offset,
                            kind,
                            OsStr::from_bytes(&it.name),
                        ) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    pub(super) fn snap_readdirplus(&self, node: u64, offset: u64, mut reply: ReplyDirectoryPlus) {
        let c = self.client.clone();
        self.spawn(async move {
            match listing(&c, node, offset, true).await {
                Ok(items) => {
                    for it in items {
                        // ".." links no dentry: only its number matters.
                        let ttl = if it.name == b".." {
                            Duration::ZERO
                        } else {
                            ttl_of(it.node)
                        };
                        let attr = kernel_attr(&it.attr);
                        let generation = Generation(it.attr.generation);
                        if reply.add(
                            INodeNo(it.node),
                            it.offset,
                            OsStr::from_bytes(&it.name),
                            &ttl,
                            &attr,
                            generation,
                        ) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    /// SEEK_DATA / SEEK_HOLE in a frozen file: all data up to its size.
    pub(super) fn snap_lseek(&self, node: u64, offset: i64, whence: i32, reply: fuser::ReplyLseek) {
        let c = self.client.clone();
        self.spawn(async move {
            let size = match attr_of(&c, node).await {
                Ok(a) => a.size as i64,
                Err(e) => return reply.error(errno(&e)),
            };
            match whence {
                _ if offset < 0 || offset >= size => reply.error(fuser::Errno::ENXIO),
                libc::SEEK_DATA => reply.offset(offset),
                libc::SEEK_HOLE => reply.offset(size),
                _ => reply.error(fuser::Errno::EINVAL),
            }
        });
    }
}

/// EROFS for a change of snapshot node `node`, if it is one.
pub(super) fn refuse_change(nodes: &[u64]) -> Option<fuser::Errno> {
    nodes
        .iter()
        .any(|&n| crate::snapshots::is_snap(n))
        .then(|| errno(&read_only()))
}

/// For a new name `name` in `parent`: EROFS in a snapshot node, EEXIST
/// for `.snap` (the virtual directory every directory has).
pub(super) fn refuse_new(parent: u64, name: &[u8]) -> Option<fuser::Errno> {
    if is_snap_name(name) {
        return Some(fuser::Errno::EEXIST);
    }
    refuse_change(&[parent])
}
