//! Directory snapshots on the client: the `snap_seq` a file's data changes
//! carry, the virtual `DIR/.snap` directories and reads of the frozen
//! inodes under `DIR/.snap/NAME` (the FUSE side is `fs/snap.rs`).
//!
//! Kernel node ids of snapshot inodes have the top bit set, the snapshot
//! id in the next [`ID_BITS`] bits and the MDS inode number in the low
//! [`INO_BITS`]; snapshot id 0 names the `.snap` directory of a directory.
//! Live node ids are MDS inode numbers, far below the top bit, so the two
//! never collide, and the same inode in two snapshots gets two nodes.
//! Snapshot inodes never change, so what is learned of them is kept.

use crate::client::Client;
use crate::error::{ClientError, Result};
use avalon_proto::pb::{self, Attr};
use dashmap::DashMap;

/// The name of the virtual directory of a directory's snapshots.
pub const SNAP_DIR: &[u8] = b".snap";
/// Bits of the MDS inode number in a snapshot node id.
pub const INO_BITS: u32 = 40;
/// Bits of the snapshot id in a snapshot node id.
pub const ID_BITS: u32 = 23;
const TOP: u64 = 1 << 63;
const INO_MASK: u64 = (1 << INO_BITS) - 1;
const ID_MASK: u64 = (1 << ID_BITS) - 1;
/// Frozen attributes kept at most (then forgotten and asked again).
const MAX_ATTRS: usize = 100_000;

/// What a snapshot node id stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    /// The `.snap` directory of live directory `dir`.
    SnapDir { dir: u64 },
    /// Inode `ino` as snapshot `id` holds it.
    Frozen { id: u64, ino: u64 },
}

impl Node {
    /// The kernel node id; EOVERFLOW if the numbers do not fit.
    pub fn id(self) -> Result<u64> {
        let (id, ino) = match self {
            Node::SnapDir { dir } => (0, dir),
            Node::Frozen { id, ino } => (id, ino),
        };
        if ino > INO_MASK || id > ID_MASK {
            return Err(ClientError::posix(
                libc::EOVERFLOW,
                "snapshot or inode number too large for a snapshot node id",
            ));
        }
        Ok(TOP | id << INO_BITS | ino)
    }

    /// The node a kernel node id stands for, if it is a snapshot one.
    pub fn of(node: u64) -> Option<Node> {
        if node & TOP == 0 {
            return None;
        }
        let ino = node & INO_MASK;
        Some(match (node >> INO_BITS) & ID_MASK {
            0 => Node::SnapDir { dir: ino },
            id => Node::Frozen { id, ino },
        })
    }
}

/// True if kernel node id `node` is a snapshot one (read-only).
pub fn is_snap(node: u64) -> bool {
    node & TOP != 0
}

/// Per client: files' snapshot sequences and frozen attributes.
#[derive(Default)]
pub struct Snaps {
    /// File -> the newest snapshot holding it, as last heard (absent: 0).
    seqs: DashMap<u64, u64>,
    /// Snapshot node id -> frozen attributes.
    attrs: DashMap<u64, Attr>,
}

impl Snaps {
    /// The `snap_seq` data changes of `ino` carry.
    pub fn seq(&self, ino: u64) -> u64 {
        self.seqs.get(&ino).map_or(0, |s| *s)
    }

    /// Notes that snapshot `seq` holds `ino`. Never lowered: a higher one
    /// left from a removed snapshot only makes the OSDs keep a clone the
    /// next trim drops.
    pub fn set_seq(&self, ino: u64, seq: u64) {
        if seq != 0 {
            let mut e = self.seqs.entry(ino).or_insert(0);
            *e = (*e).max(seq);
        }
    }

    fn remember(&self, node: u64, a: &Attr) {
        if self.attrs.len() >= MAX_ATTRS {
            self.attrs.clear();
        }
        self.attrs.insert(node, *a);
    }

    /// Forgets what is known of snapshot `id` (it was removed).
    fn forget_snapshot(&self, id: u64) {
        self.attrs
            .retain(|n, _| !matches!(Node::of(*n), Some(Node::Frozen { id: i, .. }) if i == id));
    }
}

/// A directory's snapshot, as listed.
#[derive(Debug, Clone)]
pub struct SnapEntry {
    pub id: u64,
    pub name: Vec<u8>,
}

impl Client {
    /// Before a cut of `ino`: asks the MDS for its snapshot sequence
    /// unless the file is open for writing here (then the open's reply
    /// and the snapshot demands keep it). A file the MDS does not know
    /// yet (a delegated create) is in no snapshot.
    pub(crate) async fn refresh_snap_seq(&self, ino: u64) {
        if self.open_files.count(ino).writes > 0 {
            return;
        }
        let req = pb::SnapshotLookupRequest {
            header: self.session.header(),
            snap_id: 0,
            ino,
            name: Default::default(),
        };
        match self
            .rpc(req, |mut c, r| async move { c.snapshot_lookup(r).await })
            .await
        {
            Ok(r) => self.snaps.set_seq(ino, r.snap_seq),
            Err(e) => tracing::debug!(ino, error = %e, "no snapshot sequence"),
        }
    }

