"""Pause/resume and fair share (issue 13, section 3).

The record scripts first, against a Redis database of the module's own (no worker): the order
in which turns take jobs, pause, resume and cancel. Then one farm of one real worker with test
holds (worker/testhooks.py): the order in which it starts two batches submitted while it is
held, and a paused batch through a worker restart. Orders come from the records' timestamps
(Redis' clock, one clock), never from timing.
"""

from __future__ import annotations

import pytest
from redis import Redis

from producer.enqueue import priority_lists
from renderfarm import keys
from renderfarm.records import Records
from renderfarm.schema import JobRequest, JobState
from tests.fault_fixtures import wait_for

pytest_plugins = ["tests.fault_fixtures"]

QUEUE = "renderfarm"  # Records.add_jobs' default queue


@pytest.fixture
def records(module_redis_url) -> Records:
    redis = Redis.from_url(module_redis_url)
    redis.flushdb()
    return Records(redis)


def add_batch(records: Records, batch_id: str, n: int, priority: int = 5) -> list[str]:
    ids = [f"{batch_id}-{k}" for k in range(n)]
    request = JobRequest(prompt="x", model="tiny", seed=1, priority=priority)
    records.add_jobs(batch_id, [(i, request) for i in ids])
    return ids


def take(records: Records, n: int, via: str) -> list[str]:
    """Run n deliveries of job ``via``'s message (each a turn of its queue, as a worker's) and
    return the jobs they took."""
    out = []
    for _ in range(n):
        claim = records.claim_turn(via, "w", 30, 3)
        assert claim.ok, claim
        out.append(claim.job_id)
    return out


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

    # 1. Fair share: a 40-job batch and a 4-job batch submitted while the one worker is held;
    # the small batch's jobs all start before the big batch's 12th (FIFO: after its 40th).
    blocker = ff.hold_step("blocker", 1)
    client.submit({**SMALL, "prompt": "blocker"})
    ff.wait_held()
    big = client.submit_batch([{**SMALL, "prompt": f"big {k}"} for k in range(40)])
    small = client.submit_batch([{**SMALL, "prompt": f"small {k}"} for k in range(4)])
    ff.release(blocker)
    small.wait(120)
    last_small = max(t for t, _ in started_order(ff, small.job_ids))
    big_before = [i for t, i in started_order(ff, big.job_ids) if t < last_small]
    assert len(big_before) < 11, (len(big_before), started_order(ff, big.job_ids + small.job_ids))
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
