//! What just happened on this server, for the live web page: grants, releases, expiries, lost
//! leases, callers queueing, wait timeouts and force-releases, fanned out to every `GET /v1/events` stream.
//!
//! The stream is server-sent events. Events are batched: at most ten `events` messages a second,
//! each a JSON array, so a browser keeps up with thousands of events a second; a `stats` message
//! every second carries the server facts (store, uptime, leases, waiters, grants per second). A
//! subscriber too slow to keep up loses the oldest events and is told how many (`dropped`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A lease was granted.
    Grant,
    /// A holder released its lease.
    Release,
    /// A lease ran out its TTL.
    Expiry,
    /// A renew or release came too late: the lease was gone.
    Lost,
    /// A caller joined the queue of a held lock.
    Wait,
    /// A waiting acquire gave up.
    WaitTimeout,
    /// An operator freed the lock with the admin token.
    ForceRelease,
}

/// One event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// What happened.
    pub kind: Kind,
    /// The lock.
    pub key: String,
    /// The holder label, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// The lease's fencing token, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<u64>,
    /// Wall-clock time, ms since the Unix epoch.
    pub at_ms: u64,
}

/// The server's event fan-out and its counters.
pub struct Events {
    tx: broadcast::Sender<Event>,
    started: Instant,
    grants: AtomicU64,
}

/// How many events a slow subscriber may fall behind before it loses the oldest.
const BACKLOG: usize = 16_384;

impl Default for Events {
    fn default() -> Self {
        Events { tx: broadcast::channel(BACKLOG).0, started: Instant::now(), grants: AtomicU64::new(0) }
    }
}

impl Events {
    /// Records an event (cheap when nobody listens).
    pub fn publish(&self, kind: Kind, key: &str, holder: Option<&str>, fencing_token: Option<u64>) {
        if kind == Kind::Grant {
            self.grants.fetch_add(1, Ordering::Relaxed);
        }
        if !self.listening() {
            return;
        }
        let at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let _ = self.tx.send(Event {
            kind,
            key: key.to_owned(),
            holder: holder.filter(|h| !h.is_empty()).map(str::to_owned),
            fencing_token,
            at_ms,
        });
    }

    /// Whether anyone subscribes now (callers skip building event data otherwise).
    pub fn listening(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// A new subscription.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// Grants since start.
    pub fn grants_total(&self) -> u64 {
        self.grants.load(Ordering::Relaxed)
    }

    /// Time since start.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Drains everything `rx` holds now (up to `max`) into `batch`; returns events lost to lag.
pub fn drain(rx: &mut broadcast::Receiver<Event>, batch: &mut Vec<Event>, max: usize) -> u64 {
    let mut dropped = 0;
    while batch.len() < max {
        match rx.try_recv() {
            Ok(e) => batch.push(e),
            Err(broadcast::error::TryRecvError::Lagged(n)) => dropped += n,
            Err(_) => break,
        }
    }
    dropped
}

/// Shared handle.
pub type SharedEvents = Arc<Events>;
