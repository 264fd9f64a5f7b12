//! Leader elections on etcd, as etcd's own `concurrency.Election`: a leader is the holder of a
//! plain lock whose key's value carries what it publishes (see [`meta`]); a proclamation
//! rewrites that value in place (etcd's `Proclaim`), and a key's change feed is an etcd watch of
//! the lock's prefix (etcd's `Observe`).

use std::sync::Arc;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, WatchOptions, WatchStream};
use tokio::time::Instant;

use super::meta;
// `etcd_error`, `is_transient` and `unavailable` are used by `call!`.
use super::{etcd_error, is_transient, lock, unavailable, Inner, LeaseName};
use crate::backend::StatusWatch;
use crate::error::{Error, Result};
use crate::types::{LeaseId, LockInfo, LockMode};

impl Inner {
    /// Replaces the value the key of `lease_id` publishes: one transaction that puts the new
    /// value only if the key still has the create revision read with the lease's secret (the
    /// same grant, not a later one under a reused name), keeping its etcd lease. A key that is
    /// gone, not this lease's, or whose deadline passed here unrenewed: [`Error::LeaseLost`].
    pub(super) async fn proclaim(&self, key: &str, lease_id: &LeaseId, value: &str) -> Result<()> {
        let Some(lease) = LeaseName::of(lease_id) else { return Err(Error::not_owner(key)) };
        let my_key = format!("{}{}", self.lock_prefix(key), lease.name);
        let resp = call!(@ self, kv, c, c.get(my_key.as_str(), None))?;
        let Some(kv) = resp.kvs().first().filter(|kv| lease.owns(kv.value())) else {
            return Err(Error::not_owner(key));
        };
        let lapsed = lock(&self.held)
            .locks
            .get(&my_key)
            .is_some_and(|h| lease.owns_held(h) && h.deadline <= Instant::now());
        if lapsed {
            // Its deadline passed; the expiry task is about to delete it.
            return Err(Error::not_owner(key));
        }
        let was = meta::parse(kv.value());
        let secret = meta::secret(kv.value()).unwrap_or_default();
        let new = meta::encode_value(&was.holder, secret, was.kind, Some(value));
        let txn = Txn::new()
            .when([Compare::create_revision(my_key.as_str(), CompareOp::Equal, kv.create_revision())])
            .and_then([TxnOp::put(
                my_key.as_str(),
                new.as_str(),
                Some(PutOptions::new().with_ignore_lease()),
            )]);
        match call!(@ self, kv, c, c.txn(txn.clone()))?.succeeded() {
            true => Ok(()),
            false => Err(Error::not_owner(key)),
        }
    }
}

/// What of a status a watcher is told about: everything but the times and the waiters (a
/// renewal, a key moved to another session and a caller queueing are not changes).
#[derive(PartialEq, Eq)]
struct Shown {
    held: bool,
    holder: Option<String>,
    fencing_token: Option<u64>,
    value: Option<String>,
    limit: Option<u32>,
    mode: Option<LockMode>,
    tokens: Vec<u64>,
}

impl Shown {
    fn of(info: &LockInfo) -> Shown {
        Shown {
            held: info.held,
            holder: info.holder.clone(),
            fencing_token: info.fencing_token,
            value: info.value.clone(),
            limit: info.limit,
            mode: info.mode,
            tokens: info.holders.iter().map(|h| h.fencing_token).collect(),
        }
    }
}

/// The change feed of one key (see [`StatusWatch`]): the status now, then the status after every
/// revision that changes what [`Shown`] shows, from one etcd watch of the lock's prefix started
/// just after the revision the first status was read at (so no change falls in between). A
/// broken watch is set up again from the revision last seen; a compacted one, from now.
pub(super) struct KeyWatch {
    inner: Arc<Inner>,
    key: String,
    stream: Option<WatchStream>,
    /// Every change up to this revision has been looked at.
    rev: i64,
    last: Option<Shown>,
}

impl KeyWatch {
    pub(super) fn new(inner: Arc<Inner>, key: &str) -> KeyWatch {
        KeyWatch { inner, key: key.to_owned(), stream: None, rev: 0, last: None }
    }

    /// The status now, and the watch from just after it.
    async fn restart(&mut self) -> Result<LockInfo> {
        let (info, rev) = self.inner.status_rev(&self.key).await?;
        self.rev = rev;
        self.stream = Some(self.open(rev + 1).await?);
        Ok(info)
    }

    async fn open(&self, from: i64) -> Result<WatchStream> {
        let pfx = self.inner.lock_prefix(&self.key);
        let opts = WatchOptions::new().with_prefix().with_start_revision(from);
        let inner = &*self.inner;
        call!(inner, |c| c.watch(pfx.as_str(), Some(opts.clone())))
    }

    /// `info` if it shows a change since the last status answered.
    fn changed(&mut self, info: LockInfo) -> Option<LockInfo> {
        let shown = Shown::of(&info);
        if self.last.as_ref() == Some(&shown) {
            return None;
        }
        self.last = Some(shown);
        Some(info)
    }
}

#[async_trait]
impl StatusWatch for KeyWatch {
    async fn next(&mut self) -> Result<LockInfo> {
        if self.last.is_none() {
            let info = self.restart().await?;
            self.last = Some(Shown::of(&info));
            return Ok(info);
        }
        loop {
            let Some(stream) = self.stream.as_mut() else {
                // Broken before: from the revision last seen (or from now if it was compacted).
                let from = self.rev + 1;
                self.stream = Some(self.open(from).await?);
                continue;
            };
            let msg = match stream.message().await {
                Ok(Some(msg)) => msg,
                Ok(None) | Err(_) => {
                    // A member died or the stream ended: once more from where we were; if that
                    // fails too, the caller hears `Unavailable` and the next call tries again.
                    self.stream = None;
                    let from = self.rev + 1;
                    self.stream = Some(self.open(from).await?);
                    continue;
                }
            };
            if msg.canceled() {
                self.stream = None;
                if msg.compact_revision() > 0 {
                    // The history we were to follow is compacted away: the status now.
                    let info = self.restart().await?;
                    match self.changed(info) {
                        Some(info) => return Ok(info),
                        None => continue,
                    }
                }
                return Err(Error::Unavailable(format!(
                    "etcd: the watch of {:?} was cancelled: {}",
                    self.key,
                    msg.cancel_reason()
                )));
            }
            if let Some(rev) = msg.events().iter().filter_map(|e| e.kv()).map(|kv| kv.mod_revision()).max() {
                self.rev = self.rev.max(rev);
            }
            if msg.events().is_empty() {
                continue;
            }
            let info = self.inner.status_rev(&self.key).await?.0;
            if let Some(info) = self.changed(info) {
                return Ok(info);
            }
        }
    }
}
