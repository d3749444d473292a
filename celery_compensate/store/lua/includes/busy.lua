--- Whether a saga, or one nested in it (in its shard: see
--- layout.shard_of), is at work: RUNNING or COMPENSATING.
local function tree_at_work(key)
  local v = redis.call('HMGET', key, 'state', 'kids')
  if v[1] == 'RUNNING' or v[1] == 'COMPENSATING' then return true end
  for j in string.gmatch(v[2] or '', '%d+') do
    if tree_at_work(key .. '~' .. j) then return true end
  end
  return false
end
