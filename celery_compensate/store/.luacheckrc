-- luacheck config of the store's Lua scripts (Redis runs them under Lua 5.1
-- with these globals); `make lint` passes it with --config
std = "lua51"
read_globals = {"redis", "KEYS", "ARGV", "cjson", "cmsgpack", "bit", "struct", "unpack"}
max_line_length = 100
allow_defined_top = false
-- an include may come after a command's own locals (step_done runs its
-- common case before it pulls in the helpers of the rare ones): a helper's
-- local or argument named like one of them shadows it harmlessly
ignore = {"431", "432", "433"}
