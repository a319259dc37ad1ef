-- Reads a page of history per channel, with what is needed to tell whether it is complete.
--
-- KEYS[4 + i] stream of channel i
-- ARGV[3] last seq to return, ARGV[4] most entries per page, ARGV[5] most bytes per page (a
-- page holds at least one entry), ARGV[6] TTL in seconds, ARGV[7] the epoch the reader's
-- position belongs to, ARGV[7 + i] cursor of channel i (exclusive)
-- Returns {epoch, pages...}; when the epoch is not the reader's, no pages (the reader's
-- position is from before a data loss). A page is {0, recent} when the stream is missing, else
-- {1, recent, entries-added, length, first id, max-deleted id, more, entries}; `more`: the page
-- stopped at its size, more entries may follow.
local _, epoch = lineage()
if id(epoch) ~= ARGV[7] then
  return {id(epoch)}
end
local upto, count, budget = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local ttl, bucket = tonumber(ARGV[6]), tonumber(ARGV[2])
local now_s = tonumber(redis.call('TIME')[1])
local out = {id(epoch)}
for i = 5, #KEYS do
  local after = ARGV[3 + i]
  -- "recent": the newest checkpoint at or before seq after+1 is younger than the TTL, so every
  -- event after the cursor was published less than a TTL ago.
  local recent = 0
  local cp = redis.call('ZREVRANGEBYSCORE', KEYS[3], string.format('%d', tonumber(after) + 1),
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
    local more = 0
    if #entries >= count then more = 1 end
    -- Keep the page within its byte budget: a resuming client with many channels holds one
    -- page per channel.
    local size = 0
    for j = 1, #entries do
      for _, v in ipairs(entries[j][2]) do size = size + #v end
      if size > budget and j > 1 then
        for k = #entries, j, -1 do entries[k] = nil end
        more = 1
        break
      end
    end
    out[#out + 1] = {1, recent, f['entries-added'], f['length'], first,
      f['max-deleted-entry-id'], more, entries}
  end
end
return out
