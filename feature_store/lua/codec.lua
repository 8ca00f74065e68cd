-- Feast value codec and merge rules shared by merge.lua and cluster_merge.lua: it replaces
-- their "#include codec.lua" line. feature_store/scripts.py fills UF and IF with the hash field
-- names of a user and an item, in the order of USER_FIELDS and ITEM_FIELDS (feature_store/layout.py).
local UF = {--[[USER_FIELDS]]}
local IF = {--[[ITEM_FIELDS]]}

local byte, char, floor, unpack = string.byte, string.char, math.floor, unpack
local concat = table.concat

local function read_varint(s, pos)
  local b = byte(s, pos)
  if not b then error('truncated varint') end
  if b < 128 then return b, pos + 1 end
  local result, mult = b - 128, 128
  pos = pos + 1
  while true do
    b = byte(s, pos)
    if not b then error('truncated varint') end
    pos = pos + 1
    if b < 128 then return result + b * mult, pos end
    result = result + (b - 128) * mult
    mult = mult * 128
  end
end

-- ``tag`` (one byte) followed by the varint of n, a whole number >= 0.
local function tagged_varint(tag, n)
  if n < 128 then return char(tag, n) end
  if n < 16384 then return char(tag, n % 128 + 128, floor(n / 128)) end
  if n < 2097152 then
    return char(tag, n % 128 + 128, floor(n / 128) % 128 + 128, floor(n / 16384))
  end
  if n < 268435456 then
    return char(tag, n % 128 + 128, floor(n / 128) % 128 + 128, floor(n / 16384) % 128 + 128,
      floor(n / 2097152))
  end
  local lo, hi = n % 268435456, floor(n / 268435456)
  local out = {tag, lo % 128 + 128, floor(lo / 128) % 128 + 128, floor(lo / 16384) % 128 + 128,
    floor(lo / 2097152) + 128}
  while hi >= 128 do
    out[#out + 1] = hi % 128 + 128
    hi = floor(hi / 128)
  end
  out[#out + 1] = hi
  return char(unpack(out))
end

-- feast.types.Value: int64_val = 4 (tag 32), float_val = 6 (tag 53), double_val = 5 (tag 41),
-- string_val = 2 (tag 18). Absent fields (false) decode to defaults.
local function dec_int(s)
  if not s or byte(s, 1) ~= 32 then return 0 end
  return (read_varint(s, 2))
end

local function enc_int(n)
  if n < 0 then n = 0 end
  return tagged_varint(32, floor(n))
end

local function dec_float(s)
  if not s then return 0 end
  local tag = byte(s, 1)
  if tag == 53 then return (struct.unpack('<f', s, 2)) end
  if tag == 41 then return (struct.unpack('<d', s, 2)) end
  return 0
end

local function enc_float(x) return '\53' .. struct.pack('<f', x) end

-- google.protobuf.Timestamp: seconds = 1 (tag 8), nanos = 2 (tag 16) -> milliseconds.
local function dec_ts_ms(s)
  if not s then return nil end
  local secs, nanos, p, n = 0, 0, 1, #s
  while p <= n do
    local tag = byte(s, p)
    local v
    v, p = read_varint(s, p + 1)
    if tag == 8 then secs = v elseif tag == 16 then nanos = v end
  end
  return secs * 1000 + nanos / 1000000
end

-- A user: ARGV[a .. a+2] are its three counters as the caller read them, ARGV[a+3 .. a+11] its
-- new field values ('' = leave as stored). Returns whether it changed since the read, and its writes.
local function plan_user(key, a)
  local cur = redis.call('HMGET', key, UF[1], UF[2], UF[3])
  local changed = (cur[1] or '') ~= ARGV[a] or (cur[2] or '') ~= ARGV[a + 1] or (cur[3] or '') ~= ARGV[a + 2]
  local w, n = {}, 0
  for f = 1, 9 do
    local v = ARGV[a + 2 + f]
    if v ~= '' then
      w[n + 1] = UF[f]
      w[n + 2] = v
      n = n + 2
    end
  end
  return changed, w
end

-- An item: ARGV[a .. a+6] is the batch's delta (views, carts, purchases, last event ms, trending,
-- category, price), merged here into what is stored. Returns the item's writes.
local function merge_item(key, a, now_ms, now_ts, half_life_ms)
  local dv, dc, dp = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local last, trend = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local category, price = ARGV[a + 5], ARGV[a + 6]
  local cur = redis.call('HMGET', key, IF[1], IF[2], IF[3], IF[4], IF[5], IF[8])
  local old_s, old_t = dec_float(cur[4]), dec_int(cur[5])
  local s
  if last >= old_t then
    if old_s ~= 0 and last > old_t then s = old_s * 2 ^ ((old_t - last) / half_life_ms) + trend
    else s = old_s + trend end
  else
    s = old_s + trend * 2 ^ ((last - old_t) / half_life_ms)
    last = old_t
  end
  local w = {IF[4], enc_float(s), IF[5], enc_int(last)}
  local n = 4
  -- counters the batch does not change are left alone, unless never written (Feast reads 0)
  if dv ~= 0 or not cur[1] then w[n + 1] = IF[1]; w[n + 2] = enc_int(dec_int(cur[1]) + dv); n = n + 2 end
  if dc ~= 0 or not cur[2] then w[n + 1] = IF[2]; w[n + 2] = enc_int(dec_int(cur[2]) + dc); n = n + 2 end
  if dp ~= 0 or not cur[3] then w[n + 1] = IF[3]; w[n + 2] = enc_int(dec_int(cur[3]) + dp); n = n + 2 end
  -- written-at never moves backwards (several writers, skewed clocks)
  local stored_ms = dec_ts_ms(cur[6])
  if not stored_ms or stored_ms < now_ms then w[n + 1] = IF[8]; w[n + 2] = now_ts; n = n + 2 end
  if category ~= '' then w[n + 1] = IF[6]; w[n + 2] = tagged_varint(18, #category) .. category; n = n + 2 end
  if price ~= '' then w[n + 1] = IF[7]; w[n + 2] = enc_float(tonumber(price)); n = n + 2 end
  return w
end
