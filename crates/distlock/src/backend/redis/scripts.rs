//! The Lua scripts of the Redis backend. Each runs atomically on the server, is loaded once and
//! then called by SHA (`redis::Script` does EVALSHA and loads on `NOSCRIPT`).
//!
//! Keys of one lock share a hash tag, `<prefix>:{<key>}:...`, so every script touches one slot
//! and stays legal on Redis Cluster:
//! - `lock`  hash `id`, `holder`, `token`, with the lease's PEXPIRE;
//! - `meta`  hash `fence` (the fencing counter, never expires) and `seq` (queue arrival order);
//! - `queue` sorted set of waiting lease ids by arrival `seq` (FIFO);
//! - `alive` sorted set of waiting lease ids by the time (ms) their wait registration lapses,
//!   so a waiter that crashed is dropped from the queue instead of blocking it.
//!
//! No script changes a lock whose `id` is not the caller's lease id.

/// Shared prologue: the server's clock in ms, and waiters whose registration lapsed removed.
const PURGE_DEAD_WAITERS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS_ALIVE, '-inf', now)) do
  redis.call('ZREM', KEYS_QUEUE, id)
  redis.call('ZREM', KEYS_ALIVE, id)
end
"#;

/// KEYS: lock, meta, queue, alive. ARGV: lease id, ttl ms, holder, enqueue (0/1), wait ttl ms.
/// Returns `{1, token, ''}` when granted, else `{0, pttl, holder}` (holder '' and pttl -2 when
/// the lock is free but an earlier waiter is first in line). A caller that is told to wait is
/// queued (once) and its registration refreshed.
const ACQUIRE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if not head or head == ARGV[1] then
    if head then
      redis.call('ZREM', KEYS[3], head)
      redis.call('ZREM', KEYS[4], head)
    end
    local token = redis.call('HINCRBY', KEYS[2], 'fence', 1)
    redis.call('HSET', KEYS[1], 'id', ARGV[1], 'holder', ARGV[3], 'token', token)
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, token, ''}
  end
end
if ARGV[4] == '1' then
  if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
    redis.call('ZADD', KEYS[3], redis.call('HINCRBY', KEYS[2], 'seq', 1), ARGV[1])
  end
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[5]), ARGV[1])
  redis.call('PEXPIRE', KEYS[3], 2 * tonumber(ARGV[5]))
  redis.call('PEXPIRE', KEYS[4], 2 * tonumber(ARGV[5]))
end
return {0, redis.call('PTTL', KEYS[1]), redis.call('HGET', KEYS[1], 'holder') or ''}
"#;

/// KEYS: lock. ARGV: lease id, ttl ms. Returns the token, or 0 when not the owner.
pub const RENEW: &str = r#"
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return tonumber(redis.call('HGET', KEYS[1], 'token'))
"#;

/// KEYS: lock, queue, alive. ARGV: lease id, wake channel. Deletes the lock if it is the
/// caller's and wakes the first live waiter (the message is its lease id). Returns 1 or 0.
const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
if head then
  redis.call('PUBLISH', ARGV[2], head)
end
return 1
"#;

/// KEYS: lock, queue, alive. ARGV: lease id, wake channel. A waiter gives up: leave the queue,
/// and if the lock is free, wake whoever is now first.
const DEQUEUE: &str = r#"
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if head then
    redis.call('PUBLISH', ARGV[2], head)
  end
end
return 1
"#;

/// KEYS: lock, queue, alive. Returns `{held 0/1, holder, token, pttl, live waiters}`.
const STATUS: &str = r#"
local lock = redis.call('HMGET', KEYS[1], 'holder', 'token')
local waiters = redis.call('ZCOUNT', KEYS[3], now + 1, '+inf')
if not lock[2] then
  return {0, '', 0, -2, waiters}
end
return {1, lock[1] or '', tonumber(lock[2]), redis.call('PTTL', KEYS[1]), waiters}
"#;

/// Redlock, on one master. KEYS: lock, meta. ARGV: lease id, ttl ms, holder. Sets the lock if
/// free (token 0 until fenced) and returns `{1, current fencing counter, ''}`, else
/// `{0, pttl, holder}`.
const REDLOCK_ACQUIRE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('PTTL', KEYS[1]), redis.call('HGET', KEYS[1], 'holder') or ''}
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'holder', ARGV[3], 'token', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, tonumber(redis.call('HGET', KEYS[2], 'fence') or '0'), ''}
"#;

/// Redlock, on one master. KEYS: lock, meta. ARGV: lease id, token. If the caller holds the
/// lock here, raise the fencing counter to at least `token` and record it on the lock.
const REDLOCK_FENCE: &str = r#"
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then
  return 0
end
if tonumber(ARGV[2]) > tonumber(redis.call('HGET', KEYS[2], 'fence') or '0') then
  redis.call('HSET', KEYS[2], 'fence', ARGV[2])
end
redis.call('HSET', KEYS[1], 'token', ARGV[2])
return 1
"#;

/// Redlock, on one master. KEYS: lock. ARGV: lease id, wake channel. Compare-and-delete, then
/// wake every waiter of the lock (Redlock waiting is not FIFO).
const REDLOCK_RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], '*')
return 1
"#;

fn with_purge(body: &str, queue: &str, alive: &str) -> String {
    let prologue = PURGE_DEAD_WAITERS.replace("KEYS_QUEUE", queue).replace("KEYS_ALIVE", alive);
    format!("{prologue}{body}")
}

/// The compiled scripts, built once per backend.
pub struct Scripts {
    pub acquire: redis::Script,
    pub renew: redis::Script,
    pub release: redis::Script,
    pub dequeue: redis::Script,
    pub status: redis::Script,
    pub redlock_acquire: redis::Script,
    pub redlock_fence: redis::Script,
    pub redlock_release: redis::Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            acquire: redis::Script::new(&with_purge(ACQUIRE, "KEYS[3]", "KEYS[4]")),
            renew: redis::Script::new(RENEW),
            release: redis::Script::new(&with_purge(RELEASE, "KEYS[2]", "KEYS[3]")),
            dequeue: redis::Script::new(&with_purge(DEQUEUE, "KEYS[2]", "KEYS[3]")),
            status: redis::Script::new(&with_purge(STATUS, "KEYS[2]", "KEYS[3]")),
            redlock_acquire: redis::Script::new(REDLOCK_ACQUIRE),
            redlock_fence: redis::Script::new(REDLOCK_FENCE),
            redlock_release: redis::Script::new(REDLOCK_RELEASE),
        }
    }
}
