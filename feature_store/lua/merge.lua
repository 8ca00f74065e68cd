#!lua
-- Apply one stream batch to Feast-layout hashes, guarded by the offset fence, the users'
-- unchanged-since-read check and the event-id dedup. Every check and every read happens before
-- the first write, and a failed check writes nothing, so a batch is applied whole or not at all.
--
-- Users (one partition owns a user) arrive fully merged by the caller, with the raw bytes of the
-- three counters it read: equal bytes mean nobody wrote the user since (every applied event
-- changes one counter). Items are shared by all partitions, so they are merged here.
-- This runs once per batch over thousands of values: the codec below avoids tables and
-- concatenations where it can (Lua 5.1 has no integers; values stay below 2^53).
--#include codec.lua

local now_ms = tonumber(ARGV[1])
local now_ts = ARGV[2]  -- now_ms as an encoded Timestamp
local half_life_ms = tonumber(ARGV[3])
local seen_ttl = ARGV[4]
local n_fence = tonumber(ARGV[5])
local n_seen = tonumber(ARGV[6])
local n_users = tonumber(ARGV[7])
local n_items = tonumber(ARGV[8])
local a = 9
local offsets_key = KEYS[1]

-- 1. offset fence
local offsets = {}
for _ = 1, n_fence do
  local p, expected, applied = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2]
  a = a + 3
  local stored = redis.call('HGET', offsets_key, p)
  local stored_n = -1
  if stored then stored_n = tonumber(stored) end
  if stored_n ~= expected then return {'fence', p, tostring(stored_n)} end
  offsets[#offsets + 1] = p
  offsets[#offsets + 1] = applied
end

-- 2. users unchanged since the caller read them
local writes, n_writes = {}, 0
local stale = {}
local k = 2 + n_seen
for u = 1, n_users do
  local changed, w = plan_user(KEYS[k], a)
  if changed then stale[#stale + 1] = u - 1 end
  a = a + 12
  n_writes = n_writes + 1
  writes[n_writes] = {KEYS[k], w}
  k = k + 1
end
if #stale > 0 then return {'stale', concat(stale, ',')} end

-- 3. items: merge counters and trending into what is stored
for _ = 1, n_items do
  n_writes = n_writes + 1
  writes[n_writes] = {KEYS[k], merge_item(KEYS[k], a, now_ms, now_ts, half_life_ms)}
  a = a + 7
  k = k + 1
end

-- 4. event-id dedup: set every key; if one was already there, undo and report
local dups = {}
for i = 1, n_seen do
  if not redis.call('SET', KEYS[1 + i], ARGV[a + i - 1], 'NX', 'EX', seen_ttl) then dups[#dups + 1] = i end
end
if #dups > 0 then
  local is_dup = {}
  for _, i in ipairs(dups) do is_dup[i] = true end
  for i = 1, n_seen do
    if not is_dup[i] then redis.call('DEL', KEYS[1 + i]) end
  end
  for j = 1, #dups do dups[j] = dups[j] - 1 end
  return {'dup', concat(dups, ',')}
end

-- 5. write
for i = 1, n_writes do
  local w = writes[i][2]
  if #w > 0 then redis.call('HSET', writes[i][1], unpack(w)) end
end
if #offsets > 0 then redis.call('HSET', offsets_key, unpack(offsets)) end
return {'ok'}
