--- The saga a command changes, and the arguments every such command takes
--- first (pulled in by every command but start and scan).
---
--- KEYS[1] the saga hash; KEYS[2] ``:due``, KEYS[3] ``:live`` and KEYS[4]
---   ``:ends`` of its shard (KEYS[5] ``:sagas``, used by recover only)
--- ARGV[1] a token unique to the call: a resent call (its reply lost)
---   finds its own token and answers again instead of reporting a
---   duplicate; ARGV[2] now (the caller's clock, shown to people; leases
---   use the Redis clock); ARGV[3] seconds a finished saga is kept
-- luacheck: push ignore 211 (not every command uses every one)
local h, idx, live, ends = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token, now, ttl = ARGV[1], ARGV[2], ARGV[3]
-- luacheck: pop
if redis.replicate_commands then redis.replicate_commands() end
