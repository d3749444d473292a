--- @include "fields"
--- @include "clock"

--- Step i's undo attempt was just made due (or due again): until its
--- publisher confirms it sent the message (UNDO_SENT), the attempt has the
--- undo's own lease ``ou<i>`` (plus ``extra``: its countdown), after which
--- the sweep sends it again; so a publisher killed between recording and
--- publishing delays the undo by a lease, not the queue timeout.  A
--- duplicate copy is harmless: only one copy of an attempt can begin.
local function undo_wait(i, extra)
  local d = clock() + tonumber(hget('ou' .. i)) + tonumber(extra or 0)
  redis.call('HSET', h, 'd' .. i, string.format('%.3f', d))
  redis.call('HDEL', h, 'h' .. i)
end
