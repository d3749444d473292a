--- Delete a saga and its nested sagas, and theirs (all in its shard: see
--- layout.shard_of), from the records and from ``indexes``.
local function delete_tree(key, id, indexes)
  local kids = redis.call('HGET', key, 'kids')
  redis.call('DEL', key)
  for _, index in ipairs(indexes) do redis.call('ZREM', index, id) end
  for j in string.gmatch(kids or '', '%d+') do
    delete_tree(key .. '~' .. j, id .. '~' .. j, indexes)
  end
end
