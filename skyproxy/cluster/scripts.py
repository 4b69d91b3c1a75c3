"""The Lua scripts: each one decision, atomic on the Redis server, timed by Redis `TIME`.

Every script reads the clock with `redis.call('TIME')`, so replicas whose clocks
disagree still share one timeline. Redis replicates a script's effects, not the script,
so reading the clock before writing is allowed (Redis 5 and later).

Numbers come back as strings formatted with `%.17g`: Redis turns a Lua number it is
returned into an integer, which would cut a bucket level of 9.83 to 9. (A number given to
`redis.call` is written with all its digits.) Money is integer micro-dollars,
so sums of reservations are exact.
"""

from __future__ import annotations

# Redis time as seconds (rates) and as milliseconds (leases).
_NOW_S = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
"""
_NOW_MS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# The outage probe: a write, since a PING passes on a Redis that refuses writes.
PROBE = "redis.call('SET', KEYS[1], '1', 'PX', 10000) return 1"

# Leaky buckets with aiolimiter's semantics: a level that drains at max_rate/period per
# second; one more unit fits when level + 1 <= max_rate.
#
# KEYS: the user buckets first, then the environment buckets (hashes: l = level,
#       t = Redis time of the last leak).
# ARGV[1]: how many KEYS are user buckets; then per bucket: max_rate, period (s),
#       max_wait (s, environment buckets only; 0 for users).
# 1. A user bucket without room refuses at once; nothing is consumed anywhere.
# 2. An environment bucket may take a unit past max_rate (a reservation) when the wait
#    for it is at most max_wait; otherwise it refuses, again consuming nothing.
# 3. Otherwise every bucket takes one unit.
# Returns {allowed 0|1, refusing bucket (1-based, 0: none), wait (s), delay (s), level...}:
# the wait until the refusing bucket fits (for an environment bucket: beyond max_wait),
# the delay the caller sleeps before forwarding, and each bucket's level now (after the
# unit when allowed).
RATE_CHECK = (
    _NOW_S
    + """
local users = tonumber(ARGV[1])
local count = #KEYS
local levels, per_second, capacity = {}, {}, {}
for i = 1, count do
  local base = 2 + (i - 1) * 3
  capacity[i] = tonumber(ARGV[base])
  per_second[i] = capacity[i] / tonumber(ARGV[base + 1])
  local state = redis.call('HMGET', KEYS[i], 'l', 't')
  local level = tonumber(state[1]) or 0
  if level > 0 then
    level = level - (now - (tonumber(state[2]) or now)) * per_second[i]
    if level < 0 then level = 0 end
  end
  levels[i] = level
end
local refusing, worst = 0, 0
for i = 1, users do
  if levels[i] + 1 > capacity[i] then
    local wait = (levels[i] + 1 - capacity[i]) / per_second[i]
    if refusing == 0 or wait > worst then refusing, worst = i, wait end
  end
end
local delay = 0
if refusing == 0 then
  for i = users + 1, count do
    local wait = (levels[i] + 1 - capacity[i]) / per_second[i]
    local max_wait = tonumber(ARGV[2 + (i - 1) * 3 + 2])
    if wait > max_wait then
      if refusing == 0 or wait - max_wait > worst then refusing, worst = i, wait - max_wait end
    elseif wait > delay then
      delay = wait
    end
  end
end
local out = {0, refusing, '0', '0'}
if refusing > 0 then
  out[3] = string.format('%.17g', worst)
else
  out[1] = 1
  if delay > 0 then out[4] = string.format('%.17g', delay) end
  for i = 1, count do
    local level = levels[i] + 1
    levels[i] = level
    -- A number given to redis.call is written with all its digits.
    redis.call('HSET', KEYS[i], 'l', level, 't', now)
    -- Gone once drained: an absent bucket is an empty one.
    redis.call('PEXPIRE', KEYS[i], math.ceil(level / per_second[i] * 1000) + 1000)
  end
end
for i = 1, count do out[4 + i] = string.format('%.17g', levels[i]) end
return out
"""
)

# Gives one unit back to each bucket (a request cancelled while it waited its turn).
# KEYS: buckets; ARGV[i]: bucket i's max_rate / period, units per second.
RATE_REFUND = (
    _NOW_S
    + """
for i = 1, #KEYS do
  local state = redis.call('HMGET', KEYS[i], 'l', 't')
  local level = tonumber(state[1])
  if level then
    local per_second = tonumber(ARGV[i])
    level = level - (now - (tonumber(state[2]) or now)) * per_second - 1
    if level < 0 then level = 0 end
    redis.call('HSET', KEYS[i], 'l', string.format('%.17g', level), 't', string.format('%.17g', now))
  end
