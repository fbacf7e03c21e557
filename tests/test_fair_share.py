"""Pause/resume and fair share (issue 13, section 3).

The record scripts first, against a Redis database of the module's own (no worker): the order
in which turns take jobs, a pipeline call as one turn of its batch, pause, resume and cancel.
Then one farm of one real worker with test holds (worker/testhooks.py): a small batch submitted
while the worker is held in its first call of a big one takes the next call whole, and a
paused batch through a worker restart. Orders come from the records' timestamps
(Redis' clock, one clock), never from timing.
"""

from __future__ import annotations

import pytest
from redis import Redis

from producer.enqueue import priority_lists
from renderfarm import keys
from renderfarm.records import Records
from renderfarm.schema import JobRequest, JobState
from tests.fair_fixtures import add_batch, take
from tests.fault_fixtures import wait_for

pytest_plugins = ["tests.fault_fixtures"]

QUEUE = "renderfarm"  # Records.add_jobs' default queue


@pytest.fixture
def records(module_redis_url) -> Records:
    redis = Redis.from_url(module_redis_url)
    redis.flushdb()
    return Records(redis)


def test_turns_go_round_robin_over_batches_priority_first(records):
    big = add_batch(records, "big", 30)
    assert take(records, 3, "big-0") == big[:3]
    small = add_batch(records, "small", 3)  # arrives while the big one is served
    urgent = add_batch(records, "urgent", 2, priority=8)
    order = take(records, 9, "big-0")
    assert order[:2] == urgent  # priority wins over fairness
    rest = order[2:]
    assert sorted(rest[:6]) == sorted(small + big[3:6]), rest  # one job of each batch a turn
    assert [i for i in rest if i.startswith("small")] == small  # a batch keeps its own order
    assert set(records.claim_more([QUEUE], "w", 30, 3, n=50)) == set(big[3:]) - set(rest)


def call(records: Records, via: str, size: int = 4) -> list[str]:
    """One pipeline call as a worker makes it: a delivery's turn, then its micro-batch partners
    (all jobs here are compatible: one compat key)."""
    claim = records.claim_turn(via, "w", 30, 3)
    assert claim.ok, claim
    head = records.job(claim.job_id)
    return [claim.job_id, *records.claim_more(
        [QUEUE], "w", 30, 3, n=size - 1, compat=head.compat, batch_id=head.batch_id,
        priority=head.request.priority)]


def test_a_pipeline_call_is_one_turn_of_the_batch_it_serves(records):
    """A batch that arrives while a call of a big batch renders takes the next call whole (not
    half of the next two: partners of the turn's batch first), then the calls alternate; the
    rest of a call is filled from other batches in fair order."""
    big = add_batch(records, "big", 12)
    assert call(records, "big-0") == big[:4]
    small = add_batch(records, "small", 4)  # arrives while that call renders
    assert call(records, "big-0") == small
    other = add_batch(records, "other", 2)
    assert call(records, "big-0") == big[4:8]
    assert call(records, "big-0") == [*other, *big[8:10]]  # the rest filled in fair order


def test_a_call_takes_its_batch_s_jobs_of_lower_priority_only_after_others(records):
    own = add_batch(records, "a", 3)
    other = add_batch(records, "b", 2)
    low = add_batch(records, "a", 1, priority=1, first=3)
    assert call(records, "a-0") == [*own, other[0]]
    assert call(records, "a-0") == [other[1], *low]  # a lower priority fills what is left


def test_model_affinity_looks_at_its_queues_best_priority_first(records):
    """A worker's affinity claim takes the first queue's head: the queues of its loaded models
    are ordered by the priority of what waits there (worker/service.py)."""
    for batch_id, queue, priority in (("a", "q.a", 5), ("b", "q.b", 8), ("c", "q.c", 5)):
        request = JobRequest(prompt="x", model="tiny", seed=1, priority=priority)
        records.add_jobs(batch_id, [(f"{batch_id}-0", request)], queues=[queue])
    assert records.by_priority(["q.a", "q.none", "q.c", "q.b"]) == ["q.b", "q.a", "q.c"]
    assert records.claim_more(records.by_priority(["q.a", "q.b"]), "w", 30, 3, n=1) == ["b-0"]


def test_batches_of_one_turn_are_served_in_order_of_arrival(records):
    """Single-job batches submitted one after another while the queue's clock stands still all
    take its turn: among them, first come, first served (job ids sort the other way round, so
    the zset's tie-break by member cannot pass this by luck)."""
    first = add_batch(records, "b-first", 1)
    busy = take(records, 1, first[0])
    assert busy == first
    later = [add_batch(records, f"{name}-single", 1)[0] for name in ("z", "y", "x", "w")]
    assert take(records, 4, later[0]) == later
    assert records.redis.hget(keys.fair_clock(QUEUE), "4") in (None, b"0")  # one turn, all


