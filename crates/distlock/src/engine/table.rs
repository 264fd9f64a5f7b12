//! The lease table: which keys are held, by which lease, until when. Pure and synchronous.
//!
//! Time is passed in by the caller, so the same table serves the lease engine (and through it the
//! in-process backend and the lock server's embedded store) and a property test that drives time
//! by hand. Expiry is kept in an ordered set of `(deadline, key)`, so purging costs only the
//! leases that expire, not all leases.
//!
//! Fencing tokens come from one counter for the whole table: every grant takes the next value.
//! Tokens therefore strictly increase per key (and across keys), survive a key being released and
//! re-acquired, and need no state per key once it is released.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::types::{Grant, LeaseId, ListQuery, LockInfo};

/// One held lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The secret of the lease that holds the key.
    pub lease_id: LeaseId,
    /// The grant's fencing token.
    pub fencing_token: u64,
    /// The holder's label.
    pub holder: String,
    /// The TTL of the last grant or renewal.
    pub ttl: Duration,
    /// The lease is live while `now < expires_at`.
    pub expires_at: Instant,
    /// When the key was granted to this lease (or restored from disk).
    pub granted_at: Instant,
}

/// Held locks and their deadlines. See the module documentation.
#[derive(Debug, Default)]
pub struct LeaseTable {
    locks: BTreeMap<String, Entry>,
    expirations: BTreeSet<(Instant, String)>,
    last_token: u64,
}

impl LeaseTable {
    /// An empty table whose first grant gets token 1.
    pub fn new() -> LeaseTable {
        LeaseTable::default()
    }

    /// An empty table whose next grant gets `last_token + 1` (for a store restored from disk).
    pub fn with_last_token(last_token: u64) -> LeaseTable {
        LeaseTable { last_token, ..LeaseTable::default() }
    }

    /// The highest token ever issued.
    pub fn last_token(&self) -> u64 {
        self.last_token
    }

    /// Number of entries (live, or expired but not yet purged).
    pub fn len(&self) -> usize {
        self.locks.len()
    }

    /// `true` when no entries are left.
    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }

    /// The live lease on `key`, if any.
    pub fn live(&self, key: &str, now: Instant) -> Option<&Entry> {
        self.locks.get(key).filter(|e| now < e.expires_at)
    }

    /// Grants `key` to `lease_id` unless a live lease holds it.
    pub fn try_acquire(
        &mut self,
        key: &str,
        lease_id: &LeaseId,
        holder: &str,
        ttl: Duration,
        now: Instant,
    ) -> Result<Grant> {
        if let Some(e) = self.live(key, now) {
            return Err(Error::Held { key: key.to_owned(), holder: Some(e.holder.clone()) });
        }
        self.remove(key);
        self.last_token += 1;
        let entry = Entry {
            lease_id: lease_id.clone(),
            fencing_token: self.last_token,
            holder: holder.to_owned(),
            ttl,
            expires_at: now + ttl,
            granted_at: now,
        };
        self.expirations.insert((entry.expires_at, key.to_owned()));
        self.locks.insert(key.to_owned(), entry);
        Ok(Grant { lease_id: lease_id.clone(), fencing_token: self.last_token, ttl, counted_from: now })
    }

    /// Extends the live lease `lease_id` on `key` to `now + ttl`; with `ttl` `None`, by the TTL
    /// of its last grant or renewal.
    pub fn renew(
        &mut self,
        key: &str,
        lease_id: &LeaseId,
        ttl: Option<Duration>,
        now: Instant,
    ) -> Result<Grant> {
        let entry = match self.locks.get_mut(key) {
            Some(e) if e.lease_id == *lease_id && now < e.expires_at => e,
            _ => return Err(Error::not_owner(key)),
        };
        let ttl = ttl.unwrap_or(entry.ttl);
        self.expirations.remove(&(entry.expires_at, key.to_owned()));
        entry.expires_at = now + ttl;
        entry.ttl = ttl;
        self.expirations.insert((entry.expires_at, key.to_owned()));
        Ok(Grant { lease_id: lease_id.clone(), fencing_token: entry.fencing_token, ttl, counted_from: now })
    }

    /// Frees `key` if the live lease on it is `lease_id`.
    pub fn release(&mut self, key: &str, lease_id: &LeaseId, now: Instant) -> Result<()> {
        match self.locks.get(key) {
            Some(e) if e.lease_id == *lease_id && now < e.expires_at => {
                self.remove(key);
                Ok(())
            }
            _ => Err(Error::not_owner(key)),
        }
    }

    /// Removes every lease whose deadline is at or before `now` and returns them with their keys,
    /// earliest deadline first.
    pub fn purge_expired(&mut self, now: Instant) -> Vec<(String, Entry)> {
        let mut expired = Vec::new();
        while let Some((when, _)) = self.expirations.first() {
            if *when > now {
                break;
            }
            if let Some((_, key)) = self.expirations.pop_first() {
                if let Some(entry) = self.locks.remove(&key) {
                    expired.push((key, entry));
                }
            }
        }
        expired
    }

    /// Frees `key` whoever holds it (an operator's override) and returns the lease it removed.
    /// The token counter is untouched: the next grant still gets a higher token.
    pub fn force_release(&mut self, key: &str, now: Instant) -> Option<Entry> {
        self.live(key, now)?;
        let entry = self.locks.remove(key)?;
        self.expirations.remove(&(entry.expires_at, key.to_owned()));
        Some(entry)
    }

    /// The earliest deadline in the table.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.expirations.first().map(|(when, _)| *when)
    }

    /// Status of `key` (`waiters` is left to the caller).
    pub fn info(&self, key: &str, now: Instant) -> LockInfo {
        match self.live(key, now) {
            Some(e) => entry_info(key, e, now),
            None => LockInfo::free(key, 0),
        }
    }

    /// Live leases whose key [`ListQuery::matches`] `query` (prefix and cursor; the caller applies
    /// the limit), in key order. The range starts at the later of `prefix` and just after
    /// `query.after`, so a page costs what it returns, not the keys before it.
    pub fn list<'a>(&'a self, query: &'a ListQuery, now: Instant) -> impl Iterator<Item = LockInfo> + 'a {
        use std::ops::Bound;
        let prefix = query.prefix.as_str();
        let start = match query.after.as_deref() {
            // Every key starting with `prefix` sorts at or after it, so after a cursor below
            // `prefix` the range simply starts at `prefix`.
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        self.locks
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .filter(move |(_, e)| now < e.expires_at)
            .map(move |(k, e)| entry_info(k, e, now))
    }

    /// Every entry, live or not yet purged, in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.locks.iter()
    }

    /// Puts back a lease restored from disk (replacing what `key` had); raises the token counter
    /// to at least its token.
    pub fn restore(&mut self, key: String, entry: Entry) {
        self.remove(&key);
        self.last_token = self.last_token.max(entry.fencing_token);
        self.expirations.insert((entry.expires_at, key.clone()));
        self.locks.insert(key, entry);
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.locks.remove(key) {
            self.expirations.remove(&(old.expires_at, key.to_owned()));
        }
    }
}

fn entry_info(key: &str, e: &Entry, now: Instant) -> LockInfo {
    LockInfo {
        key: key.to_owned(),
        held: true,
        holder: Some(e.holder.clone()),
        fencing_token: Some(e.fencing_token),
        expires_in: Some(e.expires_at.saturating_duration_since(now)),
        waiters: 0,
        held_for: Some(now.saturating_duration_since(e.granted_at)),
        ttl: Some(e.ttl),
    }
}
