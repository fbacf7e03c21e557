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


# KEYS: a queue's lists, then its fair set. Drops the undelivered messages whose job has ended
# (or is gone), and keeps the others in their order. A message is a turn of its queue, not of
# its own job alone (fair share: a delivery renders the job whose turn it is), so as many
# messages are kept as the fair set holds jobs, dead or not: a job whose own message served
# another job's turn still has one. One pass over the lists, atomic against the consumers.
_DROP_DEAD = """
local dropped = 0
local fair = KEYS[#KEYS]
local spare = -redis.call('ZCARD', fair)
for i = 1, #KEYS - 1 do spare = spare + redis.call('LLEN', KEYS[i]) end
for k = 1, #KEYS - 1 do
  local list = KEYS[k]
  local messages = redis.call('LRANGE', list, 0, -1)
  local kept = {}
  for _, m in ipairs(messages) do
    local ok, msg = pcall(cjson.decode, m)
    local id = ok and type(msg) == 'table' and type(msg.headers) == 'table' and msg.headers.id
    local state = id and redis.call('HGET', 'rf:job:' .. id, 'state')
    if spare > 0 and id and ((not state) or state == 'cancelled' or state == 'failed'
        or state == 'succeeded') then
      dropped = dropped + 1
      spare = spare - 1
    else
      table.insert(kept, m)
    end
  end
  if #kept < #messages then
    redis.call('DEL', list)
    for i = 1, #kept, 1000 do
      redis.call('RPUSH', list, unpack(kept, i, math.min(i + 999, #kept)))
    end
  end
end
return dropped
"""


def drop_dead_messages(redis: Redis, queues: Sequence[str]) -> int:
    """Remove from the queues the messages of jobs that have ended (a cancelled batch's), so
    a new job does not wait while workers take and drop them one by one. Returns how many.
    Each queue is one script over its lists: O(messages waiting), run after bulk cancels."""
    script = redis.register_script(_DROP_DEAD)
    return sum(int(script(keys=[*priority_lists(q), keys.fair(q)])) for q in queues)
