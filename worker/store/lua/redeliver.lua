-- Make an invoice's newest snapshot due now, dead-lettered or not.
--
-- KEYS[1] delivery-due zset   KEYS[2] delivery hash
-- ARGV[1] invoice id          ARGV[2] now
-- Returns the sequence that will be delivered, or 0 when there is none.

local newest = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
if newest == 0 then
  return 0
end
redis.call('HDEL', KEYS[2], 'dead', 'tries', 'for')
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return newest
