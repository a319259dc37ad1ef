-- Reads a page of history per channel, with what is needed to tell whether it is complete.
--
-- KEYS[1] clock, KEYS[1 + i] stream of channel i
-- ARGV[1] last seq to return, ARGV[2] page size, ARGV[3] TTL in seconds,
-- ARGV[4] clock bucket in seconds, ARGV[4 + i] cursor of channel i (exclusive)
-- Returns per channel {0, recent} when the stream is missing, else
-- {1, recent, entries-added, length, first id, max-deleted id, entries}.
local upto, count = ARGV[1], ARGV[2]
local ttl, bucket = tonumber(ARGV[3]), tonumber(ARGV[4])
local now_s = tonumber(redis.call('TIME')[1])
local out = {}
for i = 2, #KEYS do
  local after = ARGV[3 + i]
  -- "recent": the newest checkpoint at or before seq after+1 is younger than the TTL, so every
  -- event after the cursor was published less than a TTL ago.
  local recent = 0
  local cp = redis.call('ZREVRANGEBYSCORE', KEYS[1], string.format('%d', tonumber(after) + 1),
    '-inf', 'LIMIT', 0, 1)
  if #cp > 0 and tonumber(cp[1]) * bucket + ttl > now_s then recent = 1 end
  local stream = KEYS[i]
  if redis.call('EXISTS', stream) == 0 then
    out[#out + 1] = {0, recent}
  else
    local info = redis.call('XINFO', 'STREAM', stream)
    local f = {}
    for j = 1, #info, 2 do f[info[j]] = info[j + 1] end
    local first = ''
    if f['first-entry'] then first = f['first-entry'][1] end
    local entries = redis.call('XRANGE', stream, '(' .. after .. '-0', upto, 'COUNT', count)
    out[#out + 1] = {1, recent, f['entries-added'], f['length'], first,
      f['max-deleted-entry-id'], entries}
  end
end
return out
