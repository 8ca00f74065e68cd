#!lua flags=allow-cross-slot-keys
-- One node's share of a stream batch on a Redis Cluster: the keys of every slot this node serves
-- that the batch touches, each slot guarded by its own per-partition fence. Every key is read
-- before the first write (a key this node does not serve fails the script before it writes), and
-- a failed check writes nothing.
-- ARGV: now_ms, now_ts, half_life_ms, n_slots, n_users, n_items, then per slot: its fence key,
-- n, then n (partition, lowest stored offset expected, new offset, offset this writer last stored
-- there or -1); per user: key, 3 counters as read, 9 values; per item: key, 7 values.
--#include codec.lua

local now_ms = tonumber(ARGV[1])
local now_ts = ARGV[2]
local half_life_ms = tonumber(ARGV[3])
local n_slots = tonumber(ARGV[4])
local n_users = tonumber(ARGV[5])
local n_items = tonumber(ARGV[6])
local a = 7

-- 1. per-slot fences: refuse when a slot holds more than the caller knew of, or less than the
-- caller stored there (the node lost acknowledged writes)
local fences, refused, behind = {}, {}, {}
for s = 1, n_slots do
  local key, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local parts = {}
  for j = 1, n do parts[j] = ARGV[a + 4 * (j - 1)] end
  local stored = redis.call('HMGET', key, unpack(parts))
  local w = {}
  for j = 1, n do
    local lo, hi, known = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    local st = tonumber(stored[j] or '-1')
    if st > lo then
      refused[#refused + 1] = (s - 1) .. ':' .. ARGV[a] .. ':' .. tostring(st)
    elseif st < known then
      behind[#behind + 1] = (s - 1) .. ':' .. ARGV[a] .. ':' .. tostring(st)
    elseif hi > st then
      w[#w + 1] = ARGV[a]
      w[#w + 1] = ARGV[a + 2]
    end
    a = a + 4
  end
  fences[s] = {key, w}
end

-- 2. users unchanged since the caller read them
local writes, n_writes, stale = {}, 0, {}
for u = 1, n_users do
  local key = ARGV[a]
  local changed, w = plan_user(key, a + 1)
  if changed then stale[#stale + 1] = u - 1 end
  a = a + 13
  n_writes = n_writes + 1
  writes[n_writes] = {key, w}
end

-- 3. items: merge counters and trending into what is stored
for _ = 1, n_items do
  local key = ARGV[a]
  n_writes = n_writes + 1
  writes[n_writes] = {key, merge_item(key, a + 1, now_ms, now_ts, half_life_ms)}
  a = a + 8
end
if #behind > 0 then return {'behind', concat(behind, ',')} end
if #refused > 0 then return {'fence', concat(refused, ',')} end
if #stale > 0 then return {'stale', concat(stale, ',')} end

-- 4. write
for i = 1, n_writes do
  local w = writes[i][2]
  if #w > 0 then redis.call('HSET', writes[i][1], unpack(w)) end
end
for s = 1, n_slots do
  if #fences[s][2] > 0 then redis.call('HSET', fences[s][1], unpack(fences[s][2])) end
end
return {'ok'}
