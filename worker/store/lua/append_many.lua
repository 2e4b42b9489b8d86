-- Append processing updates to several partitions of the stream in one call: the
-- receiver's group commit on a single Redis (worker/ingest/enqueue.py), one command
-- per flush however many partitions its updates fall in. A Redis Cluster cannot run
-- it (the streams are in different slots): there append.lua runs once per partition.
-- All or none, like append.lua: the only way for an XADD here to fail is OOM,
-- refused before the first one.
--
-- KEYS        the updates streams
-- ARGV[1..n]  how many updates go to each stream (n = #KEYS)
-- ARGV[n+1..] the encoded updates, stream by stream in KEYS order, each stored as `u`
-- Returns the entry ids, in ARGV order.

local ids = {}
local at = #KEYS
for k = 1, #KEYS do
  for _ = 1, tonumber(ARGV[k]) do
    at = at + 1
    ids[#ids + 1] = redis.call('XADD', KEYS[k], '*', 'u', ARGV[at])
  end
end
return ids
