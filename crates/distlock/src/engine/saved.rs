//! Leases as a durable store saves them, and the two hooks it needs: a snapshot of the table
//! consistent with one instant, and an engine restored from a saved state.

use std::time::Duration;

use tokio::time::Instant;

use super::table::{Entry, LeaseTable};
use super::Engine;
use crate::error::Result;
use crate::types::LeaseId;

/// A lease as saved to disk by a durable store built on the engine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedLease {
    /// The full key.
    pub key: String,
    /// The lease's secret.
    pub lease_id: LeaseId,
    /// The holder label.
    pub holder: String,
    /// The TTL of the last grant or logged renewal, in ms.
    pub ttl_ms: u64,
    /// The grant's fencing token.
    pub fencing_token: u64,
    /// The key's limit: 1 for a lock (left out when written), N for a semaphore.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub limit: u32,
    /// Held shared (a read lock; left out when written for an exclusive lease).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// What the lease publishes (a leader's value; left out when written if none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

impl SavedLease {
    /// The saved form of a lease of `key`, held with `limit`.
    pub(super) fn of(key: &str, limit: u32, e: Entry) -> SavedLease {
        SavedLease {
            key: key.to_owned(),
            lease_id: e.lease_id,
            holder: e.holder,
            ttl_ms: e.ttl.as_millis() as u64,
            fencing_token: e.fencing_token,
            limit,
            shared: e.shared,
            value: e.value,
        }
    }
}

impl Engine {
    /// An engine that continues from a saved state: tokens continue above `last_token`, and every
    /// saved lease is held again for its full TTL counted from now.
    pub fn restore(last_token: u64, leases: Vec<SavedLease>) -> Result<Engine> {
        let engine = Engine::new()?;
        let now = Instant::now();
        engine.shared.with_state(now, |s| {
            s.table = LeaseTable::with_last_token(last_token);
            for l in leases {
                let ttl = Duration::from_millis(l.ttl_ms);
                let entry = Entry {
                    lease_id: l.lease_id,
                    fencing_token: l.fencing_token,
                    holder: l.holder,
                    ttl,
                    expires_at: now + ttl,
                    granted_at: now,
                    shared: l.shared,
                    value: l.value,
                    confirmed: true,
                };
                s.table.restore(l.key, l.limit, entry);
            }
        });
        Ok(engine)
    }

    /// The live leases and the token counter, consistent with one instant.
    pub fn snapshot(&self) -> (u64, Vec<SavedLease>) {
        let now = Instant::now();
        self.shared.with_state(now, |s| {
            let leases = s
                .table
                .entries()
                .filter(|(_, _, e)| now < e.expires_at)
                .map(|(k, limit, e)| SavedLease::of(k, limit, e.clone()))
                .collect();
            (s.table.last_token(), leases)
        })
    }
}
