-- rebuild_begin: the first step of rebuilding windows Redis does not hold from the
-- warehouse (meterline/quotas/rebuild.py tells the whole protocol).
--
-- Each absent window is made at zero and marked building since now (field b): checks
-- take it as absent, settles count into it from this instant on. The estimates of live
-- reservations on it are added back (the warehouse holds priced usage only), so that
-- their settle or release takes them off exactly.
--
-- KEYS[1]  the account's reservations: ZSET event_id -> expiry (ms)
-- KEYS[2..] the windows' HASHes
-- ARGV[1]  now, ms ('': Redis TIME)
-- ARGV[2]  the account's key prefix (of the reservations' HASHes)
-- ARGV[3..] per window: expire at (ms)
-- Returns per window the instant (ms) its building began; 0: it is complete.

local now = clock(ARGV[1])
local out, made = {}, {}
for w = 2, #KEYS do
  local key = KEYS[w]
  if redis.call('EXISTS', key) == 0 then
    window_write(key, 0, 0, 0, {0, 0})
    redis.call('HSET', key, 'b', int(now))
    expire_in(key, tonumber(ARGV[w + 1]) - now)
    made[key] = true
    table.insert(out, now)
  else
    table.insert(out, tonumber(redis.call('HGET', key, 'b')) or 0)
  end
end

if next(made) ~= nil then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local u = redis.call('HGET', ARGV[2] .. 'r:' .. id, 'u')
    if u then
      for _, e in ipairs(cjson.decode(u)) do
        if e[1] == 'w' and made[e[2]] then
          window_add(e[2], 1, tonumber(e[3]), tonumber(e[4]), money(e[5]))
        end
      end
    end
  end
end
return out
