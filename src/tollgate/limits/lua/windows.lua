-- Counter shapes shared by admit.lua, settle.lua and usage.lua; RedisLedger puts this file in
-- front of each of them. They keep what MemoryLedger keeps (tollgate/limits/memory.py):
--
--   sliding window  a hash: slot index -> count. The window holds the slots >= `oldest`; slots
--                   that left it are deleted by the scripts that write the hash.
--   calendar        two fields of a hash: `<name>` = the period id (its start, epoch seconds)
--                   and `<name>:n` = the count in that period; a new period starts from 0.
--
-- Time is the gateway's clock, never Redis TIME: slot indexes, the oldest live slot and period
-- ids arrive in ARGV, computed in Python from the `Instant` the caller passed, so this ledger and
-- MemoryLedger agree on every window. Key TTLs only collect idle keys; what ends a window is the
-- slot index or period id stored in it, so refreshing a TTL on write never keeps a window alive.
--
-- Numbers: every amount arrives as a decimal string and is added with HINCRBY, so stored counts
-- are always integers. Sums and comparisons use Lua numbers (doubles): exact while every count,
-- window total, amount and limit stays below 2^53 (9.007e15 tokens, or $9,007,199.25 as
-- nano-dollars in one window).

-- Add `amount` (a decimal string) to a counter field; a count never goes below 0.
local function bump(key, field, amount)
  if redis.call('HINCRBY', key, field, amount) < 0 then
    redis.call('HSET', key, field, '0')
  end
end

-- The total of the slots >= `oldest`, and those slots as {slot, count, slot, count, ...}.
-- With `prune`, the slots that left the window are deleted.
local function sliding(key, oldest, prune)
  local flat = redis.call('HGETALL', key)
  local total, live, stale = 0, {}, {}
  for i = 1, #flat, 2 do
    if tonumber(flat[i]) < oldest then
      stale[#stale + 1] = flat[i]
    else
      total = total + tonumber(flat[i + 1])
      live[#live + 1] = flat[i]
      live[#live + 1] = flat[i + 1]
    end
  end
  if prune and #stale > 0 then
    redis.call('HDEL', key, unpack(stale))
  end
  return total, live
end

-- Add to slot `slot`, first deleting the slots that left the window: a hash that is only ever
-- written (attributed cost) stays bounded without anyone reading it.
local function sliding_add(key, slot, oldest, amount)
  local stale = {}
  for _, field in ipairs(redis.call('HKEYS', key)) do
    if tonumber(field) < oldest then
      stale[#stale + 1] = field
    end
  end
  if #stale > 0 then
    redis.call('HDEL', key, unpack(stale))
  end
  bump(key, slot, amount)
end

local function calendar(key, name, period)
  local stored = redis.call('HMGET', key, name, name .. ':n')
  if stored[1] == period then
    return tonumber(stored[2] or '0')
  end
  return 0
end

local function calendar_add(key, name, period, amount)
  if redis.call('HGET', key, name) ~= period then
    redis.call('HSET', key, name, period, name .. ':n', '0')
  end
  bump(key, name .. ':n', amount)
end

local PERIODS = {'day', 'week', 'month'}

-- A sliding minute window plus three calendar periods: tokens, or cost. `periods` holds the
-- day, week and month ids. Returns {minute, day, week, month} and the live minute slots.
local function totals(slots, oldest, cal, name, periods, prune)
  local minute, live = sliding(slots, oldest, prune)
  local used = {minute}
  for i, period in ipairs(PERIODS) do
    used[i + 1] = calendar(cal, name .. ':' .. period, periods[i])
  end
  return used, live
end

local function add(slots, slot, oldest, cal, name, periods, amount)
  sliding_add(slots, slot, oldest, amount)
  for i, period in ipairs(PERIODS) do
    calendar_add(cal, name .. ':' .. period, periods[i], amount)
  end
end

-- Take back what was added at the reservation's slot and periods, from those that still hold
-- it: `slot` is '' when it left the window; a period counts only while it is the stored one.
local function release(slots, slot, cal, name, periods, amount)
  if slot ~= '' and redis.call('HEXISTS', slots, slot) == 1 then
    bump(slots, slot, amount)
  end
  for i, period in ipairs(PERIODS) do
    local field = name .. ':' .. period
    if redis.call('HGET', cal, field) == periods[i] then
      bump(cal, field .. ':n', amount)
    end
  end
end
