//! A held lease: automatic renewal, the loss signal, the conservative deadline, release on drop.
//!
//! This is the lease logic every backend shares. Each [`Lease`] has one keeper task that
//! renews it every `renew_every` (TTL/3 by default) and watches its deadline. The deadline is
//! counted on the local monotonic clock from *before* the request that granted or last renewed
//! the lease was sent, so the holder's view never outlives the store's: the loss signal fires at
//! `deadline - safety_margin` unless a renewal succeeded first, even when the store is
//! unreachable. Loss is final: a lost lease is never revived.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::backend::Backend;
use crate::error::{Error, LossReason, Result};
use crate::types::{Grant, LeaseId};

/// Where a lease stands, as its holder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Held and not past its deadline.
    Held,
    /// Lost for good.
    Lost(LossReason),
    /// Given back by its holder (released or dropped).
    Released,
}

/// When the lease's current TTL started counting, on the local monotonic clock.
#[derive(Debug, Clone, Copy)]
struct Timing {
    ttl: Duration,
    counted_from: Instant,
}

/// How the keeper task looks after a lease.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub auto_renew: bool,
    pub renew_every: Option<Duration>,
    pub safety_margin: Option<Duration>,
}

struct Shared {
    backend: Arc<dyn Backend>,
    key: String,
    lease_id: LeaseId,
    fencing_token: u64,
    policy: Policy,
    timing: watch::Sender<Timing>,
    state: watch::Sender<LeaseState>,
}

impl Shared {
    /// The instant the holder must consider the lease lost unless renewed first.
    fn alarm(&self, t: Timing) -> Instant {
        let margin = self.policy.safety_margin.unwrap_or(t.ttl / 10);
        let deadline = t.counted_from + t.ttl;
        deadline.checked_sub(margin).unwrap_or(t.counted_from).max(t.counted_from)
    }

    fn renew_every(&self, t: Timing) -> Duration {
        self.policy.renew_every.unwrap_or(t.ttl / 3).max(Duration::from_millis(1))
    }

    fn mark_lost(&self, reason: LossReason) {
        let changed = self.state.send_if_modified(|s| {
            if *s == LeaseState::Held {
                *s = LeaseState::Lost(reason);
                true
            } else {
                false
            }
        });
        if changed {
            tracing::warn!(key = %self.key, token = self.fencing_token, %reason, "lease lost");
        }
    }

    fn lost_error(&self) -> Error {
        let reason = match *self.state.borrow() {
            LeaseState::Lost(r) => r,
            _ => LossReason::NotOwner,
        };
        Error::LeaseLost { key: self.key.clone(), reason }
    }
}

