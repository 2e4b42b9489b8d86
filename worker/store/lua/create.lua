-- Create an invoice, all or nothing. The foreign id is claimed with SET NX in
-- the same atomic step, so two racing creates can never both succeed.
--
-- KEYS[1] foreign-id key   KEYS[2] invoice key    KEYS[3] token key
-- KEYS[4] timers zset      KEYS[5] address-owner key (= KEYS[2] when none)
-- ARGV[1] invoice id       ARGV[2] invoice JSON   ARGV[3] timer fire time or ''
-- ARGV[4] '1' when KEYS[5] is an address to own
-- Returns {1, id} when created, {0, existing id} for a duplicate foreign id.

if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  return {0, redis.call('GET', KEYS[1])}
end
if ARGV[4] == '1' and not redis.call('SET', KEYS[5], ARGV[1], 'NX') then
  return redis.error_reply('address already owned: ' .. KEYS[5])
end
-- The invoice is one string, '{version}:{JSON}'; a new one is at version 1.
redis.call('SET', KEYS[2], '1:' .. ARGV[2])
redis.call('SET', KEYS[3], ARGV[1])
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
end
return {1, ARGV[1]}
