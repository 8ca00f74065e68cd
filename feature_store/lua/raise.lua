-- Raise hash fields of KEYS[1] to the values given as ARGV (field, value, field, value, ...),
-- never lower them (several writers, any order).
for i = 1, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '-1')
  if tonumber(ARGV[i + 1]) > cur then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
