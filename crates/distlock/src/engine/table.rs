//! The lease table: which keys are held, by which leases, until when. Pure and synchronous.
//!
//! A key is held by one lease (a lock), by up to `limit` leases (a semaphore of `limit`
//! permits; every lease of a key was granted with the same limit), or by any number of shared
//! leases (a read lock, never together with an exclusive one).
//!
//! Time is passed in by the caller, so the same table serves the lease engine (and through it the
//! in-process backend and the lock server's embedded store) and a property test that drives time
//! by hand. Expiry is kept in an ordered set of `(deadline, key, token)`, so purging costs only
//! the leases that expire, not all leases.
//!
//! Fencing tokens come from one counter for the whole table: every grant takes the next value.
//! Tokens therefore strictly increase per key (and across keys), survive a key being released and
//! re-acquired, and need no state per key once it is released.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::types::{AcquireRequest, Grant, HolderInfo, LeaseId, ListQuery, LockInfo, LockMode, Wait};

/// One lease on a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The lease's secret.
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
    /// Held shared with other shared leases (a read lock).
    pub shared: bool,
    /// What the lease publishes (a leader's value), if anything.
    pub value: Option<String>,
    /// The grant is known to be kept: always, unless the table was told to
    /// [`LeaseTable::require_confirmation`] and [`LeaseTable::confirm`] has not yet been called
    /// for it. Status shows a key's leases only up to its oldest unconfirmed one (see
    /// [`LeaseTable::info`]).
    pub confirmed: bool,
}

/// The leases on one key: one for a lock, up to `limit` for a semaphore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// How many leases may hold the key at once (1: a lock).
    pub limit: u32,
    /// The leases, oldest grant first (so in token order).
    pub holders: Vec<Entry>,
}

/// Held keys and their deadlines. See the module documentation.
#[derive(Debug, Default)]
pub struct LeaseTable {
    locks: BTreeMap<String, Slot>,
    /// `(deadline, key, fencing token)`: the token tells the leases of one key apart.
    expirations: BTreeSet<(Instant, String, u64)>,
    /// Leases in the table.
    leases: usize,
    last_token: u64,
    /// New grants start unconfirmed (see [`LeaseTable::require_confirmation`]).
    confirm_grants: bool,
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

    /// From now on a grant is left out of status until [`LeaseTable::confirm`] is called for it
    /// (status shows a key's leases up to its oldest unconfirmed grant). A durable store calls
    /// this and confirms a grant once its record is on disk: until then a crash would undo the
    /// grant and hand its token out again, so no reader may learn of it (the caller itself is
    /// answered only after the record is on disk). Grants still count in full for exclusion: an
    /// unconfirmed lease holds its place like any other.
    pub fn require_confirmation(&mut self) {
        self.confirm_grants = true;
    }

    /// Whether new grants start unconfirmed (a grant then changes no status until confirmed).
    pub fn requires_confirmation(&self) -> bool {
        self.confirm_grants
    }

    /// Marks the lease with `token` on `key` confirmed: `None` when no such lease is held any
    /// more (released, expired or force-released before its confirmation), else whether it was
    /// unconfirmed (its key's status changed). By token, not lease id: a token names one grant.
    pub fn confirm(&mut self, key: &str, token: u64) -> Option<bool> {
        let entry = self.locks.get_mut(key)?.holders.iter_mut().find(|e| e.fencing_token == token)?;
        Some(!std::mem::replace(&mut entry.confirmed, true))
    }

    /// The highest token ever issued.
    pub fn last_token(&self) -> u64 {
        self.last_token
    }

    /// Number of leases (live, or expired but not yet purged).
    pub fn len(&self) -> usize {
        self.leases
    }

    /// `true` when no leases are left.
    pub fn is_empty(&self) -> bool {
        self.leases == 0
    }

