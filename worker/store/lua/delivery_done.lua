-- Record one delivery attempt of an invoice's snapshot and decide what is next.
--
-- KEYS[1] delivery-due zset   KEYS[2] delivery hash (state and attempt log)
-- ARGV[1] invoice id          ARGV[2] attempted sequence
-- ARGV[3] '1' delivered, '0' failed, 'x' failed for good (no retry can help)
-- ARGV[4] attempt log entry   ARGV[5] now (unix seconds)
-- ARGV[6] retry schedule: comma-separated delays in seconds
-- Returns {state, next attempt time or -1}; state is delivered, retrying or dead.
--
-- The delivery hash holds: seq (newest committed sequence, written by
-- commit.lua), delivered (highest sequence delivered), tries (failed attempts
-- of sequence `for`), dead (a sequence that exhausted its attempts), and the
-- attempt log: n (how many attempts were logged) and a1, a2, … one entry each
-- (worker/store/deliveries.py log_entry). Small fields, so the hash stays one
-- compact listpack; it replaced a list key of its own (cv:dlog, still read).

local id, attempted, outcome = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now = tonumber(ARGV[5])
redis.call('HSET', KEYS[2], 'a' .. redis.call('HINCRBY', KEYS[2], 'n', 1), ARGV[4])
local newest = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')

if outcome == '1' then
  local delivered = tonumber(redis.call('HGET', KEYS[2], 'delivered') or '-1')
  if attempted > delivered then
    redis.call('HSET', KEYS[2], 'delivered', attempted)
  end
  redis.call('HDEL', KEYS[2], 'tries', 'for', 'dead')
  if newest > attempted then
    -- A newer snapshot was committed while this one was in flight: it goes next.
    redis.call('ZADD', KEYS[1], now, id)
    return {'delivered', now}
  end
  redis.call('ZREM', KEYS[1], id)
  return {'delivered', -1}
end

-- Failed: count the attempts of this sequence and follow the schedule.
local tries = 1
if tonumber(redis.call('HGET', KEYS[2], 'for') or '-1') == attempted then
  tries = tonumber(redis.call('HGET', KEYS[2], 'tries') or '0') + 1
end
redis.call('HSET', KEYS[2], 'for', attempted, 'tries', tries)
local schedule = {}
for delay in string.gmatch(ARGV[6], '[^,]+') do
  schedule[#schedule + 1] = tonumber(delay)
end
if outcome == 'x' or tries > #schedule then
  if newest > attempted then
    -- Give the newer snapshot its own chance before anything is dead-lettered.
    redis.call('ZADD', KEYS[1], now, id)
    return {'retrying', now}
  end
  redis.call('HSET', KEYS[2], 'dead', attempted)
  redis.call('ZREM', KEYS[1], id)
  return {'dead', -1}
end
local next_at = now + schedule[tries]
redis.call('ZADD', KEYS[1], next_at, id)
return {'retrying', next_at}
