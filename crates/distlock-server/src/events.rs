//! What just happened on this server, for the live web page: grants, releases, expiries, lost
//! leases, callers queueing, wait timeouts and force-releases, fanned out to every `GET /v1/events` stream.
//!
//! The stream is server-sent events. Events are batched: at most ten `events` messages a second,
//! each a JSON array, so a browser keeps up with thousands of events a second; a `stats` message
//! every second carries the server facts (store, uptime, leases, waiters, grants per second). A
//! subscriber too slow to keep up loses the oldest events and is told how many (`dropped`).
//!
//! Every event is also kept in the [`History`] (whether anyone listens or not): a new subscriber
//! first gets the last events, the timeline of the busiest and longest-held keys and the series
//! (`history`), taken under the same lock that orders the live updates, so nothing is missed or
//! sent twice between the two.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use distlock::wire;
use serde::{Serialize, Serializer};
use tokio::sync::broadcast;

use crate::history::{History, Note, Span};

pub use distlock::wire::EventKind;

/// One event, as the server keeps it (its strings shared with the history's other events);
/// written as a [`distlock::wire::Event`].
#[derive(Debug, Clone)]
pub struct Event {
    /// Consecutive from 1 in this server's run: the cursor of `GET /v1/events?since=ID`.
    pub id: u64,
    /// What happened.
    pub kind: EventKind,
    /// The lock.
    pub key: Arc<str>,
    /// The holder label (of the lease; of the caller for waits), where known.
    pub holder: Option<Arc<str>>,
    /// The lease's fencing token, where known.
    pub fencing_token: Option<u64>,
    /// Wall-clock time, ms since the Unix epoch.
    pub at_ms: u64,
    /// How long the lease was held, for its end (release, expiry, lost, force-release), when this
    /// server saw the grant.
    pub held_ms: Option<u64>,
    /// How long the caller waited in the queue: on a grant after waiting (a hand-off), and on
    /// `wait_timeout` and `wait_cancelled`.
    pub waited_ms: Option<u64>,
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        wire::Event {
            id: self.id,
            kind: self.kind,
            key: &*self.key,
            holder: self.holder.as_deref(),
            fencing_token: self.fencing_token,
            at_ms: self.at_ms,
            held_ms: self.held_ms,
            waited_ms: self.waited_ms,
        }
        .serialize(s)
    }
}

/// What one recorded event changed: the event and the timeline spans it opened or closed.
#[derive(Debug)]
pub struct Update {
    /// The event.
    pub event: Event,
    /// Spans opened, closed or amended (a later version of a span has the same id).
    pub spans: Vec<Span>,
}

/// The server's event fan-out, its history and its counters.
pub struct Events {
    tx: broadcast::Sender<Arc<Update>>,
    started: Instant,
    grants: AtomicU64,
    history: Mutex<History>,
    /// Keys the lease fingerprints (the ids themselves are never kept).
    hasher: RandomState,
}

/// Events kept by default (`--event-history`).
pub const DEFAULT_EVENT_HISTORY: usize = 10_000;

/// How many events a slow subscriber may fall behind before it loses the oldest.
const BACKLOG: usize = 16_384;

impl Default for Events {
    fn default() -> Self {
        Events::new(DEFAULT_EVENT_HISTORY)
    }
}

/// Wall-clock time, ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Events {
    /// A fan-out that keeps the last `history` events (at least 1) and the timeline.
    pub fn new(history: usize) -> Events {
        Events {
            tx: broadcast::channel(BACKLOG).0,
            started: Instant::now(),
            grants: AtomicU64::new(0),
            history: Mutex::new(History::new(history)),
            hasher: RandomState::new(),
        }
    }

    /// Records an event.
    pub fn publish(&self, kind: EventKind, key: &str, holder: Option<&str>, fencing_token: Option<u64>) {
        self.record(kind, key, holder, fencing_token, 0);
    }

    /// Records an event of the lease `lease` (its id ties a release or a lost lease to its grant
    /// on the timeline; only a keyed fingerprint of it is kept).
    pub fn publish_lease(
        &self,
        kind: EventKind,
        key: &str,
        holder: Option<&str>,
        fencing_token: Option<u64>,
        lease: &distlock::LeaseId,
    ) {
        let fingerprint = self.hasher.hash_one(lease.as_str()) | 1;
        self.record(kind, key, holder, fencing_token, fingerprint);
    }

    fn record(
        &self,
        kind: EventKind,
        key: &str,
        holder: Option<&str>,
        fencing_token: Option<u64>,
        lease: u64,
    ) {
        if kind == EventKind::Grant {
            self.grants.fetch_add(1, Ordering::Relaxed);
        }
        let note = Note { kind, key, holder, fencing_token, lease, at_ms: now_ms() };
        let mut spans = Vec::new();
        // Sent under the history's lock, so that a new subscriber's snapshot and its live updates
        // neither overlap nor leave a gap.
        let mut history = self.lock();
        let event = history.record(note, &mut spans);
        if self.listening() {
            let _ = self.tx.send(Arc::new(Update { event, spans }));
        }
    }

    fn lock(&self) -> MutexGuard<'_, History> {
        // Every change to the history is a few collection operations; a panic in one leaves
        // nothing that would make the rest wrong, so keep serving.
        self.history.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the history.
    pub fn with_history<T>(&self, read: impl FnOnce(&History) -> T) -> T {
        read(&self.lock())
    }

    /// A new subscription and what `first` takes from the history at the same moment: every
    /// update after it, and none before, arrives on the receiver.
    pub fn subscribe_with<T>(
        &self,
        first: impl FnOnce(&History) -> T,
    ) -> (T, broadcast::Receiver<Arc<Update>>) {
        let history = self.lock();
        let rx = self.tx.subscribe();
        (first(&history), rx)
    }

    /// Whether anyone subscribes now (callers skip building event data otherwise).
    pub fn listening(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// A new subscription.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Update>> {
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
pub fn drain(rx: &mut broadcast::Receiver<Arc<Update>>, batch: &mut Vec<Arc<Update>>, max: usize) -> u64 {
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
