-- set_totals: a window's counters rebuilt from the warehouse. The warehouse holds priced
-- usage only, so the estimates of live reservations on these counters are added back
-- (their settle or release takes them off again).
--
-- KEYS[1]  the account's reservations: ZSET event_id -> expiry (ms)
-- KEYS[2..] the windows' HASHes
-- ARGV[1]  now, ms ('': Redis TIME)
-- ARGV[2]  the account's key prefix (of the reservations' HASHes)
-- ARGV[3..] per window: expire at (ms), requests, input, output, spend dollars, spend picos
-- Returns the number of reservations whose estimates were added back.

local now = clock(ARGV[1])
local rebuilt = {}
for w = 2, #KEYS do
  local a = 3 + (w - 2) * 6
  window_write(KEYS[w], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]),
    {tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])})
  expire_in(KEYS[w], tonumber(ARGV[a]) - now)
  rebuilt[KEYS[w]] = true
end

local held = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local u = redis.call('HGET', ARGV[2] .. 'r:' .. id, 'u')
  if u then
    for _, e in ipairs(cjson.decode(u)) do
      if e[1] == 'w' and rebuilt[e[2]] then
        window_add(e[2], 1, tonumber(e[3]), tonumber(e[4]), money(e[5]))
        held = held + 1
      end
    end
  end
end
return held
