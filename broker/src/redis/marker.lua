-- Publishes the counter on a replica's own pub/sub channel. Pub/sub keeps execution order, so
-- when the marker reaches the replica, every event up to that seq on its channels has too.
--
-- KEYS[1] counter; ARGV[1] the replica's marker channel. Returns the number of receivers.
return redis.call('PUBLISH', ARGV[1], redis.call('GET', KEYS[1]) or '0')
