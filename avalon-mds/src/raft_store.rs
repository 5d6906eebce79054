//! Raft storage glue (openraft 0.9, storage-v2): the type config, the
//! durable log (redb) and the in-memory state machine with file snapshots.

// openraft's error types are large by design; boxing them would fight its API.
#![allow(clippy::result_large_err)]

use crate::command::{MetaCommand, MetaResponse};
use crate::namespace::State;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::{Cursor, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

openraft::declare_raft_types!(
    /// Avalon MDS raft types.
    pub TypeConfig:
        D = MetaCommand,
        R = MetaResponse,
        NodeId = u64,
        Node = BasicNode,
        Entry = Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
type SErr = StorageError<NodeId>;

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "purged";

const SNAPSHOT_FILE: &str = "snapshot.bin";

/// redb's page cache for the raft log (its default is 1 GiB): the log is
/// read near its end (replication, a restart's replay), and every MDS
/// holds the whole namespace in memory besides.
const LOG_CACHE_BYTES: usize = 64 << 20;

fn io_err(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: impl std::fmt::Display) -> SErr {
    StorageIOError::new(subject, verb, AnyError::error(e.to_string())).into()
}

fn rd(e: impl std::fmt::Display) -> SErr {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn wr(e: impl std::fmt::Display) -> SErr {
    io_err(ErrorSubject::Logs, ErrorVerb::Write, e)
}

// ------------------------------------------------------------------ log

/// The raft log and vote in a redb database.
///
/// Durability contract (see docs/ARCHITECTURE.md): an entry is reported
/// stored to raft (its [`LogFlushed`] callback fires) only once it is on
/// disk, so a node acknowledges AppendEntries only for durable entries and
/// a committed entry survives any crash of a minority. `append` writes the
/// entries without fsync and hands its callback to a flusher thread that
/// makes everything appended so far durable with one commit (group commit:
/// entries appended while an fsync is under way share the next one) and
/// then fires every callback it covered. Votes and truncations are durable
/// before they return; a purge becomes durable with the next commit (it
/// only drops entries a durable snapshot covers). A storage error is
/// final: the callbacks get it (raft stops) and [`LogDurability::failed`]
/// reports it, so the node exits and a supervisor restarts it on what is
/// on disk.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// Pokes the flusher: something was appended.
    flush_tx: std::sync::mpsc::Sender<()>,
    marks: Arc<Mutex<LogMarks>>,
    /// Every entry up to this index is on disk.
    durable: Arc<tokio::sync::watch::Sender<u64>>,
    /// Set once a write of the log failed: nothing is acknowledged after.
    failed: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

/// The last appended index, and how many truncations happened: a flush
/// that raced a truncation must not claim the replaced entries durable.
#[derive(Default)]
struct LogMarks {
    appended: u64,
    epoch: u64,
    /// The committed mark (encoded) not written yet: the flusher's next
    /// commit carries it, instead of a transaction of its own per entry.
    committed: Option<Vec<u8>>,
    /// Appends waiting for their entries to be on disk.
    waiting: Vec<LogFlushed<TypeConfig>>,
}

const KEY_FLUSH: &str = "flush";

/// Why a fail point fired: `return(crash)` ends the process on the spot
/// (no destructor, no flush: what kill -9 leaves), `return(enospc)` fails
/// the operation with ENOSPC, anything else with EIO.
#[cfg(feature = "failpoints")]
pub(crate) fn injected_fault(point: &str, arg: Option<String>) -> String {
    match arg.as_deref() {
        Some("crash") => {
            eprintln!("avalon-mds: fail point {point}: crash");
            std::process::abort()
        }
        Some("enospc") => format!(
            "{point}: {}",
            std::io::Error::from_raw_os_error(libc::ENOSPC)
        ),
        _ => format!("{point}: {}", std::io::Error::from_raw_os_error(libc::EIO)),
    }
}

/// One durable commit of everything appended so far (and of the pending
/// committed mark), with the fail points around its fsync.
fn flush_commit(db: &Database, n: u64, committed: Option<&[u8]>) -> Result<(), String> {
    fail::fail_point!("mds-log-before-fsync", |a| Err(injected_fault(
        "mds-log-before-fsync",
        a
    )));
    let tx = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut t = tx.open_table(META).map_err(|e| e.to_string())?;
        t.insert(KEY_FLUSH, n.to_le_bytes().as_slice())
            .map_err(|e| e.to_string())?;
        if let Some(c) = committed {
            t.insert(KEY_COMMITTED, c).map_err(|e| e.to_string())?;
        }
    }
    tx.commit().map_err(|e| e.to_string())?;
    // Durable here, not yet acknowledged: a crash now must lose nothing.
    fail::fail_point!("mds-log-after-fsync", |a| Err(injected_fault(
        "mds-log-after-fsync",
        a
    )));
    Ok(())
}

/// Flusher thread: one durable commit per batch of appended entries, then
/// their callbacks. Holds the database weakly, so that it closes as soon as
/// the store is dropped (a restart in the same process can open it again).
fn flusher(
    db: std::sync::Weak<Database>,
    rx: std::sync::mpsc::Receiver<()>,
    marks: Arc<Mutex<LogMarks>>,
    durable: Arc<tokio::sync::watch::Sender<u64>>,
    failed: Arc<tokio::sync::watch::Sender<Option<String>>>,
) {
    let mut n: u64 = 0;
    while rx.recv().is_ok() {
        while rx.try_recv().is_ok() {}
        // Everything appended before this read is in the database already,
        // so the commit below covers it and the callbacks taken with it.
        let (epoch, target, committed, waiting) = {
            let mut m = lock(&marks);
            (
                m.epoch,
                m.appended,
                m.committed.take(),
                std::mem::take(&mut m.waiting),
            )
        };
        if target <= *durable.borrow() {
            if let Some(c) = committed {
                // Not written: put back for the next commit (unless a newer
                // mark came meanwhile).
                lock(&marks).committed.get_or_insert(c);
            }
            for cb in waiting {
                cb.log_io_completed(Ok(()));
            }
            continue;
        }
        n = n.wrapping_add(1);
        let Some(strong) = db.upgrade() else {
            for cb in waiting {
                cb.log_io_completed(Err(std::io::Error::other("raft log closed")));
            }
            return;
        };
        match flush_commit(&strong, n, committed.as_deref()) {
            Ok(()) => {
                drop(strong);
                if lock(&marks).epoch == epoch {
                    durable.send_if_modified(|d| {
                        let newer = target > *d;
                        if newer {
                            *d = target;
                        }
                        newer
                    });
                }
                for cb in waiting {
                    cb.log_io_completed(Ok(()));
                }
            }
            Err(e) => {
                // Final, never retried: after a failed fsync the kernel may
                // have dropped the pages, and a later fsync that succeeds
                // would claim them durable.
                let msg = format!("raft log flush failed: {e}");
                tracing::error!("{msg}");
                for cb in waiting {
                    cb.log_io_completed(Err(std::io::Error::other(msg.clone())));
                }
                for cb in std::mem::take(&mut lock(&marks).waiting) {
                    cb.log_io_completed(Err(std::io::Error::other(msg.clone())));
                }
                failed.send_replace(Some(msg));
                return;
            }
        }
    }
}

fn lock(m: &Mutex<LogMarks>) -> std::sync::MutexGuard<'_, LogMarks> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LogStore {
    /// Opens (or creates) `dir/raft-log.redb`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        // A restart in the same process may find the previous store's
        // flusher finishing its last commit (it holds the file meanwhile).
        let path = dir.join("raft-log.redb");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match redb::Builder::new()
                .set_cache_size(LOG_CACHE_BYTES)
                .create(&path)
            {
                Err(redb::DatabaseError::DatabaseAlreadyOpen)
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                r => break r?,
            }
        };
        let tx = db.begin_write()?;
        {
            tx.open_table(LOGS)?;
            tx.open_table(META)?;
        }
        tx.commit()?;
        // What survived on disk is durable by definition.
        let last = {
            let tx = db.begin_read()?;
            let t = tx.open_table(LOGS)?;
            let last = t.last()?.map(|(k, _)| k.value()).unwrap_or(0);
            last
        };
        let db = Arc::new(db);
        let marks = Arc::new(Mutex::new(LogMarks {
            appended: last,
            ..Default::default()
        }));
        let durable = Arc::new(tokio::sync::watch::Sender::new(last));
        let failed = Arc::new(tokio::sync::watch::Sender::new(None));
        let (flush_tx, rx) = std::sync::mpsc::channel();
        let (fdb, fm, fd, ff) = (
            Arc::downgrade(&db),
            marks.clone(),
            durable.clone(),
            failed.clone(),
        );
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flusher(fdb, rx, fm, fd, ff))?;
        Ok(LogStore {
            db,
            flush_tx,
            marks,
            durable,
            failed,
        })
    }

    /// A handle to wait for this log's durability that does not keep the
    /// database open (the node outlives its raft in a restart).
    pub fn durability(&self) -> LogDurability {
        LogDurability {
            flush_tx: self.flush_tx.clone(),
            durable: self.durable.clone(),
            failed: self.failed.clone(),
        }
    }
}

