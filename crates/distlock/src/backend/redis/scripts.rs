//! The Lua scripts of the Redis backend. Each runs atomically on the server, is loaded once and
//! then called by SHA (`redis::Script` does EVALSHA and loads on `NOSCRIPT`).
//!
//! Keys of one lock share a hash tag, `<prefix>:{<key>}:...`, so every script touches one slot
//! and stays legal on Redis Cluster:
//! - `lock`  string `"<lease id> <token> <ttl ms> <holder>"` with the lease's PX expiry (lease ids
//!   have no spaces; the holder label comes last and may have them). The TTL is the one the lease
//!   was granted or last renewed with, so a renew that names none can keep it. A value written by
//!   an older version, `"<lease id> <token> <holder>"`, is still read (as having no stored TTL,
//!   unless its holder label starts with digits and a space), and the next renew rewrites it;
//! - `meta`  hash `fence` (the fencing counter: max(counter + 1, server clock in µs) per grant);
//!   expires `meta_ttl` after its last use;
//! - `queue` sorted set of waiting lease ids by arrival order (last score + 1: FIFO);
//! - `alive` sorted set of waiting lease ids by the time (ms) their wait registration lapses,
//!   so a waiter that crashed is dropped from the queue instead of blocking it;
//! - `holders`, `deadlines`, `asks`: the leases that are not plain locks (semaphore permits,
//!   shared locks, leases that publish a value) and what waiters ask for; see `many.rs`, which
//!   also holds the queue logic every script shares.
//!
//! Every grant, release and proclamation publishes `*` on the key's change channel (`watch`), so
//! a [`super::watch`] feed learns of it without polling.
//!
//! Each script is called through a struct next to it whose fields name its KEYS and ARGV (e.g.
//! [`Acquire`]), so a call site cannot pass them in the wrong order.
//!
//! No script changes a lock whose lease id is not the caller's. The common cases (acquire a free
//! key nobody waits for, release with nobody waiting, renew) take three Redis calls or fewer; the
//! queue is only touched when someone waits.

use std::time::Duration;

use redis::ScriptInvocation;

use super::{many, millis, LockKeys};

/// A call of one script: which script, and its KEYS and ARGV in the order its Lua reads them.
/// Each script has a struct of its own below, next to its Lua, whose fields name them.
pub trait ScriptCall {
    /// The script called.
    fn script<'s>(&self, scripts: &'s Scripts) -> &'s redis::Script;

    /// KEYS, in the script's order.
    fn keys(&self) -> Vec<&str>;

    /// ARGV, in the script's order.
    fn args(&self) -> Vec<String>;

    /// The invocation: the script with its KEYS and ARGV.
    fn invocation<'s>(&self, scripts: &'s Scripts) -> ScriptInvocation<'s> {
        let mut inv = self.script(scripts).prepare_invoke();
        for key in self.keys() {
            inv.key(key);
        }
        for arg in self.args() {
            inv.arg(arg);
        }
        inv
    }
}

/// Splits a lock value (`parse`: id, token, holder, stored TTL in ms or nil) and checks ownership
/// (`owned`). Shared by every script.
const PARSE_LOCK: &str = r#"
local function parse(v)
  if not v then return nil end
  local id, token, ttl, holder = string.match(v, '^(%S+) (%d+) (%d+) (.*)$')
  if id then return id, tonumber(token), holder, tonumber(ttl) end
  -- Written by an older version, without the TTL.
  id, token, holder = string.match(v, '^(%S+) (%d+) (.*)$')
  return id, tonumber(token), holder, nil
end

-- The token of the lock at `key` when `lease_id` holds it, else nil.
local function owned(key, lease_id)
  local id, token = parse(redis.call('GET', key))
  if id == lease_id then return token end
  return nil
end
"#;

/// `purge`: the server's clock in ms, with waiters whose registration lapsed removed from the
/// queue (and from `asks`, what they asked for, when given).
const PURGE_DEAD_WAITERS: &str = r#"
local function purge(queue, alive, asks)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', alive, '-inf', now)) do
    redis.call('ZREM', queue, id)
    redis.call('ZREM', alive, id)
    if asks then redis.call('HDEL', asks, id) end
  end
  return now
end
"#;

