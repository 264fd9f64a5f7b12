//! Semaphores and shared locks on etcd: keys held by several leases at once.
//!
//! The queue is the one of a plain lock — one key per caller under the lock's prefix, bound to
//! the session's lease, its create revision the fencing token — and who holds is decided by the
//! kinds of the keys ahead (see [`meta::granted`]): the first N keys of a semaphore of N, the
//! readers before the first writer (etcd's `rwmutex` recipe). Plain locks, `etcdctl lock` and
//! Go's `Mutex` share the queue: a plain key is exclusive with limit 1, so it holds alone and a
//! reader or a permit queued behind it waits for it.
//!
//! - **try-once**: reads the queue and, if the caller would hold, creates its key in a
//!   transaction that also checks no key under the prefix was created or changed since the read
//!   (a delete only makes room): nothing is ever left behind by a refusal.
//! - **waiting**: one transaction creates the key and reads the queue as of its creation. The
//!   waiter then needs no further reads: no key can come ahead of it later, so it counts the
//!   deletes of the keys ahead that this backend's queue watch of the lock reports (one etcd watch
//!   per lock and process, shared by its waiters) and is granted the moment the keys still ahead
//!   leave room. A delete wakes every waiter of the lock in this process, but only locally: none
//!   reads etcd until it is granted (no thundering herd on the store).
//! - **limit**: every key's value records its kind and limit; a caller whose limit differs from
//!   the first key's is refused with [`Error::LimitMismatch`] naming that one (a waiting caller
//!   deletes the key it queued first). Two callers racing with different limits are both held to
//!   the smaller one, never more.
//! - **giving up** at the end of a wait deletes our key only if the keys that keep it out are all
//!   still there (one transaction comparing their create revisions), so a key that became a holder
//!   unseen is never dropped silently; otherwise it is granted.

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp};
use tokio::time::Instant;

use super::meta::{self, Kind, Meta};
// `etcd_error`, `is_transient` and `unavailable` are used by `call_kv!`.
use super::{
    etcd_error, is_transient, lease_gone, lock, text, unavailable, Inner, Pending, QueueWatch, Slot, Waiting,
    MAX_SECRET,
};
use crate::error::{Error, Result};
use crate::types::{AcquireRequest, Grant};

/// The keys ahead of a waiting key, as of a revision: all it needs to tell when it holds.
pub(super) struct Ahead {
    /// What our key asks for.
    pub kind: Kind,
    /// The keys ahead of ours, in queue order.
    pub keys: Vec<Queued>,
    /// The revision they are as of: deletes after it are still to be applied.
    pub rev: i64,
}

/// One key of a queue.
pub(super) struct Queued {
    pub key: String,
    pub create_revision: i64,
    pub kind: Kind,
}

/// Most keys whose presence one giving-up transaction checks (etcd refuses more than
/// `--max-txn-ops`, 128 by default, comparisons included).
const MAX_COMPARED: usize = 100;

/// How often a try-once acquire reads the queue again when another caller changed it between its
/// read and its transaction.
const TRY_ONCE_ROUNDS: usize = 50;

fn vanished() -> Error {
    Error::Unavailable("etcd: our place in the queue vanished (the session's etcd lease ended)".into())
}

