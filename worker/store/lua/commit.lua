-- Persist an invoice change and every effect it caused, in one atomic step.
-- Compare-and-set on the version: a writer that read an older version gets
-- 0 back and must re-read and re-apply; nothing is written then.
--
-- Every key is in the invoice's partition (one hash slot, so this runs on a
-- Redis Cluster too). The merchant's balances live in another slot: the ledger
-- entries go to the partition's ledger outbox here, in the same step, and
-- ledger_apply.lua moves each onto the balances exactly once (worker/store/ledger.py).
-- The deposit address's owner key is written before the commit that assigns it
-- (InvoiceStore.claim_address): an owner without the address is ignored by ingest.
-- A refund token's index key (cv:rtok:…, its own slot) is likewise written before
-- the commit that stores the token on the invoice (InvoiceStore.claim_refund_token):
-- an index key whose invoice does not hold that token opens no refund page.
--
-- KEYS[1] invoice key         KEYS[2] timers zset         KEYS[3] delivery-due zset
-- KEYS[4] delivery hash       KEYS[5] mail-due zset       KEYS[6] mails hash
-- KEYS[7] ledger outbox stream
-- ARGV[1] expected version    ARGV[2] invoice JSON        ARGV[3] invoice id
-- ARGV[4] timer fire time, '' to clear                    ARGV[5] callback sequence or ''
-- ARGV[6] now (unix seconds)  ARGV[7] ledger lines (worker/store/invoices.py ledger_line) or ''
-- ARGV[8] mails JSON object {cause: record} or ''        ARGV[9] merchant key
-- Returns the new version, or 0 on a version conflict.

-- The invoice is one string, '{version}:{JSON}': only its head is read here.
local version = tonumber(string.match(redis.call('GETRANGE', KEYS[1], 0, 19), '^(%d+):'))
if version == nil or version ~= tonumber(ARGV[1]) then
  return 0
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

-- Ledger lines '{invoice id} {kind} {currency} {amount} {unix seconds}', one per line,
-- into the outbox: the entry id is what makes applying them to the balance idempotent.
for line in string.gmatch(ARGV[7], '[^\n]+') do
  redis.call('XADD', KEYS[7], '*', 'm', ARGV[9], 'l', line)
end

if ARGV[8] ~= '' then
  for cause, record in pairs(cjson.decode(ARGV[8])) do
    if redis.call('HSETNX', KEYS[6], cause, cjson.encode(record)) == 1 then
      redis.call('ZADD', KEYS[5], ARGV[6], ARGV[3] .. ':' .. cause)
    end
  end
end
return version
