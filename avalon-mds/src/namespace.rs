//! The metadata state machine: namespace, cluster map, sessions, GC queue.
//!
//! Pure and deterministic: [`State::apply`] depends only on the state and the
//! command. Every error is a Linux errno; nothing here panics on any input.

use crate::command::{Attr, Layout, MetaCommand, MetaResponse, Op, OsdState, Reply, TimeSpec};
use crate::settings::ClusterSettings;
use avalon_proto::limits::{
    check_name, LINK_MAX, MAX_FILE_SIZE, NAME_MAX, PATH_MAX, ROOT_INO, XATTR_NAME_MAX,
    XATTR_SIZE_MAX,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub const S_IFMT: u32 = libc::S_IFMT;
pub const S_IFDIR: u32 = libc::S_IFDIR;
pub const S_IFREG: u32 = libc::S_IFREG;
pub const S_IFLNK: u32 = libc::S_IFLNK;
pub const S_ISGID: u32 = libc::S_ISGID;

/// Renameat2 flags.
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;
/// Setxattr flags.
pub const XATTR_CREATE: u32 = 1;
pub const XATTR_REPLACE: u32 = 2;

/// Responses remembered per session for retried mutations.
pub const DEDUP_PER_SESSION: usize = 1024;
/// Total inodes reported by statfs.
pub const TOTAL_INODES: u64 = 1 << 40;
/// First cookie of real directory entries (1 and 2 are "." and "..").
pub const FIRST_COOKIE: u64 = 3;
/// Most inode numbers one [`Op::ReserveInos`] takes.
pub const MAX_RESERVE: u64 = 1 << 16;

type R<T> = Result<T, i32>;

/// One inode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub attr: Attr,
    /// Parent directory; for a non-directory, the directory of its
    /// primary link, which its recursive statistics count under
    /// (`rstats.rs`), or 0 (no link, or a state from before rstats).
    pub parent: u64,
    /// Next readdir cookie (directories only).
    pub next_cookie: u64,
    pub symlink: Option<Vec<u8>>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        self.attr.mode & S_IFMT == S_IFDIR
    }
}

/// A directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dentry {
    pub ino: u64,
    pub cookie: u64,
}

/// A registered OSD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Osd {
    pub id: u64,
    pub addr: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub failure_domain: String,
    pub state: OsdState,
    pub pid: u32,
}

/// A client session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub id: u64,
    pub hostname: String,
    pub mountpoint: Vec<u8>,
    pub pid: u32,
    pub root_ino: u64,
}

/// One entry returned by [`State::readdir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub mode: u32,
    pub cookie: u64,
    pub attr: Option<Attr>,
}

/// Filesystem usage as statfs reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatFs {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub avail_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub block_size: u32,
    pub max_name_len: u32,
}

/// A map of the namespace: ordered like a `BTreeMap` (and serialized the
/// same way), but shared between clones and copied on write, so a snapshot
/// takes a consistent copy of millions of entries in O(1) and serializes
/// it while applies go on (`raft_store.rs`).
pub type NsMap<K, V> = imbl::OrdMap<K, V>;

/// Decodes an [`NsMap`] entry by entry. imbl's own decoder reserves room
/// for the length the input claims, so damaged or hostile bytes (a
/// snapshot file, one sent by a peer) could make it allocate terabytes
/// and abort.
pub fn de_ns_map<'de, D, K, V>(d: D) -> Result<NsMap<K, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    K: Deserialize<'de> + Ord + Clone,
    V: Deserialize<'de> + Clone,
{
    struct Entries<K, V>(std::marker::PhantomData<(K, V)>);
    impl<'de, K, V> serde::de::Visitor<'de> for Entries<K, V>
    where
        K: Deserialize<'de> + Ord + Clone,
        V: Deserialize<'de> + Clone,
    {
        type Value = NsMap<K, V>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            let mut m = NsMap::new();
            while let Some((k, v)) = a.next_entry()? {
                m.insert(k, v);
            }
            Ok(m)
        }
    }
    d.deserialize_map(Entries(std::marker::PhantomData))
}

/// The whole replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    #[serde(deserialize_with = "de_ns_map")]
    pub inodes: NsMap<u64, Inode>,
    #[serde(deserialize_with = "de_ns_map")]
    pub dentries: NsMap<(u64, Vec<u8>), Dentry>,
    /// (directory, cookie) -> name, for readdir in cookie order.
    #[serde(deserialize_with = "de_ns_map")]
    pub cookies: NsMap<(u64, u64), Vec<u8>>,
    pub next_ino: u64,
    pub next_generation: u64,
    pub osds: BTreeMap<u64, Osd>,
    pub next_osd_id: u64,
    pub map_epoch: u64,
    pub sessions: BTreeMap<u64, Session>,
    pub next_session_id: u64,
    /// Inodes whose data must be deleted on the OSDs.
    pub gc_queue: BTreeSet<u64>,
    /// Per session: the last responses by request id, oldest first.
    pub dedup: BTreeMap<u64, VecDeque<(u64, MetaResponse)>>,
    /// Regular files without links that some session still has open.
    pub orphans: BTreeSet<u64>,
    /// fcntl/flock locks by inode (`locks.rs`).
    pub locks: crate::locks::LockTable,
    /// Cluster-wide settings (`settings.rs`); `None` until the first
    /// leader writes them. Last field: older snapshots end before it.
    #[serde(deserialize_with = "crate::settings::absent_as_none")]
    pub settings: Option<ClusterSettings>,
    /// Client capabilities and session owners (`caps.rs`). Last field:
    /// older snapshots end before it.
    #[serde(deserialize_with = "crate::caps::absent_as_default")]
    pub clients: crate::caps::ClientTable,
    /// Recursive directory statistics (`rstats.rs`). Older snapshots end
    /// before it (then rebuilt at the next apply).
    #[serde(deserialize_with = "crate::rstats::absent_as_default")]
    pub rstats: crate::rstats::RStats,
    /// Directory quotas (`quota.rs`). Older snapshots end before it.
    #[serde(deserialize_with = "crate::quota::absent_as_default")]
    pub quotas: crate::quota::Quotas,
    /// Removed inodes kept for undelete (`trash.rs`). Older snapshots end
    /// before it.
    #[serde(deserialize_with = "crate::trash::absent_as_default")]
    pub trash: crate::trash::Trash,
    /// Directory snapshots (`snapshots.rs`). Older snapshots end before it.
    #[serde(deserialize_with = "crate::snapshots::absent_as_default")]
    pub snapshots: crate::snapshots::Snapshots,
    /// Client identities' uid/gid mappings (`caps.rs`). Older snapshots
    /// end before it.
    #[serde(deserialize_with = "crate::caps::absent_maps_as_default")]
    pub id_maps: crate::caps::IdMaps,
    /// Write grants by (inode, session): the size up to which the
    /// session may have grown the file without committing (`grants.rs`).
    /// Older snapshots end before it.
    #[serde(deserialize_with = "crate::grants::absent_as_default")]
    pub grants: crate::grants::Grants,
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