impl Inner {
    /// Acquires a semaphore permit or a shared lock (see the module documentation).
    pub(super) async fn acquire_many(
        &self,
        req: &AcquireRequest,
        kind: Kind,
        start: Instant,
    ) -> Result<Grant> {
        let pfx = self.lock_prefix(&req.key);
        let secret = &req.lease_id.as_str()[..req.lease_id.as_str().len().min(MAX_SECRET)];
        let value = meta::encode_value(&req.holder, secret, kind, req.value.as_deref());
        let queue_opts = GetOptions::new().with_prefix().with_sort(SortTarget::Create, SortOrder::Ascend);
        let try_once = !req.wait.waits();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let used = self.covering_session(req.ttl, start).await?;
            // Try-once: the queue first, and a creation only if we would hold, only if nothing was
            // created under the prefix since that read.
            let mut seen = None;
            if try_once {
                let resp = call_kv!(self, |c| c.get(pfx.as_str(), Some(queue_opts.clone())))?;
                let rev = resp.header().map_or(0, |h| h.revision());
                let queue: Vec<Meta> = resp.kvs().iter().map(|kv| meta::parse(kv.value())).collect();
                check_limit(&req.key, queue.first(), kind)?;
                if !meta::granted(queue.iter().map(|m| m.kind), kind) {
                    let kinds: Vec<Kind> = queue.iter().map(|m| m.kind).collect();
                    let newest = meta::holders(&kinds).checked_sub(1).and_then(|i| queue.get(i));
                    return Err(Error::Held {
                        key: req.key.clone(),
                        holder: newest.map(|m| m.holder.clone()),
                    });
                }
                seen = Some(rev);
            }
            let slot = Slot::take(&used.0);
            let my_key = format!("{pfx}{}", slot.name());
            let put =
                TxnOp::put(my_key.as_str(), value.as_str(), Some(PutOptions::new().with_lease(used.0.id)));
            let mut when = vec![Compare::create_revision(my_key.as_str(), CompareOp::Equal, 0)];
            let then = match seen {
                Some(rev) => {
                    when.push(Compare::mod_revision(pfx.as_str(), CompareOp::Less, rev + 1).with_prefix());
                    vec![put]
                }
                None => vec![put, TxnOp::get(pfx.as_str(), Some(queue_opts.clone()))],
            };
            let txn = Txn::new().when(when).and_then(then).or_else([TxnOp::get(my_key.as_str(), None)]);
            let resp = match call_kv!(self, |c| c.txn(txn.clone())) {
                Ok(resp) => resp,
                Err(e) if attempt < 2 && lease_gone(&e) => {
                    // The session's lease ended under us: a new one.
                    used.0.lost.store(true, std::sync::atomic::Ordering::Release);
                    self.forget_session(&used.0);
                    continue;
                }
                Err(e @ Error::Unavailable(_)) => {
                    // Perhaps applied with its answer lost: deleted soon if it exists.
                    self.unsure(my_key, value, used, slot);
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            let rev = resp.header().map_or(0, |h| h.revision());
            let mut gets = resp.op_responses().into_iter().filter_map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => Some(g),
                _ => None,
            });
            // Our key's create revision, and the queue as of its creation when the answer has it.
            let (my_rev, queue) = if resp.succeeded() {
                (rev, gets.next().map(|g| g.kvs().to_vec()))
            } else {
                match gets.next().and_then(|g| g.kvs().first().cloned()) {
                    // Ours, created by an attempt the call retried (its answer lost): read on.
                    Some(kv) if meta::secret(kv.value()) == Some(secret) => (kv.create_revision(), None),
                    _ => {
                        // Try-once: the queue changed since our read. Waiting: the name exists
                        // (never expected). Either way: again, with a fresh read and name.
                        slot.free();
                        if attempt >= TRY_ONCE_ROUNDS {
                            return Err(Error::Unavailable(format!(
                                "etcd: the queue of {:?} kept changing; not acquired",
                                req.key
                            )));
                        }
                        continue;
                    }
                }
            };
            if try_once {
                // Created only where we hold (checked against an unchanged queue).
                return Ok(self.granted(my_key, my_rev, req, secret, (used, slot), start));
            }
            // Our key exists: from here until a grant, dropping this deletes it.
            let pending = Pending { inner: self, key: &my_key, slot: Some(slot) };
            let (keys, snapshot) = match queue {
                Some(kvs) => (ahead_of(&kvs, my_rev), my_rev),
                None => self.read_ahead(&pfx, &my_key, my_rev, 0).await?,
            };
            let first = keys.first().map(|q| q.kind.limit);
            if let Some(limit) = first.filter(|l| *l != kind.limit) {
                pending.remove().await;
                return Err(Error::LimitMismatch { key: req.key.clone(), limit });
            }
            if meta::granted(keys.iter().map(|q| q.kind), kind) {
                let Some(slot) = pending.disarm() else {
                    return Err(Error::Unavailable("etcd: our key's name was given back".into()));
                };
                return Ok(self.granted(my_key.clone(), my_rev, req, secret, (used, slot), start));
            }
            let ahead = Some(Ahead { kind, keys, rev: snapshot });
            let waiting = Waiting { pfx: &pfx, my_key: &my_key, my_rev, secret, start, ahead };
            return self.wait_for_turn(waiting, pending, req, used).await;
        }
    }

    /// Waits until the keys ahead of ours leave it room, counting their deletes as this lock's
    /// queue watch reports them; at the deadline gives up (see [`Inner::give_up_many`]).
    /// `Ok(true)`: ours holds; `Ok(false)`: the wait ended and our key is deleted.
    pub(super) async fn wait_many(
        &self,
        pfx: &str,
        my_key: &str,
        my_rev: i64,
        ahead: Ahead,
        deadline: Option<Instant>,
    ) -> Result<bool> {
        let Ahead { kind, mut keys, mut rev } = ahead;
        let until = |d: Option<Instant>| async move {
            match d {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        loop {
            if meta::granted(keys.iter().map(|q| q.kind), kind) {
                return Ok(true);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return self.give_up_many(pfx, my_key, my_rev, kind, keys).await;
            }
            let queue = self.queue_watch(pfx).await?;
            let Some((mut deletes, seen)) = queue.listen() else { continue };
            if seen > rev {
                // The watch is past our snapshot: deletes in between would be missed; read the
                // queue as of where the watch is.
                (keys, rev) = self.read_ahead(pfx, my_key, my_rev, seen).await?;
            }
            loop {
                if meta::granted(keys.iter().map(|q| q.kind), kind) {
                    return Ok(true);
                }
                tokio::select! {
                    delete = deletes.rx.recv() => match delete {
                        Some((key, at)) if at > rev => {
                            if key == my_key {
                                return Err(vanished());
                            }
                            keys.retain(|q| q.key != key);
                        }
                        // Already in the snapshot.
                        Some(_) => {}
                        None => {
                            // The watch broke: look again (the latest state) after a short pause.
                            tokio::select! {
                                () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                                () = until(deadline) => {}
                            }
                            (keys, rev) = self.read_ahead(pfx, my_key, my_rev, 0).await?;
                            break;
                        }
                    },
                    () = until(deadline) => break,
                }
            }
        }
    }

    /// The keys ahead of ours as of revision `at` (0: the latest; or the latest when the member
    /// has not reached `at` or it was compacted), and the revision read. Our key gone:
    /// `Unavailable` (it went with the session's lease, or an operator freed it).
    async fn read_ahead(&self, pfx: &str, my_key: &str, my_rev: i64, at: i64) -> Result<(Vec<Queued>, i64)> {
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_max_create_revision(my_rev);
        let latest = || async {
            let resp = call_kv!(self, |c| c.get(pfx, Some(opts.clone())))?;
            let rev = resp.header().map_or(0, |h| h.revision());
            Ok::<_, Error>((resp, rev))
        };
        let (resp, rev) = if at > 0 {
            let snapshot = opts.clone().with_revision(at).with_serializable();
            match call_kv!(self, |c| c.get(pfx, Some(snapshot.clone()))) {
                Ok(resp) => (resp, at),
                Err(Error::Unavailable(m)) if m.contains("future revision") || m.contains("compacted") => {
                    latest().await?
                }
                Err(e) => return Err(e),
            }
        } else {
            latest().await?
        };
        if !resp.kvs().iter().any(|kv| kv.key() == my_key.as_bytes() && kv.create_revision() == my_rev) {
            return Err(vanished());
        }
        Ok((ahead_of(resp.kvs(), my_rev), rev))
    }

    /// At the end of a wait: deletes our key in one transaction that checks the keys keeping it
    /// out are all still there (`Ok(false)`), or finds that they no longer keep it out
    /// (`Ok(true)`: it holds). A plain delete could drop a key that had become a holder unseen,
    /// which for a moment would refuse others while nobody knew it held (see
    /// [`Inner::give_up_unless_first`]); past [`MAX_COMPARED`] keys that plain delete is all there
    /// is.
    async fn give_up_many(
        &self,
        pfx: &str,
        my_key: &str,
        my_rev: i64,
        kind: Kind,
        mut keys: Vec<Queued>,
    ) -> Result<bool> {
        for _ in 0..5 {
            if meta::granted(keys.iter().map(|q| q.kind), kind) {
                return Ok(true);
            }
            let blocking: Vec<&Queued> =
                match (kind.shared, keys.iter().find(|q| q.kind.shared != kind.shared)) {
                    // A reader is kept out by the last writer ahead; a permit by the first reader.
                    (true, _) => keys.iter().rev().find(|q| !q.kind.shared).into_iter().collect(),
                    (false, Some(reader)) => vec![reader],
                    // A permit kept out by the count of permits ahead: all of them.
                    (false, None) if keys.len() <= MAX_COMPARED => keys.iter().collect(),
                    (false, None) => break,
                };
            let still = blocking
                .iter()
                .map(|q| Compare::create_revision(q.key.as_str(), CompareOp::Equal, q.create_revision));
            let txn = Txn::new().when(still.collect::<Vec<_>>()).and_then([TxnOp::delete(my_key, None)]);
            if call_kv!(self, |c| c.txn(txn.clone()))?.succeeded() {
                return Ok(false);
            }
            (keys, _) = self.read_ahead(pfx, my_key, my_rev, 0).await?;
        }
        call_kv!(self, |c| c.delete(my_key, None))?;
        Ok(false)
    }
}

/// The keys of a queue (in create-revision order) ahead of the key created at `my_rev`.
fn ahead_of(kvs: &[etcd_client::KeyValue], my_rev: i64) -> Vec<Queued> {
    kvs.iter()
        .filter(|kv| kv.create_revision() < my_rev)
        .map(|kv| Queued {
            key: text(kv.key()),
            create_revision: kv.create_revision(),
            kind: meta::parse(kv.value()).kind,
        })
        .collect()
}

/// A caller's limit against the first key of the queue (which always holds): every holder of a
/// key names one limit.
fn check_limit(key: &str, first: Option<&Meta>, kind: Kind) -> Result<()> {
    match first {
        Some(m) if m.kind.limit != kind.limit => {
            Err(Error::LimitMismatch { key: key.to_owned(), limit: m.kind.limit })
        }
        _ => Ok(()),
    }
}

/// A waiter's feed of every delete of its lock's queue (see [`QueueWatch::listen`]); dropping it
/// withdraws it.
pub(super) struct Deletes<'a> {
    watch: &'a QueueWatch,
    id: u64,
    pub rx: tokio::sync::mpsc::UnboundedReceiver<(String, i64)>,
}

impl QueueWatch {
    /// Asks to be told of every delete of the queue (its key and revision); returns that, and the
    /// revision up to which deletes have been reported already (every later one will be). `None`
    /// once the watch has ended.
    pub(super) fn listen(&self) -> Option<(Deletes<'_>, i64)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut state = lock(&self.state);
        if self.broken.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let id = state.next_id;
        state.next_id += 1;
        state.listeners.push((id, tx));
        Some((Deletes { watch: self, id, rx }, state.seen))
    }
}

impl Drop for Deletes<'_> {
    fn drop(&mut self) {
        lock(&self.watch.state).listeners.retain(|(id, _)| *id != self.id);
    }
}
