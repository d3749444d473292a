--- @include "fields"
--- @include "rescore"
--- @include "lower"

--- After a member event: when the saga's state or the stage under work
--- moved (``st0``, ``cur0`` before the event) the entry is rescored
--- exactly, O(W) once per stage; otherwise only the leases of the undos
--- ``out`` made due lower it (O(1) each).
local function touch(st0, cur0, out)
  if hget('state') ~= st0 or hget('cur') ~= cur0 then
    rescore()
    return
  end
  for _, u in ipairs(out or {}) do lower(hget('d' .. u[1])) end
end
