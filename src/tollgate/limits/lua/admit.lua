-- admit: MemoryLedger.admit as one atomic step (needs windows.lua in front).
--
-- KEYS  1 the bucket's entity set     2 entity tokens, minute slots   3 entity requests, hour slots
--       4 entity calendar             5 bucket cost, minute slots     6 bucket cost calendar
-- ARGV  1 entity   2 reserve ('1' or '0')   3 tokens   4 cost (nano-dollars)
--       5 minute slot   6 oldest live minute slot   7 hour slot   8 oldest live hour slot
--       9 day id   10 week id   11 month id
--       12-15 token limits (minute, day, week, month)   16-17 request limits (hour, day)
--       18-21 cost limits (minute, day, week, month), nano-dollars; '' means no limit
--       22 TTL of minute keys   23 TTL of hour keys   24 TTL of calendar keys (seconds)
--
-- Returns 0 when admitted (the request is counted, the tokens and cost reserved), else
-- {kind, {used per window}, {exceeded windows}, {live slots of the kind's sliding window as
-- slot, count, ...}}; nothing but the entity set is written then.

local entity, reserve = ARGV[1], ARGV[2] == '1'
local tokens, cost = ARGV[3], ARGV[4]
local minute_slot, minute_oldest = ARGV[5], tonumber(ARGV[6])
local hour_slot, hour_oldest = ARGV[7], tonumber(ARGV[8])
local periods = {ARGV[9], ARGV[10], ARGV[11]}
local minute_ttl, hour_ttl, calendar_ttl = ARGV[22], ARGV[23], ARGV[24]

local function limits(first, count)
  local out = {}
  for i = 1, count do
    out[i] = tonumber(ARGV[first + i - 1]) or false -- false: no limit
  end
  return out
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

-- The entity exists from its first admission, refused or not, as in MemoryLedger.
redis.call('SADD', KEYS[1], entity)
redis.call('EXPIRE', KEYS[1], calendar_ttl)

local used, live = totals(KEYS[2], minute_oldest, KEYS[4], 'tokens', periods, true)
local hit = exceeded(CALENDAR, used, limits(12, 4), tonumber(tokens))
if #hit > 0 then
  return {'token', used, hit, live}
end

local hour
hour, live = sliding(KEYS[3], hour_oldest, true)
used = {hour, calendar(KEYS[4], 'requests:day', periods[1])}
hit = exceeded({'hour', 'day'}, used, limits(16, 2), 0)
if #hit > 0 then
  return {'request', used, hit, live}
end

used, live = totals(KEYS[5], minute_oldest, KEYS[6], 'cost', periods, true)
hit = exceeded(CALENDAR, used, limits(18, 4), tonumber(cost))
if #hit > 0 then
  return {'cost', used, hit, live}
end

sliding_add(KEYS[3], hour_slot, hour_oldest, '1')
redis.call('EXPIRE', KEYS[3], hour_ttl)
calendar_add(KEYS[4], 'requests:day', periods[1], '1')
if tonumber(tokens) ~= 0 then
  add(KEYS[2], minute_slot, minute_oldest, KEYS[4], 'tokens', periods, tokens)
  redis.call('EXPIRE', KEYS[2], minute_ttl)
end
redis.call('EXPIRE', KEYS[4], calendar_ttl)
if tonumber(cost) ~= 0 then
  add(KEYS[5], minute_slot, minute_oldest, KEYS[6], 'cost', periods, cost)
  redis.call('EXPIRE', KEYS[5], minute_ttl)
  redis.call('EXPIRE', KEYS[6], calendar_ttl)
end
return 0
