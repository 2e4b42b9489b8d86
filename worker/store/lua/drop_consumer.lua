-- Remove a worker's consumer from the updates stream's group, but only when it
-- is gone (no fresh heartbeat) and holds no pending entry: XGROUP DELCONSUMER
-- forgets a consumer's pending entries, and an entry forgotten that way would
-- never be applied. Checking and deleting in one script leaves no moment for
-- the consumer to take an entry in between; if it is alive after all, its
-- next read creates it again.
--
-- KEYS[1] stream   KEYS[2] heartbeats zset (worker name → unix seconds)
-- ARGV[1] group    ARGV[2] consumer    ARGV[3] heartbeats before this are dead
-- Returns 1 when the consumer was removed, else 0.

local beat = redis.call('ZSCORE', KEYS[2], ARGV[2])
if beat and tonumber(beat) >= tonumber(ARGV[3]) then
  return 0
end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending > 0 then
  return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
