-- usage: the figures MemoryLedger.usage reports, read in one step (needs windows.lua in front).
-- Writes nothing.
--
-- KEYS  1 bucket cost, minute slots   2 bucket cost calendar; then four keys per entity:
--       tokens minute slots, requests hour slots, entity calendar, attributed cost minute slots
-- ARGV  1 oldest live minute slot   2 oldest live hour slot   3 day id   4 week id   5 month id
--
-- Returns the bucket's cost {minute, day, week, month}, then per entity ten numbers: tokens
-- (minute, day, week, month), requests (hour, day), attributed cost (minute, day, week, month).

local minute_oldest, hour_oldest = tonumber(ARGV[1]), tonumber(ARGV[2])
local periods = {ARGV[3], ARGV[4], ARGV[5]}
local out = {}

local function append(values)
  for _, value in ipairs(values) do
    out[#out + 1] = value
  end
end

append((totals(KEYS[1], minute_oldest, KEYS[2], 'cost', periods, false)))
for first = 3, #KEYS, 4 do
  local cal = KEYS[first + 2]
  append((totals(KEYS[first], minute_oldest, cal, 'tokens', periods, false)))
  append({(sliding(KEYS[first + 1], hour_oldest, false)), calendar(cal, 'requests:day', periods[1])})
  append((totals(KEYS[first + 3], minute_oldest, cal, 'cost', periods, false)))
end
return out
