"""Job and batch records in Redis: what the client and the dashboard read, what workers update.

A job record is a hash at ``rf:job:<id>``. Every state change goes through a Lua script so it
is atomic with the batch's per-state counts, with the batch's event stream (``rf:batch:<id>:
events``: each state change and step, read by ``GET /api/v1/batches/<id>/events``) and with the
job's lease: a worker may move a job
only while it holds the lease (``lease_owner``), and a job in a terminal state never moves again
(except by an explicit :meth:`Records.retry`). That is what keeps a job from being done twice
when Redis delivers its message twice.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import ValidationError
from redis import Redis

from renderfarm import keys
from renderfarm.errors import BadRecord, JobNotFound
from renderfarm.schema import (
    BatchRecord,
    ImageResult,
    JobRecord,
    JobRequest,
    JobState,
    field_errors,
)

log = logging.getLogger("renderfarm.records")

# Every script reads the time from Redis (``TIME``), never from its caller: leases, their expiry
# and the records' timestamps all use one clock, whatever the hosts' clocks say. Every script
# that touches one job gets KEYS = [job, running] and finds the job's batch from the record.
_TERMINAL = """
local function terminal(s) return s == 'succeeded' or s == 'failed' or s == 'cancelled' end
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local B = 'rf:batch:' .. (redis.call('HGET', KEYS[1], 'batch_id') or '_')
"""

# Fair share (docs/RELIABILITY.md, "Pause and fair share"). Workers take a queue's jobs from
# its fair set rf:fair:<queue> (lowest first), not from the pending set: a job's place there is
# its priority band * FAIR_BAND + its turn. The k-th job a batch has waiting in a queue and band
# takes turn max(clock, the batch's last turn + 1), the clock (rf:fairclock:<queue>, one field
# per band) being the turn of the last job claimed there: batches waiting together take one
# job each per turn (round-robin), whatever their sizes and order of arrival. Jobs of one turn
# are served in order of arrival (first come, first served among equals: single-job batches
# submitted one after the other while the clock stands still all share its turn): a place
# carries a fraction, the queue band's arrival count mod 10,000, over 10,000 (the scores, about
# 9e10, keep steps of 1e-4 exact; every 10,000 arrivals the count wraps, and two jobs of one
# turn across that wrap are served the other way round). Paused batches' queued jobs stay in
# the pending set (they are queued) but leave the fair set.
_FAIR = """
local FAIR_BAND = 1e10
-- The place of a batch's next job in a queue's fair set (its turn recorded in the batch).
local function fair_place(bkey, queue, band)
  local field = 'r:' .. queue .. ':' .. band
  local clock = tonumber(redis.call('HGET', 'rf:fairclock:' .. queue, band) or '0')
  local last = tonumber(redis.call('HGET', bkey, field) or '-1')
  local turn = math.max(clock, last + 1)
  redis.call('HSET', bkey, field, turn)
  local arrival = redis.call('HINCRBY', 'rf:fairclock:' .. queue, 'arrivals:' .. band, 1)
  return band * FAIR_BAND + turn + (arrival % 10000) / 10000
end
-- A job's recorded place; a record written before fair share: first turn of its band.
local function fair_place_of(job)
  local place = redis.call('HGET', job, 'fair')
  if place then return tonumber(place) end
  return math.floor(tonumber(redis.call('HGET', job, 'score') or '0') / FAIR_BAND) * FAIR_BAND
end
-- Whether a queued job waits for its paused batch's resume: its batch is paused, and no resume
-- under way has put it back in line yet (Records.resume marks each job it places).
local function held(job, batch)
  if redis.call('HGET', batch, 'paused') ~= '1' then return false end
  local resuming = redis.call('HGET', batch, 'resuming')
  return not resuming or redis.call('HGET', job, 'resumed') ~= resuming
end
-- A job of the queue was claimed: the clock of its band moves up to its turn.
local function served(job, queue)
  local place = tonumber(redis.call('HGET', job, 'fair') or '')
  if not place then return end
  local band = math.floor(place / FAIR_BAND)
  local turn = math.floor(place - band * FAIR_BAND)  -- without its arrival fraction
  local key = 'rf:fairclock:' .. queue
  if turn > tonumber(redis.call('HGET', key, band) or '0') then
    redis.call('HSET', key, band, turn)
  end
end
"""

# hook(): records a webhook event with the change that makes it (renderfarm/webhooks.py
# delivers it): its id is stable (msg_<kind>_<job or batch id>_<n>) and names it in every try.
# Also used by renderfarm/plotrecords.py (a plot's batch.completed comes with its grid).
HOOK_LUA = """
local function hook(url, kind, owner, entity, batch_id, job_id, t)
  local n = redis.call('HINCRBY', owner, 'hook_seq', 1)
  local id = 'msg_' .. entity .. '_' .. n
  redis.call('HSET', 'rf:hook:' .. id, 'id', id, 'type', kind, 'url', url,
    'batch_id', batch_id, 'job_id', job_id, 'created_at', t, 'attempts', 0,
    'status', 'pending', 'next_at', t)
  redis.call('ZADD', 'rf:hooks:due', t, id)
  redis.call('RPUSH', 'rf:batch:' .. batch_id .. ':hooks', id)
  redis.call('HINCRBY', 'rf:batch:' .. batch_id, 'hooks:pending', 1)
end
"""

# move() keeps the batch's counts, the queue's pending and fair sets and the outbox (queued jobs
# whose message may not have been sent: the sender removes them once it has) in step with the
# state.
_MOVE = HOOK_LUA + _FAIR + """
-- event(): appends to the batch's event stream (SSE: dashboard/events.py), capped.
local function event(batch, ...)
  redis.call('XADD', batch .. ':events', 'MAXLEN', '~', 10000, '*', ...)
end
-- 't:<state>' is when the job entered that state: a write that keeps the state (progress)
-- never moves it.
local function ended(s) return s == 'succeeded' or s == 'failed' or s == 'cancelled' end
local function move(job, batch, from, to, t)
  redis.call('HSET', job, 'state', to)
  redis.call(from ~= to and 'HSET' or 'HSETNX', job, 't:' .. to, t)
  if from ~= to then
    redis.call('HINCRBY', batch, 'n:' .. from, -1)
    redis.call('HINCRBY', batch, 'n:' .. to, 1)
    -- the batch's timeline: its first job's start, its last job's end (dashboard: speed, time)
    if to == 'started' then redis.call('HSETNX', batch, 't:started', t) end
    if to == 'succeeded' or to == 'failed' or to == 'cancelled' then
      redis.call('HSET', batch, 't:ended', t)
    end
    -- the farm's jobs by state (GET /metrics), kept with the batches' counts
    redis.call('HINCRBY', 'rf:counts', from, -1)
    redis.call('HINCRBY', 'rf:counts', to, 1)
    if ended(to) and not ended(from) then
      local batch_id = redis.call('HGET', job, 'batch_id') or '_'
      local url = redis.call('HGET', job, 'webhook')
      if url then
        local id = redis.call('HGET', job, 'id') or ''
        hook(url, 'job.' .. to, job, 'job_' .. id, batch_id, id, t)
      end
      url = redis.call('HGET', batch, 'webhook')
      -- a plot's batch.completed is recorded with its grid (renderfarm/plotrecords.py)
      if url and redis.call('HEXISTS', batch, 'plot') == 0 then
        local over = 0
        for _, s in ipairs({'succeeded', 'failed', 'cancelled'}) do
          over = over + tonumber(redis.call('HGET', batch, 'n:' .. s) or '0')
        end
        if over >= tonumber(redis.call('HGET', batch, 'total') or '0') then
          hook(url, 'batch.completed', batch, 'batch_' .. batch_id, batch_id, '', t)
        end
      end
    end
    event(batch, 'job', redis.call('HGET', job, 'id') or '', 'state', to, 'from', from, 't', t)
    -- A live preview (worker/previews.py) is its running attempt's: gone as the job leaves
    -- running (ended, or queued again) and as an attempt starts, never served past its end.
    if to ~= 'rendering' and to ~= 'uploading' then
      redis.call('DEL', 'rf:preview:' .. (redis.call('HGET', job, 'id') or ''))
    end
    local queue = redis.call('HGET', job, 'queue')
    if queue then
      local id = redis.call('HGET', job, 'id')
      if to == 'queued' then
        redis.call('ZADD', 'rf:pending:' .. queue, redis.call('HGET', job, 'score') or 0, id)
        local resuming = redis.call('HGET', batch, 'resuming')
        if resuming then redis.call('HSET', job, 'resumed', resuming) end  -- back in line
        if not held(job, batch) then  -- a paused batch's jobs wait for its resume
          redis.call('ZADD', 'rf:fair:' .. queue, fair_place_of(job), id)
        end
        redis.call('ZADD', 'rf:outbox', t, id)
      elseif from == 'queued' then
        redis.call('ZREM', 'rf:pending:' .. queue, id)
        redis.call('ZREM', 'rf:fair:' .. queue, id)
        if to == 'started' then served(job, queue) end
      end
    end
  end