/// `next_token(meta)`: the next fencing token of a key, max(counter + 1, the server's clock in
/// microseconds), stored back as the counter. The clock floor makes a fresh counter (Redis
/// restarted empty, or the counter expired after `meta_ttl`) start above every token handed out
/// before, as long as the Redis host's clock does not step back by more than the time since.
/// Tokens are formatted as integers: Lua 5.1 prints numbers over 14 digits in exponent form.
/// `clock_us()`: the server's clock in microseconds (below 2^53, exact in a Lua number).
const NEXT_TOKEN: &str = r#"
local function clock_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function next_token(meta)
  local last = tonumber(redis.call('HGET', meta, 'fence') or '0')
  local token = string.format('%.0f', math.max(last + 1, clock_us()))
  redis.call('HSET', meta, 'fence', token)
  return token
end
"#;

/// KEYS: lock, meta, queue, alive, holders, deadlines, asks. ARGV: lease id, ttl ms, holder,
/// enqueue (0/1), wait ttl ms, meta ttl ms, change channel, wake channel. A plain lock (limit 1, exclusive, no
/// value). Returns `{1, token, ''}` when granted, `{-1, limit, ''}` when semaphore permits of
/// another limit hold the key (the caller leaves the queue), else `{0, pttl, holder}` (holder ''
/// and pttl -2 when the lock is free but an earlier waiter is first in line; for holders of
/// several, the ms until the earliest one's deadline). The key is first handed on to waiters of
/// several whose turn it is (`hand_on`). The key must be free of the lock and of live holders,
/// and it must be the caller's turn (`in_turn`: the head, or nobody waits). A
/// caller that is told to wait is queued (once) and its registration refreshed. The meta hash
/// (the fencing counter) expires `meta ttl` after its last grant, so locking ever new keys does
/// not grow Redis without bound.
const ACQUIRE: [&str; 2] = [
    r#"
local function grant()
  local token = next_token(KEYS[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
  redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. token .. ' ' .. ARGV[2] .. ' ' .. ARGV[3], 'PX', ARGV[2])
  redis.call('PUBLISH', ARGV[7], '*')
  return {1, tonumber(token), ''}
end
-- Nothing held, nobody waits: the common case, decided before the queue logic is even defined.
if redis.call('EXISTS', KEYS[1], KEYS[3], KEYS[6]) == 0 then
  return grant()
end
"#,
    r#"
local K = lock_keys()
local now = purge(K.queue, K.alive, K.asks)
hand_on(K, ARGV[8], ARGV[7], now, ARGV[1])
if redis.call('EXISTS', K.lock) == 0 then
  local count, klimit, kmode = held(K, now)
  if count > 0 and klimit ~= 1 then
    leave_queue(K, ARGV[1])
    return {-1, klimit, ''}
  end
  if in_turn(K, ARGV[1], 'X', 1, count, klimit, kmode) then
    leave_queue(K, ARGV[1])
    return grant()
  end
end
if ARGV[4] == '1' then
  join_queue(K, ARGV[1], now, ARGV[5], nil)
end
return refusal(K, now)
"#,
];

/// A call of [`ACQUIRE`], its KEYS and ARGV by name.
pub struct Acquire<'a> {
    /// KEYS: lock, meta, queue, alive, holders, deadlines, asks; ARGV[7], ARGV[8]: the change
    /// and wake channels.
    pub keys: &'a LockKeys,
    /// ARGV[1]: the caller's lease id.
    pub lease_id: &'a str,
    /// ARGV[2]: the TTL of a grant.
    pub ttl: Duration,
    /// ARGV[3]: the holder label.
    pub holder: &'a str,
    /// ARGV[4]: queue the caller when it is refused.
    pub enqueue: bool,
    /// ARGV[5]: how long the caller's place in the queue lasts unless refreshed.
    pub queue_ttl: Duration,
    /// ARGV[6]: how long the fencing counter lasts after its last grant.
    pub meta_ttl: Duration,
}

