--- @include "fields"
--- @include "num"
--- @include "wait_lease"
--- @include "pivot"

--- Whether step i comes after the saga's completed pivot: past the point
--- of no return a failed or lost step is retried, never given up to
--- compensation.
local function past_pivot(i)
  return pivot_passed() and num('k' .. i) > num('k' .. hget('pv'))
end

--- Step i (running, past the pivot) failed or was lost for ``why``: it is
--- published again after the backoff of its attempt (``base`` doubling up
--- to ``cap``), its generation raised so that an older copy is refused;
--- or, its ``max`` attempts spent, it fails and the saga becomes
--- FORWARD_FAILED, waiting for an operator (nothing is undone).
--- ``max`` counts from the operator's last retry (``fb<i>`` attempts were
--- spent before it).  Returns the {index, spec, generation, countdown} to
--- publish (under the task id ``<saga>.s<i>.<generation>``), or nil.
local function forward_retry(i, why, max, base, cap)
  local a = math.max(num('fa' .. i), 1)
  if a - num('fb' .. i) >= max then
    redis.call('HSET', h, 's' .. i, 'F', 'fe' .. i, why, 't' .. i, now,
               'tk' .. i, token, 'state', 'FORWARD_FAILED', 'reason', why,
               'failed', i, 'ended', now, 'ff', token)
    redis.call('HINCRBY', h, 'w' .. hget('k' .. i), -1)
    return nil
  end
  local delay = math.min(cap, base * 2 ^ (a - num('fb' .. i) - 1))
  local gen = math.max(num('pg' .. i), 1) + 1
  redis.call('HSET', h, 'fa' .. i, a + 1, 'pg' .. i, gen, 'fe' .. i, why,
             'tr' .. i, token, 'trd' .. i, tostring(delay))
  redis.call('HDEL', h, 'ob' .. i)
  wait_lease(i, delay)
  return {tonumber(i), hget('p' .. i), gen, tostring(delay)}
end
