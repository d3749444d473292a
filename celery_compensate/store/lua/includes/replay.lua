--- @include "fields"
--- @include "num"
--- @include "describe"

--- The queued, not yet started undos (of the stage under compensation, and
--- late ones), for a call whose reply was lost.  Publishing one twice is
--- harmless: only one copy of an attempt can begin.
local function queued(out)
  local cur = num('cur')
  for i = 0, num('n') - 1 do
    if hget('x' .. i) == 'Q' and
        (num('k' .. i) == cur or hget('l' .. i) == '1') then
      out[#out + 1] = describe(i, num('a' .. i))
    end
  end
end

--- Answer a call sent again after its reply was lost: the queued undos
--- again, and the state its first run saw before (``before`` if that run
--- left ``marker`` set to this call's token).
local function replay(status, st, marker, before)
  local out = {}
  queued(out)
  local old = st
  if marker and hget(marker) == token then old = before end
  return {status, old, st, {}, {}, out}
end
