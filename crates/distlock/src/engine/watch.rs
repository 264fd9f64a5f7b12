//! Change feeds of single keys, for leader elections ([`crate::Locker::observe`]) and the lock
//! server's `GET /v1/locks/{key}/watch`: a watcher of a key is woken by every grant, release,
//! expiry, force-release and proclamation of it, and then reads the key's status afresh.
//!
//! One `tokio::sync::watch` channel per watched key, made by its first watcher and dropped with
//! its last; a key nobody watches costs a change one check of an empty map. A watcher that is
//! slow to read sees the latest status, not every step (as etcd's `Observe` may skip values).

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use super::state::{Shared, State};
use super::Engine;
use crate::backend::StatusWatch;
use crate::error::{Error, Result};
use crate::types::LockInfo;

impl State {
    /// `key` changed (granted, freed, or its value replaced): wakes its watchers.
    pub(super) fn changed(&mut self, key: &str) {
        if self.watchers.is_empty() {
            return;
        }
        if let Some(tx) = self.watchers.get(key) {
            tx.send_replace(());
        }
    }
}

/// The change feed of one key of an [`Engine`] (see [`Engine::watch`]).
pub struct KeyWatch {
    shared: Arc<Shared>,
    key: String,
    /// Always `Some` until dropped (taken in `drop`, under the engine's lock).
    rx: Option<watch::Receiver<()>>,
    started: bool,
}

impl std::fmt::Debug for KeyWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyWatch").field("key", &self.key).finish()
    }
}

impl Engine {
    /// Starts watching `key` (see [`StatusWatch`]).
    pub fn watch(&self, key: &str) -> KeyWatch {
        let mut state = self.shared.lock();
        let rx = match state.watchers.get(key) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(());
                state.watchers.insert(key.to_owned(), tx);
                rx
            }
        };
        KeyWatch { shared: self.shared.clone(), key: key.to_owned(), rx: Some(rx), started: false }
    }

    /// The status of `key` once every grant of it that was unconfirmed at the call is confirmed
    /// or gone (see [`LeaseTable::require_confirmation`]); at once when none is. Status cuts at
    /// the oldest unconfirmed grant; waiting for the grants unconfirmed at the call means a grant
    /// that anything answered before the call could have rested on (a `lock_held` refusal, an
    /// earlier read) is shown, while grants made after the call cannot keep the answer waiting.
    /// The wait lasts one sync of the store's log (as long as the disk takes).
    ///
    /// [`LeaseTable::require_confirmation`]: super::LeaseTable::require_confirmation
    pub async fn settled_status(&self, key: &str) -> Result<LockInfo> {
        let now = Instant::now();
        let pending = self.shared.with_state(now, |s| s.table.unconfirmed(key, now));
        if pending.is_empty() {
            return Ok(self.status(key));
        }
        let mut watch = self.watch(key);
        watch.started = true;
        watch.settle(&pending).await
    }
}

impl KeyWatch {
    /// The key's status now (first call), then after each change (see [`StatusWatch::next`]),
    /// settled as [`Engine::settled_status`] is.
    pub async fn next(&mut self) -> Result<LockInfo> {
        let rx = self.rx.as_mut().ok_or_else(dropped)?;
        if self.started {
            rx.changed().await.map_err(|_| dropped())?;
        }
        self.started = true;
        let now = Instant::now();
        let pending = self.shared.with_state(now, |s| s.table.unconfirmed(&self.key, now));
        self.settle(&pending).await
    }

    /// Answers the key's status once none of the grants `pending` (tokens) is unconfirmed.
    async fn settle(&mut self, pending: &[u64]) -> Result<LockInfo> {
        let key = self.key.as_str();
        let rx = self.rx.as_mut().ok_or_else(dropped)?;
        loop {
            // Marks what is read below as seen: a change after this wakes the next wait.
            rx.borrow_and_update();
            let now = Instant::now();
            let (info, waiting) = self.shared.with_state(now, |s| {
                let waiting = s.table.unconfirmed(key, now).iter().any(|t| pending.contains(t));
                (LockInfo { waiters: s.waiters(key), ..s.table.info(key, now) }, waiting)
            });
            if !waiting {
                return Ok(info);
            }
            rx.changed().await.map_err(|_| dropped())?;
        }
    }
}

fn dropped() -> Error {
    Error::Unavailable("the memory backend was dropped".into())
}

#[async_trait]
impl StatusWatch for KeyWatch {
    async fn next(&mut self) -> Result<LockInfo> {
        KeyWatch::next(self).await
    }
}

impl Drop for KeyWatch {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        // The receiver goes under the lock, so of two last watchers leaving at once the second
        // to take the lock sees none left and removes the channel.
        drop(self.rx.take());
        if state.watchers.get(&self.key).is_some_and(|tx| tx.receiver_count() == 0) {
            state.watchers.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last two watchers of a key leaving at the same moment, from two threads: the channel
    /// goes with them (each saw the other's receiver while it dropped, and neither removed it).
    #[test]
    fn the_last_watchers_leaving_together_remove_the_channel() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let engine = runtime.block_on(async { Engine::new() }).unwrap();
        for _ in 0..500 {
            let (a, b) = (engine.watch("k"), engine.watch("k"));
            let start = std::sync::Arc::new(std::sync::Barrier::new(2));
            let other = {
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    drop(a);
                })
            };
            start.wait();
            drop(b);
            other.join().unwrap();
            assert!(engine.shared.lock().watchers.is_empty(), "a channel nobody watches was left");
        }
    }
}