impl ScriptCall for Acquire<'_> {
    fn script<'s>(&self, scripts: &'s Scripts) -> &'s redis::Script {
        &scripts.acquire
    }

    fn keys(&self) -> Vec<&str> {
        self.keys.all()
    }

    fn args(&self) -> Vec<String> {
        vec![
            self.lease_id.to_owned(),
            millis(self.ttl).to_string(),
            self.holder.to_owned(),
            if self.enqueue { "1" } else { "0" }.to_owned(),
            millis(self.queue_ttl).to_string(),
            millis(self.meta_ttl).to_string(),
            self.keys.changes.clone(),
            self.keys.channel.clone(),
        ]
    }
}

/// KEYS: lock, holders, deadlines. ARGV: lease id, ttl ms (`''`: the TTL stored with the lease),
/// the TTL in ms for a lock value that stores none (written by an older version). Returns
/// `{token, ttl ms applied}`, or `{0, 0}` when not the owner. A plain lock's value is rewritten
/// only when the TTL changes; a holder of several moves its deadline (and its stored TTL).
const RENEW: [&str; 2] = [
    r#"
local v = redis.call('GET', KEYS[1])
if v then
  local id, token, holder, stored = parse(v)
  if not id or id ~= ARGV[1] then
    return {0, 0}
  end
  local ttl = tonumber(ARGV[2]) or stored or tonumber(ARGV[3])
  if ttl ~= stored then
    local head = string.match(v, '^%S+ %d+ ')
    redis.call('SET', KEYS[1], head .. string.format('%d', ttl) .. ' ' .. holder, 'PX', ttl)
  else
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
  return {token, ttl}
end
"#,
    r#"
local K = {holders = KEYS[2], deadlines = KEYS[3]}
local now = now_ms()
local deadline = tonumber(redis.call('ZSCORE', K.deadlines, ARGV[1]))
local e = parse_entry(redis.call('HGET', K.holders, ARGV[1]))
if not deadline or deadline <= now or not e then
  return {0, 0}
end
local ttl = tonumber(ARGV[2]) or e.ttl
if ttl ~= e.ttl then
  redis.call('HSET', K.holders, ARGV[1], format_entry(e.token, ttl, e.mode, e.limit, e.holder, e.value))
end
redis.call('ZADD', K.deadlines, now + ttl, ARGV[1])
keep_holders(K, now)
return {tonumber(e.token), ttl}
"#,
];

/// A call of [`RENEW`], its KEYS and ARGV by name.
pub struct Renew<'a> {
    /// KEYS: lock, holders, deadlines.
    pub keys: &'a LockKeys,
    /// ARGV[1]: the caller's lease id.
    pub lease_id: &'a str,
    /// ARGV[2]: the new TTL; `None` keeps the one stored with the lease.
    pub ttl: Option<Duration>,
    /// ARGV[3]: the TTL for a value that stores none (written by an older version).
    pub fallback_ttl: Duration,
}

impl ScriptCall for Renew<'_> {
    fn script<'s>(&self, scripts: &'s Scripts) -> &'s redis::Script {
        &scripts.renew
    }

    fn keys(&self) -> Vec<&str> {
        vec![&self.keys.lock, &self.keys.holders, &self.keys.deadlines]
    }

    fn args(&self) -> Vec<String> {
        let ttl = self.ttl.map(|t| millis(t).to_string()).unwrap_or_default();
        vec![self.lease_id.to_owned(), ttl, millis(self.fallback_ttl).to_string()]
    }
}

/// KEYS: lock, meta, queue, alive, holders, deadlines, asks. ARGV: lease id, wake channel, change
/// channel. Frees the caller's lease — the lock if it is the caller's, else the caller's live
/// holder entry — announces the change and hands the key on to the waiters whose turn it is
/// (`hand_on`). Returns 1, or 0 when the caller holds nothing.
const RELEASE: [&str; 2] = [
    r#"
local released = false
if owned(KEYS[1], ARGV[1]) then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[3], '*')
  -- Nobody waits: done before the queue logic is even defined.
  if redis.call('EXISTS', KEYS[3]) == 0 then
    return 1
  end
  released = true
end
"#,
    r#"
local K = lock_keys()
if not released then
  local now = now_ms()
  local deadline = tonumber(redis.call('ZSCORE', K.deadlines, ARGV[1]))
  if not deadline or deadline <= now then
    return 0
  end
  redis.call('HDEL', K.holders, ARGV[1])
  redis.call('ZREM', K.deadlines, ARGV[1])
  keep_holders(K, now)
  redis.call('PUBLISH', ARGV[3], '*')
