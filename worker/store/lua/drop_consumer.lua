-- Remove a worker's consumer from one updates partition's group, but only when
-- it holds no pending entry there: XGROUP DELCONSUMER forgets a consumer's
-- pending entries, and an entry forgotten that way would never be applied.
-- Checking and deleting in one script leaves no moment for the consumer to take
-- an entry in between. The caller checked first that the worker is gone (its
-- heartbeat lives in another hash slot); if it is alive after all, its next
-- read creates the consumer again.
--
-- KEYS[1] stream of the partition
-- ARGV[1] group    ARGV[2] consumer
-- Returns 1 when the consumer was removed, else 0.

local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending > 0 then
  return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
