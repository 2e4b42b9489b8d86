-- Claim due members of a schedule with a lease: the members whose time has
-- come get their score moved to the lease's end, atomically, so no other
-- worker takes them meanwhile. A worker that dies holding a claim simply lets
-- the lease run out; the member is then due again.
--
-- KEYS[1] schedule zset (member → due time, unix seconds)
-- ARGV[1] now   ARGV[2] lease end   ARGV[3] how many at most
-- ARGV[4] (optional, callbacks) the partition's invoice key prefix: members are invoice ids
-- Returns the claimed members; with ARGV[4], {member, SHA1 of the stored invoice or ''}
-- each, so a worker that holds exactly those bytes decoded skips reading them
-- (worker/outbox/delivery.py). The invoice keys are not in KEYS (the members are
-- only known here) but share KEYS[1]'s slot: the prefix carries the partition's tag.

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], member)
end
if ARGV[4] == nil then
  return due
end
local claimed = {}
for i, member in ipairs(due) do
  local stored = redis.call('GET', ARGV[4] .. member)
  claimed[i] = {member, stored and redis.sha1hex(stored) or ''}
end
return claimed
