-- Create an invoice, all or nothing. The foreign id is claimed with HSETNX in
-- the same atomic step, so two racing creates can never both succeed. Every
-- key is in the invoice's partition (its id was drawn for the foreign id's
-- partition), so this runs unchanged on a Redis Cluster. The token and the
-- address owner live in other slots: InvoiceStore.create writes them first.
--
-- The claim is a field of a bucketed hash (worker/store/keys.py foreign_id_index);
-- versions before wrote one key per foreign id, still honoured here.
--
-- KEYS[1] foreign-id key of earlier versions   KEYS[2] foreign-id bucket (hash)
-- KEYS[3] invoice key                          KEYS[4] timers zset of the partition
-- ARGV[1] invoice id       ARGV[2] stored invoice   ARGV[3] timer fire time or ''
-- ARGV[4] the foreign id's field in its bucket
-- Returns {1, id} when created, {0, existing id} for a duplicate foreign id.

local earlier = redis.call('GET', KEYS[1])
if earlier then
  return {0, earlier}
end
if redis.call('HSETNX', KEYS[2], ARGV[4], ARGV[1]) == 0 then
  return {0, redis.call('HGET', KEYS[2], ARGV[4])}
end
-- The invoice is one string, '{version}:{stored form}'; a new one is at version 1.
redis.call('SET', KEYS[3], '1:' .. ARGV[2])
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
end
return {1, ARGV[1]}