end
return #KEYS
"""
)

# In-flight slots: one ZSET per (environment, rule, user) of lease ids scored by their
# expiry, so a slot held by a replica that died frees itself when its lease runs out.
# KEYS: the slots' sets. ARGV[1]: lease id, ARGV[2]: lease (ms), ARGV[2 + i]: cap of KEYS[i].
# Takes a slot in every set or in none. Returns {1, 0, 0} or {0, full set (1-based), count}.
INFLIGHT_ACQUIRE = (
    _NOW_MS
    + """
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local held = redis.call('ZCARD', KEYS[i])
  if held >= tonumber(ARGV[2 + i]) then return {0, i, held} end
end
local lease = tonumber(ARGV[2])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now + lease, ARGV[1])
  redis.call('PEXPIRE', KEYS[i], lease)
end
return {1, 0, 0}
"""
)

# Extends leases still held. KEYS[i] pairs with lease id ARGV[1 + i]; ARGV[1]: lease (ms).
# A lease already pruned stays gone (XX). Returns how many were extended.
INFLIGHT_RENEW = (
    _NOW_MS
    + """
local lease = tonumber(ARGV[1])
local renewed = 0
for i = 1, #KEYS do
  renewed = renewed + redis.call('ZADD', KEYS[i], 'XX', 'CH', now + lease, ARGV[1 + i])
  redis.call('PEXPIRE', KEYS[i], lease)
end
return renewed
"""
)

# Frees a lease's slots. KEYS: its sets; ARGV[1]: lease id.
INFLIGHT_RELEASE = """
for i = 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return #KEYS
"""

# Budgets per (budget, subject, period), four keys each:
#   state: hash of spent and reserved (micro-USD);  res: hash reservation id -> estimate;
#   exp: zset reservation id -> lease expiry (ms);  conv: hash of reservations whose lease
#   ran out, id -> estimate. A reservation whose holder died counts as spent at its
#   estimate (as its create's audit line does) until a late settle corrects it.
_BUDGET_PRUNE = """
local function prune(state, res, exp, conv)
  local gone = redis.call('ZRANGEBYSCORE', exp, '-inf', now)
  for _, id in ipairs(gone) do
    local amount = tonumber(redis.call('HGET', res, id) or '0')
    redis.call('HINCRBY', state, 'reserved', -amount)
    redis.call('HINCRBY', state, 'spent', amount)
    redis.call('HDEL', res, id)
    redis.call('HSET', conv, id, amount)
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', exp, '-inf', now) end
end
local function expire_at(base, at)
  for k = base, base + 3 do redis.call('EXPIREAT', KEYS[k], at) end
end
"""

# ARGV[1]: reservation id, ARGV[2]: estimate, ARGV[3]: lease (ms); then per budget:
# limit, and the Unix time its keys expire (after the period ends).
# Refused when spent + reserved + estimate > limit in any budget; then nothing is reserved.
# Returns {1, 0, 0, 0, spent in budget 1, spent in budget 2, ...} (for warn_at), or
# {0, refusing budget (1-based), spent, reserved}.
BUDGET_RESERVE = (
    _NOW_MS
    + _BUDGET_PRUNE
    + """
local estimate = tonumber(ARGV[2])
local out = {1, 0, 0, 0}
for b = 1, #KEYS / 4 do
  local k = (b - 1) * 4
  prune(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4])
  local state = redis.call('HMGET', KEYS[k + 1], 'spent', 'reserved')
  local spent, reserved = tonumber(state[1]) or 0, tonumber(state[2]) or 0
  if spent + reserved + estimate > tonumber(ARGV[2 + b * 2]) then
    return {0, b, spent, reserved}
  end
  out[4 + b] = spent
end
for b = 1, #KEYS / 4 do
  local k = (b - 1) * 4
  redis.call('HINCRBY', KEYS[k + 1], 'reserved', estimate)
  redis.call('HSET', KEYS[k + 2], ARGV[1], estimate)
  redis.call('ZADD', KEYS[k + 3], now + tonumber(ARGV[3]), ARGV[1])
  expire_at(k + 1, tonumber(ARGV[3 + b * 2]))
end
return out
"""
)

# Replaces a reservation by the actual cost (0 releases it); after its lease ran out,
# corrects the estimate counted then. ARGV[1]: id, ARGV[2]: cost. Returns budgets applied.
BUDGET_SETTLE = (
    _NOW_MS
    + _BUDGET_PRUNE
    + """
