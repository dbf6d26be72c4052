-- admit: MemoryLedger.admit as one atomic step (needs windows.lua in front).
--
-- KEYS  1 the bucket's entity set   2 the entity's hash   3 the bucket's cost hash
-- ARGV  1 entity   2 reserve ('1' or '0')   3 tokens   4 cost (nano-dollars)
--       5 minute slot   6 hour slot   7 day id   8 week id   9 month id
--       10-13 token limits (minute, day, week, month)   14-15 request limits (hour, day)
--       16-19 cost limits (minute, day, week, month), nano-dollars; '' means no limit
--       20 TTL of the keys (seconds)
--
-- Entity hash: tokens `tm` (sliding minute), `td`/`tw`/`tmo` (calendar); requests `rh` (sliding
-- hour), `rd` (calendar day). Cost hash: `cm`, `cd`, `cw`, `cmo`.
--
-- Returns 0 when admitted (the request is counted, the tokens and cost reserved), else
-- {kind, {used per window}, {exceeded windows}, {live slots of the kind's sliding window as
-- slot, count, ...}}.

local entity, reserve = ARGV[1], ARGV[2] == '1'
local tokens, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
local minute_slot, hour_slot = tonumber(ARGV[5]), tonumber(ARGV[6])
local minute_oldest, hour_oldest = minute_slot - SLOTS + 1, hour_slot - SLOTS + 1
local periods = {ARGV[7], ARGV[8], ARGV[9]}
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

local fields = {'seen'}
amounts_fields(fields, 't', minute_slot)
window_fields(fields, 'rh', hour_slot)
calendar_fields(fields, 'rd')
local e = open(KEYS[2], fields)
-- The entity exists from its first admission, refused or not, as in MemoryLedger.
remember(KEYS[1], e, entity, periods[1], ttl)

local function refuse(kind, used, hit, h, w, oldest, now_slot)
  local live = live_slots(h, w, oldest, now_slot)
  flush(h, ttl) -- what moving the windows on deleted is written, or the totals would drift
  return {kind, used, hit, live}
end

local used = amounts(e, 't', minute_oldest, periods, true)
local hit = exceeded(CALENDAR, used, limits(10, 4), tokens)
if #hit > 0 then
  return refuse('token', used, hit, e, 'tm', minute_oldest, minute_slot)
end

used = {total(e, 'rh', hour_oldest, true), calendar(e, 'rd', periods[1])}
hit = exceeded({'hour', 'day'}, used, limits(14, 2), 0)
if #hit > 0 then
  return refuse('request', used, hit, e, 'rh', hour_oldest, hour_slot)
end

local cost_limits, cost_limited = limits(16, 4)
local c = nil
if cost_limited or cost ~= 0 then
  local cost_fields = {}
  amounts_fields(cost_fields, 'c', minute_slot)
  c = open(KEYS[3], cost_fields)
  used = amounts(c, 'c', minute_oldest, periods, true)
  hit = exceeded(CALENDAR, used, cost_limits, cost)
  if #hit > 0 then
    flush(e, ttl)
    return refuse('cost', used, hit, c, 'cm', minute_oldest, minute_slot)
  end
end

window_add(e, 'rh', hour_slot, hour_oldest, 1)
calendar_add(e, 'rd', periods[1], 1)
if tokens ~= 0 then
  amounts_add(e, 't', minute_slot, minute_oldest, periods, tokens)
end
flush(e, ttl)
if c then
  if cost ~= 0 then
    amounts_add(c, 'c', minute_slot, minute_oldest, periods, cost)
  end
  flush(c, ttl)
end
return 0
