//! The write-ahead log of the embedded store: what must survive `kill -9`.
//!
//! Files in the data directory:
//! - `wal-<n>.log`: segments of framed records, appended in order;
//! - `snapshot-<n>.bin`: the live leases and the token counter when segment `n` was started;
//!   replay starts from the newest valid snapshot and applies segments `n` and later.
//!
//! The log is three parts: `frames.rs` (how a record sits in a file, and which files there are),
//! `recovery.rs` (rebuilding the state at start-up, cutting a torn tail, refusing damage) and
//! `writer.rs` (one thread that appends with group commit, rolls segments and takes snapshots),
//! over `disk.rs` (the file operations they use, as a trait: the real file system, or in tests
//! `sim.rs`, a disk in memory that loses what was not synced and fails chosen steps).
//! This file holds what they share: the records and the errors.

mod disk;
mod frames;
mod recovery;
#[doc(hidden)]
pub mod sim;
mod writer;

use std::io;
use std::path::{Path, PathBuf};

use distlock::engine::SavedLease;
use distlock::LeaseId;
use serde::{Deserialize, Serialize};

pub use disk::{Disk, DiskFile, RealDisk};
pub use recovery::{lock_dir, recover, recover_on, DirLock, Recovered};
pub use writer::{LogAhead, Reserved, SnapshotSource, Wal, WalStats, Written, MAX_SEGMENT_BYTES};

/// One logged change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    /// A lease was granted.
    Acquire(SavedLease),
    /// A lease's TTL changed.
    Renew {
        /// The key.
        key: String,
        /// The lease.
        lease_id: LeaseId,
        /// The new TTL in ms.
        ttl_ms: u64,
    },
    /// The value a lease publishes was replaced (a leader's proclamation).
    Proclaim {
        /// The key.
        key: String,
        /// The lease.
        lease_id: LeaseId,
        /// The new value.
        value: String,
    },
    /// A lease was released.
    Release {
        /// The key.
        key: String,
        /// The lease.
        lease_id: LeaseId,
        /// The lease's fencing token, on releases the store makes itself (a force-release, an
        /// expiry): such a release can reach the disk before its grant's record, and an answer
        /// or event may already have named the token, so replay raises the counter to it and the
        /// token is never handed out again. Absent on a holder's release (its grant was
        /// answered, so on disk) and in logs written before it existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fencing_token: Option<u64>,
    },
}

/// What the log failed with.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// Reading or writing the data directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A file is damaged somewhere other than a torn tail.
    #[error("{path} is corrupt at byte {offset}: {reason}; refusing to start (move the data directory aside to start empty)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// Another process has the data directory open.
    #[error("{0} is in use by another distlock server (it holds the lock on {0}/LOCK); two servers on one data directory would each grant the same locks")]
    InUse(PathBuf),
    /// A previous write failed; the log accepts nothing more.
    #[error("the write-ahead log failed earlier and is closed: {0}")]
    Closed(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io { path: path.to_owned(), source }
}

/// A record of a fresh lease, for the tests of the log's parts.
#[cfg(test)]
fn test_lease(key: &str, token: u64) -> Record {
    Record::Acquire(SavedLease {
        key: key.into(),
        lease_id: LeaseId::generate(),
        holder: String::new(),
        ttl_ms: 60_000,
        fencing_token: token,
        limit: 1,
        shared: false,
        value: None,
    })
}
