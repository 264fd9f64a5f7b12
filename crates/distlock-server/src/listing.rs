//! `GET /v1/locks` in another order than by key, paged: `sort=held_for` (longest held first) and
//! `sort=waiters` (most waiters first).
//!
//! The store lists in key order only, so the server reads every matching lock in key-ordered
//! chunks (the embedded store's table lock is held for one chunk at a time, never for the whole
//! walk) and keeps the best `limit + 1` in a bounded heap: a page costs a walk of the matching
//! locks and memory for one page.
//!
//! Paging: a page's `next` is a cursor that names the sort, the last lock's sort value and its key
//! (`held_for:TOKEN:KEY`, `waiters:N:KEY`); pass it back as `after` with the same `sort`.
//! - `held_for` orders by grant, earliest first, i.e. by fencing token (every store's tokens rise
//!   with each grant; on the embedded store this is exactly descending `held_for_ms`). A lock's
//!   token does not change while it is held, so paging is exact: a lock held throughout appears
//!   once, on the right page; one granted meanwhile sorts after every older one (a later page).
//! - `waiters` orders by the number of waiters, most first, ties by key. Counts change while one
//!   pages, so a lock whose count changes between pages may be listed twice or not at all; read
//!   one page (up to 10,000 locks) for a consistent view.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use distlock::{Backend, Error, ListQuery, LockInfo, LockPage};

/// The order of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    /// By key, byte order (the store's own order; `after` is a key).
    Key,
    /// Longest held first: by grant (fencing token), earliest first.
    HeldFor,
    /// Most waiters first, ties by key.
    Waiters,
}

impl Sort {
    /// Parses `key`, `held_for` or `waiters`.
    pub fn parse(text: &str) -> Result<Sort, String> {
        match text {
            "key" | "" => Ok(Sort::Key),
            "held_for" => Ok(Sort::HeldFor),
            "waiters" => Ok(Sort::Waiters),
            other => Err(format!("sort must be key, held_for or waiters, not {other:?}")),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Sort::Key => "key",
            Sort::HeldFor => "held_for",
            Sort::Waiters => "waiters",
        }
    }

    /// The position of `info` in this order: smaller first, ties by key.
    fn rank(self, info: &LockInfo) -> u64 {
        match self {
            Sort::Key => 0,
            Sort::HeldFor => info.fencing_token.unwrap_or(u64::MAX),
            Sort::Waiters => u64::MAX - info.waiters,
        }
    }

    /// The sort value shown in a cursor (the token; the waiter count).
    fn value(self, rank: u64) -> u64 {
        match self {
            Sort::Waiters => u64::MAX - rank,
            _ => rank,
        }
    }
}

/// Where a sorted page starts: strictly after this position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    rank: u64,
    key: String,
}

impl Cursor {
    /// Parses a `next` of a page sorted by `sort` (`held_for:TOKEN:KEY` or `waiters:N:KEY`).
    pub fn parse(sort: Sort, text: &str) -> Result<Cursor, String> {
        let refuse = || {
            format!(
                "after must be the next of a page with sort={} ({}:VALUE:KEY), as the previous page answered",
                sort.name(),
                sort.name()
            )
        };
        if text.chars().count() > distlock::types::MAX_AFTER_CHARS || text.contains('\0') {
            return Err(refuse());
        }
        let mut parts = text.splitn(3, ':');
        let (Some(name), Some(value), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(refuse());
        };
        let value: u64 = value.parse().map_err(|_| refuse())?;
        if name != sort.name() {
            return Err(refuse());
        }
        let rank = match sort {
            Sort::Waiters => u64::MAX - value,
            _ => value,
        };
        Ok(Cursor { rank, key: key.to_owned() })
    }

    fn of(sort: Sort, info: &LockInfo) -> String {
        format!("{}:{}:{}", sort.name(), sort.value(sort.rank(info)), info.key)
    }
}

/// A lock with its position, ordered by (rank, key).
struct Ranked(u64, LockInfo);

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.cmp(&other.0).then_with(|| self.1.key.cmp(&other.1.key))
    }
}

