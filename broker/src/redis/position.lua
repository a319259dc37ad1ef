-- The broker's position: {epoch, counter}. Seeds the counter when there is none, exactly as
-- publish.lua does, so a client that connects before the first event gets a position that
-- later events follow.
--
-- KEYS[1] counter, KEYS[2] epoch, KEYS[3] clock; ARGV[1] clock bucket in seconds
local seq = redis.call('GET', KEYS[1])
if seq then
  return {redis.call('GET', KEYS[2]) or '0', seq}
end
local now = redis.call('TIME')
local now_s = tonumber(now[1])
local seed = string.format('%d', (now_s * 1000 + math.floor(tonumber(now[2]) / 1000)) * 1000)
redis.call('SET', KEYS[1], seed)
redis.call('SET', KEYS[2], seed)
redis.call('DEL', KEYS[3])
redis.call('ZADD', KEYS[3], string.format('%d', tonumber(seed) + 1),
  string.format('%d', math.floor(now_s / tonumber(ARGV[1]))))
return {seed, seed}
