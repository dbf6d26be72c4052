-- Counter shapes shared by admit.lua, settle.lua and usage.lua; RedisLedger puts this file in
-- front of each of them. They keep what MemoryLedger keeps (tollgate/limits/memory.py), in one
-- hash per caller and deployment and one per caller (its total cost), so that a script reads
-- each hash with one HMGET and writes it with one HSET, whatever the number of windows:
--
--   sliding window  `<w>.<slot>` = the count of one slot, `<w>.tot` = the total of the slots
--                   held, `<w>.old` = the oldest slot of the window when it last moved. Every
--                   slot held is in [old, old + SLOTS - 1]; moving the window on deletes the
--                   slots that left it and takes them off the total, so reading a window costs
--                   the slots that left since the last reader (usually none), not a scan.
--   calendar        `<c>.id` = the period id (its start, epoch seconds) and `<c>.n` = the count
--                   in that period; a new period starts from 0.
--
-- Time is the gateway's clock, never Redis TIME: slot indexes and period ids arrive in ARGV,
-- computed in Python from the `Instant` the caller passed, so this ledger and MemoryLedger agree
-- on every window. Key TTLs only collect idle keys; what ends a window is the slot index or
-- period id stored in it, so refreshing a TTL on write never keeps a window alive.
--
-- Numbers: stored counts are integers written as decimal strings. Sums and comparisons use Lua
-- numbers (doubles): exact while every count, window total, amount and limit stays below 2^53
-- (9.007e15 tokens, or $9,007,199.25 as nano-dollars in one window).

local SLOTS = 60 -- both sliding windows: 60 x 1 s (minute), 60 x 1 min (hour)

-- A hash read once and written once: `get`/`set` work on a local copy, `flush` writes the
-- fields set (one HSET) and refreshes the TTL.
local function open(key, fields)
  local values = redis.call('HMGET', key, unpack(fields))
  local h = {key = key, values = {}, dirty = {}}
  for i, field in ipairs(fields) do
    h.values[field] = values[i]
  end
  return h
end

local function get(h, field)
  local value = h.values[field]
  if value == nil then -- not fetched with the others: read it now
    value = redis.call('HGET', h.key, field)
    h.values[field] = value
  end
  return value
end

local function number(h, field)
  return tonumber(get(h, field) or '0') or 0
end

local function set(h, field, value)
  h.values[field] = value
  h.dirty[field] = true
end

