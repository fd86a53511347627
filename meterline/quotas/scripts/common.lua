-- Shared by every quota script: meterline/quotas/engine.py puts it before each one.
--
-- Lua's numbers are doubles, exact below 2^53 only (about $9,007 in pico-dollars), so
-- money is never one Lua number: it is {dollars, picos below a dollar}, each part exact
-- (a window's spend is kept the same way, in fields sd and sp). Numbers go to Redis
-- through int(): a double's own string form may have an exponent ("1e+15").

local PICOS = 1000000000000  -- pico-dollars in a dollar
local MINUTE = 60000         -- the rolling window, ms

local function int(n)
  return string.format('%.0f', n)
end

-- now in ms: Redis's clock, so that every replica agrees; a test may give its own
local function clock(given)
  if given ~= '' then
    return tonumber(given)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- a non-negative amount of pico-dollars, given as decimal digits
local function money(digits)
  local n = #digits
  if n <= 12 then
    return {0, tonumber(digits)}
  end
  return {tonumber(string.sub(digits, 1, n - 12)), tonumber(string.sub(digits, n - 11))}
end

local function money_add(a, b)
  local d, p = a[1] + b[1], a[2] + b[2]
  if p >= PICOS then
    return {d + 1, p - PICOS}
  end
  return {d, p}
end

-- a - b, never below zero
local function money_sub(a, b)
  local d, p = a[1] - b[1], a[2] - b[2]
  if p < 0 then
    d, p = d - 1, p + PICOS
  end
  if d < 0 then
    return {0, 0}
  end
  return {d, p}
end

local function money_le(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] <= b[2])
end

-- tokens as the plan's token_basis counts them
local function tokens(basis, i, o)
  if basis == 'input' then
    return i
  elseif basis == 'output' then
    return o
  end
  return i + o
end

