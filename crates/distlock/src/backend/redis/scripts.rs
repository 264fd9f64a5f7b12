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
//!   so a waiter that crashed is dropped from the queue instead of blocking it.
//!
//! No script changes a lock whose lease id is not the caller's. The common cases (acquire a free
//! key nobody waits for, release with nobody waiting, renew) take three Redis calls or fewer; the
//! queue is only touched when someone waits.

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
/// queue; `wake_head`: purge, then wake the first waiter left.
const PURGE_DEAD_WAITERS: &str = r#"
local function purge(queue, alive)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', alive, '-inf', now)) do
    redis.call('ZREM', queue, id)
    redis.call('ZREM', alive, id)
  end
  return now
end

-- Publishes the lease id of the first live waiter, which wakes exactly that waiter.
local function wake_head(queue, alive, channel)
  purge(queue, alive)
  local head = redis.call('ZRANGE', queue, 0, 0)[1]
  if head then
    redis.call('PUBLISH', channel, head)
  end
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

/// KEYS: lock, meta, queue, alive. ARGV: lease id, ttl ms, holder, enqueue (0/1), wait ttl ms,
/// meta ttl ms. Returns `{1, token, ''}` when granted, else `{0, pttl, holder}` (holder '' and
/// pttl -2 when the lock is free but an earlier waiter is first in line). A caller that is told
/// to wait is queued (once) and its registration refreshed. The meta hash (the fencing counter)
/// expires `meta ttl` after its last grant, so locking ever new keys does not grow Redis without
/// bound.
const ACQUIRE: &str = r#"
local function grant()
  local token = next_token(KEYS[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
  redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. token .. ' ' .. ARGV[2] .. ' ' .. ARGV[3], 'PX', ARGV[2])
  return {1, tonumber(token), ''}
end
if redis.call('EXISTS', KEYS[1], KEYS[3]) == 0 then
  return grant()
end
local now = purge(KEYS[3], KEYS[4])
if redis.call('EXISTS', KEYS[1]) == 0 then
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if not head or head == ARGV[1] then
    if head then
      redis.call('ZREM', KEYS[3], head)
      redis.call('ZREM', KEYS[4], head)
    end
    return grant()
  end
end
if ARGV[4] == '1' then
  if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
    -- Arrival order from the queue itself (last score + 1): nothing outside the queue can
    -- expire under it and put a newcomer ahead of waiters that are still there.
    local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')[2]
    redis.call('ZADD', KEYS[3], (tonumber(last) or 0) + 1, ARGV[1])
  end
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[5]), ARGV[1])
  redis.call('PEXPIRE', KEYS[3], 2 * tonumber(ARGV[5]))
  redis.call('PEXPIRE', KEYS[4], 2 * tonumber(ARGV[5]))
end
local _, _, holder = parse(redis.call('GET', KEYS[1]))
return {0, redis.call('PTTL', KEYS[1]), holder or ''}
"#;

/// KEYS: lock. ARGV: lease id, ttl ms (`''`: the TTL stored with the lease), the TTL in ms for a
/// value that stores none (written by an older version). Returns `{token, ttl ms applied}`, or
/// `{0, 0}` when not the owner. The value is rewritten only when the TTL changes.
const RENEW: &str = r#"
local v = redis.call('GET', KEYS[1])
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
"#;

/// KEYS: lock, queue, alive. ARGV: lease id, wake channel. Deletes the lock if it is the
/// caller's and wakes the first live waiter (the message is its lease id). Returns 1 or 0.
const RELEASE: &str = r#"
if not owned(KEYS[1], ARGV[1]) then
  return 0
end
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  wake_head(KEYS[2], KEYS[3], ARGV[2])
end
return 1
"#;

/// KEYS: lock, queue, alive. ARGV: lease id, wake channel. A waiter gives up: leave the queue,
/// and if the lock is free, wake whoever is now first.
const DEQUEUE: &str = r#"
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then
  wake_head(KEYS[2], KEYS[3], ARGV[2])
end
return 1
"#;

/// KEYS: lock, queue, alive. Returns `{held 0/1, holder, token, pttl, live waiters}`.
const STATUS: &str = r#"
local now = purge(KEYS[2], KEYS[3])
local waiters = redis.call('ZCOUNT', KEYS[3], now + 1, '+inf')
local id, token, holder = parse(redis.call('GET', KEYS[1]))
if not id then
  return {0, '', 0, -2, waiters}
end
return {1, holder, token, redis.call('PTTL', KEYS[1]), waiters}
"#;

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
        let script =
            |body: &str| redis::Script::new(&format!("{PARSE_LOCK}{PURGE_DEAD_WAITERS}{NEXT_TOKEN}{body}"));
        Scripts {
            acquire: script(ACQUIRE),
            renew: script(RENEW),
            release: script(RELEASE),
            dequeue: script(DEQUEUE),
            status: script(STATUS),
            redlock_acquire: script(REDLOCK_ACQUIRE),
            redlock_fence: script(REDLOCK_FENCE),
            redlock_release: script(REDLOCK_RELEASE),
        }
    }
}
