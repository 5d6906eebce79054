//! fsync/fsyncdir for metadata. Every node acknowledges a log entry only
//! once it is on its own disk (`raft_store`), so an operation acknowledged
//! to a client (committed: acknowledged by a majority) is already on disk on
//! a majority, and `SyncMeta` needs no round of its own. `FlushLog` (a
//! peer's request to make its log durable up to an index) is still
//! answered, for peers that ask.

use crate::raft_store::LogDurability;
use std::time::Duration;

/// How long a `FlushLog` waits for the log before it fails.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// This node's log durability.
pub struct LogSync {
    log: LogDurability,
}

impl LogSync {
    /// Wraps `log`.
    pub fn new(log: LogDurability) -> Self {
        LogSync { log }
    }

    /// This node's raft log's durability.
    pub fn log(&self) -> &LogDurability {
        &self.log
    }
}