-- expire key in ms from now, at least a second (a window the caller's clock put in the past)
local function expire_in(key, ms)
  redis.call('PEXPIRE', key, int(math.max(ms, 1000)))
end

-- make key live at least until the instant until_ms (never shorten it)
local function keep(key, until_ms, now)
  local ttl = redis.call('PTTL', key)
  if ttl < until_ms - now then
    expire_in(key, until_ms - now)
  end
end

-- A calendar window's counters, a HASH: r requests, i and o input and output tokens,
-- sd and sp spend (dollars, picos below a dollar).
local function window_read(key)
  local v = redis.call('HMGET', key, 'r', 'i', 'o', 'sd', 'sp')
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0,
    {tonumber(v[4]) or 0, tonumber(v[5]) or 0}
end

local function window_write(key, r, i, o, s)
  redis.call('HSET', key, 'r', int(r), 'i', int(i), 'o', int(o), 'sd', int(s[1]), 'sp', int(s[2]))
end

-- add one request of i, o tokens and charge (money) to a window, or take it away (sign -1)
local function window_add(key, sign, i, o, charge)
  local r0, i0, o0, s0 = window_read(key)
  local s
  if sign > 0 then
    s = money_add(s0, charge)
  else
    s = money_sub(s0, charge)
  end
  window_write(key, math.max(r0 + sign, 0), math.max(i0 + sign * i, 0), math.max(o0 + sign * o, 0), s)
end

-- A rolling minute: a log (ZSET, member "<input>:<output>:<event_id>", score the request's
-- ms) and its totals (HASH i, o), so a check is O(1) but for the entries it drops.
local function weights(member)
  local i, o = string.match(member, '^(%d+):(%d+):')
  return tonumber(i), tonumber(o)
end

-- take i, o tokens off the totals of entries just removed; an empty log starts again at zero
local function minute_less(log, totals, i, o)
  if redis.call('ZCARD', log) == 0 then
    redis.call('DEL', log, totals)
  else
    redis.call('HINCRBY', totals, 'i', int(-i))
    redis.call('HINCRBY', totals, 'o', int(-o))
  end
end

-- drop the entries 60 s old or older: each request counts against the 60 s after it
local function minute_roll(log, totals, now)
  local edge = int(now - MINUTE)
  local old = redis.call('ZRANGEBYSCORE', log, '-inf', edge)
  if #old == 0 then
    return
  end
  local di, dout = 0, 0
  for _, m in ipairs(old) do
    local i, o = weights(m)
    di, dout = di + i, dout + o
  end
  redis.call('ZREMRANGEBYSCORE', log, '-inf', edge)
  minute_less(log, totals, di, dout)
end

local function minute_add(log, totals, ts, member, i, o)
  redis.call('ZADD', log, int(ts), member)
  redis.call('HINCRBY', totals, 'i', int(i))
  redis.call('HINCRBY', totals, 'o', int(o))
  -- every entry leaves within a minute of now
  expire_in(log, MINUTE + 1000)
  expire_in(totals, MINUTE + 1000)
end

local function minute_remove(log, totals, member)
  if redis.call('ZREM', log, member) == 1 then
    local i, o = weights(member)
    minute_less(log, totals, i, o)
  end
end

-- A prepaid account's credits, a HASH: v the version of the ledger it copies, bd and bp
-- what the account may spend (money), x until when (ms) the copy holds; past x (a grant
-- expires or takes effect, or the copy is just old) it is read from the ledger again.
-- What the requests in flight hold of it is apart, a HASH d, p (money): a new copy
-- leaves the holds as they are.
local CREDIT_LIFE = 86400000  -- an unused copy goes after a day

-- write a copy of the ledger's credits unless a newer one is there; 1 written, 0 not
local function credit_publish(key, version, digits, changes_at, refresh, now)
  local held = redis.call('HGET', key, 'v')
  if held and tonumber(held) > tonumber(version) then
    return 0
  end
  local s = money(digits)
  local x = now + tonumber(refresh)
  if changes_at ~= '' then
    x = math.min(x, tonumber(changes_at))
  end
  redis.call('HSET', key, 'v', version, 'bd', int(s[1]), 'bp', int(s[2]), 'x', int(x))
  expire_in(key, CREDIT_LIFE)
  return 1
end

local function hold_read(key)
  local v = redis.call('HMGET', key, 'd', 'p')
  return {tonumber(v[1]) or 0, tonumber(v[2]) or 0}
end

-- add a request's estimated charge to the holds, or take it away (sign -1)
local function hold_add(key, sign, charge)
  local h = hold_read(key)
  if sign > 0 then
    h = money_add(h, charge)
  else
    h = money_sub(h, charge)
  end
  redis.call('HSET', key, 'd', int(h[1]), 'p', int(h[2]))
end

-- Undo a reservation exactly: its HASH (field u) lists what it added, as
--   {'w', window key, input, output, charge}, {'m', log, totals, member}, {'f', in-flight ZSET},
--   {'c', holds HASH, charge}.
-- Returns whether there was one.
local function undo(rkey, reservations, event_id)
  local u = redis.call('HGET', rkey, 'u')
  if u then
    for _, e in ipairs(cjson.decode(u)) do
      if e[1] == 'w' then
        -- a window gone (expired, evicted) has nothing to take back
        if redis.call('EXISTS', e[2]) == 1 then
          window_add(e[2], -1, tonumber(e[3]), tonumber(e[4]), money(e[5]))
        end
      elseif e[1] == 'm' then
        minute_remove(e[2], e[3], e[4])
      elseif e[1] == 'f' then
        redis.call('ZREM', e[2], event_id)
      elseif e[1] == 'c' then
        if redis.call('EXISTS', e[2]) == 1 then
          hold_add(e[2], -1, money(e[3]))
        end
      end
    end
    redis.call('DEL', rkey)
  end
  redis.call('ZREM', reservations, event_id)
  return u ~= false
end

-- undo at most n reservations past their expiry: leaked ones free themselves
local function purge(reservations, base, now, n)
  local due = redis.call('ZRANGEBYSCORE', reservations, '-inf', int(now), 'LIMIT', 0, n)
  for _, id in ipairs(due) do
    undo(base .. 'r:' .. id, reservations, id)
  end
end