end
local function release(job, running, id)
  redis.call('HDEL', job, 'lease_owner', 'lease_until')
  redis.call('ZREM', running, id)
end
-- A job going round again (retried, or its worker lost): the last attempt's timeline, state,
-- worker and error move to 'history', so the new attempt's times start afresh.
local function new_attempt(job)
  local names = redis.call('HKEYS', job)
  local entry = {timestamps = {}}
  local drop = {}
  for _, name in ipairs(names) do
    if string.sub(name, 1, 2) == 't:' then
      entry.timestamps[string.sub(name, 3)] = tonumber(redis.call('HGET', job, name))
      table.insert(drop, name)
    end
  end
  for _, name in ipairs({'state', 'worker', 'error'}) do
    entry[name] = redis.call('HGET', job, name) or nil
  end
  local history = cjson.decode(redis.call('HGET', job, 'history') or '[]')
  table.insert(history, entry)
  redis.call('HSET', job, 'history', cjson.encode(history))
  table.insert(drop, 'error')
  table.insert(drop, 'storing')
  table.insert(drop, 'retrying')
  table.insert(drop, 'progressed_at')
  redis.call('HDEL', job, unpack(drop))
end
"""

# ARGV: batch id, label, idempotency ttl, batch webhook URL|'', then per job: job id,
# idempotency key|'', queue, priority, compat, webhook URL|'', request JSON. Records every
# job whose idempotency key is free (taking the key) and the batch, in one atomic step: a
# key never points at a job that was not written.
# Returns, per job, its own id or the id of the job that holds its key. Idempotent: a job whose
# record exists is left as it is (redis-py retries a call that timed out).
_ADD = _FAIR + """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local t = clock()
local batch_id, ttl = ARGV[1], tonumber(ARGV[3])
local bkey = 'rf:batch:' .. batch_id
if redis.call('HGET', bkey, 'pruning') == '1' then  -- its jobs are being deleted (_PRUNE)
  return redis.error_reply('batch ' .. batch_id .. ' is being pruned: submit to another batch')
end
local out, fresh, queues, first = {}, {}, {}, nil
for i = 5, #ARGV, 7 do
  local id, idem, queue = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local owner = false
  if redis.call('EXISTS', 'rf:job:' .. id) == 1 then
    owner = id  -- written by an earlier run of this very call (a client retry): not twice
  elseif idem ~= '' then
    owner = redis.call('GET', 'rf:idem:' .. idem)
    if not owner then redis.call('SET', 'rf:idem:' .. idem, id, 'EX', ttl) end
  end
  if owner then
    table.insert(out, owner)
  else
    local band = 9 - tonumber(ARGV[i + 3])
    local score = band * 1e10 + t
    local place = fair_place(bkey, queue, band)
    redis.call('HSET', 'rf:job:' .. id, 'id', id, 'batch_id', batch_id, 'state', 'queued',
      'request', ARGV[i + 6], 'created_at', t, 't:queued', t, 'queue', queue,
      'compat', ARGV[i + 4], 'score', score, 'fair', place)
    if idem ~= '' then redis.call('HSET', 'rf:job:' .. id, 'idem', idem) end
    if ARGV[i + 5] ~= '' then redis.call('HSET', 'rf:job:' .. id, 'webhook', ARGV[i + 5]) end
    redis.call('ZADD', 'rf:pending:' .. queue, score, id)
    if redis.call('HGET', bkey, 'paused') ~= '1' then
      redis.call('ZADD', 'rf:fair:' .. queue, place, id)
    end
    redis.call('ZADD', 'rf:outbox', t, id)
    redis.call('ZADD', 'rf:jobs', t, id)
    redis.call('RPUSH', bkey .. ':jobs', id)
    queues[queue] = true
    if #fresh == 0 then first = ARGV[i + 6] end
    table.insert(fresh, id)
    table.insert(out, id)
  end
