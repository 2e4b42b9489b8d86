-- Persist an invoice change and every effect it caused, in one atomic step.
-- Compare-and-set on the version: a writer that read an older version gets
-- 0 back and must re-read and re-apply; nothing is written then.
--
-- KEYS[1] invoice hash        KEYS[2] timers zset         KEYS[3] delivery-due zset
-- KEYS[4] delivery hash       KEYS[5] mail-due zset       KEYS[6] mails hash
-- KEYS[7] balance hash        KEYS[8] ledger list         KEYS[9] address-owner key
-- ARGV[1] expected version    ARGV[2] invoice JSON        ARGV[3] invoice id
-- ARGV[4] timer fire time, '' to clear                    ARGV[5] callback sequence or ''
-- ARGV[6] now (unix seconds)  ARGV[7] ledger JSON array or ''
-- ARGV[8] mails JSON object {cause: record} or ''        ARGV[9] '1': own KEYS[9]
-- Returns the new version, or 0 on a version conflict.

local version = tonumber(redis.call('HGET', KEYS[1], 'v'))
if version ~= tonumber(ARGV[1]) then
  return 0
end
if ARGV[9] == '1' and not redis.call('SET', KEYS[9], ARGV[3], 'NX') then
  if redis.call('GET', KEYS[9]) ~= ARGV[3] then
    return redis.error_reply('address already owned: ' .. KEYS[9])
  end
end
version = version + 1
redis.call('HSET', KEYS[1], 'v', version, 'd', ARGV[2])

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

if ARGV[7] ~= '' then
  for _, entry in ipairs(cjson.decode(ARGV[7])) do
    local current = redis.call('HGET', KEYS[7], entry.currency) or '0'
    redis.call('HSET', KEYS[7], entry.currency, dec_add(current, entry.amount))
    redis.call('RPUSH', KEYS[8], cjson.encode(entry))
  end
end

if ARGV[8] ~= '' then
  for cause, record in pairs(cjson.decode(ARGV[8])) do
    if redis.call('HSETNX', KEYS[6], cause, cjson.encode(record)) == 1 then
      redis.call('ZADD', KEYS[5], ARGV[6], ARGV[3] .. ':' .. cause)
    end
  end
end
return version