    /// A snapshot demand from the MDS: snapshot `seq` is being taken above
    /// `ino`, open for writing here. What is buffered goes out and the
    /// size is committed with the old sequence, then later writes carry
    /// `seq` (under the file's write gate: no write slips in between).
    pub async fn snapshot_demand(&self, ino: u64, seq: u64) -> Result<()> {
        let gate = self.open_files.write_gate(ino);
        let _g = gate.write().await;
        let flushed = self.flush_file(ino).await;
        let committed = self.commit_size(ino).await.map(|_| ());
        self.snaps.set_seq(ino, seq);
        flushed.and(committed)
    }

    /// The snapshots of live directory `dir`, by id.
    pub async fn snapshots_of(&self, dir: u64) -> Result<Vec<SnapEntry>> {
        let req = pb::SnapshotListRequest {
            header: self.session.header(),
            ino: dir,
            path: String::new(),
        };
        let r = self
            .rpc(req, |mut c, r| async move { c.snapshot_list(r).await })
            .await?;
        Ok(r.snapshots
            .into_iter()
            .map(|s| SnapEntry {
                id: s.id,
                name: s.name.to_vec(),
            })
            .collect())
    }

    /// The attributes of the `.snap` directory of `dir`: the directory's
    /// own, as a directory with its own node id.
    pub async fn snap_dir_attr(&self, dir: u64) -> Result<Attr> {
        let a = self.getattr(dir).await?;
        if a.mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(ClientError::posix(libc::ENOTDIR, "not a directory"));
        }
        Ok(Attr {
            ino: Node::SnapDir { dir }.id()?,
            nlink: 2,
            size: 0,
            ..a
        })
    }

    /// Frozen inode `ino` of snapshot `id` (with an empty `name`), or its
    /// entry `name`; the attributes carry the child's node id.
    pub async fn snap_lookup(&self, id: u64, ino: u64, name: &[u8]) -> Result<Attr> {
        if name.is_empty() {
            if let Some(a) = self.snaps.attrs.get(&Node::Frozen { id, ino }.id()?) {
                return Ok(*a);
            }
        }
        let req = pb::SnapshotLookupRequest {
            header: self.session.header(),
            snap_id: id,
            ino,
            name: name.to_vec().into(),
        };
        let r = self
            .rpc(req, |mut c, r| async move { c.snapshot_lookup(r).await })
            .await?;
        let a = r
            .attr
            .ok_or_else(|| ClientError::Unavailable("MDS reply without attributes".into()))?;
        self.frozen(id, a)
    }

    /// `a` of snapshot `id` renumbered to its node id, and remembered.
    fn frozen(&self, id: u64, mut a: Attr) -> Result<Attr> {
        let node = Node::Frozen { id, ino: a.ino }.id()?;
        a.ino = node;
        self.snaps.remember(node, &a);
        Ok(a)
    }

    /// Entry `name` of the `.snap` directory of `dir`: that snapshot's root.
    pub async fn snap_root(&self, dir: u64, name: &[u8]) -> Result<Attr> {
        let snaps = self.snapshots_of(dir).await?;
        let s = snaps
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| ClientError::posix(libc::ENOENT, "no such snapshot"))?;
        self.snap_lookup(s.id, dir, b"").await
    }

    /// A page of frozen directory `ino` of snapshot `id` after `cookie`:
    /// entries with node ids (and attributes with `plus`), whether it is
    /// the last, and the directory's parent's node id.
    pub async fn snap_readdir(
        &self,
        id: u64,
        ino: u64,
        cookie: u64,
        plus: bool,
    ) -> Result<(Vec<pb::DirEntry>, bool, u64)> {
        let req = pb::SnapshotReadDirRequest {
            header: self.session.header(),
            snap_id: id,
            ino,
            cookie,
            max_entries: 512,
            plus,
        };
        let r = self
            .rpc(req, |mut c, r| async move { c.snapshot_read_dir(r).await })
            .await?;
        let mut entries = r.entries;
        for e in &mut entries {
            e.ino = Node::Frozen { id, ino: e.ino }.id()?;
            if let Some(a) = e.attr.take() {
                e.attr = Some(self.frozen(id, a)?);
            }
        }
        let parent = if ino == r.parent {
            // The snapshot's root: ".." is the ".snap" directory.
            Node::SnapDir { dir: ino }.id()?
        } else {
            Node::Frozen { id, ino: r.parent }.id()?
        };
        Ok((entries, r.eof, parent))
    }

    /// A frozen symbolic link's target.
    pub async fn snap_readlink(&self, id: u64, ino: u64) -> Result<Vec<u8>> {
        let req = pb::SnapshotLookupRequest {
            header: self.session.header(),
            snap_id: id,
            ino,
            name: Default::default(),
        };
        let r = self
            .rpc(req, |mut c, r| async move { c.snapshot_readlink(r).await })
            .await?;
        Ok(r.target.to_vec())
    }

    /// Extended attribute `name` of frozen node `ino` of snapshot `id`
    /// (in `value`), or with an empty `name` the names of all of them.
    pub async fn snap_xattr(
        &self,
        id: u64,
        ino: u64,
        name: &[u8],
    ) -> Result<pb::SnapshotXattrReply> {
        let req = pb::SnapshotXattrRequest {
            header: self.session.header(),
            snap_id: id,
            ino,
            name: name.to_vec().into(),
        };
        Ok(self
            .rpc(req, |mut c, r| async move { c.snapshot_xattr(r).await })
            .await?)
    }

    /// Reads `size` bytes at `offset` of frozen file `ino` of snapshot
    /// `id`: clamped to its frozen size, each chunk as the snapshot saw it.
    pub async fn snap_read(&self, id: u64, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let a = self.snap_lookup(id, ino, b"").await?;
        if offset >= a.size || size == 0 {
            return Ok(Vec::new());
        }
        let len = u64::from(size).min(a.size - offset);
        let cs = u64::from(if a.chunk_size > 0 {
            a.chunk_size
        } else {
            avalon_proto::limits::DEFAULT_CHUNK_SIZE
        });
        let mut buf = vec![0u8; len as usize];
        let mut pos = 0u64;
        while pos < len {
            let at = offset + pos;
            let (index, off) = (at / cs, at % cs);
            let n = (cs - off).min(len - pos);
            let d = self
                .osd_io
                .read_chunk(&self.session, ino, index, off as u32, n as u32, id)
                .await?;
            let take = d.len().min(n as usize);
            let p = pos as usize;
            buf[p..p + take].copy_from_slice(&d[..take]);
            pos += n;
        }
        Ok(buf)
    }

    /// The request naming snapshot `name` of `dir`, made as `uid` (a
    /// create and a removal take the same one).
    fn snap_request(&self, dir: u64, name: &[u8], uid: u32) -> pb::SnapshotCreateRequest {
        pb::SnapshotCreateRequest {
            header: self.session.header(),
            ino: dir,
            path: String::new(),
            name: name.to_vec().into(),
            uid,
            has_cred: true,
        }
    }

    /// `mkdir DIR/.snap/NAME`: takes snapshot `name` of `dir` as `uid`;
    /// returns its root's attributes.
    pub async fn snap_create(&self, dir: u64, name: &[u8], uid: u32) -> Result<Attr> {
        let req = self.snap_request(dir, name, uid);
        let s = self
            .rpc(req, |mut c, r| async move { c.snapshot_create(r).await })
            .await?;
        self.snap_lookup(s.id, dir, b"").await
    }

    /// `rmdir DIR/.snap/NAME`: removes snapshot `name` of `dir` as `uid`.
    pub async fn snap_remove(&self, dir: u64, name: &[u8], uid: u32) -> Result<()> {
        let id = self
            .snapshots_of(dir)
            .await?
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| s.id);
        let req = self.snap_request(dir, name, uid);
        self.rpc(req, |mut c, r| async move { c.snapshot_remove(r).await })
            .await?;
        if let Some(id) = id {
            self.snaps.forget_snapshot(id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_round_trip_and_stay_apart_from_live_ones() {
        let dir = Node::SnapDir { dir: 7 };
        let f = Node::Frozen { id: 3, ino: 7 };
        let g = Node::Frozen { id: 4, ino: 7 };
        let ids = [dir.id().unwrap(), f.id().unwrap(), g.id().unwrap()];
        assert_eq!(Node::of(ids[0]), Some(dir));
        assert_eq!(Node::of(ids[1]), Some(f));
        assert_eq!(Node::of(ids[2]), Some(g));
        assert!(ids.iter().all(|&n| is_snap(n) && n != 7));
        assert_ne!(ids[1], ids[2], "one inode in two snapshots");
        assert_eq!(Node::of(7), None);
        assert_eq!(Node::of(INO_MASK), None);
        assert!(Node::Frozen {
            id: 1,
            ino: 1 << 40
        }
        .id()
        .is_err());
        assert!(Node::Frozen {
            id: 1 << 23,
            ino: 1
        }
        .id()
        .is_err());
    }

    #[test]
    fn sequences_only_grow() {
        let s = Snaps::default();
        assert_eq!(s.seq(5), 0);
        s.set_seq(5, 0);
        assert_eq!(s.seqs.len(), 0, "nothing kept for files in no snapshot");
        s.set_seq(5, 3);
        s.set_seq(5, 2);
        assert_eq!(s.seq(5), 3);
    }
}
