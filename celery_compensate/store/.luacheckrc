-- luacheck config of the store's Lua scripts (Redis runs them under Lua 5.1
-- with these globals); `make lint` passes it with --config
std = "lua51"
read_globals = {"redis", "KEYS", "ARGV", "cjson", "cmsgpack", "bit", "struct", "unpack"}
max_line_length = 100
allow_defined_top = false
