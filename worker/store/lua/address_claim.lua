-- Claim a deposit address for an invoice: its owner entry, set once and never changed.
-- The owner is a field of a bucketed hash (worker/store/keys.py address_index);
-- versions before wrote one key per address, which still owns it when present (and is
-- in the same slot: both carry the address's partition tag).
--
-- KEYS[1] owner key of earlier versions   KEYS[2] owner bucket (hash)
-- ARGV[1] the address's field             ARGV[2] invoice id
-- Returns the owner: ARGV[2] when claimed now or before by the same invoice.

local earlier = redis.call('GET', KEYS[1])
if earlier then
  return earlier
end
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
return redis.call('HGET', KEYS[2], ARGV[1])