end
if redis.call('EXISTS', K.queue) == 1 then
  hand_on(K, ARGV[2], ARGV[3], purge(K.queue, K.alive, K.asks), nil)
end
return 1
"#,
];

/// [`RELEASE`] or [`DEQUEUE`]: the two take the same KEYS and ARGV.
#[derive(Clone, Copy)]
pub enum LeaseScript {
    /// [`RELEASE`]: free the caller's lease, and hand the key on.
    Release,
    /// [`DEQUEUE`]: leave the queue, and hand the key on.
    Dequeue,
}

/// A call of [`RELEASE`] or [`DEQUEUE`], its KEYS and ARGV by name.
pub struct LeaseCall<'a> {
    /// Which of the two.
    pub script: LeaseScript,
    /// KEYS: every key of the lock; ARGV[2], ARGV[3]: the wake and change channels.
    pub keys: &'a LockKeys,
    /// ARGV[1]: the caller's lease id.
    pub lease_id: &'a str,
}

impl ScriptCall for LeaseCall<'_> {
    fn script<'s>(&self, scripts: &'s Scripts) -> &'s redis::Script {
        match self.script {
            LeaseScript::Release => &scripts.release,
            LeaseScript::Dequeue => &scripts.dequeue,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.keys.all()
    }

    fn args(&self) -> Vec<String> {
        vec![self.lease_id.to_owned(), self.keys.channel.clone(), self.keys.changes.clone()]
    }
}

/// KEYS: as [`RELEASE`]. ARGV: lease id, wake channel, change channel. A waiter gives up: it
/// leaves the queue, and the key is handed on to the waiters whose turn it is (the place may have
/// held them up: a free permit, or shared holders they can join). Returns 0, or the token of a
/// place the key was handed to it before it left (its deadline counted again from now: the wait
/// ended granted, and the caller holds it).
const DEQUEUE: &str = r#"
local K = lock_keys()
local now = purge(K.queue, K.alive, K.asks)
leave_queue(K, ARGV[1])
local handed = claim(K, ARGV[1], now)
if handed then
  return tonumber(handed)
end
if redis.call('EXISTS', K.queue) == 1 then
  hand_on(K, ARGV[2], ARGV[3], now, nil)
end
return 0
"#;

/// KEYS: lock, meta, queue, alive, holders, deadlines, asks. Returns `{held, holder, token, pttl,
/// live waiters, entries}`: held 1 with a plain lock's holder, 3 with holders of several (then
/// `entries` lists them: `{holder, token, ms left, ttl ms, value or nil, limit, mode}` each, in
/// no particular order), 0 when free, 2 when no lease holds it but a live waiter is first in
/// line (the key is that waiter's until it runs its acquire: a try-once acquire is refused
/// meanwhile).
const STATUS: &str = r#"
local K = lock_keys()
local now = purge(K.queue, K.alive, K.asks)
local waiters = redis.call('ZCOUNT', K.alive, now + 1, '+inf')
local id, token, holder = parse(redis.call('GET', K.lock))
if id then
  return {1, holder, token, redis.call('PTTL', K.lock), waiters, {}}
end
if purge_holders(K, now) > 0 then
  local entries = {}
  local live = redis.call('ZRANGE', K.deadlines, 0, -1, 'WITHSCORES')
  for i = 1, #live, 2 do
    local e = parse_entry(redis.call('HGET', K.holders, live[i]))
    if e then
      entries[#entries + 1] =
        {e.holder, tonumber(e.token), tonumber(live[i + 1]) - now, e.ttl, e.value, e.limit, e.mode}
    end
  end
  return {3, '', 0, -2, waiters, entries}
end
if waiters > 0 then
  return {2, '', 0, -2, waiters, {}}
end
return {0, '', 0, -2, waiters, {}}
"#;

/// A call of [`STATUS`], its KEYS by name.
pub struct Status<'a> {
    /// KEYS: every key of the lock.
    pub keys: &'a LockKeys,
}