local cost = tonumber(ARGV[2])
local applied = 0
for b = 1, #KEYS / 4 do
  local k = (b - 1) * 4
  prune(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4])
  local held = redis.call('HGET', KEYS[k + 2], ARGV[1])
  if held then
    redis.call('HINCRBY', KEYS[k + 1], 'reserved', -tonumber(held))
    redis.call('HINCRBY', KEYS[k + 1], 'spent', cost)
    redis.call('HDEL', KEYS[k + 2], ARGV[1])
    redis.call('ZREM', KEYS[k + 3], ARGV[1])
    applied = applied + 1
  else
    local counted = redis.call('HGET', KEYS[k + 4], ARGV[1])
    if counted then
      redis.call('HINCRBY', KEYS[k + 1], 'spent', cost - tonumber(counted))
      redis.call('HDEL', KEYS[k + 4], ARGV[1])
      applied = applied + 1
    end
  end
end
return applied
"""
)

# Adds to spent directly (a cost known after the reservation was settled, or a line's
# own cost). Unlike the other calls an addition is not idempotent, and a queued call
# whose answer came too late is sent again: so each carries an id, remembered in a hash
# that lives as long as its first budget's keys, and one whose id is there changes
# nothing. One hash per budget and subject, not a key per addition: the keyspace, which
# the budget views scan, does not grow with the lines.
# KEYS: four per budget, then the additions' hash. ARGV[1]: amount (may be negative);
# then per budget the Unix time its keys expire; then when the hash expires; last, the id.
# Returns the budgets added to (0 for an addition made before).
BUDGET_ADD = """
local budgets = (#KEYS - 1) / 4
if redis.call('HSETNX', KEYS[#KEYS], ARGV[budgets + 3], 1) == 0 then return 0 end
redis.call('EXPIREAT', KEYS[#KEYS], tonumber(ARGV[budgets + 2]))
for b = 1, budgets do
  local k = (b - 1) * 4
  redis.call('HINCRBY', KEYS[k + 1], 'spent', tonumber(ARGV[1]))
  for j = k + 1, k + 4 do redis.call('EXPIREAT', KEYS[j], tonumber(ARGV[1 + b])) end
end
return budgets
"""

# A prediction's cost, counted once whichever replica writes its lines: its "created"
# line's estimate, then its terminal line's cost in place of the estimate. The replica
# that writes the terminal line may not be the one that took the estimate, so the
# amount counted and the state keys it went to are remembered with the prediction.
# KEYS[1]: the prediction's record (hash: kind, amount, keys as JSON); KEYS[2..]: the
# state keys of the budgets the line counts in (possibly none).
# ARGV[1]: "estimate", "final", or "final-where-estimated" (a terminal line that names no
# user: its cost goes where the estimate went, as a single replica bills the creator),
# ARGV[2]: amount, ARGV[3]: when the record expires (Unix time), ARGV[3 + i]: when state
# key i + 1 expires. An estimate after a final changes nothing, but for a final that
# named no user and found no estimate to follow (another replica's created line can
# still be on its way): it counted where its line said, as "unplaced", and moves to
# where the estimate would have gone. An amount taken back leaves a state key that is
# gone (a past period) alone. Returns 1 when counted, else 0.
# The remembered keys are not in KEYS, which one Redis allows; like every script here
# that spans several keys, it is not meant for Redis Cluster.
BUDGET_PREDICTION = """
local kind, amount = ARGV[1], tonumber(ARGV[2])
local held = redis.call('HMGET', KEYS[1], 'kind', 'amount', 'keys')
if kind == 'estimate' and held[1] == 'final' then return 0 end
local unplaced = held[1] == 'unplaced'
if kind == 'estimate' and unplaced then
  kind, amount = 'final', tonumber(held[2])
end
local before = {}
if held[2] then
  before = cjson.decode(held[3])
  for _, key in ipairs(before) do
    if redis.call('EXISTS', key) == 1 then redis.call('HINCRBY', key, 'spent', -tonumber(held[2])) end
  end
end
local counted = {}
if kind == 'final-where-estimated' and held[2] then
  for _, key in ipairs(before) do
    if redis.call('EXISTS', key) == 1 then
      redis.call('HINCRBY', key, 'spent', amount)
      counted[#counted + 1] = key
    end
  end
else
  for i = 2, #KEYS do
    redis.call('HINCRBY', KEYS[i], 'spent', amount)
    redis.call('EXPIREAT', KEYS[i], tonumber(ARGV[2 + i]))
    counted[#counted + 1] = KEYS[i]
  end
end
if kind == 'final-where-estimated' then
  kind = (not held[2] or unplaced) and 'unplaced' or 'final'
elseif kind ~= 'estimate' then
  kind = 'final'
end
redis.call('HSET', KEYS[1], 'kind', kind, 'amount', amount, 'keys', cjson.encode(counted))
redis.call('EXPIREAT', KEYS[1], tonumber(ARGV[3]))
return 1
"""

# One budget's spent and reserved, after pruning expired reservations. KEYS: its four keys.
BUDGET_USAGE = (
    _NOW_MS
    + _BUDGET_PRUNE
    + """
prune(KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local state = redis.call('HMGET', KEYS[1], 'spent', 'reserved')
return {tonumber(state[1]) or 0, tonumber(state[2]) or 0}
"""
)

# Webhook deliveries: an outbox every replica works from.
#   due: zset event id -> when it may next be claimed (ms);  body: hash id -> payload;
#   owner: hash id -> the replica holding its claim;  queued: zset id -> when it was queued.
# Claiming moves an event's due time to the end of the claim's lease, so an event whose
# claimer died becomes due again, and another replica takes it over.

# Queues an event unless its id is already queued. ARGV[1]: id, ARGV[2]: payload,
# ARGV[3]: delay (ms). Returns 1, or 0 for an id already queued.
OUTBOX_ENQUEUE = (
    _NOW_MS
    + """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('ZADD', KEYS[4], now, ARGV[1])
return 1
"""
)

# Deduplicates and queues in one step, so a replica that dies between the two cannot
# leave an event marked seen but never queued. KEYS[5]: the dedupe key.
# ARGV[1]: id, ARGV[2]: payload ('' only marks it seen), ARGV[3]: dedupe TTL (ms).
# Returns 1 for the first arrival, 0 for a duplicate.
OUTBOX_ACCEPT = (
    _NOW_MS
    + """
if not redis.call('SET', KEYS[5], ARGV[1], 'NX', 'PX', ARGV[3]) then return 0 end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  redis.call('ZADD', KEYS[4], now, ARGV[1])
end
return 1
"""
)

# ARGV[1]: owner, ARGV[2]: lease (ms), ARGV[3]: most events to claim.
# Returns {id, payload, id, payload, ...} for the due events now claimed.
OUTBOX_CLAIM = (
    _NOW_MS
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(due) do
  local payload = redis.call('HGET', KEYS[2], id)
  if payload then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
    redis.call('HSET', KEYS[3], id, ARGV[1])
    out[#out + 1] = id
    out[#out + 1] = payload
  else
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[4], id)
  end
end
return out
"""
)

# The claimer's next step, only while it still owns the event.
# ARGV[1]: id, ARGV[2]: owner, ARGV[3]: "renew" | "reschedule" | "finish",
# ARGV[4]: lease or delay (ms), ARGV[5]: a new payload for "reschedule" ('' keeps it).
# Returns 1, or 0 when the claim was lost (its lease ran out and another replica took it).
OUTBOX_STEP = (
    _NOW_MS
    + """
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
local step = ARGV[3]
if step == 'finish' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
elseif step == 'renew' then
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[4]), ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[5]) end
end
return 1
"""
)

# The outbox at a glance: {queued, ms until the next is due (-1: none), age of the
# oldest in ms (-1: none)}, measured on Redis' clock.
OUTBOX_OUTLOOK = (
    _NOW_MS
    + """
local depth = redis.call('ZCARD', KEYS[4])
local next_due, oldest = -1, -1
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then next_due = math.max(0, tonumber(first[2]) - now) end
local queued = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
if queued[2] then oldest = math.max(0, now - tonumber(queued[2])) end
return {depth, next_due, oldest}
"""
)

# The outbox as `webhooks list` shows it, newest first: {now (ms), then per event: id,
# payload, when queued (ms), when next due (ms; -1: not due), the claiming replica ('':
# none)}. An event whose claim ran out still names its last claimer until it is taken.
# ARGV[1]: the most events to list.
OUTBOX_LIST = (
    _NOW_MS
    + """
local queued = redis.call('ZREVRANGE', KEYS[4], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
local out = {now}
for i = 1, #queued, 2 do
  local id = queued[i]
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
  out[#out + 1] = queued[i + 1]
  out[#out + 1] = redis.call('ZSCORE', KEYS[1], id) or '-1'
  out[#out + 1] = redis.call('HGET', KEYS[3], id) or ''
end
return out
"""
)
