-- extend: MemoryLedger.extend as one atomic step (needs windows.lua in front): grow an admitted
-- call's reservation while its answer streams, when every token and cost window with a limit
-- has room for the whole reservation plus the extension (compatibility C79).
--
-- KEYS  1 the bucket's entity set   2 the bucket's hash
-- ARGV  1 entity   2 extra tokens   3 extra cost (nano-dollars)
--       4 minute slot   5 day id   6 week id   7 month id
--       8-11 token limits (minute, day, week, month)
--       12-15 cost limits (minute, day, week, month), nano-dollars; '' means no limit
--       16 reserved tokens   17 reserved cost (the call's reservation so far)
--       18 the reservation's minute slot ('' once it left the window)
--       19-21 the reservation's day, week and month ids   22 the reservation's moment (s)
--       23 TTL of the keys (seconds)
--       24-26 the ends of the day, week and month (epoch seconds)   27 now (epoch seconds)
--
-- A kind the extension adds nothing to is not checked (it cannot cross a limit of it).
-- Returns 0 when extended (the reservation released where it was held and added at now, grown
-- by the extension), else {kind, {used per window, the reservation counted as held now},
-- {exceeded windows}, {live slots of the minute window as slot, count, ...}}. No request is
-- counted either way.

local entity = ARGV[1]
local tokens, cost = tonumber(ARGV[2]), tonumber(ARGV[3])
local minute_slot = tonumber(ARGV[4])
local oldest = minute_slot - SLOTS + 1
local now = moment({ARGV[5], ARGV[6], ARGV[7]}, {ARGV[24], ARGV[25], ARGV[26]}, ARGV[27])
local held_tokens, held_cost = tonumber(ARGV[16]), tonumber(ARGV[17])
local reserved_slot = tonumber(ARGV[18]) -- nil: it left the window
local reserved = moment({ARGV[19], ARGV[20], ARGV[21]}, {}, ARGV[22])
local ttl = ARGV[23]

local function limits(first)
  local out, any = {}, false
  for i = 1, 4 do
    out[i] = tonumber(ARGV[first + i - 1]) or false -- false: no limit
    any = any or out[i] ~= false
  end
  return out, any
end

local CALENDAR = {'minute', 'day', 'week', 'month'}
local E = entity .. '|'
local token_limits, token_limited = limits(8)
local cost_limits, cost_limited = limits(12)
local seen = want(E .. 'seen')
local t = amounts_of(E .. 't', minute_slot)
local costed = cost_limited or cost ~= 0 or held_cost ~= 0
local c = costed and amounts_of('c', minute_slot)
if reserved_slot then -- read with the others: the slot the reservation is held in
  want(slot_field(t.m, reserved_slot))
  if c then
    want(slot_field(c.m, reserved_slot))
  end
end
read(KEYS[2], now[1])
remember(KEYS[1], entity, seen)

-- Each window's usage with the reservation counted as held now: what it holds, less the part of
-- the reservation it still counts, plus the whole reservation.
local function counted(a, held)
  local used = amounts(a, oldest, now, true)
  if held == 0 then
    return used
  end
  local part = 0
  if reserved_slot and reserved_slot >= oldest then
    part = math.min(count(slot_field(a.m, reserved_slot)), held)
  end
  used[1] = used[1] - part + held
  for i = 1, 3 do
    part = 0
    if holds(a[i], now[i], now.at) and holds(a[i], reserved[i], reserved.at) then
      part = math.min(count(a[i].n), held)
    end
    used[i + 1] = used[i + 1] - part + held
  end
  return used
end

local function exceeded(used, limit, extra)
  local out = {}
  for i, name in ipairs(CALENDAR) do
    if limit[i] and used[i] + extra > limit[i] then
      out[#out + 1] = name
    end
  end
  return out
end

local function refuse(kind, used, hit, w)
  local live = live_slots(w, oldest, minute_slot)
  flush(ttl, {KEYS[1]}) -- what moving the windows on deleted is written, or totals would drift
  return {kind, used, hit, live}
end

if token_limited and tokens ~= 0 then
  local used = counted(t, held_tokens)
  local hit = exceeded(used, token_limits, tokens)
  if #hit > 0 then
    return refuse('token', used, hit, t.m)
  end
end
if cost_limited and cost ~= 0 then
  local used = counted(c, held_cost)
  local hit = exceeded(used, cost_limits, cost)
  if #hit > 0 then
    return refuse('cost', used, hit, c.m)
  end
end

if held_tokens ~= 0 then
  amounts_release(t, reserved_slot, oldest, reserved, held_tokens)
end
if held_tokens + tokens > 0 then
  amounts_add(t, minute_slot, oldest, now, held_tokens + tokens)
end
if c then
  if held_cost ~= 0 then
    amounts_release(c, reserved_slot, oldest, reserved, held_cost)
  end
  if held_cost + cost > 0 then
    amounts_add(c, minute_slot, oldest, now, held_cost + cost)
  end
end
flush(ttl, {KEYS[1]})
return 0
