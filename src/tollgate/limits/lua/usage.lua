-- usage: the figures MemoryLedger.usage reports, read in one step (needs windows.lua in front).
-- Writes nothing.
--
-- KEYS  1 the bucket's cost hash; then one hash per entity
-- ARGV  1 minute slot   2 hour slot   3 day id   4 week id   5 month id
--
-- Returns the bucket's cost {minute, day, week, month}, then per entity ten numbers: tokens
-- (minute, day, week, month), requests (hour, day), attributed cost (minute, day, week, month).

local minute_slot, hour_slot = tonumber(ARGV[1]), tonumber(ARGV[2])
local minute_oldest, hour_oldest = minute_slot - SLOTS + 1, hour_slot - SLOTS + 1
local periods = {ARGV[3], ARGV[4], ARGV[5]}
local out = {}

local function append(values)
  for _, value in ipairs(values) do
    out[#out + 1] = value
  end
end

local cost_fields = {}
amounts_fields(cost_fields, 'c', minute_slot)
append(amounts(open(KEYS[1], cost_fields), 'c', minute_oldest, periods, false))
for i = 2, #KEYS do
  local fields = {}
  amounts_fields(fields, 't', minute_slot)
  window_fields(fields, 'rh', hour_slot)
  calendar_fields(fields, 'rd')
  amounts_fields(fields, 'a', minute_slot)
  local e = open(KEYS[i], fields)
  append(amounts(e, 't', minute_oldest, periods, false))
  append({total(e, 'rh', hour_oldest, false), calendar(e, 'rd', periods[1])})
  append(amounts(e, 'a', minute_oldest, periods, false))
end
return out
