-- Create an invoice, all or nothing. The foreign id is claimed with SET NX in
-- the same atomic step, so two racing creates can never both succeed. Every
-- key is in the invoice's partition (its id was drawn for the foreign id's
-- partition), so this runs unchanged on a Redis Cluster. The token and the
-- address owner live in other slots: InvoiceStore.create writes them first.
--
-- KEYS[1] foreign-id key   KEYS[2] invoice key    KEYS[3] timers zset of the partition
-- ARGV[1] invoice id       ARGV[2] invoice JSON   ARGV[3] timer fire time or ''
-- Returns {1, id} when created, {0, existing id} for a duplicate foreign id.

if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  return {0, redis.call('GET', KEYS[1])}
end
-- The invoice is one string, '{version}:{JSON}'; a new one is at version 1.
redis.call('SET', KEYS[2], '1:' .. ARGV[2])
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
end
return {1, ARGV[1]}
