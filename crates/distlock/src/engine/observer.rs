//! What the engine reports beyond its answers: leases that expire on their own, and callers that
//! join a queue. The lock server turns these into its live events.

use std::sync::Arc;

use super::saved::SavedLease;

/// Something the table did on its own or that a caller cannot see from its answer.
#[derive(Debug, Clone, Copy)]
pub enum TableEvent<'a> {
    /// A lease ran out its TTL.
    Expired(&'a SavedLease),
    /// A caller joined the queue of a held key.
    Queued {
        /// The key.
        key: &'a str,
        /// The waiter's holder label.
        holder: &'a str,
    },
}

/// Called with every [`TableEvent`], under the table's lock: keep it short (e.g. a channel send).
pub type Observer = Arc<dyn Fn(TableEvent<'_>) + Send + Sync>;