    /// The newest live lease on `key` that status shows, if any (a lock's one holder).
    pub fn live(&self, key: &str, now: Instant) -> Option<&Entry> {
        let slot = self.locks.get(key)?;
        let cut = first_unconfirmed(slot, now);
        slot.holders.iter().rev().find(|e| now < e.expires_at && e.fencing_token < cut)
    }

    /// Every lease on `key`, live or not yet purged, confirmed or not, oldest grant first.
    pub fn holders(&self, key: &str) -> &[Entry] {
        self.locks.get(key).map_or(&[], |s| s.holders.as_slice())
    }

    /// The limit `key` is held with (1 when it is not held: a lock).
    pub fn limit_of(&self, key: &str) -> u32 {
        self.locks.get(key).map_or(1, |s| s.limit)
    }

    /// The live lease `lease_id` on `key`, if it holds the key.
    pub fn lease(&self, key: &str, lease_id: &LeaseId, now: Instant) -> Option<&Entry> {
        self.locks.get(key)?.holders.iter().find(|e| e.lease_id == *lease_id && now < e.expires_at)
    }

    /// Grants `key` to `lease_id` as an exclusive lock (see [`LeaseTable::grant`]).
    pub fn try_acquire(
        &mut self,
        key: &str,
        lease_id: &LeaseId,
        holder: &str,
        ttl: Duration,
        now: Instant,
    ) -> Result<Grant> {
        let req = AcquireRequest {
            key: key.to_owned(),
            lease_id: lease_id.clone(),
            holder: holder.to_owned(),
            ttl,
            wait: Wait::TryOnce,
            limit: 1,
            mode: LockMode::Exclusive,
            value: None,
        };
        self.grant(&req, now)
    }

    /// Grants `req.key` to `req.lease_id` if the key has room for it: an exclusive request while
    /// fewer than `req.limit` exclusive leases hold it (none, for a lock), a shared one while only
    /// shared leases do. Otherwise [`Error::Held`], or [`Error::LimitMismatch`] when the key's
    /// leases were granted with another limit. (`req.wait` is the caller's business: the table
    /// never waits.)
    pub fn grant(&mut self, req: &AcquireRequest, now: Instant) -> Result<Grant> {
        let (key, limit, shared) = (req.key.as_str(), req.limit, req.mode == LockMode::Shared);
        self.drop_lapsed(key, now);
        if let Some(slot) = self.locks.get(key) {
            if slot.limit != limit {
                return Err(Error::LimitMismatch { key: key.to_owned(), limit: slot.limit });
            }
            let room = if shared {
                slot.holders.iter().all(|e| e.shared)
            } else {
                slot.holders.len() < limit as usize && slot.holders.iter().all(|e| !e.shared)
            };
            if !room {
                // Named only as status would name it.
                let holder = self.live(key, now).map(|e| e.holder.clone());
                return Err(Error::Held { key: key.to_owned(), holder });
            }
        }
        self.last_token += 1;
        let entry = Entry {
            lease_id: req.lease_id.clone(),
            fencing_token: self.last_token,
            holder: req.holder.clone(),
            ttl: req.ttl,
            expires_at: now + req.ttl,
            granted_at: now,
            shared,
            value: req.value.clone(),
            confirmed: !self.confirm_grants,
        };
        self.expirations.insert((entry.expires_at, key.to_owned(), entry.fencing_token));
        self.locks
            .entry(key.to_owned())
            .or_insert_with(|| Slot { limit, holders: Vec::new() })
            .holders
            .push(entry);
        self.leases += 1;
        Ok(Grant {
            lease_id: req.lease_id.clone(),
            fencing_token: self.last_token,
            ttl: req.ttl,
            counted_from: now,
        })
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
        let entry = self
            .locks
            .get_mut(key)
            .and_then(|slot| slot.holders.iter_mut().find(|e| e.lease_id == *lease_id && now < e.expires_at))
            .ok_or_else(|| Error::not_owner(key))?;
        let ttl = ttl.unwrap_or(entry.ttl);
        self.expirations.remove(&(entry.expires_at, key.to_owned(), entry.fencing_token));
        entry.expires_at = now + ttl;
        entry.ttl = ttl;
        self.expirations.insert((entry.expires_at, key.to_owned(), entry.fencing_token));
        Ok(Grant { lease_id: lease_id.clone(), fencing_token: entry.fencing_token, ttl, counted_from: now })
    }

