--- Whether an undo in state x is dispatched and not settled.
local function inflight(x) return x == 'Q' or x == 'R' or x == 'W' end
