//! A lock's status on etcd, read from its queue in one request: every holder (the first keys by
//! create revision that [`meta::holders`] says hold), then the waiters in queue order.

use std::collections::HashMap;
use std::time::Duration;

use etcd_client::{GetOptions, KeyValue, SortOrder, SortTarget};
use tokio::time::Instant;

use super::meta::{self, Kind, Meta};
// `etcd_error`, `is_transient` and `unavailable` are used by `call!`.
use super::{etcd_error, is_transient, lock, text, unavailable, Inner};
use crate::error::{Error, Result};
use crate::types::{HolderInfo, LockInfo, LockMode};

/// A lock's queue as read: its keys in create-revision order, their values read, and how many of
/// them hold.
pub(super) struct Queue {
    pub kvs: Vec<KeyValue>,
    pub metas: Vec<Meta>,
    pub holders: usize,
    /// The revision it was read at.
    pub rev: i64,
}

impl Inner {
    /// Reads the queue of `key` (linearizable).
    pub(super) async fn queue(&self, key: &str) -> Result<Queue> {
        let pfx = self.lock_prefix(key);
        let opts = GetOptions::new().with_prefix().with_sort(SortTarget::Create, SortOrder::Ascend);
        let resp = call!(@ self, kv, c, c.get(pfx.as_str(), Some(opts.clone())))?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let kvs = resp.kvs().to_vec();
        let metas: Vec<Meta> = kvs.iter().map(|kv| meta::parse(kv.value())).collect();
        let kinds: Vec<Kind> = metas.iter().map(|m| m.kind).collect();
        let holders = meta::holders(&kinds);
        Ok(Queue { kvs, metas, holders, rev })
    }

    /// The status of `key`, and the revision it is as of. The time left of a holder granted or
    /// renewed through this backend is its own deadline; of any other, the time left on the etcd
    /// lease its key is bound to (asked once per lease).
    pub(super) async fn status_rev(&self, key: &str) -> Result<(LockInfo, i64)> {
        let queue = self.queue(key).await?;
        let Some(newest) = queue.holders.checked_sub(1) else {
            return Ok((LockInfo::free(key, 0), queue.rev));
        };
        let now = Instant::now();
        let mut lease_left: HashMap<i64, Duration> = HashMap::new();
        let mut holders = Vec::with_capacity(queue.holders);
        for (kv, meta) in queue.kvs.iter().zip(&queue.metas).take(queue.holders) {
            let own = lock(&self.held).locks.get(&text(kv.key())).map(|h| (h.deadline, h.ttl));
            let expires_in = match own {
                Some((deadline, _)) => deadline.saturating_duration_since(now),
                None => match lease_left.get(&kv.lease()) {
                    Some(left) => *left,
                    None => {
                        let lease = kv.lease();
                        let left =
                            call!(self, |c| c.lease_time_to_live(lease, None)).map(|t| t.ttl()).unwrap_or(0);
                        let left = Duration::from_secs(left.max(0) as u64);
                        lease_left.insert(lease, left);
                        left
                    }
                },
            };
            holders.push((
                HolderInfo {
                    holder: meta.holder.clone(),
                    fencing_token: kv.create_revision() as u64,
                    expires_in,
                },
                own,
            ));
        }
        let first = queue.metas[0].kind;
        let (last, own) = &holders[newest];
        let info = LockInfo {
            held: true,
            holder: Some(last.holder.clone()),
            fencing_token: Some(last.fencing_token),
            expires_in: Some(last.expires_in),
            ttl: own.map(|(_, ttl)| ttl),
            limit: (first.limit > 1).then_some(first.limit),
            mode: first.shared.then_some(LockMode::Shared),
            value: queue.metas[newest].value.clone(),
            holders: match first.many() {
                true => holders.into_iter().map(|(h, _)| h).collect(),
                false => Vec::new(),
            },
            ..LockInfo::free(key, (queue.kvs.len() - queue.holders) as u64)
        };
        Ok((info, queue.rev))
    }
}
