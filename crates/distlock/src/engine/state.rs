//! The engine's state behind its one mutex: the table, the wait queues, the counters and the
//! observer. Every access first expires what is due, so no caller ever sees a lapsed lease.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::observer::{Observer, TableEvent};
use super::queue::Waiter;
use super::saved::SavedLease;
use super::table::LeaseTable;

/// What the engine's handles and its expiry task share.
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// Wakes the expiry task when a deadline earlier than its current one appears, or on shutdown.
    pub(super) expiry_changed: Notify,
}

/// Everything under the mutex. Never held across an `.await`.
#[derive(Default)]
pub(super) struct State {
    pub(super) table: LeaseTable,
    /// The callers waiting for each held key, first in line first.
    pub(super) queues: HashMap<String, VecDeque<Waiter>>,
    /// Set when the engine is dropped: the expiry task ends.
    pub(super) shutdown: bool,
    pub(super) expired_total: u64,
    pub(super) observer: Option<Observer>,
    /// The change feeds of watched keys (see `watch.rs`); empty unless someone watches.
    pub(super) watchers: HashMap<String, tokio::sync::watch::Sender<()>>,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the table half-updated in a way that breaks
        // mutual exclusion (every mutation is a single map operation), so keep serving.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the state after purging what has expired, and wakes the expiry task when `f`
    /// moved the earliest deadline forward in time.
    pub(super) fn with_state<T>(&self, now: Instant, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.lock();
        state.purge(now);
        let before = state.table.next_expiry();
        let out = f(&mut state);
        let after = state.table.next_expiry();
        drop(state);
        if matches!((before, after), (None, Some(_)))
            || matches!((before, after), (Some(b), Some(a)) if a < b)
        {
            self.expiry_changed.notify_one();
        }
        out
    }
}

impl State {
    /// Expires due leases and hands each freed key to its next waiter.
    pub(super) fn purge(&mut self, now: Instant) {
        for (key, limit, entry) in self.table.purge_expired(now) {
            tracing::debug!(key = %key, "lease expired");
            self.expired_total += 1;
            if let Some(observe) = &self.observer {
                observe(TableEvent::Expired(&SavedLease::of(&key, limit, entry)));
            }
            self.hand_off(&key, now);
        }
    }
}
