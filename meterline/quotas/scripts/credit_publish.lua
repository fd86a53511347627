-- credit_publish: write a copy of a prepaid account's credits, as the ledger says them,
-- unless a newer one (a higher version) is there.
--
-- KEYS[1]  the account's credits HASH
-- ARGV[1]  now, ms ('': Redis TIME)
-- ARGV[2]  the ledger's version, ARGV[3] credits (picos, digits), ARGV[4] when they
--          change (ms, '': never), ARGV[5] how long the copy holds (ms)
-- Returns 1 written, 0 a newer copy is there.

return credit_publish(KEYS[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], clock(ARGV[1]))