end
if #fresh > 0 then
  if redis.call('ZCARD', 'rf:batches') == 0 and redis.call('EXISTS', 'rf:counts') == 0 then
    redis.call('HSET', 'rf:counts', '_built', '1')  -- a new farm: nothing to count first
  end
  redis.call('HSETNX', bkey, 'id', batch_id)
  local ok, request = pcall(cjson.decode, first)
  if ok and type(request) == 'table' and type(request.prompt) == 'string' then
    redis.call('HSETNX', bkey, 'prompt', request.prompt)  -- tells batches apart in lists
  end
  redis.call('HSETNX', bkey, 'created_at', t)
  if ARGV[2] ~= '' then redis.call('HSETNX', bkey, 'label', ARGV[2]) end
  if ARGV[4] ~= '' then redis.call('HSETNX', bkey, 'webhook', ARGV[4]) end
  redis.call('HINCRBY', bkey, 'total', #fresh)
  redis.call('HINCRBY', bkey, 'n:queued', #fresh)
  redis.call('HINCRBY', 'rf:counts', 'queued', #fresh)
  redis.call('ZADD', 'rf:batches', 'NX', t, batch_id)
  for queue, _ in pairs(queues) do redis.call('SADD', 'rf:queues', queue) end
end
return out
"""

# ARGV: id, owner, lease seconds, max_attempts
_CLAIM_JOB = """
local now = clock()
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', ''} end
if terminal(state) then return {'terminal', state} end
if state == 'queued' and held(KEYS[1], B) then return {'paused', ''} end
if state ~= 'queued' then
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
  if lease > now then
    return {'busy', redis.call('HGET', KEYS[1], 'lease_owner') or ''}
  end
end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then
  move(KEYS[1], B, state, 'cancelled', now)
  release(KEYS[1], KEYS[2], ARGV[1])
  return {'cancelled', state}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[4]) then
  move(KEYS[1], B, state, 'failed', now)
  redis.call('HSET', KEYS[1], 'error', 'gave up after ' .. (attempts - 1) ..
    ' attempts: the worker running it was lost each time')
  release(KEYS[1], KEYS[2], ARGV[1])
  return {'poison', tostring(attempts - 1)}
end
local lease = now + tonumber(ARGV[3])
move(KEYS[1], B, state, 'started', now)
redis.call('HSET', KEYS[1], 'worker', ARGV[2], 'lease_owner', ARGV[2], 'lease_until', lease,
  'step', 0)
redis.call('ZADD', KEYS[2], lease, ARGV[1])
return {'ok', tostring(attempts)}
"""
_CLAIM = _TERMINAL + _MOVE + _CLAIM_JOB

# ARGV: id, owner, lease seconds, max_attempts. A delivered message is a turn of its job's queue
# (docs/RELIABILITY.md, "Pause and fair share"): it claims the first job of the queue's fair
# set, whichever that is, and returns {'ok', attempts, that job's id}. Only when the fair set
# holds no job does it fall back to the delivered job itself (_CLAIM: a duplicate delivery
# finds it busy or ended; a paused batch's job answers 'paused' and stays queued).
_CLAIM_TURN = _TERMINAL + _MOVE + """
local queue = redis.call('HGET', KEYS[1], 'queue')
if queue then
  local fair = 'rf:fair:' .. queue
  local t = clock()
  while true do
    local head = redis.call('ZRANGE', fair, 0, 0)
    if #head == 0 then break end
    local id = head[1]
    local job = 'rf:job:' .. id
    local state = redis.call('HGET', job, 'state')
    local JB = 'rf:batch:' .. (redis.call('HGET', job, 'batch_id') or '_')
    if state ~= 'queued' or held(job, JB) then
      redis.call('ZREM', fair, id)
    elseif redis.call('HGET', job, 'cancel') == '1' then
      move(job, JB, state, 'cancelled', t)
    else
      local attempts = redis.call('HINCRBY', job, 'attempts', 1)
      if attempts > tonumber(ARGV[4]) then
        move(job, JB, state, 'failed', t)
        redis.call('HSET', job, 'error', 'gave up after ' .. (attempts - 1) ..
          ' attempts: the worker running it was lost each time')
      else
        local lease = t + tonumber(ARGV[3])
        move(job, JB, state, 'started', t)
        redis.call('HSET', job, 'worker', ARGV[2], 'lease_owner', ARGV[2], 'lease_until', lease,
          'step', 0)
        redis.call('ZADD', KEYS[2], lease, id)
        return {'ok', tostring(attempts), id}
      end
    end
  end
end
""" + _CLAIM_JOB

# KEYS: batch, its job list; ARGV: offset, count. Pauses the batch (the call at offset 0), then
# takes the queued jobs of its job list's [offset, offset + count) out of their queues' fair
# sets (they stay queued, in the pending sets); jobs queued later in it (a retry, a re-queue)
# wait there too. One call per PAUSE_CHUNK jobs (Records.pause): no script holds Redis for a
# whole big batch. Jobs of a paused batch still in a fair set (the chunks after are to come, or
# their caller died) are skipped and dropped by every claim. A later chunk of a batch resumed
# meanwhile (or being resumed) does nothing. Returns {queued jobs held, ids looked at};
# {-1, 0}: no such batch.
_PAUSE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
if ARGV[1] == '0' then
  redis.call('HSET', KEYS[1], 'paused', '1')
  redis.call('HDEL', KEYS[1], 'resuming')  -- a resume under way stops; its jobs are held again
elseif redis.call('HGET', KEYS[1], 'paused') ~= '1'
    or redis.call('HEXISTS', KEYS[1], 'resuming') == 1 then
  return {0, 0}  -- resumed since (a resume under way puts jobs back in line: leave them)
end
local n = 0
local ids = redis.call('LRANGE', KEYS[2], tonumber(ARGV[1]),
  tonumber(ARGV[1]) + tonumber(ARGV[2]) - 1)
for _, id in ipairs(ids) do
  local job = 'rf:job:' .. id
  if redis.call('HGET', job, 'state') == 'queued' then
    local queue = redis.call('HGET', job, 'queue')
    if queue then redis.call('ZREM', 'rf:fair:' .. queue, id) end
    n = n + 1
  end
end
return {n, #ids}
"""

# KEYS: batch, its job list; ARGV: offset, count, token. Resumes the batch a chunk of its job
# list at a time (Records.resume: one call per RESUME_CHUNK jobs, so no script holds Redis for a
# whole big batch). The call at offset 0 starts the resume: the caller's token is recorded as
# the batch's 'resuming'. Each queued job of [offset, offset + count) is marked 'resumed' with
# the token (from then on no claim holds it back: held()), takes its place at the current turn
# (not ahead of the batches that waited meanwhile) in its fair set and goes into the outbox.
# The last call (fewer ids than count) unpauses the batch. Meanwhile the batch stays paused: a
# resume whose caller dies part-way has put its first jobs back in line, and the next resume
# does the rest. A job queued again in it meanwhile (a retry, a re-queue) is marked by move().
# A later call whose token is not the batch's (a pause, which drops 'resuming', or another
# resume came in between) does nothing. The caller sends the messages of the ids returned, or
# the outbox sweep does if it dies first. Returns {done (1|0), ids to send...}; {-1}: no such
# batch; {1} when the batch is not paused (a second resume, a double click: nothing to do).
_RESUME = _FAIR + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
if ARGV[1] == '0' then
  if redis.call('HGET', KEYS[1], 'paused') ~= '1' then return {1} end
  redis.call('HSET', KEYS[1], 'resuming', ARGV[3])
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(field, 1, 2) == 'r:' then redis.call('HDEL', KEYS[1], field) end
  end
elseif redis.call('HGET', KEYS[1], 'resuming') ~= ARGV[3] then
  return {1}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {0}
local ids = redis.call('LRANGE', KEYS[2], tonumber(ARGV[1]),
  tonumber(ARGV[1]) + tonumber(ARGV[2]) - 1)
for _, id in ipairs(ids) do
  local job = 'rf:job:' .. id
  local queue = redis.call('HGET', job, 'queue')
  if queue and redis.call('HGET', job, 'state') == 'queued' then
    local band = math.floor(tonumber(redis.call('HGET', job, 'score') or '0') / FAIR_BAND)
    local place = fair_place(KEYS[1], queue, band)
    redis.call('HSET', job, 'fair', place, 'resumed', ARGV[3])
    redis.call('ZADD', 'rf:fair:' .. queue, place, id)
    redis.call('ZADD', 'rf:outbox', now, id)
    table.insert(out, id)
  end
end
if #ids < tonumber(ARGV[2]) then  -- the last chunk
  redis.call('HDEL', KEYS[1], 'paused', 'resuming')
  out[1] = 1
end
return out
"""

# KEYS: a queue's pending set, its fair set; ARGV: job ids. Puts in the fair set those of the
# ids that are in the pending set and not in the fair set (recorded before fair share existed),
# unless their batch is paused. Returns how many.
_ADOPT = _FAIR + """
local n = 0
for _, id in ipairs(ARGV) do
  if redis.call('ZSCORE', KEYS[1], id) and not redis.call('ZSCORE', KEYS[2], id) then
    local job = 'rf:job:' .. id
    local B = 'rf:batch:' .. (redis.call('HGET', job, 'batch_id') or '_')
    if redis.call('HGET', job, 'state') == 'queued' and redis.call('HGET', B, 'paused') ~= '1'
    then
      redis.call('ZADD', KEYS[2], fair_place_of(job), id)
      n = n + 1
    end
  end
end
return n
"""

# ARGV: id, owner, new_state, lease seconds|'', field, value, ...
# Returns {status, previous state, cancel flag}.
_UPDATE = _TERMINAL + _MOVE + """
local now = clock()
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', '', ''} end
if terminal(state) then return {'terminal', state, ''} end
if redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[2] then return {'lost', state, ''} end
local new = ARGV[3]
move(KEYS[1], B, state, new, now)
if #ARGV > 4 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 5))
  if not terminal(new) then redis.call('HSET', KEYS[1], 'progressed_at', now) end
end
if new == 'succeeded' and state ~= new then
  -- the batch's stored images and its first one (the batches list's count and thumbnail)
  local ok, results = pcall(cjson.decode, redis.call('HGET', KEYS[1], 'results') or '[]')
  if ok and type(results) == 'table' and #results > 0 then
    redis.call('HINCRBY', B, 'images', #results)
    if type(results[1].key) == 'string' then redis.call('HSETNX', B, 'thumb', results[1].key) end
  end
end
for i = 5, #ARGV - 1, 2 do
  if ARGV[i] == 'step' then
    event(B, 'job', ARGV[1], 'step', ARGV[i + 1],
          'steps', redis.call('HGET', KEYS[1], 'steps_total') or '')
  end
end
if terminal(new) then
  release(KEYS[1], KEYS[2], ARGV[1])
elseif ARGV[4] ~= '' then
  local lease = now + tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 'lease_until', lease)
  redis.call('ZADD', KEYS[2], lease, ARGV[1])
end
return {'ok', state, redis.call('HGET', KEYS[1], 'cancel') or ''}
"""

# ARGV: id, owner, lease seconds. Keeps a running job's lease alive; returns the cancel flag,
# or 'lost' when the caller no longer holds the job.
_RENEW = _TERMINAL + """
local state = redis.call('HGET', KEYS[1], 'state')
if (not state) or terminal(state) then return 'lost' end
if redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[2] then return 'lost' end
local lease = clock() + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'lease_until', lease)
redis.call('ZADD', KEYS[2], lease, ARGV[1])
return redis.call('HGET', KEYS[1], 'cancel') or ''
"""

# ARGV: id. A queued job is cancelled at once; a running one is flagged and stops at its next
# step, or before its first image is stored. Once an image is stored ('storing'), the cancel
# comes too late: the job will succeed, and the answer says so.
_CANCEL = _TERMINAL + _MOVE + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if terminal(state) then return state end
if state == 'queued' then
  move(KEYS[1], B, state, 'cancelled', clock())
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return 'cancelled'
end
if redis.call('HGET', KEYS[1], 'storing') == '1' then return 'storing' end
redis.call('HSET', KEYS[1], 'cancel', '1')
return 'cancelling'
"""

