-- admit: MemoryLedger.admit as one atomic step (needs windows.lua in front).
--
-- KEYS  1 the bucket's entity set   2 the bucket's hash
-- ARGV  1 entity   2 reserve ('1' or '0')   3 tokens   4 cost (nano-dollars)
--       5 minute slot   6 hour slot   7 day id   8 week id   9 month id
--       10-13 token limits (minute, day, week, month)   14-15 request limits (hour, day)
--       16-19 cost limits (minute, day, week, month), nano-dollars; '' means no limit
--       20 TTL of the keys (seconds)
--       21-23 the ends of the day, week and month (epoch seconds)   24 now (epoch seconds)
--
-- The entity's fields (prefixed `<entity>|`): tokens `tm` (sliding minute), `td`/`tw`/`tmo`
-- (calendar); requests `rh` (sliding hour), `rd` (calendar day). The caller's cost: `cm`, `cd`,
-- `cw`, `cmo`.
--
-- Returns 0 when admitted (the request is counted, the tokens and cost reserved), else
-- {kind, {used per window}, {exceeded windows}, {live slots of the kind's sliding window as
-- slot, count, ...}}.

local entity, reserve = ARGV[1], ARGV[2] == '1'
local tokens, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
local minute_slot, hour_slot = tonumber(ARGV[5]), tonumber(ARGV[6])
local minute_oldest, hour_oldest = minute_slot - SLOTS + 1, hour_slot - SLOTS + 1
local now = moment({ARGV[7], ARGV[8], ARGV[9]}, {ARGV[21], ARGV[22], ARGV[23]}, ARGV[24])
local ttl = ARGV[20]

local function limits(first, count)
  local out, any = {}, false
  for i = 1, count do
    out[i] = tonumber(ARGV[first + i - 1]) or false -- false: no limit
    any = any or out[i] ~= false
  end
  return out, any
end

-- DIAL's rule `used >= limit`; in reserve mode with something to reserve, `used + extra > limit`.
local function exceeded(names, used, limit, extra)
  local out = {}
  for i, name in ipairs(names) do
    if limit[i] then
      local hit
      if reserve and extra ~= 0 then
        hit = used[i] + extra > limit[i]
      else
        hit = used[i] >= limit[i]
      end
      if hit then
        out[#out + 1] = name
      end
    end
  end
  return out
end

local CALENDAR = {'minute', 'day', 'week', 'month'}

local E = entity .. '|'
local cost_limits, cost_limited = limits(16, 4)
local costed = cost_limited or cost ~= 0
local seen = want(E .. 'seen')
local t = amounts_of(E .. 't', minute_slot)
local rh, rd = sliding(E .. 'rh', hour_slot), calendar(E .. 'rd')
local c = costed and amounts_of('c', minute_slot)
read(KEYS[2], now[1])
-- The entity exists from its first admission, refused or not, as in MemoryLedger.
remember(KEYS[1], entity, seen)

local function refuse(kind, used, hit, w, oldest, now_slot)
  local live = live_slots(w, oldest, now_slot)
  flush(ttl, {KEYS[1]}) -- what moving the windows on deleted is written, or totals would drift
  return {kind, used, hit, live}
end

local used = amounts(t, minute_oldest, now, true)
local hit = exceeded(CALENDAR, used, limits(10, 4), tokens)
if #hit > 0 then
  return refuse('token', used, hit, t.m, minute_oldest, minute_slot)
end

used = {total(rh, hour_oldest, true), in_period(rd, now[1], now.at)}
hit = exceeded({'hour', 'day'}, used, limits(14, 2), 0)
if #hit > 0 then
  return refuse('request', used, hit, rh, hour_oldest, hour_slot)
end

if c then
  used = amounts(c, minute_oldest, now, true)
  hit = exceeded(CALENDAR, used, cost_limits, cost)
  if #hit > 0 then
    return refuse('cost', used, hit, c.m, minute_oldest, minute_slot)
  end
end

window_add(rh, hour_slot, hour_oldest, 1)
calendar_add(rd, now[1], now.ends[1], now.at, 1)
if tokens ~= 0 then
  amounts_add(t, minute_slot, minute_oldest, now, tokens)
end
if cost ~= 0 then
  amounts_add(c, minute_slot, minute_oldest, now, cost)
end
flush(ttl, {KEYS[1]})
return 0
