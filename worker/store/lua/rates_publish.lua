-- Write fresh prices into the rate table, only while this worker still leads:
-- a former leader that stalled past its lease must not overwrite a newer table.
--
-- KEYS[1] leader key   KEYS[2] rate table (hash symbol → "{price} {as of} {sources}")
-- ARGV[1] this worker's name   ARGV[2..] field, value, field, value, ...
-- Returns 1 when written, 0 when this worker no longer leads.

if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if #ARGV > 1 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 2))
end
return 1
