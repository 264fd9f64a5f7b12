//! The Lua of keys held by several leases — semaphores (a limit above 1), shared (read) locks —
//! and of leases that publish a value (leader elections), with the queue logic every acquire,
//! release and dequeue script shares.
//!
//! A plain lock (limit 1, exclusive, no value) keeps its string `lock` exactly as before. Every
//! other lease lives in two keys beside it, under the same hash tag:
//! - `holders` hash: lease id → `"<token> <ttl ms> <mode><v|n> <limit> <holder bytes> <holder><value>"`
//!   (mode `X` exclusive or `S` shared; `v` when a value follows the holder label, `n` when none;
//!   the label's length in bytes comes first, so labels and values may hold any byte);
//! - `deadlines` sorted set: lease id → its deadline in ms on the Redis server's clock. A holder
//!   is live while the clock is below it; every script that looks at the key first drops the
//!   lapsed ones (`purge_holders`), and both keys expire a second after the latest deadline, so a
//!   crashed holder's permit comes back at its TTL and nothing stays behind.
//!
//! A waiter that is not a plain lock says in the `asks` hash what it asks for and what its grant
//! would be (lease id → `"<mode> <limit> <ttl ms> <meta ttl ms> <v|n> <holder bytes> <holder><value>"`;
//! no entry: a plain exclusive lock), so that the head of the queue can be judged — and granted
//! without it. A caller is granted only when the key has room for it and it is first in line (or
//! nobody waits): a shared request behind a waiting exclusive one waits (no writer starvation).
//! Room is handed on at once (`hand_on`): every script that frees room or judges a caller first
//! grants the waiters at the head of the queue that fit, in queue order, each with the next token,
//! and wakes each to learn of its grant (its next acquire call finds its place and counts its
//! deadline again from then). So the key is never seen with room its first waiter is entitled
//! to: a try-once caller is refused only when the key is really full, and a status read lists
//! every grant already due (the key's history stays linearizable, as the contract suite checks).
//! A plain lock's waiter (its grant is the `lock` string, written by its own script) is still
//! woken to take its turn itself, and the hand-off stops at it.

use std::time::Duration;

use super::scripts::{Acquire, ScriptCall, Scripts};
use super::{millis, LockKeys};
use crate::types::LockMode;

/// Helpers of every script: `lock_keys` (KEYS by name), `now_ms`, the holders' entries, how a key
/// is held (`held`), whether a request fits and whose turn it is, joining and leaving the queue,
/// the answer to a refused caller and the wake-up of the next waiter.
pub const LIBRARY: &str = r#"
-- KEYS of every lock script, in this order.
local function lock_keys()
  return {lock = KEYS[1], meta = KEYS[2], queue = KEYS[3], alive = KEYS[4],
          holders = KEYS[5], deadlines = KEYS[6], asks = KEYS[7]}
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function parse_entry(e)
  if not e then return nil end
  local token, ttl, mode, hasv, limit, n, at =
    string.match(e, '^(%d+) (%d+) ([XS])([vn]) (%d+) (%d+) ()')
  if not token then return nil end
  n = tonumber(n)
  local value = false
  if hasv == 'v' then value = string.sub(e, at + n) end
  return {token = token, ttl = tonumber(ttl), mode = mode, limit = tonumber(limit),
          holder = string.sub(e, at, at + n - 1), value = value}
end

local function format_entry(token, ttl, mode, limit, holder, value)
  local hasv = 'n'
  if value then hasv = 'v' else value = '' end
  return token .. ' ' .. string.format('%d', ttl) .. ' ' .. mode .. hasv .. ' ' ..
    string.format('%d', limit) .. ' ' .. #holder .. ' ' .. holder .. value
end

