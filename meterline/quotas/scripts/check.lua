-- check: may this request run now? Judges it against every limit of every scope at once
-- and, when it fits them all, reserves its estimate in each; or only reports (peek).
--
-- KEYS[1]  the account's reservations: ZSET event_id -> expiry (ms)
-- KEYS[2]  this request's reservation: HASH u (what it added, JSON), ts (when, ms)
-- KEYS[3..] the groups' keys, in ARGV's order (below)
-- ARGV[1]  now, ms ('': Redis TIME; tests give a clock)
-- ARGV[2]  event_id
-- ARGV[3]  'reserve', or 'peek': report usage, reserve nothing
-- ARGV[4]  reservation ttl, ms
-- ARGV[5], ARGV[6], ARGV[7]  estimate: input tokens, output tokens, charge (picos, digits)
-- ARGV[8]  token basis: input | output | total
-- ARGV[9]  the account's key prefix (of the reservations' HASHes: <prefix>r:<event_id>)
-- ARGV[10] at most this many expired reservations are undone first
-- ARGV[11..] groups, each a kind and its arguments:
--   'm', requests cap, tokens cap ('0': none)            KEYS: minute log ZSET, its totals HASH
--   'f', cap                                             KEYS: in-flight ZSET event_id -> expiry
--   'w', expire at (ms), next's expire at, requests cap, tokens cap ('0': none),
--        spend cap (picos, digits; '': none)             KEYS: the window's HASH, the next one's
--   'c' (prepaid: the estimate must fit in the credits less the holds)
--                                                        KEYS: the credits HASH, the holds HASH
-- Returns {status, ...each group's numbers}, status 1 reserved, 0 denied, 2 a window or the
-- credits to rebuild (nothing reserved), 3 already reserved (nothing added), 4 peeked. Numbers:
--   'm': requests, input, output in the last minute, ms until a request fits and until
--        its tokens fit (-1: they fit; -2: never, the estimate exceeds the cap)
--   'f': requests in flight
--   'w': 1 present or 0 absent (or being built), requests, input, output, spend dollars, spend picos
--   'c': 1 present or 0 absent (or past its x), credits dollars, picos, holds dollars, picos

local now = clock(ARGV[1])
local event_id = ARGV[2]
local reserve = ARGV[3] == 'reserve'
local ttl = tonumber(ARGV[4])
local est_i, est_o, est_s = tonumber(ARGV[5]), tonumber(ARGV[6]), money(ARGV[7])
local basis = ARGV[8]
local est_t = tokens(basis, est_i, est_o)

purge(KEYS[1], ARGV[9], now, tonumber(ARGV[10]))

local status = 1
if not reserve then
  status = 4
elseif redis.call('EXISTS', KEYS[2]) == 1 then
  status = 3  -- a retried check: its reservation stands, once
  reserve = false
end

-- ms until `need` tokens have left the minute: the oldest entries go first
local function tokens_fit_in(log, need)
  local acc = 0
  for start = 0, 1023, 128 do
    local batch = redis.call('ZRANGE', log, start, start + 127, 'WITHSCORES')
    for j = 1, #batch, 2 do
      local i, o = weights(batch[j])
      acc = acc + tokens(basis, i, o)
      if acc >= need then
        return tonumber(batch[j + 1]) + MINUTE - now
      end
    end
    if #batch < 256 then
      break
    end
  end
  -- more entries than we look at: all of them are gone a minute after the newest
  local last = redis.call('ZRANGE', log, -1, -1, 'WITHSCORES')
  return tonumber(last[2]) + MINUTE - now
end

local out, groups = {status}, {}
local fits, rebuild = true, false
local k, a = 3, 11
while a <= #ARGV do
  local kind = ARGV[a]
  if kind == 'm' then
    local log, totals = KEYS[k], KEYS[k + 1]
    local rcap, tcap = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    k, a = k + 2, a + 3
    minute_roll(log, totals, now)
    local n = redis.call('ZCARD', log)
    local t = redis.call('HMGET', totals, 'i', 'o')
    local ti, to = tonumber(t[1]) or 0, tonumber(t[2]) or 0
    local rwait, twait = -1, -1
    if reserve and rcap > 0 and n + 1 > rcap then
      fits = false
      -- the (n + 1 - cap)th oldest entry must leave
      local e = redis.call('ZRANGE', log, n - rcap, n - rcap, 'WITHSCORES')
      rwait = tonumber(e[2]) + MINUTE - now
    end
    local used = tokens(basis, ti, to)
    if reserve and tcap > 0 and used + est_t > tcap then
      fits = false
      if est_t > tcap then
        twait = -2
      else
        twait = tokens_fit_in(log, used + est_t - tcap)
      end
    end
    table.insert(groups, {'m', log, totals})
    for _, v in ipairs({n, ti, to, rwait, twait}) do
      table.insert(out, v)
    end
  elseif kind == 'f' then
    local flying = KEYS[k]
    local cap = tonumber(ARGV[a + 1])
    k, a = k + 1, a + 2
    redis.call('ZREMRANGEBYSCORE', flying, '-inf', int(now))
    local n = redis.call('ZCARD', flying)
    if reserve and n + 1 > cap then
      fits = false
    end
    table.insert(groups, {'f', flying})
    table.insert(out, n)
  elseif kind == 'c' then
    local credit, hold = KEYS[k], KEYS[k + 1]
    k, a = k + 2, a + 1
    local c = redis.call('HMGET', credit, 'bd', 'bp', 'x')
    local h = hold_read(hold)
    if not c[3] or now >= tonumber(c[3]) then
      rebuild = true  -- absent is not zero: the ledger says what is there
      for _, v in ipairs({0, 0, 0, h[1], h[2]}) do
        table.insert(out, v)
      end
    else
      local s = {tonumber(c[1]), tonumber(c[2])}
      if reserve and not money_le(money_add(h, est_s), s) then
        fits = false
      end
      table.insert(groups, {'c', hold})
      for _, v in ipairs({1, s[1], s[2], h[1], h[2]}) do
        table.insert(out, v)
      end
    end
  else -- 'w'
    local key, following = KEYS[k], KEYS[k + 1]
    local expire_at, following_expire_at = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    local rcap, tcap, scap = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), ARGV[a + 5]
    k, a = k + 2, a + 6
    if redis.call('EXISTS', key) == 0 or redis.call('HEXISTS', key, 'b') == 1 then
      -- absent is not zero: Redis lost it (or the plan just began to cap it); one being
      -- built from the warehouse (field b) is not complete yet
      rebuild = true
      for _, v in ipairs({0, 0, 0, 0, 0, 0}) do
        table.insert(out, v)
      end
    else
      -- The next window starts from zero now, before any of its usage can arrive, so it
      -- is complete when it begins: no rebuild at every midnight.
      if redis.call('EXISTS', following) == 0 then
        window_write(following, 0, 0, 0, {0, 0})
        expire_in(following, following_expire_at - now)
      end
      local r, i, o, s = window_read(key)
      if reserve then
        if rcap > 0 and r + 1 > rcap then
          fits = false
        end
        if tcap > 0 and tokens(basis, i, o) + est_t > tcap then
          fits = false
        end
        if scap ~= '' and not money_le(money_add(s, est_s), money(scap)) then
          fits = false
        end
      end
      table.insert(groups, {'w', key, expire_at})
      for _, v in ipairs({1, r, i, o, s[1], s[2]}) do
        table.insert(out, v)
      end
    end
  end