local function flush(h, ttl)
  local flat = {}
  for field in pairs(h.dirty) do
    flat[#flat + 1] = field
    flat[#flat + 1] = h.values[field] -- Redis writes a number as %.17g: exact below 2^53
  end
  if #flat > 0 then
    redis.call('HSET', h.key, unpack(flat))
    redis.call('EXPIRE', h.key, ttl)
  end
end

-- The fields to fetch for window `w` at slot `slot` (its total, its start, the current slot).
local function window_fields(fields, w, slot)
  fields[#fields + 1] = w .. '.old'
  fields[#fields + 1] = w .. '.tot'
  fields[#fields + 1] = w .. '.' .. slot
end

local function calendar_fields(fields, c)
  fields[#fields + 1] = c .. '.id'
  fields[#fields + 1] = c .. '.n'
end

-- The total of window `w` once its oldest slot is `oldest`. With `write`, the slots that left
-- are deleted and the window's start and total stored (a reader that writes nothing only
-- subtracts them).
local function total(h, w, oldest, write)
  local old = tonumber(get(h, w .. '.old') or '')
  local sum = number(h, w .. '.tot')
  if old == nil then
    if write then
      set(h, w .. '.old', oldest)
      set(h, w .. '.tot', 0)
    end
    return 0
  end
  if oldest <= old then
    return sum
  end
  local gone = {}
  for slot = old, math.min(oldest - 1, old + SLOTS - 1) do
    gone[#gone + 1] = w .. '.' .. slot
  end
  if oldest > old + SLOTS - 1 then
    sum = 0 -- every slot held left the window
  else
    for _, value in ipairs(redis.call('HMGET', h.key, unpack(gone))) do
      if value then
        sum = sum - tonumber(value)
      end
    end
  end
  if write then
    redis.call('HDEL', h.key, unpack(gone))
    for _, field in ipairs(gone) do
      h.values[field] = false
      h.dirty[field] = nil
    end
    set(h, w .. '.old', oldest)
    set(h, w .. '.tot', sum)
  end
  return sum
end

-- Add `amount` (may be negative: a release) to slot `slot` of window `w`, moved on to `oldest`
-- first; a slot never goes below 0. A slot that left the window is not touched.
local function window_add(h, w, slot, oldest, amount)
  total(h, w, oldest, true)
  -- A slot before the window's start (a call replayed or settled late, by an instance whose
  -- clock is behind) is outside every later window: it would never be taken off the total.
  if slot < oldest or slot < number(h, w .. '.old') then
    return
  end
  local field = w .. '.' .. slot
  local held = get(h, field)
  if amount < 0 and not held then
    return -- a release from a slot that no longer holds anything
  end
  local before = tonumber(held or '0')
  local after = math.max(before + amount, 0)
  set(h, field, after)
  set(h, w .. '.tot', number(h, w .. '.tot') + after - before)
end

-- The live slots of window `w` as {slot, count, ...}: what a Retry-After is computed from.
local function live_slots(h, w, oldest, now_slot)
  local fields = {}
  for slot = oldest, now_slot do
    fields[#fields + 1] = w .. '.' .. slot
  end
  local out = {}
  for i, value in ipairs(redis.call('HMGET', h.key, unpack(fields))) do
    if value then
      out[#out + 1] = tostring(oldest + i - 1)
      out[#out + 1] = value
    end
  end
  return out
end

local function calendar(h, c, id)
  if get(h, c .. '.id') == id then
    return number(h, c .. '.n')
  end
  return 0
end

-- Add to calendar `c` in period `id`; a later period starts from 0, an earlier one (a call
-- replayed or settled late) is over and counts nowhere; a count never goes below 0.
local function calendar_add(h, c, id, amount)
  local stored = get(h, c .. '.id')
  if stored ~= id then
    if stored and tonumber(id) < tonumber(stored) then
      return
    end
    set(h, c .. '.id', id)
    h.values[c .. '.n'] = '0'
  end
  set(h, c .. '.n', math.max(number(h, c .. '.n') + amount, 0))
end

-- Take back from calendar `c` what was added in period `id`, if that is still its period.
local function calendar_release(h, c, id, amount)
  if get(h, c .. '.id') == id then
    set(h, c .. '.n', math.max(number(h, c .. '.n') - amount, 0))
  end
end

-- The three calendar counters of a sliding window: `<prefix>d`, `<prefix>w`, `<prefix>mo`.
local PERIODS = {'d', 'w', 'mo'}

local function amounts_fields(fields, prefix, slot)
  window_fields(fields, prefix .. 'm', slot)
  for _, p in ipairs(PERIODS) do
    calendar_fields(fields, prefix .. p)
  end
end

-- {minute, day, week, month} of a window and its calendars; `periods` = {day, week, month} ids.
local function amounts(h, prefix, oldest, periods, write)
  local used = {total(h, prefix .. 'm', oldest, write)}
  for i, p in ipairs(PERIODS) do
    used[i + 1] = calendar(h, prefix .. p, periods[i])
  end
  return used
end

local function amounts_add(h, prefix, slot, oldest, periods, amount)
  window_add(h, prefix .. 'm', slot, oldest, amount)
  for i, p in ipairs(PERIODS) do
    calendar_add(h, prefix .. p, periods[i], amount)
  end
end

local function amounts_release(h, prefix, slot, oldest, periods, amount)
  if slot then
    window_add(h, prefix .. 'm', slot, oldest, -amount)
  end
  for i, p in ipairs(PERIODS) do
    calendar_release(h, prefix .. p, periods[i], amount)
  end
end

-- The entity set lists every deployment a caller used; an entity joins it (and refreshes its
-- TTL) at most once a day, not on every call.
local function remember(entities, h, entity, day, ttl)
  if get(h, 'seen') ~= day then
    redis.call('SADD', entities, entity)
    redis.call('EXPIRE', entities, ttl)
    set(h, 'seen', day)
  end
end
