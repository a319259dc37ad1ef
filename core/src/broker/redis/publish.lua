-- Appends events to their channels' streams and publishes them live, in one atomic step, each
-- under the next value of the broker's single counter (docs/resume.md).
--
-- KEYS[4 + i] stream of entry i, then the entries' idempotency keys
-- ARGV[3] max stream length, ARGV[4] stream TTL in ms, ARGV[5] clock checkpoints kept,
-- ARGV[6] idempotency TTL in ms, ARGV[4 + 3i] pub/sub channel of entry i, ARGV[5 + 3i] its
-- body, ARGV[6 + 3i] the index in KEYS of its idempotency key ('' for none)
-- Returns the seq of every entry, in order; minus the first seq for an entry whose idempotency
-- key was already used (nothing is published for it).
local counter, clock = KEYS[1], KEYS[3]
local max_len, ttl = ARGV[3], ARGV[4]
local keep, idem_ttl = tonumber(ARGV[5]), ARGV[6]
local bucket = tonumber(ARGV[2])
local n = (#ARGV - 6) / 3
local last, _, now_us = lineage()

-- The batch's ids: consecutive, in request order, above the counter and at least the clock in
-- microseconds, so ids stay unique even if Redis loses the counter's last writes unnoticed.
local seq = math.max(last, now_us - 1) + 1
redis.call('SET', counter, id(seq + n - 1))

-- Clock checkpoint: every seq from here on was handed out at or after this bucket's start.
local bucket_id = id(math.floor(now_us / 1000000 / bucket))
if redis.call('ZADD', clock, 'NX', id(seq), bucket_id) == 1 then
  redis.call('ZREMRANGEBYRANK', clock, 0, -(keep + 1))
end

local seqs, streams = {}, {}
for i = 1, n do
  local stream, body, idem = KEYS[4 + i], ARGV[5 + 3 * i], ARGV[6 + 3 * i]
  if idem ~= '' then idem = KEYS[tonumber(idem)] end
  local first = idem ~= '' and redis.call('GET', idem)
  if first then
    -- A retry: answer the first publish's seq (its own seq stays unused; ids may have gaps).
    seqs[i] = -tonumber(first)
  else
    local sid = id(seq)
    local added = redis.pcall('XADD', stream, 'MAXLEN', '~', max_len, sid .. '-0', 'p', body)
    if type(added) == 'table' and added.err then
      -- The stream is ahead of the counter (the counter was edited by hand). Move the counter
      -- past the stream instead of failing half-way through the batch; the rest of the batch
      -- takes ids after it.
      local info = redis.call('XINFO', 'STREAM', stream)
      for j = 1, #info, 2 do
        if info[j] == 'last-generated-id' then
          local top = tonumber(string.match(info[j + 1], '^(%d+)'))
          seq = math.max(top + 1, seq)
        end
      end
      sid = id(seq)
      redis.call('SET', counter, id(seq + n - i))
      redis.call('XADD', stream, 'MAXLEN', '~', max_len, sid .. '-0', 'p', body)
    end
    streams[stream] = true
    redis.call('PUBLISH', ARGV[4 + 3 * i], sid .. ' ' .. body)
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
