"""Fair share under attack: the record scripts' answers to a retry, to a resume of a batch that
is not paused, and pause, resume and prune of big batches a chunk at a time (a real
redis-server of this module's own; no worker: the order in which turns take jobs is the
scripts' alone)."""

from __future__ import annotations

import pytest
from redis import Redis

from renderfarm import keys
from renderfarm.errors import JobNotFound
from renderfarm.records import Records
from renderfarm.schema import JobState
from tests.fair_fixtures import add_batch, take

QUEUE = "renderfarm"  # Records.add_jobs' default queue


@pytest.fixture(scope="module")
def own_redis_url(tmp_path_factory):
    """A redis-server of this module's own: the script calls counted (INFO commandstats) are
    the server's, and the session's is shared with workers running scripts of their own."""
    from renderfarm.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("fair-attacks-redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def records(own_redis_url) -> Records:
    redis = Redis.from_url(own_redis_url)
    redis.flushdb()
    return Records(redis)


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


def script_calls(records: Records) -> int:
    stats = records.redis.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


def test_a_big_batch_is_paused_a_chunk_at_a_time(records):
    """Pausing a batch is one script per PAUSE_CHUNK of its jobs, not one over all of them (a
    100,000-job batch held Redis 1.4 s in one script; past ~5 s every other client, workers
    renewing leases among them, is answered BUSY). A pause whose caller died after its first
    chunk already holds every job: claims skip the ones still in the fair set."""
    from renderfarm.records import PAUSE_CHUNK

    n = 2 * PAUSE_CHUNK + 3
    ids = add_batch(records, "big", n)
    other = add_batch(records, "other", 2)
    with pytest.raises(JobNotFound):  # loads the script: its first call is not counted twice
        records.pause("none")
    before = script_calls(records)
    assert records.pause("big") == n
    assert script_calls(records) - before == 3
    assert records.redis.zcard(keys.fair(QUEUE)) == 2
    assert records.resume("big") == ids
    # the pause's first chunk only (its caller died): the rest is still in the fair set
    records._pause(keys=[keys.batch("big"), keys.batch_jobs("big")], args=[0, PAUSE_CHUNK])
    assert records.claim_more([QUEUE], "w", 30, 3, n=n) == other
    assert records.claim_turn(ids[-1], "w", 30, 3).status == "paused"


def resume_chunk(records: Records, batch_id: str, offset: int, token: str):
    """One call of the resume script, as Records.resume makes them."""
    from renderfarm.records import RESUME_CHUNK

    return records._resume(keys=[keys.batch(batch_id), keys.batch_jobs(batch_id)],
                           args=[offset, RESUME_CHUNK, token])


def test_a_big_batch_is_resumed_a_chunk_at_a_time_and_nothing_is_stranded(records):
    """Resuming is one script per RESUME_CHUNK of the batch's jobs (a 100,000-job batch held
    Redis 6 s in one script: every other client was answered BUSY). The batch stays paused
    until the last chunk: a resume whose caller died part-way has put its first jobs back in
    line, the rest wait, and the next resume does it all; a job queued again while a resume is
    under way (a retry of one its chunks passed) is in line when it ends; a pause during a
    resume holds every job again."""
    from renderfarm.records import RESUME_CHUNK

    n = 2 * RESUME_CHUNK + 3
    ids = add_batch(records, "big", n)
    assert take(records, 1, ids[0]) == [ids[0]] and records.fail(ids[0], "w", "boom") == "ok"
    records.pause("big")
    records.sent(ids)
    with pytest.raises(JobNotFound):  # loads the script: its first call is not counted twice
        records.resume("none")
    # a resume whose caller died after its first chunk: still paused, its first jobs in line
    resume_chunk(records, "big", 0, "dead")
    assert records.batch("big").paused
    assert fair_ids(records) == set(ids[1:RESUME_CHUNK])
    assert records.claim_turn(ids[-1], "w", 30, 3).job_id == ids[1]
    assert records.claim_turn(ids[-1], "w", 30, 3).job_id == ids[2]
    before = script_calls(records)
    assert records.resume("big") == ids[3:]
    assert script_calls(records) - before == 3
    assert not records.batch("big").paused and fair_ids(records) == set(ids[3:])
    # a retry during a resume, of a job its chunks have passed already
    records.pause("big")
    assert not fair_ids(records)
    resume_chunk(records, "big", 0, "live")
    assert records.retry(ids[0])
    assert ids[0] in fair_ids(records)  # back in line with the chunk it belongs to
    resume_chunk(records, "big", RESUME_CHUNK, "live")
    # a pause comes in: everything is held again, the resume's last chunk does nothing
    records.pause("big")
    resume_chunk(records, "big", 2 * RESUME_CHUNK, "live")
    assert records.batch("big").paused and not fair_ids(records)
    assert records.claim_more([QUEUE], "w", 30, 3, n=5) == []
    assert records.resume("big") == [ids[0], *ids[3:]]
    assert fair_ids(records) == {ids[0], *ids[3:]}


def fair_ids(records: Records) -> set[str]:
    return {i.decode() for i in records.redis.zrange(keys.fair(QUEUE), 0, -1)}


def test_a_big_batch_is_pruned_a_chunk_at_a_time(records):
    """Pruning a batch deletes PRUNE_CHUNK of its jobs per script call (one script deleted a
    100,000-job batch in 3.3 s: past 5 s Redis answers every other client BUSY). A prune whose
    caller died after its first chunk has marked the batch: no retry or extension of it is
    taken (its check, every job ended, holds to the end), and the next prune finishes it."""
    from redis.exceptions import ResponseError

    from renderfarm.records import PRUNE_CHUNK

    n = 2 * PRUNE_CHUNK + 3
    ids = add_batch(records, "old", n)
    for job_id in ids:
        records.cancel(job_id)
    assert records.state_counts()[JobState.cancelled] == n
    # the first chunk only (its caller died)
    records._prune(keys=[keys.batch("old"), keys.batch_jobs("old"), keys.BATCHES, keys.JOBS],
                   args=["old", records.clock(), PRUNE_CHUNK])
    assert records.state_counts()[JobState.cancelled] == 0
    assert not records.retry(ids[0])
    with pytest.raises(ResponseError, match="being pruned"):
        add_batch(records, "old", 1)
    before = script_calls(records)
    assert records.prune(0).jobs == n - PRUNE_CHUNK
    assert script_calls(records) - before == 2
    assert not records.redis.keys("rf:job:*") and not records.redis.exists(keys.batch("old"))
    assert records.count_batches() == 0 and records.count_jobs() == 0
