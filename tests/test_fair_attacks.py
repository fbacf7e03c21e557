"""Fair share under attack: the record scripts' answers to a retry and to a resume of a batch
that is not paused (real Redis, a database of this module's own; no worker: the order in which
turns take jobs is the scripts' alone)."""

from __future__ import annotations

import pytest
from redis import Redis

from renderfarm import keys
from renderfarm.records import Records
from renderfarm.schema import JobRequest

QUEUE = "renderfarm"  # Records.add_jobs' default queue


@pytest.fixture
def records(module_redis_url) -> Records:
    redis = Redis.from_url(module_redis_url)
    redis.flushdb()
    return Records(redis)


def add_batch(records: Records, batch_id: str, n: int) -> list[str]:
    ids = [f"{batch_id}-{k}" for k in range(n)]
    request = JobRequest(prompt="x", model="tiny", seed=1)
    records.add_jobs(batch_id, [(i, request) for i in ids], compat=["c"] * n)
    return ids


def take(records: Records, n: int, via: str) -> list[str]:
    out = []
    for _ in range(n):
        claim = records.claim_turn(via, "w", 30, 3)
        assert claim.ok, claim
        out.append(claim.job_id)
    return out


def test_a_retried_batch_takes_turns_with_the_batches_waiting(records):
    """Retried jobs rejoin at their batch's next turn, as a resume does: not at the turns they
    had when first submitted (long past), which put a whole retried batch ahead of every batch
    that waited meanwhile."""
    failed = add_batch(records, "a", 4)
    assert take(records, 4, failed[0]) == failed
    for job_id in failed:
        assert records.fail(job_id, "w", "boom") == "ok"
    waiting = add_batch(records, "b", 4)
    assert all(records.retry(job_id) for job_id in failed)
    order = take(records, 8, waiting[0])
    for k in range(1, 9):  # one job of each batch a turn: neither gets two turns ahead
        firsts = [i[0] for i in order[:k]]
        assert abs(firsts.count("a") - firsts.count("b")) <= 2, order
    assert [i for i in order if i.startswith("a-")] == failed  # a batch keeps its own order


def test_a_second_resume_sends_nothing_again(records):
    """Resume twice (a double click), or resume a batch never paused: nothing to do. It used to
    re-place every queued job of the batch and put each in the outbox again: one spare Celery
    message per queued job, each time."""
    queued = add_batch(records, "p", 3)
    records.sent(queued)
    assert records.resume("p") == []  # never paused
    records.pause("p")
    assert records.resume("p") == queued
    records.sent(queued)
    places = records.redis.zrange(keys.fair(QUEUE), 0, -1, withscores=True)
    assert records.resume("p") == []
    assert records.redis.zrange(keys.fair(QUEUE), 0, -1, withscores=True) == places
    assert records.redis.zcard(keys.OUTBOX) == 0
