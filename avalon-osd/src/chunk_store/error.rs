//! Errors of the chunk store.

use std::io;
use std::path::{Path, PathBuf};

/// Errors of the chunk store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request itself is malformed (bad sizes, offsets, ids).
    #[error("{0}")]
    InvalidArgument(String),
    /// Stored data or metadata fails verification; read another replica.
    #[error("chunk {ino:016x}/{index:016x} is corrupt: {detail}")]
    Corruption {
        ino: u64,
        index: u64,
        detail: String,
    },
    /// A replicated write older than what the chunk already holds.
    #[error(
        "chunk {ino:016x}/{index:016x}: write version {got} is older than stored version {current}"
    )]
    StaleVersion {
        ino: u64,
        index: u64,
        current: u64,
        got: u64,
    },
    /// A replicated write that skips versions the chunk has not seen yet.
    #[error("chunk {ino:016x}/{index:016x}: write version {got} does not follow stored version {current}")]
    VersionGap {
        ino: u64,
        index: u64,
        current: u64,
        got: u64,
    },
    /// An operating system error on a store file.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A blocking task panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Shorthand for store results.
pub type Result<T> = std::result::Result<T, StoreError>;

/// Wraps an I/O error on `path`.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A corruption of chunk `(ino, index)`.
pub(crate) fn corrupt(ino: u64, index: u64, detail: impl Into<String>) -> StoreError {
    StoreError::Corruption {
        ino,
        index,
        detail: detail.into(),
    }
}
