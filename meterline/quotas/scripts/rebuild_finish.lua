-- rebuild_finish: the warehouse's totals go into windows being built, which become
-- complete (meterline/quotas/rebuild.py tells the whole protocol).
--
-- A window holds what was settled into it since its building began, each such event
-- noted s:<event_id>. The warehouse's totals are added; the recent events among them
-- noted s: are taken off again (they would count twice); the recent ones not settled
-- at all yet are marked e:<event_id>, so that their settle does not add them again.
--
-- KEYS[1]  the account's settled events: ZSET event_id -> forget at (ms)
-- KEYS[2..] the windows' HASHes
-- ARGV[1..] per window: building since (ms), requests, input, output, spend dollars,
--          spend picos (6 each); then per recent event: event_id, input, output,
--          charge (picos, digits), the number n of its windows, then n window numbers
--          (1 = the first window)
-- Returns how many windows were completed (0 for one another rebuild completed first).

local n = #KEYS - 1
local building = {}
for w = 1, n do
  local b = redis.call('HGET', KEYS[w + 1], 'b')
  building[w] = b ~= false and tonumber(b) == tonumber(ARGV[1 + (w - 1) * 6])
end

local a = 1 + n * 6
while a <= #ARGV do
  local event_id = ARGV[a]
  local i, o, charge = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), money(ARGV[a + 3])
  local m = tonumber(ARGV[a + 4])
  local settled = redis.call('ZSCORE', KEYS[1], event_id)
  for j = a + 5, a + 4 + m do
    local w = tonumber(ARGV[j])
    local key = KEYS[w + 1]
    if building[w] then
      if redis.call('HDEL', key, 's:' .. event_id) == 1 then
        window_add(key, -1, i, o, charge)
      elseif not settled then
        redis.call('HSET', key, 'e:' .. event_id, 1)
      end
    end
  end
  a = a + 5 + m
end

local done = 0
for w = 1, n do
  if building[w] then
    local key, b = KEYS[w + 1], 1 + (w - 1) * 6
    local r, i, o, s = window_read(key)
    window_write(key, r + tonumber(ARGV[b + 1]), i + tonumber(ARGV[b + 2]),
      o + tonumber(ARGV[b + 3]), money_add(s, {tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])}))
    local notes = {}
    for _, field in ipairs(redis.call('HKEYS', key)) do
      if string.sub(field, 1, 2) == 's:' then
        table.insert(notes, field)
      end
    end
    for start = 1, #notes, 1000 do
      redis.call('HDEL', key, unpack(notes, start, math.min(start + 999, #notes)))
    end
    redis.call('HDEL', key, 'b')
    done = done + 1
  end
end
return done
