-- Add preloaded deposit addresses to one currency's pool, each at most once
-- ever: the set remembers every address loaded before, including the ones
-- already popped and handed out, so restarts and concurrent starts that load
-- the same file never put an address back into the pool.
--
-- KEYS[1] pool list of the currency
-- KEYS[2] set of every address ever loaded for the currency
-- ARGV    the addresses, in pool order
--
-- Returns how many addresses were new.

local added = 0
for _, address in ipairs(ARGV) do
  if redis.call('SADD', KEYS[2], address) == 1 then
    redis.call('RPUSH', KEYS[1], address)
    added = added + 1
  end
end
return added
