-- Counter shapes shared by admit.lua, settle.lua and usage.lua; RedisLedger puts this file in
-- front of each of them. They keep what MemoryLedger keeps (tollgate/limits/memory.py), in one
-- hash per caller bucket, read with one HMGET and written with one HSET whatever the number of
-- windows:
--
--   sliding window  `<w>.<slot>` = the count of one slot, `<w>.tot` = the total of the slots
--                   held, `<w>.old` = the oldest slot of the window when it last moved. Every
--                   slot held is in [old, old + SLOTS - 1]; moving the window on deletes the
--                   slots that left it and takes them off the total, so reading a window costs
--                   the slots that left since the last reader (usually none), not a scan.
--   calendar        `<c>.id` = the period id (its start, epoch seconds), `<c>.e` = its end
--                   (epoch seconds; absent in counters written before ends were kept) and
--                   `<c>.n` = the count in that period; a new period starts from 0. A moment
--                   inside the stored period counts there even when its own period id differs
--                   (`rateLimitSchedule` changed): the stored period runs until its end, so a
--                   schedule change never starts a limit over early.
--
-- The caller's own windows (its cost) are named `c...`; an entity's are prefixed with the
-- entity and `|` (`gpt-4|tm.old`). No caller field has a `|` and no suffix has one, so no two
-- names meet whatever the entity's name.
--
-- Time is the gateway's clock, never Redis TIME: slot indexes and period ids arrive in ARGV,
-- computed in Python from the `Instant` the caller passed, so this ledger and MemoryLedger agree
-- on every window. Key TTLs only collect idle keys; what ends a window is the slot index or
-- period id stored in it, so refreshing a TTL never keeps a window alive.
--
-- Speed: Redis runs these scripts in its one thread, so their cost is every instance's latency.
-- Each field name is built once per run (a window is a record of its names) and each stored
-- value parsed once; the interpreter spends most of a run on string building and parsing.
--
-- Numbers: stored counts are integers written as decimal strings. Sums and comparisons use Lua
-- numbers (doubles): exact while every count, window total, amount and limit stays below 2^53
-- (9.007e15 tokens, or $9,007,199.25 as nano-dollars in one window). Every count is capped at
-- CAP, the largest double below 2^63 (as MemoryLedger caps them, limits.cost.USAGE_MAX): a
-- larger one would overflow Java's Long (and Redis's integer replies, which turn it negative).

local SLOTS = 60 -- both sliding windows: 60 x 1 s (minute), 60 x 1 min (hour)
local CAP = 9223372036854774784 -- 2^63 - 1024

local function capped(n)
  if n > CAP then
    return CAP
  end
  return n
end

-- The bucket hash as one script sees it: the fields it reads (`want`, before `read`), their
-- values, and the fields it writes (`put`, written by `flush`).
local KEY, DAY, FRESH
local names, index, values = {}, {}, nil
local writes = {}

