-- Take partitions for the event log: a fresh owner token, and the logged offsets as they stand
-- once it is set (a roll of the previous owner either went through before, or is refused after).
-- KEYS: logged, owners. ARGV: token, partition...
local out = {}
for i = 2, #ARGV do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[1])
  out[#out + 1] = redis.call('HGET', KEYS[1], ARGV[i])
end
return out
