-- Appends events to their channels' streams and publishes them live, in one atomic step, each
-- under the next value of the broker's single counter (docs/resume.md).
--
-- KEYS[1] counter, KEYS[2] epoch, KEYS[3] clock, KEYS[3 + i] stream of entry i
-- ARGV[1] max stream length, ARGV[2] stream TTL in ms, ARGV[3] clock bucket in seconds,
-- ARGV[4] clock checkpoints kept, ARGV[5] idempotency TTL in ms, ARGV[3 + 3i] pub/sub channel
-- of entry i, ARGV[4 + 3i] its body, ARGV[5 + 3i] its idempotency key ('' for none)
-- Returns the seq of every entry, in order; minus the first seq for an entry whose idempotency
-- key was already used (nothing is published for it).
local counter, epoch, clock = KEYS[1], KEYS[2], KEYS[3]
local max_len, ttl = ARGV[1], ARGV[2]
local bucket, keep, idem_ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local n = #KEYS - 3
local now = redis.call('TIME')
local now_s = tonumber(now[1])

local function id(s) return string.format('%d', s) end

if redis.call('EXISTS', counter) == 0 then
  -- No counter: a new Redis or one that lost its data. Seed from the wall clock (ms * 1000) so
  -- ids never repeat ones handed out before the loss, and start a new epoch.
  local seed = (now_s * 1000 + math.floor(tonumber(now[2]) / 1000)) * 1000
  redis.call('SET', counter, id(seed))
  redis.call('SET', epoch, id(seed))
  redis.call('DEL', clock)
end
-- The whole batch's ids at once: consecutive, in request order.
local seq = redis.call('INCRBY', counter, n) - n + 1

-- Clock checkpoint: every seq from here on was handed out at or after this bucket's start.
if redis.call('ZADD', clock, 'NX', id(seq), id(math.floor(now_s / bucket))) == 1 then
  redis.call('ZREMRANGEBYRANK', clock, 0, -(keep + 1))
end

local seqs, streams = {}, {}
for i = 1, n do
  local stream, body, idem = KEYS[3 + i], ARGV[4 + 3 * i], ARGV[5 + 3 * i]
  local first = idem ~= '' and redis.call('GET', idem)
  if first then
    -- A retry: answer the first publish's seq (its own seq stays unused; ids may have gaps).
    seqs[i] = -tonumber(first)
  else
    local sid = id(seq)
    local added = redis.pcall('XADD', stream, 'MAXLEN', '~', max_len, sid .. '-0', 'p', body)
    if type(added) == 'table' and added.err then
      -- The stream is ahead of the counter (the counter was deleted or edited by hand). Move the
      -- counter past the stream instead of failing half-way through the batch; the rest of the
      -- batch takes ids after it.
      local info = redis.call('XINFO', 'STREAM', stream)
      for j = 1, #info, 2 do
        if info[j] == 'last-generated-id' then
          local top = tonumber(string.match(info[j + 1], '^(%d+)'))
          redis.call('SET', counter, id(math.max(top, tonumber(redis.call('GET', counter)))))
        end
      end
      seq = redis.call('INCRBY', counter, n - i + 1) - (n - i)
      sid = id(seq)
      redis.call('XADD', stream, 'MAXLEN', '~', max_len, sid .. '-0', 'p', body)
    end
    streams[stream] = true
    redis.call('PUBLISH', ARGV[3 + 3 * i], sid .. ' ' .. body)
    if idem ~= '' then
      redis.call('SET', idem, sid, 'PX', idem_ttl)
    end
    seqs[i] = seq
  end
  seq = seq + 1
end
-- Each stream expires HISTORY_TTL after its last event.
for stream in pairs(streams) do
  redis.call('PEXPIRE', stream, ttl)
end
return seqs