local function want(name)
  if not index[name] then
    names[#names + 1] = name
    index[name] = #names
  end
  return name
end

-- One HMGET of every wanted field. `seen` holds the day the TTLs were last refreshed: the
-- first write of a day refreshes them (`flush`), later ones do not. A reader passes no day.
local function read(key, day)
  KEY, DAY = key, day
  want('seen')
  values = redis.call('HMGET', key, unpack(names))
  FRESH = day ~= nil and values[index.seen] ~= day
end

-- A field's value in this run: what was put, else what was read (false: absent).
local function stored(name)
  local value = writes[name]
  if value ~= nil then
    return value
  end
  local i = index[name]
  if i then
    return values[i]
  end
  return redis.call('HGET', KEY, name) -- not wanted up front (a rare path)
end

local function put(name, value)
  writes[name] = value
end

local function count(name)
  local value = stored(name)
  return value and tonumber(value) or 0
end

-- One HSET of the fields put; at the first write of a day, the TTL of the hash and of the keys
-- in `companions` is refreshed (a TTL longer than any window by more than a day collects no key
-- a live window needs).
local function flush(ttl, companions)
  local flat = {}
  for name, value in pairs(writes) do
    flat[#flat + 1] = name
    flat[#flat + 1] = value -- Redis writes a number as %.17g: exact below 2^53
  end
  if #flat == 0 then
    return
  end
  if FRESH then
    flat[#flat + 1] = 'seen'
    flat[#flat + 1] = DAY
  end
  redis.call('HSET', KEY, unpack(flat))
  if FRESH then
    redis.call('EXPIRE', KEY, ttl)
    for _, key in ipairs(companions) do
      redis.call('EXPIRE', key, ttl)
    end
    FRESH = false
  end
  writes = {}
end

-- --- sliding windows ---------------------------------------------------------------------------

-- Window `name` as a record; `slot` is the current slot (its field is read with the others).
local function sliding(name, slot)
  local w = {name = name, old = want(name .. '.old'), tot = want(name .. '.tot')}
  w.slot, w.at = slot, want(name .. '.' .. slot)
  return w
end

local function slot_field(w, slot)
  if slot == w.slot then
    return w.at
  end
  return w.name .. '.' .. slot
end

-- The total of window `w` once its oldest slot is `oldest`. With `write`, the slots that left
-- are deleted and the window's start and total stored (a reader that writes nothing only
-- subtracts them).
local function total(w, oldest, write)
  local old = tonumber(stored(w.old) or '')
  local sum = count(w.tot)
  if old == nil then
    if write then
      put(w.old, oldest)
      put(w.tot, 0)
    end
    return 0
  end
  if oldest <= old then
    return sum
  end
  local gone = {}
  for slot = old, math.min(oldest - 1, old + SLOTS - 1) do
    gone[#gone + 1] = w.name .. '.' .. slot
  end
  if oldest > old + SLOTS - 1 then
    sum = 0 -- every slot held left the window
  else
    for _, value in ipairs(redis.call('HMGET', KEY, unpack(gone))) do
      if value then
        sum = sum - tonumber(value)
      end
    end
  end
  if write then
    redis.call('HDEL', KEY, unpack(gone))
    for _, name in ipairs(gone) do
      writes[name] = nil
      local i = index[name]
      if i then
        values[i] = false
      end
    end
    put(w.old, oldest)
    put(w.tot, sum)
  end
  return sum
end

-- Add `amount` (may be negative: a release) to slot `slot` of window `w`, moved on to `oldest`
-- first; a slot never goes below 0. A slot that left the window is not touched.
local function window_add(w, slot, oldest, amount)
  total(w, oldest, true)
  -- A slot before the window's start (a call replayed or settled late, by an instance whose
  -- clock is behind) is outside every later window: it would never be taken off the total.
  if slot < oldest or slot < count(w.old) then
    return
  end
  local name = slot_field(w, slot)
  local held = stored(name)
  if amount < 0 and not held then
    return -- a release from a slot that no longer holds anything
  end
  local before = held and tonumber(held) or 0
  local after = capped(math.max(before + amount, 0))
  put(name, after)
  put(w.tot, capped(math.max(count(w.tot) + after - before, 0)))
end

-- The live slots of window `w` as {slot, count, ...}: what a Retry-After is computed from.
local function live_slots(w, oldest, now_slot)
  local fields = {}
  for slot = oldest, now_slot do
    fields[#fields + 1] = slot_field(w, slot)
  end
  local out = {}
  for i, value in ipairs(redis.call('HMGET', KEY, unpack(fields))) do
    if value then
      out[#out + 1] = tostring(oldest + i - 1)
      out[#out + 1] = value
    end
  end
  return out
end

-- --- calendar counters -------------------------------------------------------------------------

local function calendar(name)
  return {id = want(name .. '.id'), n = want(name .. '.n'), e = want(name .. '.e')}
end

-- The moment a script runs at, as periods see it: `ids` {day, week, month} period ids, their
-- `ends`, and `at`, the moment in whole epoch seconds.
local function moment(ids, ends, at)
  return {ids[1], ids[2], ids[3], ends = ends, at = tonumber(at)}
end

-- Whether calendar `c` counts moment `at` (seconds) of period `id`: its own period, or a moment
-- inside the period it holds (see the header: a changed `rateLimitSchedule`).
local function holds(c, id, at)
  local held = stored(c.id)
  if held == id then
    return true
  end
  local stop = tonumber(stored(c.e) or '')
  return held and stop ~= nil and at ~= nil and at >= tonumber(held) and at < stop
end

local function in_period(c, id, at)
  if holds(c, id, at) then
    return count(c.n)
  end
  return 0
end

-- Add to calendar `c` at moment `at` of period `id` (ending at `stop`): in the period held
-- while it holds that moment; a moment before it (a call replayed or settled late) is over and
-- counts nowhere; any other starts the new period from 0. A count never goes below 0.
local function calendar_add(c, id, stop, at, amount)
  local held = stored(c.id)
  local n = 0
  if held == id then
    n = count(c.n)
    if stored(c.e) ~= stop then
      put(c.e, stop)
    end
  elseif holds(c, id, at) then
    n = count(c.n)
  elseif held and at < tonumber(held) then
    return
  else
    put(c.id, id)
    put(c.e, stop)
  end
  put(c.n, capped(math.max(n + amount, 0)))
end

-- Take back from calendar `c` what was added at moment `at` of period `id`, if it still holds it.
local function calendar_release(c, id, at, amount)
  if holds(c, id, at) then
    put(c.n, math.max(count(c.n) - amount, 0))
  end
end

-- --- amounts: a sliding minute and its day, week and month ---------------------------------------

-- `<prefix>m` (sliding minute) and the calendars `<prefix>d`, `<prefix>w`, `<prefix>mo`.
local function amounts_of(prefix, slot)
  return {
    m = sliding(prefix .. 'm', slot),
    calendar(prefix .. 'd'),
    calendar(prefix .. 'w'),
    calendar(prefix .. 'mo'),
  }
end

-- {minute, day, week, month}; `now` = a `moment`.
local function amounts(a, oldest, now, write)
  return {
    capped(total(a.m, oldest, write)),
    in_period(a[1], now[1], now.at),
    in_period(a[2], now[2], now.at),
    in_period(a[3], now[3], now.at),
  }
end

local function amounts_add(a, slot, oldest, now, amount)
  window_add(a.m, slot, oldest, amount)
  for i = 1, 3 do
    calendar_add(a[i], now[i], now.ends[i], now.at, amount)
  end
end

-- `at` = the reservation's `moment` (its ends are not needed).
local function amounts_release(a, slot, oldest, at, amount)
  if slot then
    window_add(a.m, slot, oldest, -amount)
  end
  for i = 1, 3 do
    calendar_release(a[i], at[i], at.at, amount)
  end
end

-- The entity set lists every deployment a caller used; an entity joins it at its first call of
-- a day (its `<entity>|seen` field), not on every call. Its TTL is the hash's (`flush`).
local function remember(entities, entity, seen)
  if stored(seen) ~= DAY then
    redis.call('SADD', entities, entity)
    put(seen, DAY)
  end
end
