-- settle: MemoryLedger.settle as one atomic step (needs windows.lua in front).
--
-- KEYS  1 the bucket's entity set   2 entity tokens, minute slots   3 entity calendar
--       4 entity's attributed cost, minute slots   5 bucket cost, minute slots
--       6 bucket cost calendar
-- ARGV  1 entity   2 tokens used   3 cost (nano-dollars)
--       4 minute slot   5 oldest live minute slot   6 day id   7 week id   8 month id
--       9 reserved tokens, negated   10 reserved cost, negated ('0': nothing to release)
--       11 the reservation's minute slot ('' once it left the window)
--       12-14 the reservation's day, week and month ids
--       15 TTL of minute keys   16 TTL of calendar keys (seconds)
--
-- Returns 0.

local entity, tokens, cost = ARGV[1], ARGV[2], ARGV[3]
local slot, oldest = ARGV[4], tonumber(ARGV[5])
local periods = {ARGV[6], ARGV[7], ARGV[8]}
local release_tokens, release_cost = ARGV[9], ARGV[10]
local reserved_slot = ARGV[11]
local reserved_periods = {ARGV[12], ARGV[13], ARGV[14]}
local minute_ttl, calendar_ttl = ARGV[15], ARGV[16]

redis.call('SADD', KEYS[1], entity)
redis.call('EXPIRE', KEYS[1], calendar_ttl)

if release_tokens ~= '0' then
  release(KEYS[2], reserved_slot, KEYS[3], 'tokens', reserved_periods, release_tokens)
end
if release_cost ~= '0' then
  release(KEYS[5], reserved_slot, KEYS[6], 'cost', reserved_periods, release_cost)
end
if tonumber(tokens) > 0 then
  add(KEYS[2], slot, oldest, KEYS[3], 'tokens', periods, tokens)
  redis.call('EXPIRE', KEYS[2], minute_ttl)
  redis.call('EXPIRE', KEYS[3], calendar_ttl)
end
if tonumber(cost) > 0 then
  add(KEYS[5], slot, oldest, KEYS[6], 'cost', periods, cost)
  add(KEYS[4], slot, oldest, KEYS[3], 'cost', periods, cost)
  redis.call('EXPIRE', KEYS[4], minute_ttl)
  redis.call('EXPIRE', KEYS[5], minute_ttl)
  redis.call('EXPIRE', KEYS[3], calendar_ttl)
  redis.call('EXPIRE', KEYS[6], calendar_ttl)
end
return 0
