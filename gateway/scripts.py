"""The Lua scripts the shared counters run in Redis: each is one atomic step and one round trip.

A call is admitted by :data:`ADMIT` (its key's and model's rates and tokens per minute, its
credits, a capacity slot: all checked, then all taken only if all pass) and ended by
:data:`FINISH` (its slot given back, its reservation replaced by its cost, its tokens counted).
Rates and token windows run on the caller's clock; capacity leases on the Redis server's.
"""

from __future__ import annotations

_FUNCTIONS = """
local function tokens_of(member) return tonumber(string.match(member, ':(%d+)$')) end

-- A rolling minute of tokens: prune it, then the seconds to wait (-1: none), refused for tokens (0/1),
-- the tokens in it and the seconds until its newest leaves.
local function minute(window_key, used_key, limit, now, window)
  if limit <= 0 then return -1, 0, 0, 0 end
  local gone = redis.call('ZRANGEBYSCORE', window_key, '-inf', now - window)
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', window_key, '-inf', now - window) end
  local newest = redis.call('ZRANGE', window_key, -1, -1, 'WITHSCORES')
  if #newest == 0 then
    redis.call('DEL', used_key)
    return -1, 0, 0, 0
  end
  local used
  if #gone > 0 then
    local freed = 0
    for _, member in ipairs(gone) do freed = freed + tokens_of(member) end
    used = redis.call('DECRBY', used_key, freed)
  else
    used = tonumber(redis.call('GET', used_key) or '0')
  end
  local reset = tonumber(newest[2]) + window - now
  if used < limit then return -1, 0, used, reset end
  local need, freed, start = used - limit + 1, 0, 0
  while true do
    local batch = redis.call('ZRANGE', window_key, start, start + 99, 'WITHSCORES')
    if #batch == 0 then return reset, 1, used, reset end
    for i = 1, #batch, 2 do
      freed = freed + tokens_of(batch[i])
      if freed >= need then return tonumber(batch[i + 1]) + window - now, 1, used, reset end
    end
    start = start + 100
  end
end

-- A token bucket's level now (refilled since it was last moved), and when that is.
local function level_of(bucket, per_second, burst, now)
  local state = redis.call('HMGET', bucket, 'level', 'at')
  local level, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
  if now > at then level, at = math.min(burst, level + (now - at) * per_second), now end
  return level, at
end

local function slots_now()
  local time = redis.call('TIME')
  return time[1] * 1000 + math.floor(time[2] / 1000)
end

-- The set of a model's slots lives at least as long as its longest lease (never shortened: processes
-- may run with leases of different lengths), and goes once no process renews any.
local function outlive(key, lease)
  if redis.call('PTTL', key) < lease then redis.call('PEXPIRE', key, lease) end
end

-- What an account has left: its base, less what is recorded and reserved (the reservations of
-- processes whose lease lapsed are dropped), seeded first with the caller's base if newer (and
-- given its lifetime then: every ending renews it).
local function available(key, version, base, process, leases, ttl)
  local fields = redis.call('HGETALL', key)
  local known, held, taken = -1, 0, 0
  for j = 1, #fields, 2 do
    local name, value = fields[j], tonumber(fields[j + 1])
    if name == 'v' then known = value
    elseif name == 'b' then held = value
    elseif name == 's' then taken = taken + value
    elseif string.sub(name, 1, 2) == 'c:' then
      local owner = string.sub(name, 3)
      if owner ~= process and redis.call('EXISTS', leases .. owner) == 0 then
        redis.call('HDEL', key, name)
      else
        taken = taken + value
      end
    end
  end
  if tonumber(version) > known then
    redis.call('HSET', key, 'v', version, 'b', base)
    redis.call('EXPIRE', key, ttl)
    held = tonumber(base)
  end
  return held - taken
end

local function move(key, process, reserved, recorded, ttl)
  if tonumber(reserved) ~= 0 then redis.call('HINCRBY', key, 'c:' .. process, reserved) end
  if tonumber(recorded) ~= 0 then
    if redis.call('HINCRBY', key, 's', recorded) < 0 then redis.call('HSET', key, 's', 0) end
  end
  redis.call('EXPIRE', key, ttl)
end
"""