# ARGV: id, max_attempts
# A running job whose lease ran out (its worker died or hung): back to queued, or failed when
# it has used up its attempts. Returns 'requeued', 'failed' or ''.
_REAP = _TERMINAL + _MOVE + """
local now = clock()
local state = redis.call('HGET', KEYS[1], 'state')
if (not state) or terminal(state) or state == 'queued' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return ''
end
local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
if lease > now then
  redis.call('ZADD', KEYS[2], lease, ARGV[1])
  return ''
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local host = redis.call('HGET', KEYS[1], 'lease_owner') or '?'
release(KEYS[1], KEYS[2], ARGV[1])
if attempts >= tonumber(ARGV[2]) then
  move(KEYS[1], B, state, 'failed', now)
  redis.call('HSET', KEYS[1], 'error', 'gave up after ' .. attempts ..
    ' attempts: the worker running it was lost each time (last: ' .. host .. ')')
  return 'failed'
end
redis.call('HSET', KEYS[1], 'error', 'the worker running it was lost: ' .. host)
new_attempt(KEYS[1])
move(KEYS[1], B, state, 'queued', now)
redis.call('HSET', KEYS[1], 'step', 0)
return 'requeued'
"""

# ARGV: id, owner. The worker holding a running job gives it back (its farm is stopping now):
# queued again at once, with no lease to wait out, and the attempt not counted.
_GIVE_BACK = _TERMINAL + _MOVE + """
local state = redis.call('HGET', KEYS[1], 'state')
if (not state) or terminal(state) then return 'lost' end
if redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[2] then return 'lost' end
release(KEYS[1], KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'error', 'given back unfinished: its worker was stopped')
new_attempt(KEYS[1])
move(KEYS[1], B, state, 'queued', clock())
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
redis.call('HSET', KEYS[1], 'step', 0, 'attempts', math.max(0, attempts - 1))
return 'requeued'
"""

# A failed or cancelled job goes back to queued, attempts reset, its last timeline kept as
# history, at its batch's next turn of its queue (fair share).
_RETRY = _TERMINAL + _MOVE + """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'failed' and state ~= 'cancelled' then return 'no' end
if redis.call('HGET', B, 'pruning') == '1' then return 'no' end  -- being deleted
-- its batch's next turn, as a resume's: not the turn it took when submitted (long past), which
-- would put a retried batch ahead of every batch that waited meanwhile
local queue = redis.call('HGET', KEYS[1], 'queue')
if queue then
  local band = math.floor(tonumber(redis.call('HGET', KEYS[1], 'score') or '0') / FAIR_BAND)
  redis.call('HSET', KEYS[1], 'fair', fair_place(B, queue, band))
end
new_attempt(KEYS[1])
move(KEYS[1], B, state, 'queued', clock())
-- a plot's cell: its grid is drawn again once the cells have ended (renderfarm/plotrecords.py)
if redis.call('HEXISTS', B, 'plot') == 1 then
  redis.call('HINCRBY', B, 'grid_epoch', 1)
  redis.call('SADD', 'rf:plots', redis.call('HGET', KEYS[1], 'batch_id'))
end
redis.call('HDEL', KEYS[1], 'cancel', 'results')
redis.call('HSET', KEYS[1], 'attempts', 0, 'step', 0)
return 'queued'
"""

