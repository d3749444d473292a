--- REPORT: what a nested saga tells its parent now that it settled (read
--- only; the caller sends the parent's command with the report's token,
--- then REPORTED).
---
--- KEYS[1] the nested saga's hash; KEYS[2] its parent's
--- ARGV[1..] none
---
--- Replies {} when there is no such saga, else {state, its step index in
--- the parent ('' for an outermost saga), the parent's undo attempt it
--- compensated for ('' none), the report's token ('' none owed), the
--- reason it compensated (''), the results of its last stage (when
--- COMPLETED), '1' when its parent is the saga that started it (its
--- ``ptk`` is the parent's ``tok``; else a leftover of an earlier saga
--- with the parent's id: nothing is reported)}.
local h = KEYS[1]
local v = redis.call('HMGET', h, 'state', 'up', 'ua', 'rp', 'reason', 'ns')
if not v[1] then return {} end
local results = {}
if v[1] == 'COMPLETED' then
  local last = redis.call('HGET', h, 'g' .. (tonumber(v[6] or '1') - 1))
  for j in string.gmatch(last or '', '%d+') do
    results[#results + 1] = redis.call('HGET', h, 'r' .. j) or 'null'
  end
end
local mine = redis.call('HGET', h, 'ptk')
    == redis.call('HGET', KEYS[2], 'tok')
return {v[1], v[2] or '', v[3] or '', v[4] or '', v[5] or '', results,
        mine and '1' or ''}
