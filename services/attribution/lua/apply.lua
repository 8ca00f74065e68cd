-- Apply one attribution batch if every partition in it is still ours and holds the offsets this
-- consumer read (the stream's fences: owner tokens set by take_log.lua, offsets moved only here),
-- atomically with its effects: counters, impressions kept per user, arms seen. Otherwise write
-- nothing and return {'fenced', field, stored offset or '', stored token or ''}.
-- KEYS: offsets, owners. ARGV: n, (field, token, expected offset, new offset) * n,
-- m, (field, value) * m [plain offsets-hash fields: watermarks], k, (key, field, amount) * k,
-- j, (key, value, keep, ttl ms) * j, set key, members...
local a = 1
local n = tonumber(ARGV[a]); a = a + 1
for i = 0, n - 1 do
  local f, token, expected = ARGV[a + 4 * i], ARGV[a + 4 * i + 1], ARGV[a + 4 * i + 2]
  local owner = redis.call('HGET', KEYS[2], f)
  local stored = redis.call('HGET', KEYS[1], f)
  if owner ~= token or (stored or '-1') ~= expected then
    return {'fenced', f, stored or '', owner or ''}
  end
end
for i = 0, n - 1 do redis.call('HSET', KEYS[1], ARGV[a + 4 * i], ARGV[a + 4 * i + 3]) end
a = a + 4 * n
local m = tonumber(ARGV[a]); a = a + 1
for i = 0, m - 1 do redis.call('HSET', KEYS[1], ARGV[a + 2 * i], ARGV[a + 2 * i + 1]) end
a = a + 2 * m
local k = tonumber(ARGV[a]); a = a + 1
for i = 0, k - 1 do redis.call('HINCRBY', ARGV[a + 3 * i], ARGV[a + 3 * i + 1], ARGV[a + 3 * i + 2]) end
a = a + 3 * k
local j = tonumber(ARGV[a]); a = a + 1
for i = 0, j - 1 do
  local key = ARGV[a + 4 * i]
  redis.call('LPUSH', key, ARGV[a + 4 * i + 1])
  redis.call('LTRIM', key, 0, tonumber(ARGV[a + 4 * i + 2]) - 1)
  redis.call('PEXPIRE', key, ARGV[a + 4 * i + 3])
end
a = a + 4 * j
for i = a + 1, #ARGV do redis.call('SADD', ARGV[a], ARGV[i]) end
return {'ok'}
