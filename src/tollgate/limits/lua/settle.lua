-- settle: MemoryLedger.settle as one atomic step (needs windows.lua in front).
--
-- KEYS  1 the bucket's entity set   2 the bucket's hash
-- ARGV  1 entity   2 tokens used   3 cost (nano-dollars)
--       4 minute slot   5 day id   6 week id   7 month id
--       8 reserved tokens   9 reserved cost (released now; '0': nothing to release)
--       10 the reservation's minute slot ('' once it left the window)
--       11-13 the reservation's day, week and month ids
--       14 TTL of the keys (seconds)
--       15-17 the ends of the day, week and month   18 now   19 the reservation's moment
--       (epoch seconds; '' when nothing is released)
--
-- The entity's tokens `<entity>|t*` and the cost attributed to it `<entity>|a*`; the caller's
-- cost `c*` (see admit.lua). Returns 0.

local entity, tokens, cost = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local minute_slot = tonumber(ARGV[4])
local oldest = minute_slot - SLOTS + 1
local now = moment({ARGV[5], ARGV[6], ARGV[7]}, {ARGV[15], ARGV[16], ARGV[17]}, ARGV[18])
local release_tokens, release_cost = tonumber(ARGV[8]), tonumber(ARGV[9])
local reserved_slot = tonumber(ARGV[10]) -- nil: it left the window
local reserved = moment({ARGV[11], ARGV[12], ARGV[13]}, {}, ARGV[19])
local ttl = ARGV[14]

local E = entity .. '|'
local costed = cost > 0 or release_cost ~= 0
local seen = want(E .. 'seen')
local t = amounts_of(E .. 't', minute_slot)
local a = cost > 0 and amounts_of(E .. 'a', minute_slot)
local c = costed and amounts_of('c', minute_slot)
if reserved_slot then -- read with the others: the slot a reservation is released from
  if release_tokens ~= 0 then
    want(slot_field(t.m, reserved_slot))
  end
  if release_cost ~= 0 then
    want(slot_field(c.m, reserved_slot))
  end
end
read(KEYS[2], now[1])
remember(KEYS[1], entity, seen)

if release_tokens ~= 0 then
  amounts_release(t, reserved_slot, oldest, reserved, release_tokens)
end
if tokens > 0 then
  amounts_add(t, minute_slot, oldest, now, tokens)
end
if a then
  amounts_add(a, minute_slot, oldest, now, cost)
end
if release_cost ~= 0 then
  amounts_release(c, reserved_slot, oldest, reserved, release_cost)
end
if cost > 0 then
  amounts_add(c, minute_slot, oldest, now, cost)
end
flush(ttl, {KEYS[1]})
return 0
