-- Append processing updates to the stream, all in one step: the receiver's group
-- commit (worker/ingest/enqueue.py). A script rather than MULTI because the WAIT
-- for replicas must follow on the same connection, outside any transaction, and
-- redis-py's transactional pipeline cannot append a command after its EXEC.
-- The only way for an XADD here to fail is OOM, refused before the first one.
--
-- KEYS[1] the updates stream
-- ARGV    one encoded update each, stored as field `u`
-- Returns the entry ids, in order.

local ids = {}
for i, payload in ipairs(ARGV) do
  ids[i] = redis.call('XADD', KEYS[1], '*', 'u', payload)
end
return ids