    /// Replaces the value the live lease `lease_id` on `key` publishes (any lease may; only the
    /// one holder of a key is its leader, see [`crate::Leader::of`]).
    pub fn proclaim(&mut self, key: &str, lease_id: &LeaseId, value: &str, now: Instant) -> Result<()> {
        let entry = self
            .locks
            .get_mut(key)
            .and_then(|slot| slot.holders.iter_mut().find(|e| e.lease_id == *lease_id && now < e.expires_at))
            .ok_or_else(|| Error::not_owner(key))?;
        entry.value = Some(value.to_owned());
        Ok(())
    }

    /// Frees the live lease `lease_id` on `key`, and returns it.
    pub fn release(&mut self, key: &str, lease_id: &LeaseId, now: Instant) -> Result<Entry> {
        let token =
            self.lease(key, lease_id, now).map(|e| e.fencing_token).ok_or_else(|| Error::not_owner(key))?;
        self.remove(key, token).ok_or_else(|| Error::not_owner(key))
    }

    /// Removes every lease whose deadline is at or before `now` and returns them with their keys
    /// and their keys' limits (read before the removal, which may drop the key), earliest
    /// deadline first.
    pub fn purge_expired(&mut self, now: Instant) -> Vec<(String, u32, Entry)> {
        let mut expired = Vec::new();
        while let Some((when, _, _)) = self.expirations.first() {
            if *when > now {
                break;
            }
            if let Some((_, key, token)) = self.expirations.pop_first() {
                let limit = self.limit_of(&key);
                if let Some(entry) = self.remove(&key, token) {
                    expired.push((key, limit, entry));
                }
            }
        }
        expired
    }

    /// Frees `key` whoever holds it (an operator's override) and returns the leases it removed,
    /// oldest first. The token counter is untouched: the next grant still gets a higher token.
    pub fn force_release(&mut self, key: &str, now: Instant) -> Vec<Entry> {
        self.drop_lapsed(key, now);
        let Some(slot) = self.locks.remove(key) else { return Vec::new() };
        for e in &slot.holders {
            self.expirations.remove(&(e.expires_at, key.to_owned(), e.fencing_token));
        }
        self.leases -= slot.holders.len();
        slot.holders
    }