-- Drops the holders whose deadline has passed; returns how many are left.
local function purge_holders(K, now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', K.deadlines, '-inf', now)) do
    redis.call('HDEL', K.holders, id)
    redis.call('ZREM', K.deadlines, id)
  end
  return redis.call('ZCARD', K.deadlines)
end

-- The holders' keys expire a second after the latest deadline (or go now, with no holder left).
local function keep_holders(K, now)
  local latest = redis.call('ZRANGE', K.deadlines, -1, -1, 'WITHSCORES')[2]
  if latest then
    local ms = math.max(tonumber(latest) - now, 0) + 1000
    redis.call('PEXPIRE', K.holders, ms)
    redis.call('PEXPIRE', K.deadlines, ms)
  else
    redis.call('DEL', K.holders, K.deadlines)
  end
end

-- How the key is held: live holders, their limit and mode (a plain lock is one exclusive holder
-- of limit 1). An entry that cannot be read counts as a lock: nobody is let in beside it.
local function held(K, now)
  if redis.call('EXISTS', K.lock) == 1 then return 1, 1, 'X' end
  local count = purge_holders(K, now)
  if count == 0 then return 0, 1, 'X' end
  local e = parse_entry(redis.call('HGET', K.holders, redis.call('ZRANGE', K.deadlines, 0, 0)[1]))
  if not e then return count, 1, 'X' end
  return count, e.limit, e.mode
end

-- Whether a request (mode, limit) fits beside `count` holders of (klimit, kmode).
local function fits(count, klimit, kmode, mode, limit)
  if count == 0 then return true end
  if limit ~= klimit then return false end
  if mode == 'S' then return kmode == 'S' end
  return kmode == 'X' and count < klimit
end

-- What a waiter asks for: a plain lock unless it said otherwise. Beside mode and limit, a waiter
-- of several says what its grant would be (TTL, fencing counter TTL, holder label, value), so
-- that it can be handed its place when its turn comes (`hand_on`); `ttl` is nil for a plain lock
-- and for an entry written by an older version (that waiter takes its turn itself).
local function ask_of(K, id)
  local a = redis.call('HGET', K.asks, id) or ''
  local mode, limit = string.match(a, '^([XS]) (%d+)')
  if not mode then return {mode = 'X', limit = 1} end
  local ask = {mode = mode, limit = tonumber(limit)}
  local ttl, meta_ttl, hasv, n, at = string.match(a, '^[XS] %d+ (%d+) (%d+) ([vn]) (%d+) ()')
  if ttl then
    n = tonumber(n)
    ask.ttl, ask.meta_ttl = tonumber(ttl), meta_ttl
    ask.holder = string.sub(a, at, at + n - 1)
    ask.value = false
    if hasv == 'v' then ask.value = string.sub(a, at + n) end
  end
  return ask
end

local function format_ask(mode, limit, ttl, meta_ttl, holder, value)
  local hasv = 'n'
  if value then hasv = 'v' else value = '' end
  return mode .. ' ' .. string.format('%d', limit) .. ' ' .. string.format('%d', ttl) .. ' ' ..
    meta_ttl .. ' ' .. hasv .. ' ' .. #holder .. ' ' .. holder .. value
end

-- Grants `id` a place among the holders: the next fencing token, its deadline `ttl` from now.
local function grant_entry(K, id, now, ttl, meta_ttl, mode, limit, holder, value)
  local token = next_token(K.meta)
  redis.call('PEXPIRE', K.meta, meta_ttl)
  redis.call('HSET', K.holders, id, format_entry(token, ttl, mode, limit, holder, value))
  redis.call('ZADD', K.deadlines, now + ttl, id)
  return token
end

-- The token of a live place `id` holds among the holders (handed to it while it waited), its
-- deadline counted again from now (it learns of the grant only now, and counts from its call),
-- else nil.
local function claim(K, id, now)
  local deadline = tonumber(redis.call('ZSCORE', K.deadlines, id))
  if not deadline or deadline <= now then return nil end
  local e = parse_entry(redis.call('HGET', K.holders, id))
  if not e then return nil end
  redis.call('ZADD', K.deadlines, now + e.ttl, id)
  keep_holders(K, now)
  return e.token
end

-- Whether it is the turn of `id` asking (mode, limit): it is first in line (or nobody waits)
-- and the key has room for it.
local function in_turn(K, id, mode, limit, count, klimit, kmode)
  local head = redis.call('ZRANGE', K.queue, 0, 0)[1]
  if head and head ~= id then return false end
  return fits(count, klimit, kmode, mode, limit)
end

local function join_queue(K, id, now, queue_ttl, ask)
  if not redis.call('ZSCORE', K.queue, id) then
    -- Arrival order from the queue itself (last score + 1): nothing outside the queue can
    -- expire under it and put a newcomer ahead of waiters that are still there.
    local last = redis.call('ZRANGE', K.queue, -1, -1, 'WITHSCORES')[2]
    redis.call('ZADD', K.queue, (tonumber(last) or 0) + 1, id)
  end
  redis.call('ZADD', K.alive, now + tonumber(queue_ttl), id)
  redis.call('PEXPIRE', K.queue, 2 * tonumber(queue_ttl))
  redis.call('PEXPIRE', K.alive, 2 * tonumber(queue_ttl))
  if ask then
    redis.call('HSET', K.asks, id, ask)
    redis.call('PEXPIRE', K.asks, 2 * tonumber(queue_ttl))
  end
end

local function leave_queue(K, id)
  redis.call('ZREM', K.queue, id)
  redis.call('ZREM', K.alive, id)
  redis.call('HDEL', K.asks, id)
end

-- The answer to a refused caller: {0, ms until a holder's deadline (-2: free, others are
-- first), the holder's label}.
local function refusal(K, now)
  local v = redis.call('GET', K.lock)
  if v then
    local _, _, holder = parse(v)
    return {0, redis.call('PTTL', K.lock), holder or ''}
  end
  local first = redis.call('ZRANGE', K.deadlines, 0, 0, 'WITHSCORES')
  if not first[1] then return {0, -2, ''} end
  local e = parse_entry(redis.call('HGET', K.holders, redis.call('ZRANGE', K.deadlines, -1, -1)[1]))
  return {0, math.max(tonumber(first[2]) - now, 1), (e and e.holder) or ''}
end

-- Hands the key on in queue order while the first waiter fits: a waiter of several is granted
-- its place here and now (so no caller ever finds room the queue's head is entitled to, and a
-- status read never misses a grant already due), then woken to learn of it (the message is its
-- lease id); a plain lock's waiter is woken to take its turn itself, and the hand-off stops
-- there. Call after purge(); `caller` (or nil) is the lease id of the script's caller.
local function hand_on(K, channel, changes, now, caller)
  local granted = false
  while true do
    local head = redis.call('ZRANGE', K.queue, 0, 0)[1]
    -- The caller first in line is judged by its own script, which hands on after it.
    if not head or head == caller then break end
    local count, klimit, kmode = held(K, now)
    local ask = ask_of(K, head)
    if not fits(count, klimit, kmode, ask.mode, ask.limit) then break end
    if not ask.ttl then
      redis.call('PUBLISH', channel, head)
      break
    end
    leave_queue(K, head)
    grant_entry(K, head, now, ask.ttl, ask.meta_ttl, ask.mode, ask.limit, ask.holder, ask.value)
    redis.call('PUBLISH', channel, head)
    granted = true
  end
  if granted then
    keep_holders(K, now)
    redis.call('PUBLISH', changes, '*')
  end
end
"#;

/// KEYS: lock, meta, queue, alive, holders, deadlines, asks. ARGV: those of the lock's acquire
/// script (lease id, ttl ms, holder, enqueue (0/1), wait ttl ms, meta ttl ms, change channel,
/// wake channel), then mode (X/S), limit, value flag (v/n), value. A semaphore permit, a shared
/// lock, or a lease that publishes a value: granted when the key has room and it is the
/// caller's turn (see the module docs), as an entry of `holders`, with the next fencing token;
/// first the key is handed on to the waiters whose turn it is (`hand_on`), and a caller that was
/// handed its place is answered its token. `{-1, limit, ''}` when the key is held with another
/// limit (the caller also leaves the queue: waiting would not change it); else the caller is
/// queued (once, with what it asks for and what its grant would be) and told `{0, ms, holder}`
/// as by the lock's script.
const ACQUIRE_MANY: &str = r#"
local K = lock_keys()
local id, ttl, mode, limit = ARGV[1], tonumber(ARGV[2]), ARGV[9], tonumber(ARGV[10])
local value = false
if ARGV[11] == 'v' then value = ARGV[12] end
local now = purge(K.queue, K.alive, K.asks)
hand_on(K, ARGV[8], ARGV[7], now, id)
-- Handed a place while it waited (just now, or before; or a retry of an acquire whose answer
-- was lost).
local handed = claim(K, id, now)
if handed then
  leave_queue(K, id)
  return {1, tonumber(handed), ''}
end
local count, klimit, kmode = held(K, now)
if count > 0 and klimit ~= limit then
  leave_queue(K, id)
  return {-1, klimit, ''}
end
if in_turn(K, id, mode, limit, count, klimit, kmode) then
  leave_queue(K, id)
  local token = grant_entry(K, id, now, ttl, ARGV[6], mode, limit, ARGV[3], value)
  keep_holders(K, now)
  redis.call('PUBLISH', ARGV[7], '*')
  hand_on(K, ARGV[8], ARGV[7], now, nil)
  return {1, tonumber(token), ''}
end
if ARGV[4] == '1' then
  join_queue(K, id, now, ARGV[5], format_ask(mode, limit, ttl, ARGV[6], ARGV[3], value))
end
return refusal(K, now)
"#;

/// A call of [`ACQUIRE_MANY`], its KEYS and ARGV by name.
pub struct AcquireMany<'a> {
    /// KEYS and ARGV[1..=8], as for a plain lock.
    pub lock: Acquire<'a>,
    /// ARGV[9]: exclusive (a lock or a permit) or shared.
    pub mode: LockMode,
    /// ARGV[10]: the key's number of permits (1 for a lock or a shared lock).
    pub limit: u32,
    /// ARGV[11], ARGV[12]: what the lease publishes, if anything.
    pub value: Option<&'a str>,
}

