-- Publishes "counter epoch" on a replica's own pub/sub channel. Pub/sub keeps execution order,
-- so when the marker reaches the replica, every event up to that seq on its channels has too;
-- a new epoch tells a replica that stayed subscribed (to a demoted master) that data was lost.
--
-- ARGV[3] the replica's marker channel. Returns the number of receivers.
local seq, epoch = lineage()
return redis.call('PUBLISH', ARGV[3], id(seq) .. ' ' .. id(epoch))
