-- Every script begins here: ids that never repeat, and a new epoch whenever Redis may have gone
-- back in time (docs/resume.md, "When Redis goes back in time").
--
-- KEYS[1] counter, KEYS[2] epoch, KEYS[3] clock, KEYS[4] generation (the server that wrote last)
-- ARGV[1] '1' when a restart keeps every write (REDIS_LOSSLESS_RESTARTS), ARGV[2] clock bucket
-- in seconds. A script's own arguments start at ARGV[3], its own keys at KEYS[5].
local function id(s) return string.format('%d', s) end

-- A new epoch starts this far (µs) ahead of the clock: a primary that goes on accepting writes
-- after a failover (split brain, until Sentinel demotes it) hands out ids below the new epoch
-- for that long, so cursors from it are still recognised as from before the failover.
local EPOCH_MARGIN = 600000000

-- Returns the counter, the epoch and the time in microseconds, after starting a new epoch if
-- the data may be older than what was handed out: no counter (a new or emptied Redis), or a
-- different server than the one that wrote last (a restart from a snapshot, a failover to a
-- replica that lagged). The new epoch starts above the old counter and ahead of the clock, so
-- no id handed out by the lost writes is ever handed out again. A restart is trusted only when
-- configured, and never on a promoted replica.
local function lineage()
  local counter, epoch, clock, generation = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
  local now = redis.call('TIME')
  local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local info = redis.call('INFO', 'server')
  local seq = redis.call('GET', counter)
  local writer = redis.call('GET', generation)
  -- The common case, the server that wrote last, with a plain search (a pattern match over
  -- INFO costs more than the rest of a publish's bookkeeping).
  if seq and writer and string.find(info, 'run_id:' .. writer .. '\r\n', 1, true) then
    return tonumber(seq), tonumber(redis.call('GET', epoch) or '0'), now_us
  end
  local server = string.match(info, 'run_id:(%x+)') or ''
  if seq and writer == server then
    return tonumber(seq), tonumber(redis.call('GET', epoch) or '0'), now_us
  end
  redis.call('SET', generation, server)
  if seq and writer and ARGV[1] == '1' then
    local replication = redis.call('INFO', 'replication')
    if string.match(replication, 'second_repl_offset:(-?%d+)') == '-1' then
      return tonumber(seq), tonumber(redis.call('GET', epoch) or '0'), now_us
    end
  end
  local start = now_us + EPOCH_MARGIN
  if seq then
    start = math.max(tonumber(seq) + 1, now_us) + EPOCH_MARGIN
  else
    redis.call('DEL', clock)
  end
  redis.call('SET', counter, id(start))
  redis.call('SET', epoch, id(start))
  -- A cursor at the new start is recent (see history.lua), even before the first event.
  redis.call('ZADD', clock, 'NX', id(start + 1), id(math.floor(tonumber(now[1]) / tonumber(ARGV[2]))))
  return start, start, now_us
end
