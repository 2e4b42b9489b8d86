-- Move ledger entries of one partition's outbox onto one merchant's balances,
-- each exactly once. commit.lua put them in the outbox (the invoice's slot) in
-- the same step as the state change; this runs in the merchant's slot. The
-- merchant keeps, per partition, the newest outbox entry id already applied:
-- callers go through a partition's outbox oldest first, so an entry at or
-- below that mark is on the balances already (a crash between this script
-- and the outbox XDEL, or two workers on one partition) and is skipped.
--
-- KEYS[1] balance hash   KEYS[2] ledger list   KEYS[3] applied hash (partition → entry id)
-- ARGV[1] partition      ARGV[2], ARGV[3], ... entry id, ledger line, entry id, ledger line, ...
-- Returns how many entries were applied (the rest had been).

local function after(a, b)
  -- Stream ids 'ms-seq': is a newer than b? (ms < 2^53: exact as a Lua number)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams > bms or (ams == bms and aseq > bseq)
end

local mark = redis.call('HGET', KEYS[3], ARGV[1]) or '0-0'
local applied = 0
for i = 2, #ARGV, 2 do
  local id, line = ARGV[i], ARGV[i + 1]
  if after(id, mark) then
    local currency, amount = string.match(line, '^%S+ %S+ (%S+) (%S+) ')
    local current = redis.call('HGET', KEYS[1], currency) or '0'
    redis.call('HSET', KEYS[1], currency, dec_add(current, amount))
    redis.call('RPUSH', KEYS[2], line)
    mark = id
    applied = applied + 1
  end
end
if applied > 0 then
  redis.call('HSET', KEYS[3], ARGV[1], mark)
end
return applied