impl ScriptCall for Status<'_> {
    fn script<'s>(&self, scripts: &'s Scripts) -> &'s redis::Script {
        &scripts.status
    }

    fn keys(&self) -> Vec<&str> {
        self.keys.all()
    }

    fn args(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Redlock, on one master. KEYS: lock, meta. ARGV: lease id, ttl ms, holder. Sets the lock if
/// free (token 0 until fenced) and returns `{1, max(fencing counter, clock in µs), ''}`, else
/// `{0, pttl, holder}`: the winner's token (the highest of a majority, plus one) is then above
/// every token any master handed out, even one restarted empty.
const REDLOCK_ACQUIRE: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1] .. ' 0 ' .. ARGV[2] .. ' ' .. ARGV[3], 'NX', 'PX', ARGV[2]) then
  return {1, math.max(tonumber(redis.call('HGET', KEYS[2], 'fence') or '0'), clock_us()), ''}
end
local _, _, holder = parse(redis.call('GET', KEYS[1]))
return {0, redis.call('PTTL', KEYS[1]), holder or ''}
"#;

/// A call of [`REDLOCK_ACQUIRE`], its KEYS and ARGV by name.
pub struct RedlockAcquire<'a> {
    /// KEYS: lock, meta.
    pub keys: &'a LockKeys,
    /// ARGV[1]: the caller's lease id.
    pub lease_id: &'a str,
    /// ARGV[2]: the TTL of a grant.
    pub ttl: Duration,
    /// ARGV[3]: the holder label.
    pub holder: &'a str,
}

impl ScriptCall for RedlockAcquire<'_> {
    fn script<'s>(&self, scripts: &'s Scripts) -> &'s redis::Script {
        &scripts.redlock_acquire
    }

    fn keys(&self) -> Vec<&str> {
        vec![&self.keys.lock, &self.keys.meta]
    }

    fn args(&self) -> Vec<String> {
        vec![self.lease_id.to_owned(), millis(self.ttl).to_string(), self.holder.to_owned()]
    }
}

/// Redlock, on one master. KEYS: lock, meta. ARGV: lease id, token, holder, ttl ms, meta ttl ms.
/// If the caller holds the lock here, raise the fencing counter to at least `token` and record it
/// on the lock; the counter expires `meta ttl` after its last use.
const REDLOCK_FENCE: &str = r#"
if not owned(KEYS[1], ARGV[1]) then
  return 0
end
if tonumber(ARGV[2]) > tonumber(redis.call('HGET', KEYS[2], 'fence') or '0') then
  redis.call('HSET', KEYS[2], 'fence', ARGV[2])
end
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. ARGV[4] .. ' ' .. ARGV[3], 'KEEPTTL')
return 1
"#;

/// A call of [`REDLOCK_FENCE`], its KEYS and ARGV by name.
pub struct RedlockFence<'a> {
    /// KEYS: lock, meta.
    pub keys: &'a LockKeys,
    /// ARGV[1]: the caller's lease id.
    pub lease_id: &'a str,
    /// ARGV[2]: the fencing token of the grant.
    pub token: u64,
    /// ARGV[3]: the holder label.
    pub holder: &'a str,
    /// ARGV[4]: the TTL of the grant.
    pub ttl: Duration,
    /// ARGV[5]: how long the fencing counter lasts after its last use.
    pub meta_ttl: Duration,
}

impl ScriptCall for RedlockFence<'_> {
    fn script<'s>(&self, scripts: &'s Scripts) -> &'s redis::Script {
        &scripts.redlock_fence
    }

    fn keys(&self) -> Vec<&str> {
        vec![&self.keys.lock, &self.keys.meta]
    }

    fn args(&self) -> Vec<String> {
        vec![
            self.lease_id.to_owned(),
            self.token.to_string(),
            self.holder.to_owned(),
            millis(self.ttl).to_string(),
            millis(self.meta_ttl).to_string(),
        ]
    }
}

/// Redlock, on one master. KEYS: lock. ARGV: lease id, wake channel. Compare-and-delete, then
/// wake every waiter of the lock (Redlock waiting is not FIFO).
const REDLOCK_RELEASE: &str = r#"
if not owned(KEYS[1], ARGV[1]) then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], '*')
return 1
"#;

/// A call of [`REDLOCK_RELEASE`], its KEYS and ARGV by name.
pub struct RedlockRelease<'a> {
    /// KEYS[1]: the lock; ARGV[2]: the wake channel.
    pub keys: &'a LockKeys,
    /// ARGV[1]: the caller's lease id.
    pub lease_id: &'a str,
}

