-- Give up the lead of the rates refresher, if this worker holds it (shutdown),
-- so another worker takes over without waiting for the lease to run out.
--
-- KEYS[1] leader key
-- ARGV[1] this worker's name
-- Returns 1 when the lead was given up, else 0.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
