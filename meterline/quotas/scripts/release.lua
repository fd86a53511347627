-- release: the request never ran; undo exactly what its reservation added.
--
-- KEYS[1]  the account's reservations: ZSET event_id -> expiry (ms)
-- KEYS[2]  the reservation's HASH
-- ARGV[1]  event_id
-- Returns 1 when there was a reservation, else 0 (settled, released, expired or unknown).

if undo(KEYS[2], KEYS[1], ARGV[1]) then
  return 1
end
return 0
