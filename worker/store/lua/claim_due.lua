-- Claim due members of a schedule with a lease: the members whose time has
-- come get their score moved to the lease's end, atomically, so no other
-- worker takes them meanwhile. A worker that dies holding a claim simply lets
-- the lease run out; the member is then due again.
--
-- KEYS[1] schedule zset (member → due time, unix seconds)
-- ARGV[1] now   ARGV[2] lease end   ARGV[3] how many at most
-- Returns the claimed members.

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], member)
end
return due
