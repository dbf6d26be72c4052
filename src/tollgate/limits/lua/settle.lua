-- settle: MemoryLedger.settle as one atomic step (needs windows.lua in front).
--
-- KEYS  1 the bucket's entity set   2 the entity's hash   3 the bucket's cost hash
-- ARGV  1 entity   2 tokens used   3 cost (nano-dollars)
--       4 minute slot   5 day id   6 week id   7 month id
--       8 reserved tokens   9 reserved cost (released now; '0': nothing to release)
--       10 the reservation's minute slot ('' once it left the window)
--       11-13 the reservation's day, week and month ids
--       14 TTL of the keys (seconds)
--
-- Entity hash: tokens `t*` and the cost attributed to the entity `a*`; cost hash: `c*` (see
-- admit.lua). Returns 0.

local entity, tokens, cost = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local minute_slot = tonumber(ARGV[4])
local oldest = minute_slot - SLOTS + 1
local periods = {ARGV[5], ARGV[6], ARGV[7]}
local release_tokens, release_cost = tonumber(ARGV[8]), tonumber(ARGV[9])
local reserved_slot = tonumber(ARGV[10]) -- nil: it left the window
local reserved_periods = {ARGV[11], ARGV[12], ARGV[13]}
local ttl = ARGV[14]

local fields = {'seen'}
amounts_fields(fields, 't', minute_slot)
if reserved_slot and release_tokens ~= 0 then
  fields[#fields + 1] = 'tm.' .. reserved_slot
end
if cost > 0 then
  amounts_fields(fields, 'a', minute_slot)
end
local e = open(KEYS[2], fields)
remember(KEYS[1], e, entity, periods[1], ttl)

if release_tokens ~= 0 then
  amounts_release(e, 't', reserved_slot, oldest, reserved_periods, release_tokens)
end
if tokens > 0 then
  amounts_add(e, 't', minute_slot, oldest, periods, tokens)
end
if cost > 0 then
  amounts_add(e, 'a', minute_slot, oldest, periods, cost)
end
flush(e, ttl)

if cost > 0 or release_cost ~= 0 then
  local cost_fields = {}
  amounts_fields(cost_fields, 'c', minute_slot)
  if reserved_slot and release_cost ~= 0 then
    cost_fields[#cost_fields + 1] = 'cm.' .. reserved_slot
  end
  local c = open(KEYS[3], cost_fields)
  if release_cost ~= 0 then
    amounts_release(c, 'c', reserved_slot, oldest, reserved_periods, release_cost)
  end
  if cost > 0 then
    amounts_add(c, 'c', minute_slot, oldest, periods, cost)
  end
  flush(c, ttl)
end
return 0