impl ScriptCall for AcquireMany<'_> {
    fn script<'s>(&self, scripts: &'s Scripts) -> &'s redis::Script {
        &scripts.acquire_many
    }

    fn keys(&self) -> Vec<&str> {
        self.lock.keys()
    }

    fn args(&self) -> Vec<String> {
        let mut args = self.lock.args();
        args.extend([
            mode_letter(self.mode).to_owned(),
            self.limit.to_string(),
            if self.value.is_some() { "v" } else { "n" }.to_owned(),
            self.value.unwrap_or_default().to_owned(),
        ]);
        args
    }
}

/// The letter the scripts store for a mode.
fn mode_letter(mode: LockMode) -> &'static str {
    match mode {
        LockMode::Exclusive => "X",
        LockMode::Shared => "S",
    }
}

/// KEYS: lock, meta, queue, alive, holders, deadlines, asks. ARGV: lease id, value, change
/// channel, the TTL in ms for a lock value that stores none. Replaces the value the caller's live
/// lease publishes and returns 1, or 0 when the caller holds nothing. A plain lock that proclaims
/// becomes a holder entry (same token, same deadline): only entries carry values.
const PROCLAIM: &str = r#"
local K = lock_keys()
local now = now_ms()
local v = redis.call('GET', K.lock)
if v then
  local id, token, holder, ttl = parse(v)
  local pttl = redis.call('PTTL', K.lock)
  if id ~= ARGV[1] or pttl <= 0 then return 0 end
  redis.call('DEL', K.lock)
  local entry = format_entry(string.format('%.0f', token), ttl or tonumber(ARGV[4]), 'X', 1, holder, ARGV[2])
  redis.call('HSET', K.holders, ARGV[1], entry)
  redis.call('ZADD', K.deadlines, now + pttl, ARGV[1])
