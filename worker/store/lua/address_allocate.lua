-- Take the next deposit address of one currency: a preloaded pool entry first,
-- else the next HD derivation index; either way with a fresh global address id.
-- One atomic step, so no two callers in any process ever get the same pool
-- entry or index, and no id is spent when nothing could be handed out.
--
-- KEYS[1] pool list of the currency
-- KEYS[2] HD index counter of the currency
-- KEYS[3] global address id counter
-- ARGV[1] "1" when the caller holds an extended public key for the currency
--
-- Returns {id, "pool", address}, {id, "hd", index} (index counts from 0),
-- or an empty array when the pool is empty and there is no key.

local address = redis.call('LPOP', KEYS[1])
if address then
  return {redis.call('INCR', KEYS[3]), 'pool', address}
end
if ARGV[1] == '1' then
  local index = redis.call('INCR', KEYS[2]) - 1
  return {redis.call('INCR', KEYS[3]), 'hd', index}
end
return {}
