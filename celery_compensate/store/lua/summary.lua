--- SUMMARY: what ``compensate list`` shows of one saga, bounded whatever
--- the saga's size: its state, when it started, why it compensates, and
--- at most ARGV[1] of the steps it waits for.  Reads only.
---
--- KEYS[1] the saga hash
--- ARGV[1] most steps described; ARGV[2] most characters of a text
---   (the reason, an undo's error); ARGV[3] a saga state, or '' for any
---
--- Replies:
---   nil      no such saga (expired)
---   error    ``CORRUPT ...``: the record lacks a field it always has
---   {state}  the saga is in another state than ARGV[3]
---   {state, created, reason or false, waiting, shown, steps...}
---     waiting: how many steps the saga waits for (forward steps running,
---       undos queued, running or waiting to be retried; when none, undos
---       failed for good, or in FORWARD_FAILED the steps that failed);
---       shown: 0 when ``waiting`` counts steps in flight, 1 when it counts
---       failed ones; then for each step
---       described, 7 values: index, task name, undo name (or false),
---       forward state, undo state, undo attempts, undo error (or false)
---
--- Transitions: none.

local h = KEYS[1]
local most, width = tonumber(ARGV[1]), tonumber(ARGV[2])
--- @include "includes/fields"

local state = hget('state')
if not state then return nil end
if ARGV[3] ~= '' and state ~= ARGV[3] then return {state} end

-- cut at a character boundary (texts are UTF-8): a continuation byte
-- (0x80-0xBF) after the cut means the cut splits a character
local function cut(text)
  if not text or #text <= width then return text or false end
  local n = width
  while n > 0 do
    local b = string.byte(text, n + 1)
    if b < 0x80 or b >= 0xC0 then break end
    n = n - 1
  end
  return string.sub(text, 1, n) .. '...'
end

local function names(i)
  local ok, spec = pcall(cjson.decode, hget('p' .. i) or '')
  if not ok or type(spec) ~= 'table' then return '?', false end
  local call, undo = spec['call'], spec['undo']
  local task = type(call) == 'table' and call['task'] or '?'
  local undo_task = type(undo) == 'table' and undo['task'] or false
  return tostring(task), undo_task and tostring(undo_task)
end

local busy, failed, shown = {}, {}, {}
local n = tonumber(hget('n') or '')
if not n or not tonumber(hget('created') or '') then
  return redis.error_reply('CORRUPT the saga record lacks its size or its '
                           .. 'start time')
end
for i = 0, n - 1 do
  local f = redis.call('HMGET', h, 's' .. i, 'x' .. i)
  local x = f[2] or ''
  if not f[1] then
    return redis.error_reply('CORRUPT step ' .. i .. ' of the saga record '
                             .. 'lacks its state')
  end
  if f[1] == 'R' or x == 'Q' or x == 'R' or x == 'W' then
    busy[#busy + 1] = i
  elseif x == 'F' or (f[1] == 'F' and state == 'FORWARD_FAILED') then
    -- an undo failed for good, or a step past the pivot did
    failed[#failed + 1] = i
  end
end
local chosen, kind = busy, 0
if #busy == 0 then chosen, kind = failed, 1 end
for m = 1, math.min(#chosen, most) do
  local i = chosen[m]
  local task, undo_task = names(i)
  local f = redis.call('HMGET', h, 's' .. i, 'x' .. i, 'a' .. i, 'e' .. i)
  for _, v in ipairs({i, task, undo_task, f[1] or 'P', f[2] or '',
                      tonumber(f[3] or '0') or 0, cut(f[4])}) do
    shown[#shown + 1] = v
  end
end
local reply = {state, hget('created'), cut(hget('reason')),
               #chosen, kind}
for _, v in ipairs(shown) do reply[#reply + 1] = v end
return reply
