//! The callers waiting for a held key, first come first served, and the hand-off: a freed key
//! goes to the first waiter still waiting inside the critical section that freed it, so a
//! newcomer can never jump the queue.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::observer::TableEvent;
use super::state::State;
use super::Engine;
use crate::types::{AcquireRequest, Grant};

/// A caller blocked in `acquire`: it gets its grant through `tx`.
pub(super) struct Waiter {
    /// What it asked for (its limit is the key's, when it queued).
    pub(super) req: AcquireRequest,
    pub(super) since: Instant,
    pub(super) tx: oneshot::Sender<Grant>,
}

/// A caller waiting for a key, as [`Engine::waiting_on`] and [`crate::Backend::waiters`] report
/// it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WaiterInfo {
    /// The waiter's holder label.
    pub holder: String,
    /// How long it has waited so far.
    #[serde(rename = "waiting_ms", serialize_with = "as_millis")]
    pub waiting: Duration,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

impl State {
    /// A lease of `key` has just been freed: grant it to the first waiters still waiting, in
    /// order, while the key has room (one waiter for a lock; for a semaphore, as many as there
    /// are free permits; every shared waiter up to the first exclusive one).
    pub(super) fn hand_off(&mut self, key: &str, now: Instant) {
        self.changed(key);
        let Some(queue) = self.queues.get_mut(key) else { return };
        let late_waiter_granted = crate::planted::active(crate::planted::Bug::LateWaiterGranted);
        while let Some(w) = queue.pop_front() {
            if w.tx.is_closed() && !late_waiter_granted {
                continue;
            }
            let Ok(grant) = self.table.grant(&w.req, now) else {
                // No room left (or, for the first, cannot happen: the key was just freed); the
                // waiter keeps its place.
                queue.push_front(w);
                break;
            };
            // A waiter that gave up between the check and the send: undo, try the next one.
            if let Err(grant) = w.tx.send(grant) {
                if !late_waiter_granted {
                    let _ = self.table.release(key, &grant.lease_id, now);
                }
            }
        }
        if queue.is_empty() {
            self.queues.remove(key);
        }
    }

    /// Puts `waiter` at the end of the queue of `key`.
    pub(super) fn enqueue(&mut self, key: &str, waiter: Waiter) {
        if let Some(observe) = &self.observer {
            observe(TableEvent::Queued { key, holder: &waiter.req.holder });
        }
        let queue = self.queues.entry(key.to_owned()).or_default();
        queue.push_back(waiter);
        // Waiters that timed out stay in the queue until skipped; sweep them when the queue
        // doubles, which keeps the cost amortised O(1) per waiter.
        if queue.len().is_power_of_two() && queue.len() >= 64 {
            queue.retain(|w| !w.tx.is_closed());
        }
    }

    /// How many callers still wait for `key`.
    pub(super) fn waiters(&self, key: &str) -> u64 {
        self.queues.get(key).map_or(0, |q| q.iter().filter(|w| !w.tx.is_closed()).count() as u64)
    }
}

impl Engine {
    /// The callers waiting for `key`, first in line first.
    pub fn waiting_on(&self, key: &str) -> Vec<WaiterInfo> {
        let now = Instant::now();
        self.shared.with_state(now, |s| {
            s.queues.get(key).map_or_else(Vec::new, |q| {
                q.iter()
                    .filter(|w| !w.tx.is_closed())
                    .map(|w| WaiterInfo { holder: w.req.holder.clone(), waiting: now - w.since })
                    .collect()
            })
        })
    }
}
