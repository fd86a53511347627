-- settle: priced usage replaces its reservation's estimate by what it used, once per event.
-- An event with no reservation (never checked, released or expired) is added as it is.
--
-- KEYS[1]  the account's reservations: ZSET event_id -> expiry (ms)
-- KEYS[2]  the account's settled events: ZSET event_id -> forget at (ms)
-- KEYS[3]  the account's credits HASH (prepaid)
-- KEYS[4..] per event: its reservation HASH; the windows it counts in (HASHes); the minute
--          logs it counts in (ZSET, totals HASH pairs)
-- ARGV[1]  now, ms ('': Redis TIME)
-- ARGV[2]  how long a settled event is remembered, ms
-- ARGV[3]  the account's key prefix (of the reservations' HASHes)
-- ARGV[4]  at most this many expired reservations are undone first
-- ARGV[5..8] a copy of the account's credits, posted with these events' debit, written
--          with the holds these events free, at once: version ('': none), credits (picos,
--          digits), when they change (ms, '': never), how long the copy holds (ms)
-- ARGV[9..] per event: event_id, occurred at (ms), input, output, charge (picos, digits),
--          number of windows, number of minute logs
-- Returns how many events were applied (replays are not).

local now = clock(ARGV[1])
local memory = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', int(now))
purge(KEYS[1], ARGV[3], now, tonumber(ARGV[4]))
if ARGV[5] ~= '' then
  credit_publish(KEYS[3], ARGV[5], ARGV[6], ARGV[7], ARGV[8], now)
end

local applied = 0
local k, a = 4, 9
while a <= #ARGV do
  local event_id, occurred = ARGV[a], math.min(tonumber(ARGV[a + 1]), now)
  local i_digits, o_digits = ARGV[a + 2], ARGV[a + 3]
  local i, o, charge = tonumber(i_digits), tonumber(o_digits), money(ARGV[a + 4])
  local nwindows, nlogs = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local rkey = KEYS[k]
  local windows, logs = k + 1, k + 1 + nwindows
  k, a = logs + 2 * nlogs, a + 7
  if not redis.call('ZSCORE', KEYS[2], event_id) then
    -- the minute counts the request when it was admitted, else when it occurred
    local ts = occurred
    local held = redis.call('HGET', rkey, 'ts')
    if held then
      ts = tonumber(held)
    end
    undo(rkey, KEYS[1], event_id)
    for w = windows, logs - 1 do
      -- absent: Redis lost it; its rebuild from the warehouse will hold this event.
      -- Marked e:<id>: a rebuild counted it from the warehouse already. Being built
      -- (b): noted s:<id>, so the rebuild knows it was added here.
      local w_key = KEYS[w]
      if redis.call('EXISTS', w_key) == 1 and redis.call('HDEL', w_key, 'e:' .. event_id) == 0 then
        window_add(w_key, 1, i, o, charge)
        if redis.call('HEXISTS', w_key, 'b') == 1 then
          redis.call('HSET', w_key, 's:' .. event_id, 1)
        end
      end
    end
    if ts > now - MINUTE then
      local member = i_digits .. ':' .. o_digits .. ':' .. event_id
      for m = logs, logs + 2 * nlogs - 1, 2 do
        minute_add(KEYS[m], KEYS[m + 1], ts, member, i, o)
      end
    end
    redis.call('ZADD', KEYS[2], int(now + memory), event_id)
    applied = applied + 1
  end
end
keep(KEYS[2], now + memory, now)
return applied