end

if not reserve then
  return out
end
if not fits then
  out[1] = 0
  return out
end
if rebuild then
  out[1] = 2
  return out
end

-- Reserve: add the estimate everywhere, and remember exactly where, to undo it.
local expiry = now + ttl
local life = ttl + MINUTE  -- the HASH outlives every counter it added to
local added = {}
for _, g in ipairs(groups) do
  if g[1] == 'm' then
    local member = ARGV[5] .. ':' .. ARGV[6] .. ':' .. event_id
    minute_add(g[2], g[3], now, member, est_i, est_o)
    table.insert(added, {'m', g[2], g[3], member})
  elseif g[1] == 'f' then
    redis.call('ZADD', g[2], int(expiry), event_id)
    expire_in(g[2], ttl + MINUTE)
    table.insert(added, {'f', g[2]})
  elseif g[1] == 'c' then
    hold_add(g[2], 1, est_s)
    table.insert(added, {'c', g[2], ARGV[7]})
    keep(g[2], now + ttl + MINUTE, now)
  else
    window_add(g[2], 1, est_i, est_o, est_s)
    table.insert(added, {'w', g[2], ARGV[5], ARGV[6], ARGV[7]})
    life = math.max(life, g[3] - now)
  end
end
redis.call('HSET', KEYS[2], 'u', cjson.encode(added), 'ts', int(now))
expire_in(KEYS[2], life)
redis.call('ZADD', KEYS[1], int(expiry), event_id)
keep(KEYS[1], now + life, now)
return out
