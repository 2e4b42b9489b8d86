-- Take or keep the lead of the rates refresher: one worker reads the market
-- sources, the others wait. The lead is a lease: a worker that dies or stalls
-- simply stops renewing it, and another takes over when it runs out.
--
-- KEYS[1] leader key
-- ARGV[1] this worker's name   ARGV[2] lease (milliseconds)
-- Returns 1 when this worker leads (until the lease ends), else 0.

local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
