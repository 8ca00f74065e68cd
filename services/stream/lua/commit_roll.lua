-- Record a roll if every partition in it is still owned by the token it was taken with: raise the
-- logged offsets (never lower them) and record its files. Otherwise change nothing and return the
-- partitions owned by someone else. KEYS: logged, owners, rolls. ARGV: n, (partition, token,
-- offset or -1) * n, file name...
local n = tonumber(ARGV[1])
local refused = {}
for i = 0, n - 1 do
  local p = ARGV[2 + 3 * i]
  if redis.call('HGET', KEYS[2], p) ~= ARGV[3 + 3 * i] then refused[#refused + 1] = p end
end
if #refused > 0 then return refused end
for i = 0, n - 1 do
  local p, offset = ARGV[2 + 3 * i], ARGV[4 + 3 * i]
  if tonumber(offset) > tonumber(redis.call('HGET', KEYS[1], p) or '-1') then
    redis.call('HSET', KEYS[1], p, offset)
  end
end
for j = 2 + 3 * n, #ARGV do redis.call('HSET', KEYS[3], ARGV[j], '1') end
return refused