/// A lock held by this process. Renewed automatically while held; released when dropped.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), distlock::Error> {
/// use distlock::{AcquireOptions, Locker};
///
/// let locker = Locker::open("memory://").await?;
/// let lease = locker.acquire("nightly-backup", &AcquireOptions::new()).await?;
/// // Hand the fencing token to the resource you write to, so it can refuse stale writers.
/// let token = lease.fencing_token();
/// let out = lease.run(async move { format!("backed up with token {token}") }).await?;
/// lease.release().await?;
/// # assert!(out.ends_with('1'));
/// # Ok(()) }
/// ```
pub struct Lease {
    shared: Arc<Shared>,
    released: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.shared.key)
            .field("fencing_token", &self.shared.fencing_token)
            .field("state", &*self.shared.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Starts looking after a fresh grant. `counted_from` must already be conservative.
    pub(crate) fn start(backend: Arc<dyn Backend>, key: String, grant: Grant, policy: Policy) -> Lease {
        let timing = Timing { ttl: grant.ttl, counted_from: grant.counted_from };
        let shared = Arc::new(Shared {
            backend,
            key,
            lease_id: grant.lease_id,
            fencing_token: grant.fencing_token,
            policy,
            timing: watch::Sender::new(timing),
            state: watch::Sender::new(LeaseState::Held),
        });
        tokio::spawn(keep(shared.clone()));
        Lease { shared, released: false }
    }

    /// The store the lease lives in.
    pub(crate) fn backend(&self) -> &Arc<dyn Backend> {
        &self.shared.backend
    }

    /// The key as stored (namespace included).
    pub fn key(&self) -> &str {
        &self.shared.key
    }

    /// The secret that allows renew and release; give it only to whoever must release the lease.
    pub fn lease_id(&self) -> &LeaseId {
        &self.shared.lease_id
    }

    /// The fencing token of this grant: higher than that of every earlier grant of the key.
    pub fn fencing_token(&self) -> u64 {
        self.shared.fencing_token
    }

    /// The TTL of the last grant or renewal.
    pub fn ttl(&self) -> Duration {
        self.shared.timing.borrow().ttl
    }

    /// The instant until which this holder may act on the lease: the deadline counted from before
    /// the last successful grant or renewal was requested, less the safety margin.
    pub fn safe_until(&self) -> Instant {
        self.shared.alarm(*self.shared.timing.borrow())
    }

    /// Where the lease stands.
    pub fn state(&self) -> LeaseState {
        *self.shared.state.borrow()
    }

    /// `true` while the lease is held and before [`Lease::safe_until`].
    pub fn is_held(&self) -> bool {
        self.state() == LeaseState::Held && Instant::now() < self.safe_until()
    }

    /// A handle that other tasks can await loss on.
    pub fn watch(&self) -> LeaseWatch {
        LeaseWatch { rx: self.shared.state.subscribe() }
    }

    /// Completes when the lease is lost (renewal refused, or the deadline passed unrenewed).
    pub async fn lost(&self) -> LossReason {
        let mut rx = self.shared.state.subscribe();
        // While `self` is borrowed the lease cannot be released, so this ends only in loss.
        loop {
            if let LeaseState::Lost(reason) = *rx.borrow_and_update() {
                return reason;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Runs `work` while the lease is held; if the lease is lost first, `work` is dropped
    /// (cancelled) and [`Error::LeaseLost`] is returned.
    pub async fn run<F: Future>(&self, work: F) -> Result<F::Output> {
        tokio::select! {
            biased;
            reason = self.lost() => Err(Error::LeaseLost { key: self.shared.key.clone(), reason }),
            out = work => Ok(out),
        }
    }

    /// Renews the lease now for the TTL it was granted (or last renewed) with, as the store keeps
    /// it; automatic renewal does this on its own.
    pub async fn renew(&self) -> Result<()> {
        if self.state() != LeaseState::Held {
            return Err(self.shared.lost_error());
        }
        renew_once(&self.shared, None).await
    }

    /// Renews the lease now with a new TTL (validated like an acquire's).
    pub async fn renew_with_ttl(&self, ttl: Duration) -> Result<()> {
        crate::validate::ttl(ttl)?;
        if self.state() != LeaseState::Held {
            return Err(self.shared.lost_error());
        }
        renew_once(&self.shared, Some(ttl)).await
    }

    /// Releases the lease. Fails with [`Error::LeaseLost`] when the store no longer holds it.
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        self.shared.state.send_if_modified(|s| {
            let held = *s == LeaseState::Held;
            if held {
                *s = LeaseState::Released;
            }
            held
        });
        self.shared.backend.release(&self.shared.key, &self.shared.lease_id).await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.shared.state.send_if_modified(|s| {
            let held = *s == LeaseState::Held;
            if held {
                *s = LeaseState::Released;
            }
            held
        });
        // Never block in Drop: release in the background when a runtime is there; otherwise the
        // lease simply expires by its TTL.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            handle.spawn(async move {
                if let Err(e) = shared.backend.release(&shared.key, &shared.lease_id).await {
                    tracing::debug!(key = %shared.key, error = %e, "background release of dropped lease failed");
                }
            });
        }
    }
}

