"""Putting jobs on the Celery queue: Celery's own messages, published in Redis pipelines.

One ``apply_async`` per job is a network round trip each (≈ 1,000/s). kombu's
``Producer.batch()`` buffers the same publishes in one pipeline, so a batch of 10,000 jobs is
accepted in well under 2 s. The messages are built by Celery (``amqp.as_task_v2``) and sent by
``amqp.send_task_message``, so workers see ordinary Celery task messages. Each queue is declared
once per call rather than once per message, and the message carries only the job id: the job
itself is in its record, written before the message so a worker never sees a message without
a record.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from secrets import token_hex
from typing import TYPE_CHECKING

from renderfarm import keys
from renderfarm.connection import TASK_NAME, celery_priority
from renderfarm.schema import JobRequest
from renderfarm.settings import Settings

if TYPE_CHECKING:
    from celery import Celery
    from redis import Redis

    from renderfarm.records import Records

log = logging.getLogger(__name__)


def queue_for(request: JobRequest, settings: Settings) -> str:
    """The one place that decides which queue a job goes to: one queue per model, and per
    hardware class when the job names one. Only workers that have the model (and are of that
    class) consume it, so a job never lands on a worker that cannot run it."""
    base = f"{settings.queue}.{request.model}"
    return base if request.hardware == "any" else f"{base}.{request.hardware}"


def worker_queues(settings: Settings, models: list[str], hardware: str) -> list[str]:
    """The queues a worker of class ``hardware`` that has ``models`` consumes."""
    base = settings.queue
    return [q for m in models for q in (f"{base}.{m}", f"{base}.{m}.{hardware}")]


def publish(app: Celery, settings: Settings, jobs: Sequence[tuple[str, JobRequest]]) -> None:
    """Send one render message per job, pipelined. Raises if Redis refuses them."""
    send(app, [(job_id, queue_for(r, settings), r.priority) for job_id, r in jobs])


def publish_records(app: Celery, records: Records, job_ids: Sequence[str]) -> None:
    """Send the messages of recorded jobs again (the reaper, a retry, the outbox sweep), from
    their raw queue and priority fields: a job whose record cannot be read is still sent, and
    fails alone when a worker claims it."""
    send(app, records.messages(job_ids))
    records.sent(job_ids)


def send_unsent(app: Celery, records: Records, older_than: float) -> list[str]:
    """The outbox sweep: send again the messages of queued jobs that went queued more than
    ``older_than`` seconds ago and whose sender never confirmed (it died, or Redis failed
    between recording and sending). A message sent twice is harmless: the second delivery
    finds the job claimed and is dropped. Returns the ids sent."""
    ids = records.unsent(older_than)
    if not ids:
        return []
    states = records.redis.pipeline(transaction=False)
    for job_id in ids:
        states.hget(keys.job(job_id), "state")
    queued = [i for i, state in zip(ids, states.execute(), strict=True) if state == b"queued"]
    send(app, records.messages(queued))
    records.sent(ids)
    return queued


#: A spare turn's task id is its job's id, this, and a random tag (see :func:`send_turn`).
TURN_TAG = ".turn-"


def send_turn(app: Celery, records: Records, job_id: str) -> None:
    """Send a turn of job ``job_id``'s queue under a task id of its own: for a message of that
    job that Celery discarded (a revoke), which may have been another queued job's turn
    (docs/RELIABILITY.md, "Pause and fair share"). A spare turn is harmless: delivered with no
    job waiting, it reports its job's end as any late delivery does."""
    for _, queue, priority in records.messages([job_id]):
        send(app, [(job_id, queue, priority)], task_id=f"{job_id}{TURN_TAG}{token_hex(4)}")


def send(app: Celery, messages: Sequence[tuple[str, str, int]], task_id: str = "") -> None:
    """Publish (job id, queue, priority) messages in pipelines. Raises if Redis refuses them.
    A message's task id is its job id, or ``task_id`` when given (one message)."""
    amqp = app.amqp
    with app.producer_or_acquire() as producer:
        declared: set[str] = set()
        with producer.batch(max_size=2000):
            for job_id, queue, priority in messages:
                if queue not in declared:
                    producer.maybe_declare(amqp.queues[queue])
                    declared.add(queue)
                message = amqp.as_task_v2(
                    task_id or job_id, TASK_NAME, args=(job_id,), kwargs={},
                    argsrepr=repr((job_id,)), kwargsrepr="{}",
                )
                amqp.send_task_message(
                    producer, TASK_NAME, message, queue=queue, declare=[],
                    priority=celery_priority(priority), retry=False,
                )


