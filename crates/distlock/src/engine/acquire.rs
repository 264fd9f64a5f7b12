//! The engine's acquire: a grant when the key is free, otherwise a place at the end of the key's
//! queue until the hand-off, the wait's end or the caller's cancellation. A grant that races the
//! end of a wait is taken rather than lost, and one that races a cancellation is given back at
//! once instead of holding the key for nobody until its TTL runs out.

use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::queue::Waiter;
use super::state::Shared;
use super::Engine;
use crate::error::{Error, Result};
use crate::types::{AcquireRequest, Grant, LockMode};

/// The first, non-waiting step of an acquire.
enum Attempt {
    Granted(Grant),
    Queued,
}

/// A grant in flight to a waiter. If the waiting `acquire` is cancelled (its future dropped or
/// timed out) after the grant was made, dropping this releases the lease at once instead of
/// leaving the key held by nobody until its TTL runs out.
struct PendingGrant {
    rx: oneshot::Receiver<Grant>,
    shared: Arc<Shared>,
    key: String,
}

impl PendingGrant {
    /// Stops waiting and returns a grant that arrived meanwhile, if any.
    fn take_late_grant(&mut self) -> Option<Grant> {
        self.rx.close();
        self.rx.try_recv().ok()
    }
}

impl Drop for PendingGrant {
    fn drop(&mut self) {
        if let Some(grant) = self.take_late_grant() {
            let now = Instant::now();
            self.shared.with_state(now, |s| {
                if s.table.release(&self.key, &grant.lease_id, now).is_ok() {
                    s.hand_off(&self.key, now);
                }
            });
        }
    }
}

impl Engine {
    /// Grants `req.key` to `req.lease_id`, waiting in line as `req.wait` says. Same rules as
    /// [`crate::Backend::acquire`]; the grant is counted from the instant it was made.
    pub async fn acquire(&self, req: AcquireRequest) -> Result<Grant> {
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        let queued = self.shared.with_state(started, |s| {
            // A shared request must not pass a waiting exclusive one (no writer starvation): with
            // live waiters queued it queues too. (Exclusive requests and permits find a key with
            // room only when its queue is empty: a freed place is handed off at once.)
            let attempt = if req.mode == LockMode::Shared && s.waiters(&req.key) > 0 {
                let holder = s.table.live(&req.key, started).map(|e| e.holder.clone());
                Err(Error::Held { key: req.key.clone(), holder })
            } else {
                s.table.grant(&req, started)
            };
            match attempt {
                Ok(grant) => {
                    // An unconfirmed grant changes no status yet; its confirmation wakes watchers.
                    if !s.table.requires_confirmation() {
                        s.changed(&req.key);
                    }
                    Ok(Attempt::Granted(grant))
                }
                Err(held @ Error::Held { .. }) if !req.wait.waits() => Err(held),
                Err(Error::Held { .. }) => {
                    let waiter = Waiter { req: req.clone(), since: started, tx };
                    s.enqueue(&req.key, waiter);
                    Ok(Attempt::Queued)
                }
                // Another limit than the key's: refused at once, waiting would not change it.
                Err(other) => Err(other),
            }
        })?;
        if let Attempt::Granted(grant) = queued {
            return Ok(grant);
        }

        let mut pending = PendingGrant { rx, shared: self.shared.clone(), key: req.key.clone() };
        let outcome = match req.wait.limit() {
            Some(wait) => tokio::time::timeout(wait, &mut pending.rx).await.ok(),
            None => Some((&mut pending.rx).await),
        };
        match outcome {
            Some(Ok(grant)) => Ok(grant),
            Some(Err(_)) => Err(Error::Unavailable("the memory backend was dropped".into())),
            None => match pending.take_late_grant() {
                Some(grant) => Ok(grant),
                None => {
                    let now = Instant::now();
                    let holder = self
                        .shared
                        .with_state(now, |s| s.table.live(&req.key, now).map(|e| e.holder.clone()));
                    Err(Error::WaitTimeout { key: req.key, holder, waited: now - started })
                }
            },
        }
    }
}
