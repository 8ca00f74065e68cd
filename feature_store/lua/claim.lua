#!lua flags=allow-cross-slot-keys
-- ARGV: ttl, n, then n (key, record) claims, then keys only to read. Returns, per claim, the record
-- that owns the id when it is another one (false: this record owns it), then the read values.
local ttl, n = ARGV[1], tonumber(ARGV[2])
local out, a = {}, 3
for i = 1, n do
  local owner = redis.call('SET', ARGV[a], ARGV[a + 1], 'NX', 'EX', ttl, 'GET')
  if owner == ARGV[a + 1] then owner = false end
  out[i] = owner
  a = a + 2
end
for j = a, #ARGV do out[#out + 1] = redis.call('GET', ARGV[j]) end
return out