impl ScriptCall for RedlockRelease<'_> {
    fn script<'s>(&self, scripts: &'s Scripts) -> &'s redis::Script {
        &scripts.redlock_release
    }

    fn keys(&self) -> Vec<&str> {
        vec![&self.keys.lock]
    }

    fn args(&self) -> Vec<String> {
        vec![self.lease_id.to_owned(), self.keys.channel.clone()]
    }
}

/// The compiled scripts, built once per backend. Call them through the structs above.
pub struct Scripts {
    pub acquire: redis::Script,
    pub acquire_many: redis::Script,
    pub proclaim: redis::Script,
    pub renew: redis::Script,
    pub release: redis::Script,
    pub dequeue: redis::Script,
    pub status: redis::Script,
    pub redlock_acquire: redis::Script,
    pub redlock_fence: redis::Script,
    pub redlock_release: redis::Script,
}

impl Scripts {
    /// The scripts, waking waiters with `PUBLISH`.
    pub fn new() -> Scripts {
        Scripts::publishing_with("PUBLISH")
    }

    /// The scripts for Redis Cluster, waking waiters with `SPUBLISH`: sharded pub/sub, whose
    /// messages stay on the shard of the lock's slot (the wake channel shares the lock's hash
    /// tag) instead of crossing the whole cluster bus as `PUBLISH` does.
    pub fn sharded() -> Scripts {
        Scripts::publishing_with("SPUBLISH")
    }

    fn publishing_with(publish: &str) -> Scripts {
        // A script in two parts: what runs before the queue logic is defined (a plain lock's
        // common case returns there, without paying for the closures of the library), then the
        // rest.
        let split = |[first, rest]: [&str; 2]| {
            let source =
                format!("{PARSE_LOCK}{NEXT_TOKEN}{first}{PURGE_DEAD_WAITERS}{}{rest}", many::LIBRARY);
            redis::Script::new(&source.replace("redis.call('PUBLISH',", &format!("redis.call('{publish}',")))
        };
        let script = |body: &str| split(["", body]);
        let [acquire_many, proclaim] = many::sources();
        Scripts {
            acquire: split(ACQUIRE),
            acquire_many: script(acquire_many),
            proclaim: script(proclaim),
            renew: split(RENEW),
            release: split(RELEASE),
            dequeue: script(DEQUEUE),
            status: script(STATUS),
            redlock_acquire: script(REDLOCK_ACQUIRE),
            redlock_fence: script(REDLOCK_FENCE),
            redlock_release: script(REDLOCK_RELEASE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed call puts each named field where the Lua reads it.
    #[test]
    fn acquire_passes_keys_and_argv_in_the_scripts_order() {
        let keys = LockKeys::new("p", "k");
        let call = Acquire {
            keys: &keys,
            lease_id: "id",
            ttl: Duration::from_secs(30),
            holder: "h 1",
            enqueue: true,
            queue_ttl: Duration::from_secs(6),
            meta_ttl: Duration::from_secs(60),
        };
        let all = [
            "p:{k}:lock",
            "p:{k}:meta",
            "p:{k}:queue",
            "p:{k}:alive",
            "p:{k}:holders",
            "p:{k}:deadlines",
            "p:{k}:asks",
        ];
        assert_eq!(call.keys(), all);
        assert_eq!(call.args(), ["id", "30000", "h 1", "1", "6000", "60000", "p:{k}:watch", "p:{k}:wake"]);
        let release = LeaseCall { script: LeaseScript::Release, keys: &keys, lease_id: "id" };
        assert_eq!(release.keys(), all);
        assert_eq!(release.args(), ["id", "p:{k}:wake", "p:{k}:watch"]);
        let many = crate::backend::redis::many::AcquireMany {
            lock: Acquire { enqueue: false, ..call },
            mode: crate::types::LockMode::Shared,
            limit: 1,
            value: Some("v a l"),
        };
        assert_eq!(many.keys(), all);
        assert_eq!(
            many.args(),
            ["id", "30000", "h 1", "0", "6000", "60000", "p:{k}:watch", "p:{k}:wake", "S", "1", "v", "v a l"]
        );
    }
}
