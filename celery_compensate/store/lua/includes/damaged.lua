--- @include "fields"

--- The fields every command relies on for step i, checked before anything
--- is written (a Lua error would leave the writes made before it): the
--- CORRUPT error, or nil when they are all there.
local function damaged(i)
  local k = tonumber(hget('k' .. i) or '')
  local w = k and hget('w' .. k)
  if not k or redis.call('HEXISTS', h, 'g' .. k) == 0
      or (w and not tonumber(w))
      or not hget('p' .. i) or not hget('u' .. i) then
    return redis.error_reply('CORRUPT step ' .. i .. ' of the saga record '
                             .. 'lacks its stage, spec or counters')
  end
end
