-- Persist an invoice change and every effect it caused, in one atomic step.
-- Compare-and-set on the version: a writer that read an older version gets
-- 0 back and must re-read and re-apply; nothing is written then.
--
-- KEYS[1] invoice key         KEYS[2] timers zset         KEYS[3] delivery-due zset
-- KEYS[4] delivery hash       KEYS[5] mail-due zset       KEYS[6] mails hash
-- KEYS[7] balance hash        KEYS[8] ledger list         KEYS[9] address-owner key
-- ARGV[1] expected version    ARGV[2] invoice JSON        ARGV[3] invoice id
-- ARGV[4] timer fire time, '' to clear                    ARGV[5] callback sequence or ''
-- ARGV[6] now (unix seconds)  ARGV[7] ledger lines (worker/store/invoices.py ledger_line) or ''
-- ARGV[8] mails JSON object {cause: record} or ''        ARGV[9] '1': own KEYS[9]
-- KEYS[10] refund-token key (= KEYS[1] when none)          ARGV[10] '1': index KEYS[10]
-- Returns the new version, or 0 on a version conflict.

-- The invoice is one string, '{version}:{JSON}': only its head is read here.
local version = tonumber(string.match(redis.call('GETRANGE', KEYS[1], 0, 19), '^(%d+):'))
if version == nil or version ~= tonumber(ARGV[1]) then
  return 0
end
if ARGV[9] == '1' and not redis.call('SET', KEYS[9], ARGV[3], 'NX') then
  if redis.call('GET', KEYS[9]) ~= ARGV[3] then
    return redis.error_reply('address already owned: ' .. KEYS[9])
  end
end
-- A refund token issued by this change (with its first refund/payback e-mail):
-- it names the refund page from now on. 192 random bits never collide; NX
-- refuses rather than let one token point at two invoices.
if ARGV[10] == '1' and not redis.call('SET', KEYS[10], ARGV[3], 'NX') then
  if redis.call('GET', KEYS[10]) ~= ARGV[3] then
    return redis.error_reply('refund token already used: ' .. KEYS[10])
  end
end
version = version + 1
redis.call('SET', KEYS[1], string.format('%d:', version) .. ARGV[2])

if ARGV[4] == '' then
  redis.call('ZREM', KEYS[2], ARGV[3])
else
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
end

-- A new snapshot: record it and make the invoice due for delivery. NX keeps a
-- retry's scheduled time; that attempt will carry this newest snapshot.
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[4], 'seq', ARGV[5])
  redis.call('ZADD', KEYS[3], 'NX', ARGV[6], ARGV[3])
end

-- Ledger lines '{invoice id} {kind} {currency} {amount} {unix seconds}', one per line.
for line in string.gmatch(ARGV[7], '[^\n]+') do
  local currency, amount = string.match(line, '^%S+ %S+ (%S+) (%S+) ')
  local current = redis.call('HGET', KEYS[7], currency) or '0'
  redis.call('HSET', KEYS[7], currency, dec_add(current, amount))
  redis.call('RPUSH', KEYS[8], line)
end

if ARGV[8] ~= '' then
  for cause, record in pairs(cjson.decode(ARGV[8])) do
    if redis.call('HSETNX', KEYS[6], cause, cjson.encode(record)) == 1 then
      redis.call('ZADD', KEYS[5], ARGV[6], ARGV[3] .. ':' .. cause)
    end
  end
end
return version
