-- After Redis lost writes: take partitions again (a fresh owner token) and raise their logged
-- offsets back to what this consumer knows its recorded rolls made durable (their files exist);
-- returns the logged offsets as they then stand. KEYS: logged, owners. ARGV: token, (partition,
-- offset or -1)...
local out = {}
for i = 2, #ARGV, 2 do
  local p, floor = ARGV[i], tonumber(ARGV[i + 1])
  redis.call('HSET', KEYS[2], p, ARGV[1])
  local logged = tonumber(redis.call('HGET', KEYS[1], p) or '-1')
  if floor > logged then
    redis.call('HSET', KEYS[1], p, floor)
    logged = floor
  end
  out[#out + 1] = logged
end
return out
