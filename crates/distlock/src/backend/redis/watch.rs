//! [`Backend::watch`](crate::Backend::watch) on Redis: the status of one key now and after every
//! change, without polling.
//!
//! Every script that grants, releases or proclaims publishes `*` on the key's change channel
//! (`<prefix>:{key}:watch`, in the key's hash tag: sharded `SPUBLISH` on a cluster, as the
//! wake-ups). A feed registers on that channel through the backend's one pub/sub connection
//! ([`Wakeups`]) *before* it reads the status, so a change in between is not missed. An expiry
//! publishes nothing (Redis drops the lock by itself, the scripts drop lapsed holders), so the feed
//! also arms a timer at the earliest deadline the status showed and reads the key again then. A
//! read that shows the same holders, tokens and value as the last answer (a renewal, a waiter
//! joining) is not a change and is not answered.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::wakeups::{Registration, Wakeups};
use super::{LockKeys, Store};
use crate::backend::StatusWatch;
use crate::error::{Error, Result};
use crate::types::{LeaseId, LockInfo};

/// A change feed of one key (see the module docs).
pub(super) struct RedisWatch {
    store: Store,
    wakeups: Arc<Wakeups>,
    key: String,
    keys: LockKeys,
    /// This feed's name among the channel's registrations (never a lease id).
    id: String,
    registration: Option<Registration>,
    /// The last answer, and when it was read (its deadlines count from then).
    last: Option<(LockInfo, Instant)>,
    /// A change may have gone unseen (the subscription was renewed, a read failed): read again
    /// before waiting.
    stale: bool,
}

impl RedisWatch {
    /// Subscribes to the key's changes; [`Error::Unavailable`] when pub/sub cannot be reached.
    pub(super) async fn open(
        store: Store,
        wakeups: Arc<Wakeups>,
        key: &str,
        keys: LockKeys,
    ) -> Result<RedisWatch> {
        let mut watch = RedisWatch {
            store,
            wakeups,
            key: key.to_owned(),
            keys,
            id: LeaseId::generate().to_string(),
            registration: None,
            last: None,
            stale: true,
        };
        watch.subscribe().await?;
        Ok(watch)
    }

    /// Makes sure the subscription is live; a renewed one marks the feed stale.
    async fn subscribe(&mut self) -> Result<()> {
        if self.registration.as_ref().is_some_and(Registration::is_current) {
            return Ok(());
        }
        self.registration = None;
        self.stale = true;
        let registration = self
            .wakeups
            .register(&self.keys.changes, &self.id)
            .await
            .map_err(|e| Error::Unavailable(format!("redis pub/sub, watching {:?}: {e}", self.key)))?;
        self.registration = Some(registration);
        Ok(())
    }

    /// Sleeps until a change message arrives or the earliest deadline of the last answer passes.
    async fn until_change(&self) {
        let Some(registration) = &self.registration else { return };
        let expiry = self.last.as_ref().and_then(|(info, read)| next_deadline(info).map(|d| *read + d));
        match expiry {
            Some(at) => {
                tokio::select! {
                    _ = registration.notify.notified() => {}
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            None => registration.notify.notified().await,
        }
    }
}

/// How long after the status was read its first lease runs out, with a few ms to spare so that
/// Redis has dropped it by then (its clock and ours tick apart by a little).
fn next_deadline(info: &LockInfo) -> Option<Duration> {
    let first = info.holders.iter().map(|h| h.expires_in).chain(info.expires_in).min()?;
    Some(first + Duration::from_millis(5))
}

/// Whether two answers show the same holders, tokens and value (what a watcher is told of);
/// deadlines and waiters move without a change.
fn same(a: &LockInfo, b: &LockInfo) -> bool {
    let holders =
        |i: &LockInfo| i.holders.iter().map(|h| (h.holder.clone(), h.fencing_token)).collect::<Vec<_>>();
    (a.held, &a.holder, a.fencing_token, &a.value, a.limit, a.mode)
        == (b.held, &b.holder, b.fencing_token, &b.value, b.limit, b.mode)
        && holders(a) == holders(b)
}

#[async_trait]
impl StatusWatch for RedisWatch {
    async fn next(&mut self) -> Result<LockInfo> {
        loop {
            self.subscribe().await?;
            if !self.stale {
                self.until_change().await;
                // The connection may have dropped while waiting: subscribe again, then read.
                self.subscribe().await?;
            }
            let read = Instant::now();
            let info = match self.store.status(&self.key).await {
                Ok(info) => info,
                Err(e) => {
                    self.stale = true;
                    return Err(e);
                }
            };
            self.stale = false;
            let changed = !self.last.as_ref().is_some_and(|(last, _)| same(last, &info));
            self.last = Some((info.clone(), read));
            if changed {
                return Ok(info);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::HolderInfo;

    #[test]
    fn renewals_and_waiters_are_not_changes_but_holders_and_values_are() {
        let held = LockInfo {
            held: true,
            holder: Some("a".into()),
            fencing_token: Some(7),
            expires_in: Some(Duration::from_secs(3)),
            ..LockInfo::free("k", 0)
        };
        let renewed = LockInfo { expires_in: Some(Duration::from_secs(9)), waiters: 2, ..held.clone() };
        assert!(same(&held, &renewed));
        assert!(!same(&held, &LockInfo { value: Some("v".into()), ..held.clone() }));
        assert!(!same(&held, &LockInfo { fencing_token: Some(8), ..held.clone() }));
        let permit =
            |token| HolderInfo { holder: "p".into(), fencing_token: token, expires_in: Duration::ZERO };
        let one = LockInfo { holders: vec![permit(1)], ..held.clone() };
        assert!(!same(&one, &LockInfo { holders: vec![permit(1), permit(2)], ..held.clone() }));
        assert_eq!(next_deadline(&one), Some(Duration::from_millis(5)));
        assert_eq!(next_deadline(&LockInfo::free("k", 0)), None);
    }
}