/// Waits for a [`LogStore`]'s flusher (see [`LogStore::durability`]).
#[derive(Clone)]
pub struct LogDurability {
    flush_tx: std::sync::mpsc::Sender<()>,
    durable: Arc<tokio::sync::watch::Sender<u64>>,
    failed: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

impl LogDurability {
    /// Waits until every entry up to `index` is on disk here (false on
    /// timeout: this node does not have the entry yet, or its disk fails).
    pub async fn flush_upto(&self, index: u64, timeout: std::time::Duration) -> bool {
        let mut rx = self.durable.subscribe();
        if *rx.borrow() >= index {
            return true;
        }
        if self.failed.borrow().is_some() {
            return false;
        }
        let _ = self.flush_tx.send(());
        let poke = self.flush_tx.clone();
        // Entries replicated to us after this call need a poke of their own
        // only if nothing appends after them; one retry poke covers that.
        let wait = async {
            loop {
                match tokio::time::timeout(
                    std::time::Duration::from_millis(50),
                    rx.wait_for(|d| *d >= index),
                )
                .await
                {
                    Ok(r) => return r.is_ok(),
                    Err(_) => {
                        let _ = poke.send(());
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// Resolves with the error once a write of the log failed (the node
    /// must stop: it cannot acknowledge anything any more).
    pub async fn failed(&self) -> String {
        let mut rx = self.failed.subscribe();
        let failed = match rx.wait_for(|f| f.is_some()).await {
            Ok(f) => f.clone(),
            Err(_) => None,
        };
        match failed {
            Some(e) => e,
            // The store is gone (shut down): never resolves.
            None => std::future::pending().await,
        }
    }
}

impl LogStore {
    fn get_meta<T: for<'a> Deserialize<'a>>(&self, key: &str) -> Result<Option<T>, SErr> {
        let tx = self.db.begin_read().map_err(rd)?;
        let t = tx.open_table(META).map_err(rd)?;
        match t.get(key).map_err(rd)? {
            Some(v) => Ok(Some(postcard::from_bytes(v.value()).map_err(rd)?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &str, v: &T, durable: bool) -> Result<(), SErr> {
        let bytes = postcard::to_allocvec(v).map_err(wr)?;
        let mut tx = self.db.begin_write().map_err(wr)?;
        if !durable {
            tx.set_durability(Durability::None);
        }
        {
            let mut t = tx.open_table(META).map_err(wr)?;
            t.insert(key, bytes.as_slice()).map_err(wr)?;
        }
        tx.commit().map_err(wr)
    }

    /// True if nothing was ever written (no vote, no log): a fresh node.
    pub fn is_empty(&self) -> anyhow::Result<bool> {
        let vote: Option<Vote<NodeId>> = self.get_meta(KEY_VOTE)?;
        let tx = self.db.begin_read()?;
        let t = tx.open_table(LOGS)?;
        Ok(vote.is_none() && t.first()?.is_none())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let tx = self.db.begin_read().map_err(rd)?;
        let t = tx.open_table(LOGS).map_err(rd)?;
        let mut out = Vec::new();
        for item in t.range(range).map_err(rd)? {
            let (_, v) = item.map_err(rd)?;
            out.push(postcard::from_bytes(v.value()).map_err(rd)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let purged: Option<LogId<NodeId>> = self.get_meta(KEY_PURGED)?;
        let tx = self.db.begin_read().map_err(rd)?;
        let t = tx.open_table(LOGS).map_err(rd)?;
        let last = match t.last().map_err(rd)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = postcard::from_bytes(v.value()).map_err(rd)?;
                Some(e.log_id)
            }
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        self.put_meta(KEY_VOTE, vote, true)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        // Written by the flusher's next commit, not in a transaction of its
        // own (one per entry on every node): a lost committed mark only
        // delays re-applying until the leader says.
        let bytes = postcard::to_allocvec(&committed).map_err(wr)?;
        lock(&self.marks).committed = Some(bytes);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        let pending = lock(&self.marks).committed.clone();
        if let Some(b) = pending {
            return postcard::from_bytes::<Option<LogId<NodeId>>>(&b).map_err(rd);
        }
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        if let Some(e) = self.failed.borrow().clone() {
            callback.log_io_completed(Err(std::io::Error::other(e.clone())));
            return Err(wr(e));
        }
        let res = (|| -> Result<u64, SErr> {
            fail::fail_point!("mds-log-append", |a| Err(wr(injected_fault(
                "mds-log-append",
                a
            ))));
            let mut tx = self.db.begin_write().map_err(wr)?;
            // Made durable by the flusher right behind (group commit).
            tx.set_durability(Durability::None);
            let mut last = 0;
            {
                let mut t = tx.open_table(LOGS).map_err(wr)?;
                for e in entries {
                    let bytes = postcard::to_allocvec(&e).map_err(wr)?;
                    t.insert(e.log_id.index, bytes.as_slice()).map_err(wr)?;
                    last = e.log_id.index;
                }
            }
            tx.commit().map_err(wr)?;
            Ok(last)
        })();
        match res {
            Ok(last) => {
                {
                    let mut m = lock(&self.marks);
                    m.appended = m.appended.max(last);
                    // Acknowledged (to the leader, to raft) only once on
                    // disk: the flusher fires it after its commit.
                    m.waiting.push(callback);
                }
                if self.flush_tx.send(()).is_err() {
                    // The flusher is gone: only after a failure or a close.
                    let waiting = std::mem::take(&mut lock(&self.marks).waiting);
                    for cb in waiting {
                        cb.log_io_completed(Err(std::io::Error::other("raft log flusher stopped")));
                    }
                    return Err(wr("raft log flusher stopped"));
                }
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                self.failed
                    .send_replace(Some(format!("raft log append failed: {msg}")));
                callback.log_io_completed(Err(std::io::Error::other(msg)));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let tx = self.db.begin_write().map_err(wr)?;
        {
            let mut t = tx.open_table(LOGS).map_err(wr)?;
            t.retain_in(log_id.index.., |_, _| false).map_err(wr)?;
        }
        // A durable commit: what is left is on disk, nothing beyond it.
        tx.commit().map_err(wr)?;
        let kept = log_id.index.saturating_sub(1);
        {
            let mut m = lock(&self.marks);
            m.epoch += 1;
            m.appended = kept;
        }
        self.durable.send_replace(kept);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let bytes = postcard::to_allocvec(&log_id).map_err(wr)?;
        let db = self.db.clone();
        // Off raft's core and the runtime's threads, and without an fsync
        // of its own: openraft waits for the purge before it answers
        // AppendEntries or heartbeats again, and a durable purge of
        // thousands of entries took up to a second, long enough for an
        // election. The flusher's next commit makes it durable; a crash
        // before that leaves entries a durable snapshot already covers,
        // which is harmless (purged again after the restart).
        let purged = tokio::task::spawn_blocking(move || -> Result<(), SErr> {
            let mut tx = db.begin_write().map_err(wr)?;
            tx.set_durability(Durability::None);
            {
                let mut m = tx.open_table(META).map_err(wr)?;
                m.insert(KEY_PURGED, bytes.as_slice()).map_err(wr)?;
                let mut t = tx.open_table(LOGS).map_err(wr)?;
                t.retain_in(..=log_id.index, |_, _| false).map_err(wr)?;
            }
            tx.commit().map_err(wr)
        })
        .await;
        purged.map_err(wr)?
    }
}

// ------------------------------------------------------------------ state machine

/// The applied state plus raft's bookkeeping of it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, BasicNode>,
    pub state: State,
}

impl SmData {
    /// FNV-1a hash of the serialized namespace state: equal on every node
    /// at the same `last_applied`.
    pub fn digest(&self) -> u64 {
        struct Fnv(u64);
        impl std::io::Write for Fnv {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                for b in buf {
                    self.0 ^= u64::from(*b);
                    self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
                }
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        match postcard::to_io(&self.state, &mut h) {
            Ok(_) => h.0,
            Err(_) => 0,
        }
    }
}

/// Shared, readable handle on the state machine.
pub type SharedSm = Arc<RwLock<SmData>>;

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// The state machine: in memory, snapshotted to `dir/snapshot.bin`.
#[derive(Clone)]
pub struct StateMachineStore {
    sm: SharedSm,
    dir: PathBuf,
    counter: Arc<AtomicU64>,
}

fn sm_err(verb: ErrorVerb, e: impl std::fmt::Display) -> SErr {
    io_err(ErrorSubject::StateMachine, verb, e)
}

fn snap_err(verb: ErrorVerb, e: impl std::fmt::Display) -> SErr {
    io_err(ErrorSubject::Snapshot(None), verb, e)
}

/// Writes what `fill` writes to `dir/name` atomically and durably.
fn write_atomically(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    fail::fail_point!("mds-sm-snapshot-write", |a| Err(std::io::Error::other(
        injected_fault("mds-sm-snapshot-write", a)
    )));
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        fill(&mut f)?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    fail::fail_point!("mds-sm-snapshot-rename", |a| Err(std::io::Error::other(
        injected_fault("mds-sm-snapshot-rename", a)
    )));
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// postcard's unsigned varint (LEB128), as it prefixes a byte vector.
fn write_varint(w: &mut dyn Write, mut v: u64) -> std::io::Result<()> {
    let mut buf = [0u8; 10];
    let mut i = 0;
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            buf[i] = b;
            i += 1;
            break;
        }
        buf[i] = b | 0x80;
        i += 1;
    }
    w.write_all(&buf[..i])
}

/// Writes `state` as a [`SnapshotFile`] to `dir/snapshot.bin`, serialized
/// straight into the file: the same bytes as postcard of a `SnapshotFile`
/// whose `data` is postcard of `state` (the format older releases read),
/// without that buffer. One pass counts the bytes for the length prefix,
/// a second writes them. Returns the size of the data.
fn write_snapshot_file(
    dir: &Path,
    meta: &SnapshotMeta<NodeId, BasicNode>,
    state: &SmData,
) -> Result<u64, SErr> {
    let size = postcard::experimental::serialized_size(state)
        .map_err(|e| snap_err(ErrorVerb::Write, e))? as u64;
    write_atomically(dir, SNAPSHOT_FILE, |w| {
        postcard::to_io(meta, &mut *w).map_err(std::io::Error::other)?;
        write_varint(w, size)?;
        postcard::to_io(state, &mut *w).map_err(std::io::Error::other)?;
        Ok(())
    })
    .map_err(|e| snap_err(ErrorVerb::Write, e))?;
    Ok(size)
}

impl StateMachineStore {
    /// Opens the state machine, restoring the last snapshot in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut data = SmData::default();
        if let Some(f) = Self::read_snapshot_file(dir)? {
            data = postcard::from_bytes(&f.data)?;
        }
        Ok(StateMachineStore {
            sm: Arc::new(RwLock::new(data)),
            dir: dir.to_path_buf(),
            counter: Arc::new(AtomicU64::new(0)),
        })
    }

    fn read_snapshot_file(dir: &Path) -> anyhow::Result<Option<SnapshotFile>> {
        match std::fs::read(dir.join(SNAPSHOT_FILE)) {
            Ok(b) => Ok(Some(postcard::from_bytes(&b)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The shared state, for reads by the services.
    pub fn shared(&self) -> SharedSm {
        self.sm.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, SmData> {
        self.sm.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, SmData> {
        self.sm.write().unwrap_or_else(|e| e.into_inner())
    }

    fn save_snapshot(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        data: &[u8],
    ) -> Result<(), SErr> {
        write_atomically(&self.dir, SNAPSHOT_FILE, |w| {
            postcard::to_io(meta, &mut *w).map_err(std::io::Error::other)?;
            write_varint(w, data.len() as u64)?;
            w.write_all(data)
        })
        .map_err(|e| snap_err(ErrorVerb::Write, e))
    }
}

/// Builds one snapshot from a copy of the state taken between two applies
/// (see [`StateMachineStore::get_snapshot_builder`]).
pub struct SnapshotBuilder {
    /// The state at the moment the builder was made; `None` once built.
    view: Option<SmData>,
    dir: PathBuf,
    counter: Arc<AtomicU64>,
}

impl SnapshotBuilder {
    /// Serializes the copy straight to `dir/snapshot.bin` (no buffer of the
    /// whole state in memory) and returns its metadata and size in bytes.
    fn write(
        view: &SmData,
        dir: &Path,
        n: u64,
    ) -> Result<(SnapshotMeta<NodeId, BasicNode>, u64), SErr> {
        let snapshot_id = match view.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, n),
            None => format!("0-0-{n}"),
        };
        let meta = SnapshotMeta {
            last_log_id: view.last_applied,
            last_membership: view.last_membership.clone(),
            snapshot_id,
        };
        let size = write_snapshot_file(dir, &meta, view)?;
        Ok((meta, size))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let _m = crate::metrics::snapshot_timer();
        let view = self
            .view
            .take()
            .ok_or_else(|| snap_err(ErrorVerb::Read, "snapshot builder used twice"))?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.clone();
        // Serializing millions of entries takes seconds of CPU: on a
        // blocking thread, so neither applies (the copy is this builder's
        // own) nor the runtime's workers wait for it.
        let (meta, size) =
            tokio::task::spawn_blocking(move || SnapshotBuilder::write(&view, &dir, n))
                .await
                .map_err(|e| snap_err(ErrorVerb::Write, e))??;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = size, "built snapshot");
        // openraft keeps only the metadata of a built snapshot; the data is
        // read back from the file when a follower needs it
        // (`get_current_snapshot`).
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), SErr> {
        let sm = self.read();
        Ok((sm.last_applied, sm.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetaResponse>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let _m = crate::metrics::apply_timer();
        let mut sm = self.write();
        let mut out = Vec::new();
        for e in entries {
            sm.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(MetaResponse::default()),
                EntryPayload::Normal(cmd) => out.push(sm.state.apply(&cmd)),
                EntryPayload::Membership(m) => {
                    sm.last_membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(MetaResponse::default());
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Called by raft's state machine task between two applies, so this
        // copy is exactly the state at `last_applied`. The namespace maps
        // are shared, copy-on-write maps (`namespace::NsMap`): the copy
        // costs O(1) in their size, and applies go on beside it.
        SnapshotBuilder {
            view: Some(self.read().clone()),
            dir: self.dir.clone(),
            counter: self.counter.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let mut new: SmData =
            postcard::from_bytes(&data).map_err(|e| sm_err(ErrorVerb::Read, e))?;
        new.last_applied = meta.last_log_id;
        new.last_membership = meta.last_membership.clone();
        self.save_snapshot(meta, &data)?;
        *self.write() = new;
        tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let f = Self::read_snapshot_file(&self.dir).map_err(|e| snap_err(ErrorVerb::Read, e))?;
        Ok(f.map(|f| Snapshot {
            meta: f.meta,
            snapshot: Box::new(Cursor::new(f.data)),
        }))
    }
}

// ------------------------------------------------------------------ snapshot pacing

/// A snapshot is due after at least one log entry per this many inodes.
const INODES_PER_SNAPSHOT_ENTRY: u64 = 20;

/// Log entries since the last snapshot after which node `id` takes the
/// next: `snapshot_logs`, or one per [`INODES_PER_SNAPSHOT_ENTRY`] inodes
/// when that is more (a snapshot's cost grows with the namespace, so a
/// fixed count made a large namespace spend most of its time in
/// snapshots), times 1, 1.25 or 1.5 by node id so the nodes of a group,
/// which apply the same entries, do not all serialize at once.
pub fn snapshot_threshold(snapshot_logs: u64, inodes: u64, id: u64) -> u64 {
    let base = snapshot_logs.max(inodes / INODES_PER_SNAPSHOT_ENTRY).max(1);
    base + base * (id % 3) / 4
}

/// Asks raft for this node's snapshots by [`snapshot_threshold`] (raft's
/// own policy, a fixed count of entries, is off). Runs until raft stops or
/// `stop` is cancelled.
pub async fn snapshot_pacer(
    raft: Raft,
    sm: SharedSm,
    id: u64,
    snapshot_logs: u64,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut rx = raft.metrics();
    // The applied index a snapshot was asked at, and when: not asked again
    // until a snapshot covers it (or a minute passed: a build that failed).
    let mut asked: Option<(u64, std::time::Instant)> = None;
    loop {
        let (applied, snap) = {
            let m = rx.borrow_and_update();
            (
                m.last_applied.map_or(0, |l| l.index),
                m.snapshot.map_or(0, |l| l.index),
            )
        };
        let inodes = sm
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .state
            .inodes
            .len() as u64;
        let due = applied.saturating_sub(snap) >= snapshot_threshold(snapshot_logs, inodes, id);
        let pending = matches!(asked, Some((at, when))
            if snap < at && when.elapsed() < std::time::Duration::from_secs(60));
        if due && !pending {
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
            asked = Some((applied, std::time::Instant::now()));
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), SErr> {
            let dir = tempfile::tempdir().map_err(wr)?;
            let log = LogStore::open(&dir.path().join("log")).map_err(wr)?;
            let sm = StateMachineStore::open(&dir.path().join("sm")).map_err(wr)?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn openraft_storage_suite() -> Result<(), SErr> {
        Suite::test_all(Builder)
    }

    fn mkdir_entry(index: u64, name: &str) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(MetaCommand {
                now_ns: index as i64,
                session_id: 0,
                request_id: 0,
                op: crate::command::Op::Mkdir {
                    parent: avalon_proto::limits::ROOT_INO,
                    name: name.as_bytes().to_vec(),
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                },
            }),
        }
    }

    /// A snapshot is the state at the index its builder was made at, even
    /// though entries are applied while it is being built, and its file
    /// reads back (in the format older releases wrote) to that state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshot_taken_while_applying_is_the_state_at_its_index() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut sm = StateMachineStore::open(dir.path())?;
        let first: Vec<_> = (1..=500)
            .map(|i| mkdir_entry(i, &format!("d{i}")))
            .collect();
        sm.apply(first).await?;
        let at_index = sm.read().clone();
        let mut builder = sm.get_snapshot_builder().await;
        // Applies go on while the snapshot is built, on another task.
        let building = tokio::spawn(async move { builder.build_snapshot().await });
        for i in 501..=1500 {
            sm.apply(vec![mkdir_entry(i, &format!("d{i}"))]).await?;
        }
        let built = building.await??;
        assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(500));
        assert_eq!(sm.read().state.inodes.len(), 1501);

        let cur = sm.get_current_snapshot().await?.expect("a snapshot file");
        assert_eq!(cur.meta, built.meta);
        let restored: SmData = postcard::from_bytes(cur.snapshot.get_ref())?;
        assert_eq!(restored.state, at_index.state);
        assert_eq!(restored.last_applied, at_index.last_applied);
        assert_eq!(restored.digest(), at_index.digest());
        // The same bytes a whole-buffer serialization gave.
        let file = std::fs::read(dir.path().join(SNAPSHOT_FILE))?;
        let old = postcard::to_allocvec(&SnapshotFile {
            meta: built.meta.clone(),
            data: postcard::to_allocvec(&at_index)?,
        })?;
        assert!(file == old, "snapshot file differs from the old format");

        // A restart restores it; the entries after it come from the log.
        drop(sm);
        let reopened = StateMachineStore::open(dir.path())?;
        assert_eq!(reopened.read().state, at_index.state);
        Ok(())
    }

    #[test]
    fn varint_prefix_is_postcards() {
        for n in [0usize, 1, 127, 128, 300, 16_383, 16_384, 1 << 21] {
            let whole = postcard::to_allocvec(&vec![7u8; n]).expect("serialize");
            let mut prefix = Vec::new();
            write_varint(&mut prefix, n as u64).expect("write");
            assert_eq!(prefix, whole[..whole.len() - n], "length {n}");
        }
    }

    #[test]
    fn snapshot_threshold_grows_with_the_namespace_and_is_staggered() {
        assert_eq!(snapshot_threshold(5000, 1000, 3), 5000);
        assert_eq!(snapshot_threshold(5000, 1_000_000, 3), 50_000);
        assert_eq!(snapshot_threshold(5000, 10_000_000, 3), 500_000);
        let per_node: Vec<u64> = (1..=3).map(|id| snapshot_threshold(5000, 0, id)).collect();
        assert_eq!(per_node, vec![6250, 7500, 5000]);
        assert_eq!(snapshot_threshold(0, 0, 1), 1);
    }
}