# KEYS: per limit its bucket, window and window's sum; then the model's slots (with a capacity); then
# the credit accounts. ARGV: now, window seconds, limits, then per limit per second (0: no rate), burst,
# tokens per minute (0: none); capacity (0: none), lease ms, slot id; process, credit lease prefix,
# nanos, need, ttl, accounts, then version and base per account.
# Returns what refused (0: nothing, i: limit i, -1: credits, -2: capacity), the refusing account and
# what it has left, then per limit checked: wait (-1: none), refused for tokens, level, used, reset.
ADMIT = (
    _FUNCTIONS
    + """
local now, window, limits = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local refused, checked, out = 0, {}, {}
for i = 1, limits do
  local k, a = 3 * (i - 1), 3 + 3 * (i - 1)
  local per_second, burst = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local wait, by_tokens, used, reset = minute(KEYS[k + 2], KEYS[k + 3], tonumber(ARGV[a + 3]), now, window)
  local level, at = 0, now
  if per_second > 0 then
    level, at = level_of(KEYS[k + 1], per_second, burst, now)
    if level < 1 then wait = math.max(wait, (1 - level) / per_second) end
  end
  checked[i] = {wait, by_tokens, level, used, reset, at, per_second, burst}
  if wait >= 0 then refused = i break end
end
local a = 3 + 3 * limits
local capacity, lease_ms, slot = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3]
local slots = 3 * limits + 1
local first_account = slots + (capacity > 0 and 1 or 0)
local process, leases, nanos, need, ttl = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], tonumber(ARGV[a + 7]), ARGV[a + 8]
local accounts, refusing, left = tonumber(ARGV[a + 9]), 0, 0
if refused == 0 then
  for j = 1, accounts do
    left = available(KEYS[first_account + j - 1], ARGV[a + 8 + 2 * j], ARGV[a + 9 + 2 * j], process, leases, ttl)
    if left <= 0 or left < need then refused, refusing = -1, j break end
  end
end
local now_ms = 0
if refused == 0 and capacity > 0 then
  now_ms = slots_now()
  -- Lapsed leases (of processes that died) matter only once the slots look full: dropped then.
  if redis.call('ZCARD', KEYS[slots]) >= capacity then
    redis.call('ZREMRANGEBYSCORE', KEYS[slots], '-inf', now_ms)
    if redis.call('ZCARD', KEYS[slots]) >= capacity then refused = -2 end
  end
end
if refused == 0 then
  for i = 1, limits do
    local c = checked[i]
    if c[7] > 0 then
      c[3] = c[3] - 1
      local bucket = KEYS[3 * (i - 1) + 1]
      redis.call('HSET', bucket, 'level', string.format('%.17g', c[3]), 'at', string.format('%.17g', c[6]))
      -- Once full again it is the same as no bucket at all.
      redis.call('PEXPIRE', bucket, math.ceil((c[8] - c[3]) / c[7] * 1000) + 1000)
    end
  end
  for j = 1, accounts do redis.call('HINCRBY', KEYS[first_account + j - 1], 'c:' .. process, nanos) end
  if capacity > 0 then
    redis.call('ZADD', KEYS[slots], now_ms + lease_ms, slot)
    outlive(KEYS[slots], lease_ms)
  end
end
out[1], out[2], out[3] = refused, refusing, tostring(left)
for i, c in ipairs(checked) do
  local at = 3 + 5 * (i - 1)
  out[at + 1], out[at + 2], out[at + 3] = string.format('%.17g', c[1]), c[2], string.format('%.17g', c[3])
  out[at + 4], out[at + 5] = c[4], string.format('%.17g', c[5])
end
return out
"""
)

# KEYS: the model's slots (with a lease), the credit accounts, then pairs of (window, window's sum).
# ARGV: lease ("": none), process, ttl, accounts, reserved and recorded change per account, then now,
# member, tokens, window seconds. A window's member is "<request id>:<tokens>", scored by when counted.
FINISH = (
    _FUNCTIONS
    + """
local k = 1
if ARGV[1] ~= '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  k = 2
end
local accounts = tonumber(ARGV[4])
for j = 1, accounts do
  move(KEYS[k], ARGV[2], ARGV[3 + 2 * j], ARGV[4 + 2 * j], ARGV[3])
  k = k + 1
end
local a = 5 + 2 * accounts
local ttl = math.ceil(tonumber(ARGV[a + 3]) * 1000) + 1000
for i = k, #KEYS, 2 do
  if redis.call('ZADD', KEYS[i], 'NX', ARGV[a], ARGV[a + 1]) == 1 then
    redis.call('INCRBY', KEYS[i + 1], ARGV[a + 2])
  end
  redis.call('PEXPIRE', KEYS[i], ttl)
  redis.call('PEXPIRE', KEYS[i + 1], ttl)
end
"""
)

# KEYS: the model's slots. ARGV: lease ms, then the slot ids to renew (only those still there).
RENEW = (
    _FUNCTIONS
    + """
local now = slots_now()
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
outlive(KEYS[1], tonumber(ARGV[1]))
"""
)

# KEYS: accounts. ARGV: process, credit lease prefix, nanos, need, ttl, then version and base per account.
RESERVE = (
    _FUNCTIONS
    + """
local lefts = {}
for i, key in ipairs(KEYS) do
  lefts[i] = available(key, ARGV[4 + 2 * i], ARGV[5 + 2 * i], ARGV[1], ARGV[2], ARGV[5])
  if lefts[i] <= 0 or lefts[i] < tonumber(ARGV[4]) then return {i, tostring(lefts[i])} end
end
for _, key in ipairs(KEYS) do redis.call('HINCRBY', key, 'c:' .. ARGV[1], ARGV[3]) end
return {0, '0'}
"""
)

# KEYS: the accounts. ARGV: process, ttl, then per account its reserved change and recorded change.
MOVE = _FUNCTIONS + "for j = 1, #KEYS do move(KEYS[j], ARGV[1], ARGV[1 + 2 * j], ARGV[2 + 2 * j], ARGV[2]) end"

# KEYS: the account. ARGV: version, base, ttl.
SEED = (
    _FUNCTIONS
    + """
if tonumber(ARGV[1]) > tonumber(redis.call('HGET', KEYS[1], 'v') or '-1') then
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'b', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
"""
)