else
  local deadline = tonumber(redis.call('ZSCORE', K.deadlines, ARGV[1]))
  local e = parse_entry(redis.call('HGET', K.holders, ARGV[1]))
  if not deadline or deadline <= now or not e then return 0 end
  redis.call('HSET', K.holders, ARGV[1], format_entry(e.token, e.ttl, e.mode, e.limit, e.holder, ARGV[2]))
end
keep_holders(K, now)
redis.call('PUBLISH', ARGV[3], '*')
return 1
"#;

/// A call of [`PROCLAIM`], its KEYS and ARGV by name.
pub struct Proclaim<'a> {
    /// KEYS: every key of the lock; ARGV[3]: the change channel.
    pub keys: &'a LockKeys,
    /// ARGV[1]: the caller's lease id.
    pub lease_id: &'a str,
    /// ARGV[2]: the new value.
    pub value: &'a str,
    /// ARGV[4]: the TTL for a lock value that stores none (written by an older version).
    pub fallback_ttl: Duration,
}

impl ScriptCall for Proclaim<'_> {
    fn script<'s>(&self, scripts: &'s Scripts) -> &'s redis::Script {
        &scripts.proclaim
    }

    fn keys(&self) -> Vec<&str> {
        self.keys.all()
    }

    fn args(&self) -> Vec<String> {
        vec![
            self.lease_id.to_owned(),
            self.value.to_owned(),
            self.keys.changes.clone(),
            millis(self.fallback_ttl).to_string(),
        ]
    }
}

/// The scripts of this file, for [`Scripts`].
pub(super) fn sources() -> [&'static str; 2] {
    [ACQUIRE_MANY, PROCLAIM]
}