/// A cloneable view of a lease's state, for tasks that must stop when the lease is lost.
#[derive(Debug, Clone)]
pub struct LeaseWatch {
    rx: watch::Receiver<LeaseState>,
}

impl LeaseWatch {
    /// Completes with the reason when the lease is lost, or with `None` once it was released.
    pub async fn lost(&mut self) -> Option<LossReason> {
        loop {
            match *self.rx.borrow_and_update() {
                LeaseState::Lost(reason) => return Some(reason),
                LeaseState::Released => return None,
                LeaseState::Held => {}
            }
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// The current state.
    pub fn state(&self) -> LeaseState {
        *self.rx.borrow()
    }
}

/// One renewal request, bounded by the lease's alarm: succeeds, or marks the lease lost. `None`
/// renews for the TTL the store holds for the lease (the one asked for at grant or last renewal),
/// not the grant's TTL as the holder saw it, which a backend may have shortened (Redlock subtracts
/// its drift allowance) and which would otherwise shrink with every automatic renewal.
async fn renew_once(shared: &Shared, ttl: Option<Duration>) -> Result<()> {
    let alarm = shared.alarm(*shared.timing.borrow());
    let sent = Instant::now();
    let result = tokio::select! {
        r = shared.backend.renew(&shared.key, &shared.lease_id, ttl) => r,
        _ = tokio::time::sleep_until(alarm) => {
            shared.mark_lost(LossReason::Expired);
            return Err(shared.lost_error());
        }
    };
    match result {
        Ok(grant) => {
            if *shared.state.borrow() != LeaseState::Held {
                return Err(shared.lost_error());
            }
            let counted_from = if crate::planted::active(crate::planted::Bug::RenewalFromAnswer) {
                Instant::now()
            } else {
                sent
            };
            shared.timing.send_replace(Timing { ttl: grant.ttl, counted_from });
            Ok(())
        }
        Err(Error::LeaseLost { .. }) => {
            shared.mark_lost(LossReason::NotOwner);
            Err(shared.lost_error())
        }
        Err(e) => Err(e),
    }
}

/// The keeper task: renews on schedule, retries failed renewals until the alarm, fires the loss
/// signal at the alarm, and exits when the lease is lost or given back.
async fn keep(shared: Arc<Shared>) {
    let mut state_rx = shared.state.subscribe();
    let mut timing_rx = shared.timing.subscribe();
    let first = *timing_rx.borrow_and_update();
    let mut next_renew = first.counted_from + shared.renew_every(first);
    loop {
        if *state_rx.borrow_and_update() != LeaseState::Held {
            return;
        }
        let timing = *timing_rx.borrow_and_update();
        let alarm = shared.alarm(timing);
        let renew_at = shared.policy.auto_renew.then_some(next_renew);
        tokio::select! {
            changed = state_rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = timing_rx.changed() => {
                // Renewed by hand: count the next automatic renewal from there.
                let t = *timing_rx.borrow();
                next_renew = t.counted_from + shared.renew_every(t);
            }
            _ = tokio::time::sleep_until(alarm) => {
                shared.mark_lost(LossReason::Expired);
                return;
            }
            _ = sleep_until_opt(renew_at) => {
                let outcome = tokio::select! {
                    r = renew_once(&shared, None) => r,
                    _ = state_rx.changed() => return,
                };
                match outcome {
                    Ok(()) => {
                        let t = *timing_rx.borrow();
                        next_renew = t.counted_from + shared.renew_every(t);
                    }
                    Err(Error::LeaseLost { .. }) => return,
                    Err(e) => {
                        // The store did not answer: try again soon; the alarm still bounds it all.
                        let retry = (shared.renew_every(timing) / 4).max(Duration::from_millis(10));
                        tracing::debug!(key = %shared.key, error = %e, ?retry, "renewal failed; retrying");
                        next_renew = Instant::now() + retry;
                    }
                }
            }
        }
    }
}

async fn sleep_until_opt(when: Option<Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(when).await,
        None => std::future::pending().await,
    }
}