# ARGV: older than (s), limit. The outbox's entries older than that, stamped now (handed out).
_UNSENT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ids = redis.call('ZRANGEBYSCORE', 'rf:outbox', '-inf', now - tonumber(ARGV[1]),
  'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do redis.call('ZADD', 'rf:outbox', now, id) end
return ids
"""

# The farm's jobs by state (rf:counts), kept by move(), _ADD and _PRUNE. Built once from the
# batches' counters when it has never been (a farm's Redis from before it existed, or one
# restored): atomically, so an increment that came first is not counted twice. Returns
# state, n, state, n, ...
_COUNTS = """
if redis.call('HGET', 'rf:counts', '_built') ~= '1' then
  redis.call('DEL', 'rf:counts')
  local totals = {}
  for _, batch in ipairs(redis.call('ZRANGE', 'rf:batches', 0, -1)) do
    local fields = redis.call('HGETALL', 'rf:batch:' .. batch)
    for i = 1, #fields, 2 do
      if string.sub(fields[i], 1, 2) == 'n:' then
        local state = string.sub(fields[i], 3)
        totals[state] = (totals[state] or 0) + (tonumber(fields[i + 1]) or 0)
      end
    end
  end
  for state, n in pairs(totals) do redis.call('HSET', 'rf:counts', state, n) end
  redis.call('HSET', 'rf:counts', '_built', '1')
end
return redis.call('HGETALL', 'rf:counts')
"""

ADD_CHUNK = 500  #: jobs recorded per script call by Records.add_jobs
ADOPT_CHUNK = 500  #: queued jobs looked at per script call by Records.adopt
PAUSE_CHUNK = 500  #: jobs of a batch looked at per script call by Records.pause
RESUME_CHUNK = 500  #: jobs of a batch looked at per script call by Records.resume
PRUNE_CHUNK = 500  #: jobs of a batch deleted per script call by Records.prune

# Largest list offset asked of Redis: offset + limit must stay within its 64-bit integers.
MAX_INDEX = 2**62


# KEYS: running, fair zsets...  ARGV: owner, lease seconds, max_attempts, n, compat|'',
# scan limit, batch id|'', priority band. Claims up to n queued jobs from the fair zsets in
# order, only those whose 'compat' field equals ARGV[5] when it is given (micro-batch partners).
# With a batch id, the first pass takes only that batch's jobs of that band (a pipeline call is
# one turn of the batch it serves: docs/RELIABILITY.md, "Pause and fair share"), a second pass
# fills what is left in fair order. Skips (and drops from the zset) ids that are no longer
# queued. Partners are only jobs never tried before: a job whose worker was lost runs alone,
# so a poison job cannot take partners down with it. Returns the ids claimed.
_CLAIM_MORE = _MOVE + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = now + tonumber(ARGV[2])
local out = {}
local n = tonumber(ARGV[4])
local function take(fair, id)
  local job = 'rf:job:' .. id
  local state = redis.call('HGET', job, 'state')
  local B = 'rf:batch:' .. (redis.call('HGET', job, 'batch_id') or '_')
  if state ~= 'queued' or redis.call('HGET', job, 'cancel') == '1'
      or held(job, B) then  -- (a pause's chunks to come)
    redis.call('ZREM', fair, id)
  elseif ARGV[5] == '' or (redis.call('HGET', job, 'compat') == ARGV[5]
      and tonumber(redis.call('HGET', job, 'attempts') or '0') == 0) then
    local attempts = redis.call('HINCRBY', job, 'attempts', 1)
    if attempts <= tonumber(ARGV[3]) then
      move(job, B, state, 'started', now)
      redis.call('HSET', job, 'worker', ARGV[1], 'lease_owner', ARGV[1],
        'lease_until', lease, 'step', 0)
      redis.call('ZADD', KEYS[1], lease, id)
      table.insert(out, id)
    else
      redis.call('HINCRBY', job, 'attempts', -1)
    end
  end
end
local passes = {false}
if ARGV[7] ~= '' then passes = {true, false} end
for _, own_batch in ipairs(passes) do
  for k = 2, #KEYS do
    local ids = redis.call('ZRANGE', KEYS[k], 0, tonumber(ARGV[6]) - 1, 'WITHSCORES')
    for j = 1, #ids, 2 do
      if #out >= n then return out end
      local id = ids[j]
      if not own_batch or (math.floor(tonumber(ids[j + 1]) / FAIR_BAND) == tonumber(ARGV[8])
          and redis.call('HGET', 'rf:job:' .. id, 'batch_id') == ARGV[7]) then
        take(KEYS[k], id)
      end
    end
  end
end
return out
"""


# ARGV: reason. A queued job whose message could not be sent: failed, with the reason, and its
# idempotency key given back, so the same request submitted again is recorded afresh.
_ABANDON = _TERMINAL + _MOVE + """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' then return 0 end
move(KEYS[1], B, state, 'failed', clock())
redis.call('HSET', KEYS[1], 'error', ARGV[1])
local idem = redis.call('HGET', KEYS[1], 'idem')
if idem and redis.call('GET', 'rf:idem:' .. idem) == redis.call('HGET', KEYS[1], 'id') then
  redis.call('DEL', 'rf:idem:' .. idem)
end
return 1
"""


# KEYS: batch, batch's job list, rf:batches, rf:jobs.  ARGV: batch id, cutoff time, count.
# Deletes a batch created before the cutoff whose every job has ended: the job records, their
# idempotency keys (where those still point at the job), the batch. Its first call checks the
# batch and marks it 'pruning' (from then on no retry or extension of it is taken: the check
# holds to the end) and takes its jobs out of the farm's counts; each call deletes up to count
# jobs from the end of its job list (Records.prune: one call per PRUNE_CHUNK jobs, so no script
# holds Redis for a whole big batch); the call that empties the list deletes the batch. A prune
# whose caller died part-way is finished by the next (the batch stays listed until then).
# Returns {done (1|0), jobs deleted}; {-1}: a job has not ended; {-2}: too new.
_PRUNE = """
if redis.call('HGET', KEYS[1], 'pruning') ~= '1' then
  local created = redis.call('HGET', KEYS[1], 'created_at')
  if not created or tonumber(created) > tonumber(ARGV[2]) then return {-2} end
  for _, s in ipairs({'queued', 'started', 'rendering', 'uploading'}) do
    if tonumber(redis.call('HGET', KEYS[1], 'n:' .. s) or '0') > 0 then return {-1} end
  end
  if tonumber(redis.call('HGET', KEYS[1], 'hooks:pending') or '0') > 0 then return {-1} end
  local fields = redis.call('HGETALL', KEYS[1])
  for i = 1, #fields, 2 do
    local n = tonumber(fields[i + 1]) or 0
    if string.sub(fields[i], 1, 2) == 'n:' and n ~= 0 then  -- (-0 would print as '-0')
      redis.call('HINCRBY', 'rf:counts', string.sub(fields[i], 3), 0 - n)
    end
  end
  redis.call('HSET', KEYS[1], 'pruning', '1')
end
local ids = redis.call('LRANGE', KEYS[2], 0 - tonumber(ARGV[3]), -1)
for _, id in ipairs(ids) do
  local job = 'rf:job:' .. id
  local idem = redis.call('HGET', job, 'idem')
  if idem and redis.call('GET', 'rf:idem:' .. idem) == id then
    redis.call('DEL', 'rf:idem:' .. idem)
  end
  redis.call('DEL', job)
  redis.call('ZREM', KEYS[4], id)
  redis.call('ZREM', 'rf:outbox', id)
end
redis.call('LTRIM', KEYS[2], 0, -1 - #ids)
if redis.call('LLEN', KEYS[2]) > 0 then return {0, #ids} end
for _, hook in ipairs(redis.call('LRANGE', KEYS[1] .. ':hooks', 0, -1)) do
  redis.call('DEL', 'rf:hook:' .. hook)
  redis.call('ZREM', 'rf:hooks:due', hook)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[1] .. ':events', KEYS[1] .. ':hooks')
redis.call('ZREM', KEYS[3], ARGV[1])
return {1, #ids}
"""


@dataclass(frozen=True)
class Pruned:
    """What :meth:`Records.prune` removed (or, dry, would remove)."""

    batches: int
    jobs: int
    kept_running: int  #: batches old enough but with jobs not ended yet


@dataclass(frozen=True)
class Claim:
    """The answer to a worker asking to run a job."""

    status: str  #: ok | terminal | busy | cancelled | poison | missing | paused
    detail: str = ""
    job_id: str = ""  #: the job claimed (a turn of a queue may take another job than its own)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Records:
    """Reads and writes the farm's records in one Redis."""

    def __init__(self, redis: Redis):
        self.redis = redis
        self._claim = redis.register_script(_CLAIM)
        self._claim_turn = redis.register_script(_CLAIM_TURN)
        self._pause = redis.register_script(_PAUSE)
        self._resume = redis.register_script(_RESUME)
        self._adopt = redis.register_script(_ADOPT)
        self._update = redis.register_script(_UPDATE)
        self._renew = redis.register_script(_RENEW)
        self._cancel = redis.register_script(_CANCEL)
        self._reap = redis.register_script(_REAP)
        self._retry = redis.register_script(_RETRY)
        self._give_back = redis.register_script(_GIVE_BACK)
        self._claim_more = redis.register_script(_CLAIM_MORE)
        self._abandon = redis.register_script(_ABANDON)
        self._prune = redis.register_script(_PRUNE)
        self._add = redis.register_script(_ADD)
        self._unsent = redis.register_script(_UNSENT)
        self._counts = redis.register_script(_COUNTS)

    # -- writing new work -------------------------------------------------------------------
    def add_jobs(
        self,
        batch_id: str,
        jobs: Sequence[tuple[str, JobRequest]],
        label: str = "",
        queues: Sequence[str] | None = None,
        compat: Sequence[str] | None = None,
        idempotency_ttl: int = 7 * 24 * 3600,
        webhook_url: str | None = None,
    ) -> list[str]:
        """Create (or extend) a batch and the records of its jobs, in one atomic script.

        ``queues[i]`` is the Celery queue job i goes to, ``compat[i]`` its micro-batch key. A
        job whose idempotency key is already held is not recorded: the answer, per job in
        order, is its own id, or the id of the job that holds its key. The keys are taken in
        the same step as the records are written, so a failed write (Redis out of memory)
        leaves no key pointing at nothing."""
        queues = queues or ["renderfarm"] * len(jobs)
        compat = compat or [job_id for job_id, _ in jobs]
        # A job's webhook: its own, else its batch's (the batch's also gets batch.completed).
        rows = [[job_id, request.idempotency_key or "", queue, request.priority, key,
                 request.webhook_url or webhook_url or "", request.model_dump_json()]
                for (job_id, request), queue, key in zip(jobs, queues, compat, strict=True)]
        # One script per chunk, all in one round trip: Redis serves other clients (workers
        # renewing leases) between chunks, and no call outlasts the socket timeout.
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(rows), ADD_CHUNK):
            chunk = [v for row in rows[start:start + ADD_CHUNK] for v in row]
            self._add(args=[batch_id, label, idempotency_ttl, webhook_url or "", *chunk],
                      client=pipe)
        answers = pipe.execute(raise_on_error=False)
        failed = next((a for a in answers if isinstance(a, Exception)), None)
        if failed is not None:  # all or nothing: fail what the other chunks recorded
            mine = [row[0] for k, answer in enumerate(answers) if not isinstance(answer, Exception)
                    for row, owner in zip(rows[k * ADD_CHUNK:(k + 1) * ADD_CHUNK], answer,
                                          strict=True) if owner.decode() == row[0]]
            self.abandon(mine, f"not enqueued: Redis refused part of the batch ({failed})")
            raise failed
        return [v.decode() for answer in answers for v in answer]

    def sent(self, job_ids: Sequence[str]) -> None:
        """The messages of these jobs are on their queues: take them out of the outbox."""
        if job_ids:
            self.redis.zrem(keys.OUTBOX, *job_ids)

    def unsent(self, older_than: float, limit: int = 500) -> list[str]:
        """Jobs put in the outbox more than ``older_than`` seconds ago whose sender never said
        their messages went out (it died, or Redis failed between the two steps). They are
        stamped afresh as they are handed out, so sweepers do not send them at once: one that
        dies before it is done leaves them to the next sweep."""
        return [i.decode() for i in self._unsent(args=[older_than, limit])]

    def clock(self) -> float:
        """Redis' time: the one clock of leases and records, whatever this host's says."""
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    # -- reading ----------------------------------------------------------------------------
    def job(self, job_id: str) -> JobRecord:
        """The job's record; :class:`BadRecord` with the reason if it cannot be read."""
        data = self.redis.hgetall(keys.job(job_id))
        if not data:
            raise JobNotFound(job_id)
        return _job_from_hash(job_id, data)

    def read(self, job_ids: Iterable[str]) -> dict[str, JobRecord | BadRecord]:
        """Job id -> its record, or the :class:`BadRecord` saying why it cannot be read, in one
        round trip. Missing jobs are left out. One bad record never spoils the others."""
        ids = list(job_ids)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        out: dict[str, JobRecord | BadRecord] = {}
        for job_id, data in zip(ids, pipe.execute(), strict=True):
            if data:
                try:
                    out[job_id] = _job_from_hash(job_id, data)
                except BadRecord as exc:
                    out[job_id] = exc
        return out

    def jobs(self, job_ids: Iterable[str]) -> list[JobRecord]:
        """The records that can be read, in order; unreadable ones are logged and left out."""
        out = []
        for found in self.read(job_ids).values():
            if isinstance(found, BadRecord):
                log.warning("%s", found)
            else:
                out.append(found)
        return out

    def messages(self, job_ids: Iterable[str]) -> list[tuple[str, str, int]]:
        """(job id, queue, priority) of each job, from the raw fields its message needs: no
        validation, so a job with a bad record is still sent (and fails alone when claimed)."""
        ids = list(job_ids)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(keys.job(job_id), "queue", "score")
        out = []
        for job_id, (queue, score) in zip(ids, pipe.execute(), strict=True):
            if queue:
                out.append((job_id, queue.decode(), priority_of(float(score or 0))))
        return out

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(keys.job(job_id)))

    def batch(self, batch_id: str) -> BatchRecord:
        data = self.redis.hgetall(keys.batch(batch_id))
        if not data:
            raise JobNotFound(batch_id)
        return _batch_from_hash(data)

    def batch_job_ids(self, batch_id: str, offset: int = 0, limit: int = -1) -> list[str]:
        if offset > MAX_INDEX:  # past any list; Redis would refuse offset + limit over int64
            return []
        stop = -1 if limit < 0 else offset + limit - 1
        return [v.decode() for v in self.redis.lrange(keys.batch_jobs(batch_id), offset, stop)]

    def batch_jobs(self, batch_id: str, offset: int = 0, limit: int = -1) -> list[JobRecord]:
        return self.jobs(self.batch_job_ids(batch_id, offset, limit))

    def batches(self, offset: int = 0, limit: int = 50) -> list[BatchRecord]:
        """Batches, newest first."""
        if offset > MAX_INDEX:
            return []
        ids = self.redis.zrevrange(keys.BATCHES, offset, offset + limit - 1)
        pipe = self.redis.pipeline(transaction=False)
        for batch_id in ids:
            pipe.hgetall(keys.batch(batch_id.decode()))
        return [_batch_from_hash(d) for d in pipe.execute() if d]

    def count_batches(self) -> int:
        return int(self.redis.zcard(keys.BATCHES))

    def count_jobs(self) -> int:
        return int(self.redis.zcard(keys.JOBS))

    def state_counts(self) -> dict[JobState, int]:
        """The farm's kept jobs by state: one hash read, kept by every transition (built from
        the batches' counters the first time)."""
        flat = self._counts()
        out = {state: 0 for state in JobState}
        for name, value in zip(flat[::2], flat[1::2], strict=True):
            try:
                out[JobState(name.decode())] = int(value)
            except ValueError:  # '_built', or a state this version does not know
                continue
        return out

    # -- a worker's transitions -------------------------------------------------------------
    def claim(self, job_id: str, owner: str, lease_seconds: float, max_attempts: int) -> Claim:
        """Claim this very job (queued, or running under an expired lease)."""
        status, detail = self._claim(
            keys=self._keys(job_id), args=[job_id, owner, lease_seconds, max_attempts]
        )
        return Claim(status.decode(), detail.decode(), job_id)

    def claim_turn(self, job_id: str, owner: str, lease_seconds: float,
                   max_attempts: int) -> Claim:
        """A delivered message of job ``job_id``: claim the first job of its queue's fair set
        (round-robin over batches, priority first), which may be another job than its own;
        ``Claim.job_id`` says which. With no job there to take, :meth:`claim` of the job itself
        (a duplicate delivery finds it busy or ended; a paused batch's job answers 'paused')."""
        answer = self._claim_turn(
            keys=self._keys(job_id), args=[job_id, owner, lease_seconds, max_attempts]
        )
        taken = answer[2].decode() if len(answer) > 2 else job_id
        return Claim(answer[0].decode(), answer[1].decode(), taken)

    def pause(self, batch_id: str) -> int:
        """Pause a batch: its queued jobs stay queued and no worker takes them until
        :meth:`resume`; running ones finish. Returns how many queued jobs it holds."""
        held, offset = 0, 0
        while True:  # a chunk per call (_PAUSE): Redis serves other clients in between
            n, seen = self._pause(keys=[keys.batch(batch_id), keys.batch_jobs(batch_id)],
                                  args=[offset, PAUSE_CHUNK])
            if n < 0:
                raise JobNotFound(batch_id)
            held += n
            if seen < PAUSE_CHUNK:
                return held
            offset += PAUSE_CHUNK

    def resume(self, batch_id: str) -> list[str]:
        """Resume a paused batch: its queued jobs rejoin the queues at the current turn. Returns
        their ids, whose messages the caller must send (:func:`producer.enqueue.
        publish_records`); they are in the outbox meanwhile, so none is lost if it cannot."""
        token, offset, ids = uuid.uuid4().hex, 0, []
        while True:  # a chunk per call (_RESUME): Redis serves other clients in between
            done, *out = self._resume(keys=[keys.batch(batch_id), keys.batch_jobs(batch_id)],
                                      args=[offset, RESUME_CHUNK, token])
            if done < 0:
                raise JobNotFound(batch_id)
            ids += [i.decode() for i in out]
            if done:
                return ids
            offset += RESUME_CHUNK

    def adopt(self, queues: Sequence[str]) -> int:
        """Put the queued jobs recorded before fair share existed in their queues' fair sets
        (a worker does this at start). Returns how many."""
        adopted = 0
        for queue in queues:
            pending, fair = keys.pending(queue), keys.fair(queue)
            if self.redis.zcard(pending) == self.redis.zcard(fair):
                continue  # the usual case: every queued job is in the fair set already
            # In chunks of ids found by ZSCAN (which returns every member present throughout
            # the scan): each script call is short, so a queue of a million jobs never stops
            # Redis serving other clients (leases, claims) while a worker starts.
            ids: list[bytes] = []
            for member, _ in self.redis.zscan_iter(pending, count=ADOPT_CHUNK):
                ids.append(member)
                if len(ids) == ADOPT_CHUNK:
                    adopted += int(self._adopt(keys=[pending, fair], args=ids))
                    ids = []
            if ids:
                adopted += int(self._adopt(keys=[pending, fair], args=ids))
        return adopted

    def claim_more(
        self,
        queues: Sequence[str],
        owner: str,
        lease_seconds: float,
        max_attempts: int,
        n: int,
        compat: str = "",
        scan: int = 200,
        batch_id: str = "",
        priority: int = 5,
    ) -> list[str]:
        """Claim up to ``n`` queued jobs straight from the queues' fair sets (best first),
        only micro-batch partners when ``compat`` is given. With ``batch_id``, that batch's
        jobs of ``priority`` come first (the rest of a pipeline call is one turn of the batch
        it serves), then the others' in fair order. Their Celery messages, delivered later, find
        them claimed and are dropped."""
        if n <= 0 or not queues:
            return []
        ids = self._claim_more(
            keys=[keys.RUNNING, *[keys.fair(q) for q in queues]],
            args=[owner, lease_seconds, max_attempts, n, compat, scan, batch_id,
                  9 - priority],
        )
        return [i.decode() for i in ids]

    def best_priority(self, queues: Sequence[str]) -> int:
        """The highest priority among the queues' queued jobs a worker may take (paused
        batches' left out); -1 when none waits."""
        best = self._head_priorities(queues)
        return max(best.values()) if best else -1

    def by_priority(self, queues: Sequence[str]) -> list[str]:
        """The queues with a job a worker may take, best waiting priority first (queues of
        equal priority in the order given: their turns are counted apart)."""
        best = self._head_priorities(queues)
        return sorted((q for q in queues if q in best), key=lambda q: -best[q])

    def _head_priorities(self, queues: Sequence[str]) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.zrange(keys.fair(queue), 0, 0, withscores=True)
        return {queue: priority_of(found[0][1])
                for queue, found in zip(queues, pipe.execute(), strict=True) if found}

    def update(
        self,
        job_id: str,
        owner: str,
        state: JobState,
        lease_seconds: float | None = None,
        **fields: str | int | float,
    ) -> tuple[str, bool]:
        """Move a job the caller holds. Returns (status, cancel requested).

        status is ``ok``, or ``terminal`` / ``lost`` / ``missing`` when the caller no longer
        holds the job: then nothing was written and the caller must stop working on it.
        """
        return self.update_many([job_id], owner, state, lease_seconds, **fields)[0]

    def update_many(
        self,
        job_ids: Sequence[str],
        owner: str,
        state: JobState,
        lease_seconds: float | None = None,
        **fields: str | int | float,
    ) -> list[tuple[str, bool]]:
        """:meth:`update` of several jobs in one round trip (a micro-batch's progress): each
        job is moved by its own script run, atomic as in :meth:`update`."""
        lease = "" if lease_seconds is None else lease_seconds
        extra = [item for name, value in fields.items() for item in (name, value)]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            self._update(keys=self._keys(job_id), args=[job_id, owner, state.value, lease,
                                                        *extra], client=pipe)
        return [(status.decode(), cancel == b"1") for status, _, cancel in pipe.execute()]

    def renew(self, job_id: str, owner: str, lease_seconds: float) -> str:
        """Extend the caller's lease: returns 'ok', 'cancel' (a user asked to cancel) or 'lost'."""
        out = self._renew(keys=self._keys(job_id), args=[job_id, owner, lease_seconds])
        return {b"lost": "lost", b"1": "cancel"}.get(out, "ok")

    def succeed(self, job_id: str, owner: str, results: list[ImageResult]) -> str:
        payload = json.dumps([r.model_dump(exclude={"url"}) for r in results])
        return self.update(job_id, owner, JobState.succeeded, results=payload, retrying="")[0]

    def fail(self, job_id: str, owner: str, error: str) -> str:
        return self.update(job_id, owner, JobState.failed, error=error[:2000])[0]

    # -- users' and reapers' transitions ----------------------------------------------------
    def cancel(self, job_id: str) -> str:
        """Cancel a job: at once if queued, at its next step if running. Returns the outcome."""
        out = self._cancel(keys=self._keys(job_id), args=[job_id]).decode()
        if out == "missing":
            raise JobNotFound(job_id)
        return out

    def retry(self, job_id: str) -> bool:
        """Put a failed or cancelled job back in the queue; True if it was."""
        return self._retry(keys=self._keys(job_id), args=[]) == b"queued"

    def abandon(self, job_ids: Sequence[str], reason: str) -> int:
        """Fail queued jobs whose messages were never sent (so none waits for nothing)."""
        return sum(self._abandon(keys=self._keys(i), args=[reason]) for i in job_ids)

    def prune(self, older_than: float, dry_run: bool = False,
              limit: int | None = None) -> Pruned:
        """Delete the records of batches submitted more than ``older_than`` seconds ago whose
        every job has ended (succeeded, failed or cancelled). Images in storage stay; batches
        with a job still queued or running stay whatever their age. One script per batch, so
        Redis is never blocked for longer than one batch's deletion; ``limit`` stops after
        that many batches are deleted (a worker prunes a few at a time)."""
        cutoff = self.clock() - older_than
        batches = jobs = kept = 0
        for raw in self.redis.zrangebyscore(keys.BATCHES, "-inf", cutoff):
            if limit is not None and batches >= limit:
                break
            batch_id = raw.decode()
            if dry_run:
                try:
                    record = self.batch(batch_id)
                except JobNotFound:
                    continue
                if record.finished:
                    batches, jobs = batches + 1, jobs + record.total
                else:
                    kept += 1
                continue
            deleted = self._prune_batch(batch_id, cutoff)
            if deleted >= 0:
                batches, jobs = batches + 1, jobs + deleted
            elif deleted == -1:
                kept += 1
        return Pruned(batches, jobs, kept)

    def _prune_batch(self, batch_id: str, cutoff: float) -> int:
        """Delete one batch (_PRUNE), a chunk of its jobs per call: Redis serves other clients
        in between. Returns the jobs deleted, or _PRUNE's -1 / -2."""
        deleted = 0
        while True:
            done, *n = self._prune(
                keys=[keys.batch(batch_id), keys.batch_jobs(batch_id), keys.BATCHES, keys.JOBS],
                args=[batch_id, cutoff, PRUNE_CHUNK],
            )
            if done < 0:
                return int(done)
            deleted += int(n[0])
            if done:
                return deleted

    def expired_leases(self, limit: int = 100) -> list[str]:
        ids = self.redis.zrangebyscore(keys.RUNNING, "-inf", self.clock(), start=0, num=limit)
        return [i.decode() for i in ids]

    def give_back(self, job_id: str, owner: str) -> str:
        """The holder of a running job puts it back in the queue now (its worker is stopping):
        'requeued' (the caller re-sends its message) or 'lost'. The attempt does not count."""
        return self._give_back(keys=self._keys(job_id), args=[job_id, owner]).decode()

    def reap(self, job_id: str, max_attempts: int) -> str:
        """Recover a job whose lease ran out: 'requeued' (caller re-sends it), 'failed' or ''."""
        return self._reap(keys=self._keys(job_id), args=[job_id, max_attempts]).decode()

    @staticmethod
    def _keys(job_id: str) -> list[str]:
        return [keys.job(job_id), keys.RUNNING]