def test_pause_holds_queued_jobs_and_resume_sends_them_again(records):
    paused = add_batch(records, "p", 3)
    other = add_batch(records, "o", 1)
    assert records.pause("p") == 3
    assert records.batch("p").paused
    # The paused jobs stay queued (counted, in the pending set) but no turn takes them.
    assert {r.state for r in records.jobs(paused)} == {JobState.queued}
    assert records.redis.zcard(keys.pending(QUEUE)) == 4
    assert take(records, 1, "p-0") == other  # a paused job's message serves another
    held = records.claim_turn("p-1", "w", 30, 3)  # a paused job's own message
    assert held.status == "paused" and records.job("p-1").state is JobState.queued
    assert records.claim_more([QUEUE], "w", 30, 3, n=10) == []
    assert records.best_priority([QUEUE]) == -1
    records.redis.delete(keys.OUTBOX)
    assert records.resume("p") == paused
    assert not records.batch("p").paused
    assert set(records.unsent(older_than=-1)) == set(paused)  # in the outbox until sent
    assert take(records, 3, "o-0") == paused


def test_cancel_of_a_paused_batch_and_requeues_stay_held(records):
    ids = add_batch(records, "c", 3)
    records.claim_turn(ids[0], "w", 30, 3)
    records.retry(ids[0])  # not failed: nothing happens
    records.pause("c")
    assert records.update(ids[0], "w", JobState.failed)[0] == "ok"
    assert records.retry(ids[0])  # queued again, but held with its batch
    assert records.claim_more([QUEUE], "w", 30, 3, n=10) == []
    for job_id in ids:
        assert records.cancel(job_id) == "cancelled"
    assert records.batch("c").counts == {JobState.cancelled: 3}
    assert records.redis.zcard(keys.pending(QUEUE)) == 0
    assert records.redis.zcard(keys.fair(QUEUE)) == 0
    assert records.resume("c") == []


# -- with a real worker ----------------------------------------------------------------------
SMALL = {"model": "tiny", "width": 64, "height": 64, "steps": 2, "scheduler": "euler"}


def started_order(ff, job_ids: list[str]) -> list[tuple[float, str]]:
    """(time started, id) of the jobs, in that order; not started yet: last."""
    return sorted((r.timestamps.get("started", float("inf")), r.id)
                  for r in ff.client.records.jobs(job_ids))


def queue_drained(ff, queue: str) -> bool:
    """No message of the queue waits in Redis or is held unacked by the worker."""
    redis = ff.client.redis
    return (sum(redis.llen(key) for key in priority_lists(queue)) == 0
            and redis.hlen("unacked") == 0)


def test_fair_share_and_pause_through_a_worker_restart(make_fault_farm):
    ff = make_fault_farm(workers=1)
    client, records = ff.client, ff.client.records
    queue = f"{ff.settings.queue}.tiny"

    # 1. Fair share: a 4-job batch submitted while the one worker renders its first pipeline
    # call of a 40-job batch (held there) takes the next call whole: no job of the big batch
    # starts between the small batch's submit and its last job's start (before pipeline calls
    # were turns of one batch, the small batch got half of each of the next two calls: 3 big
    # jobs started in that window; FIFO: all 36 left).
    hold = ff.hold_step("big", 1)
    big = client.submit_batch([{**SMALL, "prompt": "big", "seed": k} for k in range(40)])
    ff.wait_held()
    small = client.submit_batch([{**SMALL, "prompt": "small", "seed": k} for k in range(4)])
    submitted = small.status().created_at
    ff.release(hold)
    small.wait(120)
    last_small = max(t for t, _ in started_order(ff, small.job_ids))
    big_started = started_order(ff, big.job_ids)
    in_window = [i for t, i in big_started if submitted < t <= last_small]
    assert in_window == [], started_order(ff, big.job_ids + small.job_ids)
    assert sum(1 for t, _ in big_started if t < submitted) >= 1  # the call held meanwhile
    big.cancel()  # the rest of it shows nothing more (and costs the suite minutes)

    # 2. Pause: the running job finishes, the queued ones stay queued through a restart of the
    # worker and its deliveries of their messages; resumed, each renders exactly once.
    first = ff.hold_step("paused 0", 1)
    paused = client.submit_batch([{**SMALL, "prompt": "paused 0"}] + [
        {**SMALL, "steps": 3, "prompt": f"paused {k}"} for k in (1, 2)])  # no partners of 0
    assert ff.wait_held()[1] == paused.job_ids[0]
    assert paused.pause() == 2
    ff.release(first)
    ff.wait_state(paused.job_ids[0], {JobState.succeeded}, timeout=120)
    ff.kill(0, 15).wait(60)  # SIGTERM: warm shutdown
    ff.restart(0)
    after = client.submit({**SMALL, "prompt": "after the restart"})
    ff.wait_state(after.id, {JobState.succeeded})
    wait_for(lambda: queue_drained(ff, queue), 60, "the worker took every message")
    for record in records.jobs(paused.job_ids[1:]):
        assert record.state is JobState.queued and record.attempts == 0, record
    assert "its batch is paused" in ff.log(0)
    assert set(paused.resume()) == set(paused.job_ids[1:])
    paused.wait(60)
    for record in paused.records():
        assert record.state is JobState.succeeded and record.attempts == 1, record
        assert ff.objects(record) == ff.expected_objects(record)
