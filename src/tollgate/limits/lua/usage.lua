-- usage: the figures MemoryLedger.usage reports, read in one step (needs windows.lua in front).
-- Writes nothing.
--
-- KEYS  1 the bucket's hash
-- ARGV  1 minute slot   2 hour slot   3 day id   4 week id   5 month id   6 now (epoch seconds)
--       7... the entities
--
-- Returns the bucket's cost {minute, day, week, month}, then per entity ten numbers: tokens
-- (minute, day, week, month), requests (hour, day), attributed cost (minute, day, week, month).

local minute_slot, hour_slot = tonumber(ARGV[1]), tonumber(ARGV[2])
local minute_oldest, hour_oldest = minute_slot - SLOTS + 1, hour_slot - SLOTS + 1
local now = moment({ARGV[3], ARGV[4], ARGV[5]}, {}, ARGV[6])
local out = {}

local function append(values)
  for _, value in ipairs(values) do
    out[#out + 1] = value
  end
end

local c = amounts_of('c', minute_slot)
local entities = {}
for i = 7, #ARGV do
  local E = ARGV[i] .. '|'
  entities[#entities + 1] = {
    t = amounts_of(E .. 't', minute_slot),
    rh = sliding(E .. 'rh', hour_slot),
    rd = calendar(E .. 'rd'),
    a = amounts_of(E .. 'a', minute_slot),
  }
end
read(KEYS[1])
append(amounts(c, minute_oldest, now, false))
for _, e in ipairs(entities) do
  append(amounts(e.t, minute_oldest, now, false))
  append({capped(total(e.rh, hour_oldest, false)), in_period(e.rd, now[1], now.at)})
  append(amounts(e.a, minute_oldest, now, false))
end
return out