PRIORITY_BAND = 1e10  #: width of one priority's scores in a pending set


def pending_score(priority: int, created_at: float) -> float:
    """Lower is taken first: higher priority, then older."""
    return (9 - priority) * PRIORITY_BAND + created_at


def priority_of(score: float) -> int:
    """The priority a pending score was made from (see :func:`pending_score`)."""
    return 9 - int(score // PRIORITY_BAND)


def _s(data: dict, name: str, default: str = "") -> str:
    value = data.get(name.encode())
    return value.decode() if value is not None else default


def _job_from_hash(job_id: str, data: dict) -> JobRecord:
    try:
        return _parse_job_hash(data)
    except ValidationError as exc:
        reason = "; ".join(str(e) for e in field_errors(exc))
    except (ValueError, KeyError, TypeError) as exc:  # a state, a number, JSON that is not
        reason = f"{type(exc).__name__}: {exc}"
    raise BadRecord(job_id, reason)


def _parse_job_hash(data: dict) -> JobRecord:
    timestamps = {
        k.decode()[2:]: float(v) for k, v in data.items() if k.startswith(b"t:")
    }
    results = _s(data, "results")
    request = JobRequest.model_validate_json(_s(data, "request"), context={"trusted": True})
    return JobRecord(
        id=_s(data, "id"),
        batch_id=_s(data, "batch_id"),
        state=JobState(_s(data, "state")),
        request=request,
        created_at=float(_s(data, "created_at", "0")),
        timestamps=timestamps,
        worker=_s(data, "worker") or None,
        attempts=int(_s(data, "attempts", "0")),
        step=int(_s(data, "step", "0")),
        progressed_at=float(_s(data, "progressed_at", "0")) or None,
        steps_total=int(_s(data, "steps_total", "0")) or request.steps,
        results=[ImageResult.model_validate(r) for r in json.loads(results)] if results else [],
        error=_s(data, "error") or None,
        cancel_requested=_s(data, "cancel") == "1",
        queue=_s(data, "queue"),
        compat=_s(data, "compat"),
        retrying=_s(data, "retrying") or None,
        history=json.loads(_s(data, "history", "[]")),
    )


def _batch_from_hash(data: dict) -> BatchRecord:
    counts = {
        JobState(k.decode()[2:]): int(v)
        for k, v in data.items()
        if k.startswith(b"n:") and int(v) > 0
    }
    hooks = {k.decode()[6:]: int(v) for k, v in data.items() if k.startswith(b"hooks:")}
    plot = _json_or(_s(data, "plot"), None)
    grids, grid_state = _grids_of(data) if plot is not None else ([], None)
    return BatchRecord(
        id=_s(data, "id"),
        created_at=float(_s(data, "created_at", "0")),
        total=int(_s(data, "total", "0")),
        counts=counts,
        label=_s(data, "label"),
        plot=plot,
        grids=grids,
        grid_state=grid_state,
        prompt=_s(data, "prompt"),
        started_at=_float_or_none(data.get(b"t:started")),
        ended_at=_float_or_none(data.get(b"t:ended")),
        images=int(_s(data, "images", "0")),
        thumb=_s(data, "thumb"),
        webhook_url=_s(data, "webhook") or None,
        webhooks=hooks,
        paused=_s(data, "paused") == "1",
    )


def _grids_of(data: dict) -> tuple[list, str]:
    """A plot's grids and their state (renderfarm/plotrecords.py): the grids recorded are
    current only while ``grid_done`` is the ``grid_epoch`` a retry of a cell bumps (in the same
    step as it re-queues the cell); from then until the new grids are stored, none is listed."""
    if _s(data, "grid_done") == _s(data, "grid_epoch", "0"):
        return _json_or(_s(data, "grids"), []), "drawn"
    return [], ("redrawing" if b"grid_done" in data else "waiting")


def _json_or(text: str, default):
    """A plot's JSON field, or ``default`` when absent or unreadable (a page must not fail
    because one batch's field is bad)."""
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        log.warning("unreadable JSON in a batch record: %.80s", text)
        return default


def _float_or_none(raw: bytes | None) -> float | None:
    return float(raw) if raw else None
