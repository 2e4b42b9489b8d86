-- Record what happened to one customer e-mail: compare-and-set on its record.
-- The record is replaced only if it is still exactly what the caller read, so
-- an outcome is recorded once even when two workers raced on the mail (the
-- loser re-reads and decides again); its due entry moves in the same step.
--
-- KEYS[1] mails hash of the invoice   KEYS[2] mail-due zset   KEYS[3] invoice key
-- ARGV[1] cause (hash field)           ARGV[2] record as read  ARGV[3] new record
-- ARGV[4] due member                   ARGV[5] next due time, '' to take it off the schedule
-- ARGV[6] invoice version that must still hold, '' for no check (parking a mail for
--         want of an address must not miss an e-mail the customer just gave)
-- Returns 1 when written, 0 when the record or the invoice changed meanwhile.

if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
-- The invoice is '{version}:{JSON}' (commit.lua): compare its version only.
local head = redis.call('GETRANGE', KEYS[3], 0, 19)
if ARGV[6] ~= '' and string.match(head, '^(%d+):') ~= ARGV[6] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if ARGV[5] == '' then
  redis.call('ZREM', KEYS[2], ARGV[4])
else
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
end
return 1