    /// The earliest deadline in the table.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.expirations.first().map(|(when, _, _)| *when)
    }

    /// The tokens of the live unconfirmed leases on `key`, oldest first (see
    /// [`LeaseTable::require_confirmation`]).
    pub fn unconfirmed(&self, key: &str, now: Instant) -> Vec<u64> {
        self.holders(key)
            .iter()
            .filter(|e| !e.confirmed && now < e.expires_at)
            .map(|e| e.fencing_token)
            .collect()
    }

    /// Status of `key` (`waiters` is left to the caller), from its live leases granted before
    /// its oldest unconfirmed one.
    pub fn info(&self, key: &str, now: Instant) -> LockInfo {
        match self.locks.get(key) {
            Some(slot) => slot_info(key, slot, now).unwrap_or_else(|| LockInfo::free(key, 0)),
            None => LockInfo::free(key, 0),
        }
    }

    /// Held keys whose key [`ListQuery::matches`] `query` (prefix and cursor; the caller applies
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
            .filter_map(move |(k, slot)| slot_info(k, slot, now))
    }

    /// Every lease, live or not yet purged, with its key and its key's limit, in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&String, u32, &Entry)> {
        self.locks.iter().flat_map(|(k, slot)| slot.holders.iter().map(move |e| (k, slot.limit, e)))
    }

    /// Puts back a lease restored from disk (replacing a lease with its id on `key`); raises the
    /// token counter to at least its token. The key's limit becomes `limit`.
    pub fn restore(&mut self, key: String, limit: u32, entry: Entry) {
        if let Some(old) =
            self.locks.get(&key).and_then(|s| s.holders.iter().find(|e| e.lease_id == entry.lease_id))
        {
            let token = old.fencing_token;
            self.remove(&key, token);
        }
        self.last_token = self.last_token.max(entry.fencing_token);
        self.expirations.insert((entry.expires_at, key.clone(), entry.fencing_token));
        let slot = self.locks.entry(key).or_insert_with(|| Slot { limit, holders: Vec::new() });
        slot.limit = limit;
        let at = slot.holders.partition_point(|e| e.fencing_token < entry.fencing_token);
        slot.holders.insert(at, entry);
        self.leases += 1;
    }

    /// Removes the leases of `key` whose deadline has passed (the expiry task may not have run
    /// yet), so a grant never counts them.
    fn drop_lapsed(&mut self, key: &str, now: Instant) {
        let lapsed: Vec<u64> = match self.locks.get(key) {
            Some(slot) => {
                slot.holders.iter().filter(|e| now >= e.expires_at).map(|e| e.fencing_token).collect()
            }
            None => return,
        };
        for token in lapsed {
            self.remove(key, token);
        }
    }

    /// Removes the lease with `token` from `key` (and the key once it has none).
    fn remove(&mut self, key: &str, token: u64) -> Option<Entry> {
        let slot = self.locks.get_mut(key)?;
        let at = slot.holders.iter().position(|e| e.fencing_token == token)?;
        let entry = slot.holders.remove(at);
        if slot.holders.is_empty() {
            self.locks.remove(key);
        }
        self.expirations.remove(&(entry.expires_at, key.to_owned(), token));
        self.leases -= 1;
        Some(entry)
    }
}

/// Status of a held key, from its live leases granted before its oldest unconfirmed one; `None`
/// when there are none. Cutting at the oldest unconfirmed grant (not only leaving the
/// unconfirmed out) keeps what status shows a state the key was in: a newer grant confirmed
/// first would otherwise show without an older one still in flight, out of token order.
fn slot_info(key: &str, slot: &Slot, now: Instant) -> Option<LockInfo> {
    let cut = first_unconfirmed(slot, now);
    let mut live = slot.holders.iter().filter(|e| now < e.expires_at && e.fencing_token < cut).peekable();
    live.peek()?;
    let holders: Vec<&Entry> = live.collect();
    let newest = holders[holders.len() - 1];
    let shared = newest.shared;
    let many = slot.limit > 1 || shared;
    Some(LockInfo {
        key: key.to_owned(),
        held: true,
        holder: Some(newest.holder.clone()),
        fencing_token: Some(newest.fencing_token),
        expires_in: Some(newest.expires_at.saturating_duration_since(now)),
        waiters: 0,
        held_for: Some(now.saturating_duration_since(newest.granted_at)),
        ttl: Some(newest.ttl),
        limit: (slot.limit > 1).then_some(slot.limit),
        mode: shared.then_some(LockMode::Shared),
        holders: if many {
            holders
                .iter()
                .map(|e| HolderInfo {
                    holder: e.holder.clone(),
                    fencing_token: e.fencing_token,
                    expires_in: e.expires_at.saturating_duration_since(now),
                })
                .collect()
        } else {
            Vec::new()
        },
        value: newest.value.clone(),
    })
}

/// The token of the oldest live unconfirmed lease of `slot` (`u64::MAX` when none is).
fn first_unconfirmed(slot: &Slot, now: Instant) -> u64 {
    slot.holders.iter().find(|e| !e.confirmed && now < e.expires_at).map_or(u64::MAX, |e| e.fencing_token)
}