fn is_dir_mode(mode: u32) -> bool {
    mode & S_IFMT == S_IFDIR
}

impl State {
    /// A fresh filesystem: just the root directory.
    pub fn new() -> Self {
        let mut inodes = NsMap::new();
        inodes.insert(
            ROOT_INO,
            Inode {
                attr: Attr {
                    ino: ROOT_INO,
                    mode: S_IFDIR | 0o755,
                    nlink: 2,
                    generation: 1,
                    ..Attr::default()
                },
                parent: ROOT_INO,
                next_cookie: FIRST_COOKIE,
                symlink: None,
                xattrs: BTreeMap::new(),
            },
        );
        State {
            inodes,
            dentries: NsMap::new(),
            cookies: NsMap::new(),
            next_ino: ROOT_INO + 1,
            next_generation: 2,
            osds: BTreeMap::new(),
            next_osd_id: 1,
            map_epoch: 1,
            sessions: BTreeMap::new(),
            next_session_id: 1,
            gc_queue: BTreeSet::new(),
            dedup: BTreeMap::new(),
            orphans: BTreeSet::new(),
            locks: crate::locks::LockTable::default(),
            settings: None,
            clients: crate::caps::ClientTable::default(),
            rstats: crate::rstats::RStats::new(),
            quotas: crate::quota::Quotas::default(),
            trash: crate::trash::Trash::default(),
            snapshots: crate::snapshots::Snapshots::default(),
            id_maps: Default::default(),
            grants: Default::default(),
        }
    }

    // ------------------------------------------------------------ reads