#: kombu's Redis transport keeps one list per priority step: ``queue`` for step 0 and
#: ``queue`` + this + step for the others (``priority_steps`` is 0..9, renderfarm/connection.py).
PRIORITY_SEP = "\x06\x16"


def priority_lists(queue: str) -> list[str]:
    """The Redis lists holding a Celery queue's undelivered messages, one per priority step."""
    return [queue] + [f"{queue}{PRIORITY_SEP}{n}" for n in range(1, 10)]


# KEYS: a queue's lists, a scratch key for each, then its fair set; ARGV: messages read at a
# time. Drops the undelivered messages whose job has ended (or is gone), and keeps the others
# in their order. A message is a turn of its queue, not of its own job alone (fair share: a
# delivery renders the job whose turn it is), so as many messages are kept as the fair set
# holds jobs, dead or not: a job whose own message served another job's turn still has one.
# One pass over the lists, atomic against the consumers.
_DROP_DEAD = """
local dropped = 0
local fair = KEYS[#KEYS]
local lists = (#KEYS - 1) / 2
local chunk = tonumber(ARGV[1])
local spare = -redis.call('ZCARD', fair)
for i = 1, lists do spare = spare + redis.call('LLEN', KEYS[i]) end
for k = 1, lists do
  local list, copy = KEYS[k], KEYS[lists + k]
  local before = dropped
  redis.call('DEL', copy)
  -- A chunk at a time, the kept messages copied to a list of their own as we go: the script
  -- never holds the whole queue in Lua (a table of 100,000 messages made every garbage
  -- collection walk them all: minutes, not a second), and the copy replaces the queue whole.
  local n = redis.call('LLEN', list)
  for first = 0, n - 1, chunk do
    local kept = {}
    for _, m in ipairs(redis.call('LRANGE', list, first, first + chunk - 1)) do
      local ok, msg = pcall(cjson.decode, m)
      local id = ok and type(msg) == 'table' and type(msg.headers) == 'table' and msg.headers.id
      local state = id and redis.call('HGET', 'rf:job:' .. id, 'state')
      if spare > 0 and id and ((not state) or state == 'cancelled' or state == 'failed'
          or state == 'succeeded') then
        dropped = dropped + 1
        spare = spare - 1
      else
        kept[#kept + 1] = m
      end
    end
    if #kept > 0 then redis.call('RPUSH', copy, unpack(kept)) end
  end
  if dropped > before then
    if redis.call('EXISTS', copy) == 1 then redis.call('RENAME', copy, list)
    else redis.call('DEL', list) end
  else
    redis.call('DEL', copy)
  end
end
return dropped
"""


#: A queue holding more messages than this is left as it is by :func:`drop_dead_messages`: the
#: pass is one script (Redis answers no one else meanwhile), about 30-85 µs a message on a
#: loaded 2-core VM (bench/drop_dead_messages.py), so it stays under a second up to here.
DROP_DEAD_MAX = 10_000


def drop_dead_messages(redis: Redis, queues: Sequence[str], chunk: int = 1000,
                       most: int | None = None) -> int:
    """Remove from the queues the messages of jobs that have ended (a cancelled batch's), so
    workers do not take and drop them one by one. Returns how many. Each queue is one script
    over its lists, O(messages waiting); a queue longer than ``most`` (:data:`DROP_DEAD_MAX`)
    is skipped: its dead messages cost little where they are, since a delivered message is a
    turn of its queue (``Records.claim_turn``) and serves the next live job, the dead one's or
    not, so nobody waits behind them."""
    script = redis.register_script(_DROP_DEAD)
    most = DROP_DEAD_MAX if most is None else most
    out = 0
    for queue in queues:
        lists = priority_lists(queue)
        depth = sum(_lengths(redis, lists))
        if depth > most:
            log.info("queue %s holds %d messages: its dead ones are dropped by the workers as "
                     "they come, not in one pass", queue, depth)
            continue
        out += int(script(keys=[*lists, *(f"{name}:rf-kept" for name in lists),
                                keys.fair(queue)], args=[chunk]))
    return out


def _lengths(redis: Redis, names: Sequence[str]) -> list[int]:
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    return pipe.execute()
