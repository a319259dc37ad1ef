-- The broker's position: {epoch, counter}. Starts a new epoch when needed (lineage.lua), so a
-- client that connects before the first event gets a position that later events follow.
local seq, epoch = lineage()
return {id(epoch), id(seq)}