    fn inode(&self, ino: u64) -> R<&Inode> {
        if ino == 0 {
            return Err(libc::EINVAL);
        }
        self.inodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn inode_mut(&mut self, ino: u64) -> R<&mut Inode> {
        if ino == 0 {
            return Err(libc::EINVAL);
        }
        self.inodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn dir(&self, ino: u64) -> R<&Inode> {
        let i = self.inode(ino)?;
        if !i.is_dir() {
            return Err(libc::ENOTDIR);
        }
        Ok(i)
    }

    /// A directory that may take new entries: not one removed while open
    /// (an orphan), as Linux refuses with ENOENT.
    fn live_dir(&self, ino: u64) -> R<&Inode> {
        let i = self.dir(ino)?;
        if i.attr.nlink == 0 {
            return Err(libc::ENOENT);
        }
        Ok(i)
    }

    /// A directory's parent (itself for the root) and the cookie its next
    /// entry will get: entries with cookies from there on were added
    /// after this moment.
    pub fn dir_info(&self, ino: u64) -> R<(u64, u64)> {
        let d = self.dir(ino)?;
        let parent = if ino == ROOT_INO || d.parent == 0 {
            ino
        } else {
            d.parent
        };
        Ok((parent, d.next_cookie))
    }

    pub fn getattr(&self, ino: u64) -> R<Attr> {
        Ok(self.inode(ino)?.attr)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> R<Attr> {
        self.dir(parent)?;
        check_name(name)?;
        let d = self
            .dentries
            .get(&(parent, name.to_vec()))
            .ok_or(libc::ENOENT)?;
        self.getattr(d.ino)
    }

    /// The inode `name` in directory `parent` names, if any.
    pub fn child_ino(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.dentries.get(&(parent, name.to_vec())).map(|d| d.ino)
    }

    pub fn readlink(&self, ino: u64) -> R<Vec<u8>> {
        self.inode(ino)?.symlink.clone().ok_or(libc::EINVAL)
    }

    /// Entries with cookie > `cookie`, in cookie order; `(entries, eof)`.
    pub fn readdir(
        &self,
        ino: u64,
        cookie: u64,
        max: usize,
        plus: bool,
    ) -> R<(Vec<DirEntry>, bool)> {
        self.dir(ino)?;
        Ok(list_entries(
            (&self.inodes, &self.dentries, &self.cookies),
            ino,
            cookie,
            max,
            plus,
        ))
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> R<Vec<u8>> {
        let i = self.inode(ino)?;
        check_xattr_name(name)?;
        if let Some(v) = crate::rstats::getxattr(self, ino, name)
            .or_else(|| crate::quota::getxattr(self, ino, name))
            .or_else(|| crate::trash::getxattr(self, ino, name))
        {
            return v;
        }
        i.xattrs.get(name).cloned().ok_or(libc::ENODATA)
    }

    pub fn listxattr(&self, ino: u64) -> R<Vec<Vec<u8>>> {
        Ok(listed_xattrs(self.inode(ino)?))
    }

    /// Usage as statfs reports it; each byte is stored `replicas` times.
    pub fn statfs(&self, replicas: u32) -> StatFs {
        let mut cap = 0u64;
        let mut used = 0u64;
        let replicas = u64::from(replicas.max(1));
        for o in self.osds.values().filter(|o| !o.state.is_out()) {
            cap = cap.saturating_add(o.capacity_bytes);
            used = used.saturating_add(o.used_bytes.min(o.capacity_bytes));
        }
        let total = cap / replicas;
        let free = cap.saturating_sub(used) / replicas;
        let n = self.inodes.len() as u64;
        StatFs {
            total_bytes: total,
            free_bytes: free,
            avail_bytes: free,
            total_inodes: TOTAL_INODES,
            free_inodes: TOTAL_INODES.saturating_sub(n),
            block_size: 4096,
            max_name_len: NAME_MAX as u32,
        }
    }

    /// Resolves a `/`-separated path from the root to a directory inode.
    pub fn resolve_dir(&self, path: &[u8]) -> R<u64> {
        let mut cur = ROOT_INO;
        for comp in path.split(|&b| b == b'/') {
            match comp {
                b"" | b"." => continue,
                b".." => cur = self.dir(cur)?.parent,
                name => {
                    self.dir(cur)?;
                    check_name(name)?;
                    cur = self
                        .dentries
                        .get(&(cur, name.to_vec()))
                        .ok_or(libc::ENOENT)?
                        .ino;
                }
            }
        }
        self.dir(cur)?;
        Ok(cur)
    }

    // ------------------------------------------------------------ apply

    /// The answer already given to request `request_id` of `session_id`,
    /// if it was applied and is still remembered (retries of it get it).
    pub fn answered(&self, session_id: u64, request_id: u64) -> Option<&MetaResponse> {
        if session_id == 0 || request_id == 0 {
            return None;
        }
        self.dedup
            .get(&session_id)?
            .iter()
            .rev()
            .find(|(r, _)| *r == request_id)
            .map(|(_, resp)| resp)
    }

    /// Applies one command, with per-session dedup of retried requests.
    pub fn apply(&mut self, cmd: &MetaCommand) -> MetaResponse {
        if !self.rstats.ready {
            crate::rstats::rebuild(self);
        }
        if let Op::Multi(cmds) = &cmd.op {
            return MetaResponse(Ok(Reply::Multi(
                cmds.iter().map(|c| self.apply(c)).collect(),
            )));
        }
        let dedup = cmd.session_id != 0 && cmd.request_id != 0;
        if let Some(prev) = self.answered(cmd.session_id, cmd.request_id) {
            return prev.clone();
        }
        // A client's delegated batch from a session that expired is
        // refused: expiry dropped the session's request ids, so it may be
        // a retry of a batch applied before, which must not apply twice.
        if cmd.session_id != 0
            && matches!(cmd.op, Op::Batch { .. })
            && !self.sessions.contains_key(&cmd.session_id)
        {
            return MetaResponse(Err(libc::ESTALE));
        }
        let resp = MetaResponse(self.apply_op(cmd.now_ns, &cmd.op));
        if dedup {
            let q = self.dedup.entry(cmd.session_id).or_default();
            q.push_back((cmd.request_id, resp.clone()));
            while q.len() > DEDUP_PER_SESSION {
                q.pop_front();
            }
        }
        resp
    }

    fn apply_op(&mut self, now: i64, op: &Op) -> R<Reply> {
        match op {
            Op::SetAttr {
                ino,
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
                ctime_ns,
            } => {
                if let Some(s) = size {
                    crate::quota::check_size(self, *ino, *s, true)?;
                }
                let old = crate::rstats::size_of(self, *ino);
                let a = self.setattr(
                    now, *ino, *mode, *uid, *gid, *size, *atime, *mtime, *ctime_ns,
                )?;
                crate::rstats::changed(self, *ino, old);
                Ok(Reply::Attr(a))
            }
            Op::Mknod {
                parent,
                name,
                mode,
                rdev,
                uid,
                gid,
                exclusive,
                layout,
            } => self
                .mknod(
                    now, *parent, name, *mode, *rdev, *uid, *gid, *exclusive, *layout,
                )
                .map(Reply::Attr),
            Op::Mkdir {
                parent,
                name,
                mode,
                uid,
                gid,
            } => self
                .mkdir(now, *parent, name, *mode, *uid, *gid)
                .map(Reply::Attr),
            Op::Symlink {
                parent,
                name,
                target,
                uid,
                gid,
            } => self
                .symlink(now, *parent, name, target, *uid, *gid)
                .map(Reply::Attr),
            Op::Unlink {
                parent,
                name,
                guard,
            } => self
                .remove(now, *parent, name, false, *guard)
                .map(|_| Reply::None),
            Op::Rmdir { parent, name } => self
                .remove(now, *parent, name, true, None)
                .map(|_| Reply::None),
            Op::Touch { ino, atime } => {
                let i = self.inode_mut(*ino)?;
                i.attr.atime_ns = match atime {
                    TimeSpec::Now => now,
                    TimeSpec::Ns(n) => *n,
                };
                Ok(Reply::Attr(i.attr))
            }
            Op::RmdirGuarded {
                parent,
                name,
                guard,
            } => self
                .remove(now, *parent, name, true, *guard)
                .map(|_| Reply::None),
            Op::Link {
                ino,
                new_parent,
                new_name,
            } => self.link(now, *ino, *new_parent, new_name).map(Reply::Attr),
            Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
                guard,
            } => self
                .rename(now, *parent, name, *new_parent, new_name, *flags, *guard)
                .map(|_| Reply::None),
            Op::SetXattr {
                ino,
                name,
                value,
                flags,
            } => self
                .setxattr(now, *ino, name, value, *flags)
                .map(|_| Reply::None),
            Op::RemoveXattr { ino, name } => self.removexattr(now, *ino, name).map(|_| Reply::None),
            Op::CommitWrite { ino, size } => self.commit_write(now, *ino, *size).map(Reply::Attr),
            Op::CreateAs {
                ino,
                parent,
                name,
                mode,
                uid,
                gid,
                target,
                layout,
            } => self
                .create_as(
                    now,
                    *ino,
                    *parent,
                    name,
                    (*mode, *uid, *gid),
                    target.as_deref(),
                    *layout,
                )
                .map(Reply::Attr),
            Op::Batch { ops } => {
                // Removals into the trash take the leader's time, not the
                // client's stamps.
                self.trash.clock = crate::trash::ApplyClock(Some(now));
                let errnos = ops
                    .iter()
                    .map(|(t, op)| match op {
                        Op::CreateAs { .. }
                        | Op::SetAttr { .. }
                        | Op::Unlink { .. }
                        | Op::Rmdir { .. }
                        | Op::Rename { .. }
                        | Op::CommitWrite { .. } => self.apply_op(*t, op).err().unwrap_or(0),
                        _ => libc::EINVAL,
                    })
                    .collect();
                self.trash.clock = crate::trash::ApplyClock(None);
                Ok(Reply::Batch(errnos))
            }
            Op::TrashRestore { id, to } => crate::trash::restore(self, now, *id, to.as_deref())
                .map(|(attr, _)| Reply::Attr(attr))
                .map_err(|e| e.errno()),
            Op::TrashPurge { ids, all } => {
                let n = if *all {
                    crate::trash::purge_all(self)
                } else {
                    crate::trash::purge(self, ids)
                };
                Ok(Reply::Count(n))
            }
            Op::TrashExpire => Ok(Reply::Count(crate::trash::expire(self, now))),
            Op::SnapCreate { id, dir, name } => {
                crate::snapshots::take(self, now, *id, *dir, name).map(Reply::Count)
            }
            Op::SnapRemove { dir, name } => {
                crate::snapshots::remove(self, *dir, name).map(Reply::Count)
            }
            Op::SnapTrimmed { removals } => {
                let t = &mut self.snapshots;
                t.trimmed = t.trimmed.max((*removals).min(t.removals));
                Ok(Reply::None)
            }
            // Taken apart in `apply`; a Multi nested in a Batch is refused.
            Op::Multi(_) => Err(libc::EINVAL),
            Op::ReserveInos { count } => {
                let start = self.next_ino;
                self.next_ino += (*count).min(MAX_RESERVE);
                Ok(Reply::Inos(start))
            }
            Op::AppendWrite { ino, len } => self.append_write(now, *ino, *len).map(Reply::Attr),
            Op::CommitWriteIf { ino, size, expect } => self
                .commit_write_if(now, *ino, *size, *expect)
                .map(Reply::Attr),
            Op::RegisterOsd {
                osd_id,
                addr,
                capacity_bytes,
                used_bytes,
                failure_domain,
                pid,
            } => {
                let id = self.register_osd(
                    *osd_id,
                    addr,
                    *capacity_bytes,
                    *used_bytes,
                    failure_domain,
                    *pid,
                )?;
                Ok(Reply::OsdRegistered {
                    osd_id: id,
                    epoch: self.map_epoch,
                })
            }
            Op::OsdReport {
                osd_id,
                addr,
                capacity_bytes,
                used_bytes,
                pid,
            } => {
                let o = self.osds.get_mut(osd_id).ok_or(libc::ENOENT)?;
                // Placement weighs capacity: a change is a new map.
                let placement_changed = o.capacity_bytes != *capacity_bytes;
                o.capacity_bytes = *capacity_bytes;
                o.used_bytes = *used_bytes;
                o.pid = *pid;
                if !addr.is_empty() && *addr != o.addr {
                    o.addr = addr.clone();
                    self.map_epoch += 1;
                } else if placement_changed {
                    self.map_epoch += 1;
                }
                Ok(Reply::None)
            }
            Op::SetOsdState { osd_id, state } => {
                let o = self.osds.get_mut(osd_id).ok_or(libc::ENOENT)?;
                if o.state != *state {
                    o.state = *state;
                    self.map_epoch += 1;
                }
                Ok(Reply::None)
            }
            Op::RegisterClient {
                hostname,
                mountpoint,
                pid,
                subdir,
            } => self.register_client(hostname, mountpoint, *pid, subdir),
            Op::RegisterClientAs {
                hostname,
                mountpoint,
                pid,
                subdir,
                identity,
            } => {
                let r = self.register_client(hostname, mountpoint, *pid, subdir)?;
                if let Reply::ClientRegistered { session_id, .. } = &r {
                    self.clients.owners.insert(*session_id, identity.clone());
                }
                Ok(r)
            }
            Op::RegisterClientWithId {
                hostname,
                mountpoint,
                pid,
                subdir,
                identity,
                session_id,
            } => {
                if *session_id == 0 || self.sessions.contains_key(session_id) {
                    return Err(libc::EEXIST);
                }
                let root_ino = self.resolve_dir(subdir)?;
                self.add_session(*session_id, hostname, mountpoint, *pid, root_ino);
                if let Some(id) = identity {
                    self.clients.owners.insert(*session_id, id.clone());
                }
                Ok(Reply::ClientRegistered {
                    session_id: *session_id,
                    root_ino,
                })
            }
            Op::SetClientCaps { name, caps } => {
                match caps {
                    Some(c) => {
                        if c.revoked {
                            let gone: Vec<u64> = self
                                .clients
                                .owners
                                .iter()
                                .filter(|(_, o)| *o == name)
                                .map(|(s, _)| *s)
                                .collect();
                            for sid in gone {
                                self.drop_session(sid);
                            }
                        }
                        self.clients.caps.insert(name.clone(), c.clone());
                    }
                    None => {
                        self.clients.caps.remove(name);
                        self.id_maps.remove(name);
                    }
                }
                Ok(Reply::None)
            }
            Op::SetClientCapsMapped { name, caps, ids } => {
                let r = self.apply_op(
                    now,
                    &Op::SetClientCaps {
                        name: name.clone(),
                        caps: caps.clone(),
                    },
                );
                if caps.is_some() && !ids.is_empty() {
                    self.id_maps.insert(name.clone(), ids.clone());
                } else {
                    self.id_maps.remove(name);
                }
                r
            }
            Op::GcDone { inos } => {
                for i in inos {
                    self.gc_queue.remove(i);
                }
                Ok(Reply::None)
            }
            Op::ReclaimOrphans { inos } => {
                for i in inos {
                    if self.orphans.remove(i) {
                        let removed = self.inodes.remove(i);
                        self.locks.drop_inode(*i);
                        let trashed = self.trash.pending.remove(i);
                        match (removed, trashed) {
                            (Some(r), Some(o)) => crate::trash::put(self, r, o),
                            // Directories have no data on the OSDs.
                            (Some(r), None) if !r.is_dir() => {
                                self.gc_queue.insert(*i);
                            }
                            _ => {}
                        }
                    }
                }
                Ok(Reply::None)
            }
            Op::CommitWriteGrant {
                ino,
                size,
                commit,
                session,
                max_size,
            } => {
                let attr = if *commit {
                    self.commit_write(now, *ino, *size)?
                } else {
                    self.getattr(*ino)?
                };
                let granted = crate::grants::set(self, *ino, *session, *max_size);
                Ok(Reply::Granted(attr, granted))
            }
            Op::RecoverGrants {
                session,
                sizes,
                keep_session,
            } => {
                for &(ino, size) in sizes {
                    if self.grants.remove(&(ino, *session)).is_none() {
                        continue;
                    }
                    let Ok(i) = self.inode_mut(ino) else { continue };
                    if i.attr.mode & S_IFMT != S_IFREG {
                        continue;
                    }
                    // No quota check: the bytes are stored already.
                    let old = i.attr.size;
                    i.attr.size = old.max(size.min(MAX_FILE_SIZE));
                    i.attr.mtime_ns = i.attr.mtime_ns.max(now);
                    i.attr.ctime_ns = i.attr.ctime_ns.max(now);
                    crate::rstats::changed(self, ino, old);
                }
                if !*keep_session && self.sessions.contains_key(session) {
                    self.drop_session(*session);
                }
                Ok(Reply::None)
            }
            Op::ExpireSession { session_id } => {
                if !self.sessions.contains_key(session_id) {
                    return Err(libc::ENOENT);
                }
                self.drop_session(*session_id);
                Ok(Reply::None)
            }
            Op::SetLock {
                ino,
                session,
                owner,
                pid,
                start,
                end,
                kind,
            } => {
                if *kind != crate::locks::LockKind::Unlock {
                    self.inode(*ino)?;
                }
                self.locks
                    .set(*ino, *session, *owner, *pid, *start, *end, *kind)
                    .map(|_| Reply::None)
            }
            Op::ReleaseLocks {
                ino,
                session,
                owner,
            } => {
                self.locks.release_owner(*ino, *session, *owner);
                Ok(Reply::None)
            }
            Op::InitSettings { settings } => {
                // First writer wins: a second leader's proposal (a race
                // at creation) changes nothing.
                if self.settings.is_none() {
                    crate::settings::check_quorum(settings.replicas, settings.write_quorum)
                        .map_err(|_| libc::EINVAL)?;
                    if settings.pg_count == 0 || settings.chunk_size == 0 {
                        return Err(libc::EINVAL);
                    }
                    self.settings = Some(settings.clone());
                    self.map_epoch += 1;
                }
                self.settings
                    .clone()
                    .map(Reply::Settings)
                    .ok_or(libc::EINVAL)
            }
            Op::SetReplicas {
                replicas,
                write_quorum,
            } => {
                crate::settings::check_quorum(*replicas, *write_quorum)
                    .map_err(|_| libc::EINVAL)?;
                let s = self.settings.as_mut().ok_or(libc::EAGAIN)?;
                if (s.replicas, s.write_quorum) != (*replicas, *write_quorum) {
                    s.replicas = *replicas;
                    s.write_quorum = *write_quorum;
                    // Placement depends on replicas: OSDs re-peer.
                    self.map_epoch += 1;
                }
                Ok(Reply::Settings(s.clone()))
            }
        }
    }

    /// Registers a client session whose mount root is `subdir`.
    fn register_client(
        &mut self,
        hostname: &str,
        mountpoint: &[u8],
        pid: u32,
        subdir: &[u8],
    ) -> R<Reply> {
        let root_ino = self.resolve_dir(subdir)?;
        let id = self.next_session_id;
        self.next_session_id += 1;
        self.add_session(id, hostname, mountpoint, pid, root_ino);
        Ok(Reply::ClientRegistered {
            session_id: id,
            root_ino,
        })
    }

    fn add_session(&mut self, id: u64, hostname: &str, mountpoint: &[u8], pid: u32, root_ino: u64) {
        self.sessions.insert(
            id,
            Session {
                id,
                hostname: hostname.to_string(),
                mountpoint: mountpoint.to_vec(),
                pid,
                root_ino,
            },
        );
    }

    /// Forgets session `sid` and what it held.
    fn drop_session(&mut self, sid: u64) {
        self.sessions.remove(&sid);
        self.dedup.remove(&sid);
        self.locks.drop_session(sid);
        self.clients.owners.remove(&sid);
    }

    /// True if `ino` is `root` or below it (a confined session's reach,
    /// `caps.rs`): a directory by its parent pointers; a non-directory if
    /// one of its links is in such a directory (found by a scan of the
    /// entries: confined sessions only, until there is a reverse index).
    pub fn within(&self, ino: u64, root: u64) -> bool {
        if root == ROOT_INO || ino == root {
            return true;
        }
        if self.inodes.get(&ino).is_some_and(|i| !i.is_dir()) {
            return self
                .dentries
                .iter()
                .any(|((dir, _), d)| d.ino == ino && self.within_dir(*dir, root));
        }
        self.within_dir(ino, root)
    }

    fn within_dir(&self, ino: u64, root: u64) -> bool {
        let mut cur = ino;
        for _ in 0..4096 {
            if cur == root {
                return true;
            }
            match self.inodes.get(&cur) {
                Some(i) if i.is_dir() && cur != ROOT_INO => cur = i.parent,
                _ => return false,
            }
        }
        false
    }

    fn register_osd(
        &mut self,
        osd_id: u64,
        addr: &str,
        capacity: u64,
        used: u64,
        failure_domain: &str,
        pid: u32,
    ) -> R<u64> {
        if addr.is_empty() {
            return Err(libc::EINVAL);
        }
        let id = if osd_id == 0 {
            let id = self.next_osd_id;
            self.next_osd_id += 1;
            id
        } else {
            if osd_id >= self.next_osd_id {
                self.next_osd_id = osd_id.saturating_add(1);
            }
            osd_id
        };
        let osd = Osd {
            id,
            addr: addr.to_string(),
            capacity_bytes: capacity,
            used_bytes: used,
            failure_domain: failure_domain.to_string(),
            // Taken out by hand stays out across restarts.
            state: match self.osds.get(&id).map(|o| o.state) {
                Some(OsdState::OutByAdmin) => OsdState::OutByAdmin,
                _ => OsdState::Up,
            },
            pid,
        };
        let changed = self.osds.get(&id).is_none_or(|o| {
            o.addr != osd.addr
                || o.state != osd.state
                || o.failure_domain != osd.failure_domain
                || o.capacity_bytes != osd.capacity_bytes
        });
        self.osds.insert(id, osd);
        if changed {
            self.map_epoch += 1;
        }
        Ok(id)
    }

    fn alloc_inode(&mut self, now: i64, mode: u32, uid: u32, gid: u32) -> Inode {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.new_inode(ino, now, mode, uid, gid)
    }

    fn new_inode(&mut self, ino: u64, now: i64, mode: u32, uid: u32, gid: u32) -> Inode {
        let generation = self.next_generation;
        self.next_generation += 1;
        Inode {
            attr: Attr {
                ino,
                mode,
                nlink: 1,
                uid,
                gid,
                atime_ns: now,
                mtime_ns: now,
                ctime_ns: now,
                crtime_ns: now,
                generation,
                ..Attr::default()
            },
            parent: 0,
            next_cookie: FIRST_COOKIE,
            symlink: None,
            xattrs: BTreeMap::new(),
        }
    }

    pub(crate) fn touch_dir(&mut self, dir: u64, now: i64) {
        if let Some(d) = self.inodes.get_mut(&dir) {
            d.attr.mtime_ns = now;
            d.attr.ctime_ns = now;
        }
        crate::rstats::touched(self, dir, now);
    }

    pub(crate) fn add_entry(&mut self, dir: u64, name: &[u8], ino: u64) {
        let Some(d) = self.inodes.get_mut(&dir) else {
            return;
        };
        let cookie = d.next_cookie;
        d.next_cookie += 1;
        self.dentries
            .insert((dir, name.to_vec()), Dentry { ino, cookie });
        self.cookies.insert((dir, cookie), name.to_vec());
    }

    fn del_entry(&mut self, dir: u64, name: &[u8]) -> Option<Dentry> {
        let d = self.dentries.remove(&(dir, name.to_vec()))?;
        self.cookies.remove(&(dir, d.cookie));
        Some(d)
    }

    /// Checks that `name` is free in directory `parent`; returns nothing.
    fn check_new_entry(&self, parent: u64, name: &[u8]) -> R<()> {
        self.live_dir(parent)?;
        check_name(name)?;
        if self.dentries.contains_key(&(parent, name.to_vec())) {
            return Err(libc::EEXIST);
        }
        Ok(())
    }

    fn insert_new(
        &mut self,
        now: i64,
        parent: u64,
        name: &[u8],
        mut inode: Inode,
        umask: u32,
    ) -> Attr {
        // setgid directory: new entries take its group, subdirectories its
        // setgid bit (the kernel already strips S_ISGID from files created
        // by non-members).
        if let Some(p) = self.inodes.get(&parent) {
            if p.attr.mode & S_ISGID != 0 {
                inode.attr.gid = p.attr.gid;
                if inode.is_dir() {
                    inode.attr.mode |= S_ISGID;
                }
            }
            crate::acl::inherit(p, &mut inode, umask);
            crate::trash::inherit(p, &mut inode);
        }
        let attr = inode.attr;
        self.inodes.insert(attr.ino, inode);
        self.add_entry(parent, name, attr.ino);
        crate::rstats::linked(self, parent, attr.ino, now);
        self.touch_dir(parent, now);
        attr
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        now: i64,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeSpec>,
        mtime: Option<TimeSpec>,
        ctime_ns: Option<i64>,
    ) -> R<Attr> {
        let i = self.inode_mut(ino)?;
        if let Some(s) = size {
            if i.is_dir() {
                return Err(libc::EISDIR);
            }
            if i.attr.mode & S_IFMT != S_IFREG {
                return Err(libc::EINVAL);
            }
            if s > MAX_FILE_SIZE {
                return Err(libc::EFBIG);
            }
        }
        let mut changed = false;
        if let Some(m) = mode {
            i.attr.mode = (i.attr.mode & S_IFMT) | (m & 0o7777);
            changed = true;
            // chmod rewrites the access ACL's owner/group/other entries.
            if let Some(v) = i.xattrs.get_mut(crate::acl::ACCESS) {
                if let Some(mut acl) = crate::acl::parse(v) {
                    crate::acl::chmod(&mut acl, m);
                    *v = crate::acl::encode(&acl);
                }
            }
        }
        if let Some(u) = uid {
            i.attr.uid = u;
            changed = true;
        }
        if let Some(g) = gid {
            i.attr.gid = g;
            changed = true;
        }
        if let Some(s) = size {
            i.attr.size = s;
            i.attr.mtime_ns = now;
            changed = true;
        }
        let ts = |t: TimeSpec| match t {
            TimeSpec::Now => now,
            TimeSpec::Ns(n) => n,
        };
        if let Some(t) = atime {
            i.attr.atime_ns = ts(t);
            changed = true;
        }
        if let Some(t) = mtime {
            i.attr.mtime_ns = ts(t);
            changed = true;
        }
        if changed {
            i.attr.ctime_ns = now;
        }
        if let Some(c) = ctime_ns {
            i.attr.ctime_ns = c;
        }
        Ok(i.attr)
    }

    #[allow(clippy::too_many_arguments)]
    fn mknod(
        &mut self,
        now: i64,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
        exclusive: bool,
        layout: Layout,
    ) -> R<Attr> {
        let (mode, umask) = crate::acl::split_umask(mode);
        let ftype = match mode & S_IFMT {
            0 => S_IFREG,
            t
            @ (libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK) => t,
            _ => return Err(libc::EINVAL),
        };
        self.live_dir(parent)?;
        check_name(name)?;
        if let Some(d) = self.dentries.get(&(parent, name.to_vec())) {
            if exclusive {
                return Err(libc::EEXIST);
            }
            let existing = self.inode(d.ino)?;
            if existing.is_dir() {
                return Err(libc::EISDIR);
            }
            if existing.attr.mode & S_IFMT != S_IFREG || ftype != S_IFREG {
                return Err(libc::EEXIST);
            }
            return Ok(existing.attr);
        }
        crate::quota::check_new(self, parent)?;
        let mut inode = self.alloc_inode(now, ftype | (mode & 0o7777), uid, gid);
        if ftype == S_IFREG {
            inode.attr.chunk_size = layout.chunk_size;
            inode.attr.replicas = layout.replicas;
            inode.attr.write_quorum = layout.write_quorum;
        } else if ftype == libc::S_IFCHR || ftype == libc::S_IFBLK {
            inode.attr.rdev = rdev;
        }
        Ok(self.insert_new(now, parent, name, inode, umask))
    }

    fn mkdir(
        &mut self,
        now: i64,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> R<Attr> {
        let (mode, umask) = crate::acl::split_umask(mode);
        self.check_new_entry(parent, name)?;
        if self.inode(parent)?.attr.nlink >= LINK_MAX {
            return Err(libc::EMLINK);
        }
        crate::quota::check_new(self, parent)?;
        let mut inode = self.alloc_inode(now, S_IFDIR | (mode & 0o7777), uid, gid);
        inode.attr.nlink = 2;
        inode.parent = parent;
        let attr = self.insert_new(now, parent, name, inode, umask);
        if let Some(p) = self.inodes.get_mut(&parent) {
            p.attr.nlink += 1;
        }
        Ok(attr)
    }

    fn symlink(
        &mut self,
        now: i64,
        parent: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> R<Attr> {
        if target.is_empty() {
            return Err(libc::ENOENT);
        }
        if target.len() > PATH_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        self.check_new_entry(parent, name)?;
        crate::quota::check_new(self, parent)?;
        let mut inode = self.alloc_inode(now, S_IFLNK | 0o777, uid, gid);
        inode.attr.size = target.len() as u64;
        inode.symlink = Some(target.to_vec());
        Ok(self.insert_new(now, parent, name, inode, 0))
    }

    /// A create under a client's delegation (see [`Op::CreateAs`]): the
    /// number must be reserved and unused, the rest is checked as for any
    /// create. `owner` is (mode, uid, gid).
    #[allow(clippy::too_many_arguments)]
    fn create_as(
        &mut self,
        now: i64,
        ino: u64,
        parent: u64,
        name: &[u8],
        (mode, uid, gid): (u32, u32, u32),
        target: Option<&[u8]>,
        layout: Layout,
    ) -> R<Attr> {
        if ino <= ROOT_INO
            || ino >= self.next_ino
            || self.inodes.contains_key(&ino)
            || self.gc_queue.contains(&ino)
            || crate::trash::holds(self, ino)
        {
            return Err(libc::EINVAL);
        }
        self.check_new_entry(parent, name)?;
        crate::quota::check_new(self, parent)?;
        let mut inode = self.new_inode(ino, now, mode & (S_IFMT | 0o7777), uid, gid);
        // The client showed generation 1 already (it cannot know the
        // counter); numbers are never reused, so (ino, 1) stays unique.
        inode.attr.generation = 1;
        match mode & S_IFMT {
            S_IFREG => {
                inode.attr.chunk_size = layout.chunk_size;
                inode.attr.replicas = layout.replicas;
                inode.attr.write_quorum = layout.write_quorum;
            }
            S_IFDIR => {
                if self.inode(parent)?.attr.nlink >= LINK_MAX {
                    return Err(libc::EMLINK);
                }
                inode.attr.nlink = 2;
                inode.parent = parent;
            }
            S_IFLNK => {
                let t = target.ok_or(libc::EINVAL)?;
                if t.is_empty() {
                    return Err(libc::ENOENT);
                }
                if t.len() > PATH_MAX {
                    return Err(libc::ENAMETOOLONG);
                }
                inode.attr.mode = S_IFLNK | 0o777;
                inode.attr.size = t.len() as u64;
                inode.symlink = Some(t.to_vec());
            }
            _ => return Err(libc::EINVAL),
        }
        // The generation was taken even if a check above failed: harmless
        // (generations only need to differ), and apply stays deterministic.
        let is_dir = inode.is_dir();
        let attr = self.insert_new(now, parent, name, inode, 0);
        if is_dir {
            if let Some(p) = self.inodes.get_mut(&parent) {
                p.attr.nlink += 1;
            }
        }
        Ok(attr)
    }

    /// Drops one link of `ino`; removes the inode at zero links, or keeps
    /// a regular file or a directory as an orphan unless `guard` allows
    /// deleting it (an open directory stays for fstat/fchdir users). With
    /// `trash`, the removed inode goes to the trash (an orphan when it is
    /// reclaimed) instead of being freed.
    fn drop_link(
        &mut self,
        now: i64,
        ino: u64,
        guard: Option<u64>,
        trash: Option<crate::trash::Origin>,
    ) {
        let Some(i) = self.inodes.get_mut(&ino) else {
            return;
        };
        if i.is_dir() {
            i.attr.nlink = 0;
        } else {
            i.attr.nlink = i.attr.nlink.saturating_sub(1);
        }
        i.attr.ctime_ns = now;
        if i.attr.nlink == 0 {
            let is_reg = i.attr.mode & S_IFMT == S_IFREG;
            if (is_reg || i.is_dir()) && guard.is_some_and(|g| g != ino) {
                self.orphans.insert(ino);
                if let Some(o) = trash {
                    self.trash.pending.insert(ino, o);
                }
                return;
            }
            let removed = self.inodes.remove(&ino);
            self.locks.drop_inode(ino);
            match (removed, trash) {
                (Some(r), Some(o)) => crate::trash::put(self, r, o),
                _ if is_reg => {
                    self.gc_queue.insert(ino);
                }
                _ => {}
            }
        }
    }

    /// No entries, and no snapshots (they are named by the directory).
    fn dir_is_empty(&self, dir: u64) -> bool {
        !crate::snapshots::has_any(self, dir)
            && self
                .cookies
                .range((dir, 0)..=(dir, u64::MAX))
                .next()
                .is_none()
    }

    fn remove(
        &mut self,
        now: i64,
        parent: u64,
        name: &[u8],
        rmdir: bool,
        guard: Option<u64>,
    ) -> R<()> {
        self.dir(parent)?;
        check_name(name)?;
        let d = *self
            .dentries
            .get(&(parent, name.to_vec()))
            .ok_or(libc::ENOENT)?;
        let child = self.inode(d.ino)?;
        if rmdir {
            if !child.is_dir() {
                return Err(libc::ENOTDIR);
            }
            if !self.dir_is_empty(d.ino) {
                return Err(libc::ENOTEMPTY);
            }
        } else if child.is_dir() {
            return Err(libc::EISDIR);
        }
        let trash = crate::trash::origin(self, now, parent, name, d.ino);
        self.del_entry(parent, name);
        if rmdir {
            if let Some(p) = self.inodes.get_mut(&parent) {
                p.attr.nlink = p.attr.nlink.saturating_sub(1);
            }
        }
        crate::rstats::unlinking(self, parent, d.ino, now);
        self.drop_link(now, d.ino, guard, trash);
        self.touch_dir(parent, now);
        Ok(())
    }

    fn link(&mut self, now: i64, ino: u64, new_parent: u64, new_name: &[u8]) -> R<Attr> {
        let i = self.inode(ino)?;
        if i.is_dir() {
            return Err(libc::EPERM);
        }
        if i.attr.nlink == 0 {
            return Err(libc::ENOENT);
        }
        self.check_new_entry(new_parent, new_name)?;
        if self.inode(ino)?.attr.nlink >= LINK_MAX {
            return Err(libc::EMLINK);
        }
        self.add_entry(new_parent, new_name, ino);
        self.touch_dir(new_parent, now);
        let i = self.inode_mut(ino)?;
        i.attr.nlink += 1;
        i.attr.ctime_ns = now;
        let attr = i.attr;
        crate::rstats::touched(self, ino, now);
        Ok(attr)
    }

    /// True if `dir` is `anc` or lies below it.
    fn is_in_subtree(&self, mut dir: u64, anc: u64) -> bool {
        for _ in 0..100_000 {
            if dir == anc {
                return true;
            }
            if dir == ROOT_INO {
                return false;
            }
            match self.inodes.get(&dir) {
                Some(i) if i.parent != dir => dir = i.parent,
                _ => return false,
            }
        }
        false
    }

    #[allow(clippy::too_many_arguments)]
    fn rename(
        &mut self,
        now: i64,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
        guard: Option<u64>,
    ) -> R<()> {
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
            || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
        {
            return Err(libc::EINVAL);
        }
        self.dir(parent)?;
        self.live_dir(new_parent)?;
        check_name(name)?;
        check_name(new_name)?;
        let src = *self
            .dentries
            .get(&(parent, name.to_vec()))
            .ok_or(libc::ENOENT)?;
        let dst = self.dentries.get(&(new_parent, new_name.to_vec())).copied();
        let src_dir = self.inode(src.ino)?.is_dir();
        if parent == new_parent && name == new_name {
            return if dst.is_none() && flags & RENAME_EXCHANGE != 0 {
                Err(libc::ENOENT)
            } else if flags & RENAME_NOREPLACE != 0 {
                Err(libc::EEXIST)
            } else {
                Ok(())
            };
        }
        if flags & RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or(libc::ENOENT)?;
            let dst_dir = self.inode(dst.ino)?.is_dir();
            if src_dir && self.is_in_subtree(new_parent, src.ino) {
                return Err(libc::EINVAL);
            }
            if dst_dir && self.is_in_subtree(parent, dst.ino) {
                return Err(libc::EINVAL);
            }
            crate::quota::check_move(self, src.ino, parent, new_parent)?;
            crate::quota::check_move(self, dst.ino, new_parent, parent)?;
            // Swap the inode numbers, keep the cookies.
            if let Some(e) = self.dentries.get_mut(&(parent, name.to_vec())) {
                e.ino = dst.ino;
            }
            if let Some(e) = self.dentries.get_mut(&(new_parent, new_name.to_vec())) {
                e.ino = src.ino;
            }
            if parent != new_parent && src_dir != dst_dir {
                let (to_new, to_old) = if src_dir { (1i64, -1i64) } else { (-1, 1) };
                self.adjust_nlink(new_parent, to_new);
                self.adjust_nlink(parent, to_old);
            }
            if src_dir {
                if let Some(i) = self.inodes.get_mut(&src.ino) {
                    i.parent = new_parent;
                }
            }
            if dst_dir {
                if let Some(i) = self.inodes.get_mut(&dst.ino) {
                    i.parent = parent;
                }
            }
            for ino in [src.ino, dst.ino] {
                if let Some(i) = self.inodes.get_mut(&ino) {
                    i.attr.ctime_ns = now;
                }
            }
            crate::rstats::moved(self, src.ino, parent, new_parent, now);
            crate::rstats::moved(self, dst.ino, new_parent, parent, now);
            self.touch_dir(parent, now);
            self.touch_dir(new_parent, now);
            return Ok(());
        }
        if src_dir && self.is_in_subtree(new_parent, src.ino) {
            return Err(libc::EINVAL);
        }
        crate::quota::check_move(self, src.ino, parent, new_parent)?;
        if let Some(dst) = dst {
            if flags & RENAME_NOREPLACE != 0 {
                return Err(libc::EEXIST);
            }
            if dst.ino == src.ino {
                // Two links to one inode: POSIX says do nothing.
                return Ok(());
            }
            let dst_inode = self.inode(dst.ino)?;
            let dst_dir = dst_inode.is_dir();
            if src_dir && !dst_dir {
                return Err(libc::ENOTDIR);
            }
            if !src_dir && dst_dir {
                return Err(libc::EISDIR);
            }
            if dst_dir {
                // The target must not be an ancestor of the source (it
                // would be non-empty anyway).
                if !self.dir_is_empty(dst.ino) {
                    return Err(libc::ENOTEMPTY);
                }
            }
            let trash = crate::trash::origin(self, now, new_parent, new_name, dst.ino);
            self.del_entry(new_parent, new_name);
            if dst_dir {
                self.adjust_nlink(new_parent, -1);
            }
            crate::rstats::unlinking(self, new_parent, dst.ino, now);
            self.drop_link(now, dst.ino, guard, trash);
        }
        self.del_entry(parent, name);
        self.add_entry(new_parent, new_name, src.ino);
        if src_dir && parent != new_parent {
            self.adjust_nlink(parent, -1);
            self.adjust_nlink(new_parent, 1);
        }
        if let Some(i) = self.inodes.get_mut(&src.ino) {
            if src_dir {
                i.parent = new_parent;
            }
            i.attr.ctime_ns = now;
        }
        crate::rstats::moved(self, src.ino, parent, new_parent, now);
        self.touch_dir(parent, now);
        self.touch_dir(new_parent, now);
        Ok(())
    }

    fn adjust_nlink(&mut self, ino: u64, delta: i64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.attr.nlink = if delta < 0 {
                i.attr.nlink.saturating_sub(delta.unsigned_abs() as u32)
            } else {
                i.attr.nlink.saturating_add(delta as u32)
            };
        }
    }

    fn setxattr(&mut self, now: i64, ino: u64, name: &[u8], value: &[u8], flags: u32) -> R<()> {
        self.inode(ino)?;
        check_xattr_name(name)?;
        if crate::quota::is_quota_name(name) {
            return crate::quota::set(self, ino, name, value);
        }
        if name == crate::trash::TRASH_SECONDS {
            return crate::trash::set(self, now, ino, value);
        }
        if name.starts_with(crate::rstats::PREFIX) {
            return Err(libc::EPERM);
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(libc::E2BIG);
        }
        if flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 || flags == XATTR_CREATE | XATTR_REPLACE {
            return Err(libc::EINVAL);
        }
        let i = self.inode_mut(ino)?;
        let exists = i.xattrs.contains_key(name);
        if flags == XATTR_CREATE && exists {
            return Err(libc::EEXIST);
        }
        if flags == XATTR_REPLACE && !exists {
            return Err(libc::ENODATA);
        }
        if name == crate::acl::ACCESS || name == crate::acl::DEFAULT {
            let acl = crate::acl::parse(value).ok_or(libc::EINVAL)?;
            if name == crate::acl::ACCESS {
                // The mode follows the access ACL; one that says no more
                // than the mode is not kept.
                i.attr.mode = (i.attr.mode & !0o777) | crate::acl::mode_of(&acl);
                if crate::acl::is_minimal(&acl) {
                    i.xattrs.remove(name);
                    i.attr.ctime_ns = now;
                    return Ok(());
                }
            }
        }
        i.xattrs.insert(name.to_vec(), value.to_vec());
        i.attr.ctime_ns = now;
        crate::rstats::touched(self, ino, now);
        Ok(())
    }

    fn removexattr(&mut self, now: i64, ino: u64, name: &[u8]) -> R<()> {
        self.inode(ino)?;
        check_xattr_name(name)?;
        if crate::quota::is_quota_name(name) {
            return crate::quota::remove(self, ino, name);
        }
        if name == crate::trash::TRASH_SECONDS {
            return crate::trash::remove(self, now, ino);
        }
        let i = self.inode_mut(ino)?;
        i.xattrs.remove(name).ok_or(libc::ENODATA)?;
        i.attr.ctime_ns = now;
        crate::rstats::touched(self, ino, now);
        Ok(())
    }

    fn commit_write(&mut self, now: i64, ino: u64, size: u64) -> R<Attr> {
        let i = self.inode_mut(ino)?;
        if i.is_dir() {
            return Err(libc::EISDIR);
        }
        if i.attr.mode & S_IFMT != S_IFREG {
            return Err(libc::EINVAL);
        }
        if size > MAX_FILE_SIZE {
            return Err(libc::EFBIG);
        }
        crate::quota::check_size(self, ino, size, false)?;
        let i = self.inode_mut(ino)?;
        let old = i.attr.size;
        i.attr.size = i.attr.size.max(size);
        i.attr.mtime_ns = now;
        i.attr.ctime_ns = now;
        let attr = i.attr;
        crate::rstats::changed(self, ino, old);
        Ok(attr)
    }

    /// Commits `size` only if the file's size is `expect` (see
    /// [`Op::CommitWriteIf`]).
    fn commit_write_if(&mut self, now: i64, ino: u64, size: u64, expect: u64) -> R<Attr> {
        if self.inode(ino)?.attr.size != expect {
            return Err(libc::ESTALE);
        }
        self.commit_write(now, ino, size)
    }

    /// Reserves `len` bytes at the end of a regular file: the size grows
    /// over them, so concurrent appenders get disjoint ranges.
    fn append_write(&mut self, now: i64, ino: u64, len: u64) -> R<Attr> {
        let size = self.inode(ino)?.attr.size;
        let end = size
            .checked_add(len)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or(libc::EFBIG)?;
        self.commit_write(now, ino, end)
    }

    /// Whether an inode number names a directory (used by callers that need
    /// the type without the full attributes).
    pub fn is_dir(&self, ino: u64) -> bool {
        self.inodes
            .get(&ino)
            .is_some_and(|i| is_dir_mode(i.attr.mode))
    }
}

/// The names LISTXATTR shows of an inode's stored attributes. The trash
/// retention is kept with them but, like the other `avalon.*` attributes,
/// not listed (copies must not carry it).
pub(crate) fn listed_xattrs(i: &Inode) -> Vec<Vec<u8>> {
    i.xattrs
        .keys()
        .filter(|k| k.as_slice() != crate::trash::TRASH_SECONDS)
        .cloned()
        .collect()
}

pub(crate) fn check_xattr_name(name: &[u8]) -> R<()> {
    if name.is_empty() {
        return Err(libc::EINVAL);
    }
    if name.len() > XATTR_NAME_MAX {
        return Err(libc::ERANGE);
    }
    Ok(())
}

/// The tables a directory listing reads: inodes, entries, cookies.
pub(crate) type Listing<'a> = (
    &'a NsMap<u64, Inode>,
    &'a NsMap<(u64, Vec<u8>), Dentry>,
    &'a NsMap<(u64, u64), Vec<u8>>,
);

/// Entries of directory `ino` with cookie > `cookie`, in cookie order, at
/// most `max` (clamped to 1..=100,000), with attributes if `plus`; and
/// whether that reached the end. Shared by the live namespace and the
/// snapshots' frozen copies.
pub(crate) fn list_entries(
    (inodes, dentries, cookies): Listing<'_>,
    ino: u64,
    cookie: u64,
    max: usize,
    plus: bool,
) -> (Vec<DirEntry>, bool) {
    let max = max.clamp(1, 100_000);
    let mut out = Vec::new();
    let start = cookie.max(FIRST_COOKIE - 1).saturating_add(1);
    let mut eof = true;
    for ((_, c), name) in cookies.range((ino, start)..=(ino, u64::MAX)) {
        if out.len() >= max {
            eof = false;
            break;
        }
        let Some(d) = dentries.get(&(ino, name.clone())) else {
            continue;
        };
        let Some(child) = inodes.get(&d.ino) else {
            continue;
        };
        out.push(DirEntry {
            name: name.clone(),
            ino: d.ino,
            mode: child.attr.mode,
            cookie: *c,
            attr: plus.then_some(child.attr),
        });
    }
    (out, eof)
}

#[cfg(test)]
mod tests;