/// The key prefixes to walk for `prefix` when the caller may read only `readable`: `prefix`
/// itself when a readable prefix covers it, else the readable prefixes inside it, without those
/// inside another (as the key-ordered listing narrows them).
pub fn narrow(prefix: &str, readable: &[&str]) -> Vec<String> {
    if readable.iter().any(|r| prefix.starts_with(r)) {
        return vec![prefix.to_owned()];
    }
    let mut inside: Vec<&str> = readable.iter().copied().filter(|r| r.starts_with(prefix)).collect();
    inside.sort_unstable();
    inside.dedup();
    let all = inside.clone();
    inside.retain(|p| !all.iter().any(|q| q != p && p.starts_with(q)));
    inside.into_iter().map(str::to_owned).collect()
}

/// One page of the held locks under `prefixes` in `sort` order (not [`Sort::Key`]), after
/// `after`, at most `limit`. The store is read in key order, `chunk` locks per call (`None`: all
/// in one call, for stores that read every name anyway).
pub async fn sorted_page(
    backend: &dyn Backend,
    prefixes: &[String],
    sort: Sort,
    after: Option<&Cursor>,
    limit: usize,
    chunk: Option<usize>,
) -> Result<LockPage, Error> {
    let limit = limit.max(1);
    // The best `limit + 1` so far, worst on top (the extra one tells whether more follow).
    let mut best: BinaryHeap<Ranked> = BinaryHeap::with_capacity(limit.min(16_384) + 1);
    for prefix in prefixes {
        let mut query = ListQuery { prefix: prefix.clone(), after: None, limit: chunk };
        loop {
            let page = backend.list(&query).await?;
            for info in page.locks {
                let item = Ranked(sort.rank(&info), info);
                if let Some(c) = after {
                    if (item.0, item.1.key.as_str()) <= (c.rank, c.key.as_str()) {
                        continue;
                    }
                }
                if best.len() <= limit {
                    best.push(item);
                } else if best.peek().is_some_and(|worst| item < *worst) {
                    best.pop();
                    best.push(item);
                }
            }
            match page.next {
                Some(next) if chunk.is_some() => query.after = Some(next),
                _ => break,
            }
        }
    }
    let mut locks: Vec<Ranked> = best.into_sorted_vec();
    let more = locks.len() > limit;
    locks.truncate(limit);
    let next = if more { locks.last().map(|r| Cursor::of(sort, &r.1)) } else { None };
    Ok(LockPage { locks: locks.into_iter().map(|r| r.1).collect(), next })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    use distlock::{AcquireOptions, Locker, MemoryBackend};

    #[test]
    fn cursors_name_their_sort() {
        let c = Cursor::parse(Sort::Waiters, "waiters:3:a:b").expect("cursor");
        assert_eq!((c.rank, c.key.as_str()), (u64::MAX - 3, "a:b"));
        assert!(Cursor::parse(Sort::HeldFor, "waiters:3:a").is_err());
        assert!(Cursor::parse(Sort::HeldFor, "held_for:x:a").is_err());
        assert!(Cursor::parse(Sort::HeldFor, "deploy/web").is_err());
        assert!(Sort::parse("age").is_err());
    }

    #[test]
    fn narrowing_keeps_only_outermost_readable_prefixes() {
        assert_eq!(narrow("deploy/web", &["deploy/"]), vec!["deploy/web"]);
        assert_eq!(narrow("", &["b/", "a/", "a/x/", "c"]), vec!["a/", "b/", "c"]);
        assert!(narrow("z", &["a/"]).is_empty());
    }

    #[tokio::test]
    async fn pages_in_grant_order_see_every_lock_once() {
        let backend = Arc::new(MemoryBackend::new().expect("backend"));
        let locker = Locker::with_backend(backend.clone());
        let opts = AcquireOptions::new().ttl(Duration::from_secs(60));
        let mut leases = Vec::new();
        // Granted in reverse key order: the longest held are the last keys.
        for i in (0..250).rev() {
            leases.push(locker.acquire(&format!("k{i:03}"), &opts).await.expect("acquire"));
        }
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = sorted_page(&*backend, &[String::new()], Sort::HeldFor, after.as_ref(), 40, Some(16))
                .await
                .expect("page");
            seen.extend(page.locks.iter().map(|l| l.key.clone()));
            match page.next {
                Some(next) => after = Some(Cursor::parse(Sort::HeldFor, &next).expect("cursor")),
                None => break,
            }
        }
        let expected: Vec<String> = (0..250).rev().map(|i| format!("k{i:03}")).collect();
        assert_eq!(seen, expected);
        let held: Vec<_> = leases.iter().map(|l| l.fencing_token()).collect();
        assert!(held.windows(2).all(|w| w[0] < w[1]));
    }
}
