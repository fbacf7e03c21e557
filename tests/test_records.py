"""The record scripts against a real Redis: claims, leases, reaping, poison jobs, cancel."""

from __future__ import annotations

import time

import pytest
from redis import Redis

from renderfarm import keys
from renderfarm.records import Records
from renderfarm.schema import JobRequest, JobState
from tests.fault_fixtures import wait_for


@pytest.fixture
def records(module_redis_url) -> Records:
    """A database of its own: the session farm's workers reap expired leases in database 0."""
    redis = Redis.from_url(module_redis_url)
    redis.flushdb()
    return Records(redis)


def add(records: Records, job_id: str, batch_id: str = "b1") -> None:
    request = JobRequest(prompt="x", model="tiny", seed=1)
    records.redis.delete(keys.job(job_id), keys.batch(batch_id), keys.batch_jobs(batch_id))
    records.add_jobs(batch_id, [(job_id, request)])


def lease_ended(records: Records, job_id: str) -> None:
    """Wait until Redis' clock (the one of leases) has passed the job's lease."""
    wait_for(lambda: job_id in records.expired_leases(), 5, f"{job_id}'s lease to end", 0.01)


def counts(records: Records, batch_id: str = "b1") -> dict:
    return {s.value: n for s, n in records.batch(batch_id).counts.items()}


def test_claim_then_second_delivery_is_dropped(records):
    add(records, "j1")
    assert records.claim("j1", "w1", 30, 3).ok
    again = records.claim("j1", "w2", 30, 3)
    assert (again.status, again.detail) == ("busy", "w1")
    assert records.job("j1").attempts == 1
    assert counts(records) == {"started": 1}


def test_only_the_lease_owner_moves_the_job(records):
    add(records, "j2")
    records.claim("j2", "w1", 30, 3)
    assert records.update("j2", "w2", JobState.rendering, step=1)[0] == "lost"
    assert records.update("j2", "w1", JobState.rendering, step=1) == ("ok", False)
    assert records.succeed("j2", "w1", []) == "ok"
    assert records.claim("j2", "w3", 30, 3).status == "terminal"
    assert records.update("j2", "w1", JobState.failed)[0] == "terminal"
    record = records.job("j2")
    assert record.state is JobState.succeeded
    assert counts(records) == {"succeeded": 1}
    assert records.redis.zscore(keys.RUNNING, "j2") is None


def test_expired_lease_is_reaped_and_reclaimed(records):
    add(records, "j3")
    records.claim("j3", "dead-worker", 0.2, 3)
    assert records.reap("j3", 3) == ""  # lease still live
    lease_ended(records, "j3")
    assert records.reap("j3", 3) == "requeued"
    assert records.reap("j3", 3) == ""  # a second reaper does nothing
    assert records.job("j3").state is JobState.queued
    assert records.claim("j3", "w2", 30, 3).detail == "2"
    assert records.update("j3", "dead-worker", JobState.uploading)[0] == "lost"


def test_poison_job_fails_after_max_attempts(records):
    add(records, "j4")
    for _ in range(3):
        assert records.claim("j4", "w", 0.05, 3).ok
        lease_ended(records, "j4")
        outcome = records.reap("j4", 3)
    assert outcome == "failed"
    record = records.job("j4")
    assert record.state is JobState.failed
    assert "gave up after 3 attempts" in record.error
    assert counts(records) == {"failed": 1}


def test_claim_counts_attempts_past_the_limit(records):
    add(records, "j5")
    for _ in range(2):
        assert records.claim("j5", "w", 0.01, 2).ok
        lease_ended(records, "j5")
    claim = records.claim("j5", "w", 0.01, 2)
    assert claim.status == "poison"
    assert records.job("j5").state is JobState.failed


def test_cancel_queued_and_running(records):
    add(records, "j6")
    assert records.cancel("j6") == "cancelled"
    assert records.claim("j6", "w", 30, 3).status == "terminal"
    add(records, "j7", "b2")
    records.claim("j7", "w", 30, 3)
    assert records.cancel("j7") == "cancelling"
    assert records.renew("j7", "w", 30) == "cancel"
    assert records.update("j7", "w", JobState.cancelled)[0] == "ok"
    assert counts(records, "b2") == {"cancelled": 1}


def test_retry_puts_a_failed_job_back(records):
    add(records, "j8")
    records.claim("j8", "w", 30, 3)
    records.fail("j8", "w", "boom")
    assert records.retry("j8")
    record = records.job("j8")
    assert (record.state, record.attempts, record.error) == (JobState.queued, 0, None)
    assert not records.retry("j8")


def test_abandon_fails_only_queued_jobs(records):
    add(records, "j9")
    add(records, "j10", "b3")
    records.claim("j10", "w", 30, 3)
    assert records.abandon(["j9", "j10"], "not enqueued: boom") == 1
    assert records.job("j9").state is JobState.failed
    assert records.job("j9").error == "not enqueued: boom"
    assert records.job("j10").state is JobState.started


def test_prune_removes_old_ended_batches_and_nothing_else(records):
    from renderfarm.errors import JobNotFound

    def batch(batch_id: str, job_ids: list[str], age: float, end: bool) -> None:
        records.add_jobs(batch_id, [(j, JobRequest(prompt=j, model="tiny", seed=1,
                                                   idempotency_key=f"key-{j}")) for j in job_ids])
        for j in job_ids:
            records.redis.set(keys.idempotency(f"key-{j}"), j)
            if end:
                records.claim(j, "w1", 30, 3)
                records.fail(j, "w1", "boom") if j.endswith("f") else records.succeed(j, "w1", [])
        t = time.time() - age
        records.redis.hset(keys.batch(batch_id), "created_at", t)
        records.redis.zadd(keys.BATCHES, {batch_id: t})

    batch("old", ["o1", "o2f"], age=7200, end=True)
    batch("old-running", ["r1"], age=7200, end=False)  # still queued: kept whatever its age
    batch("new", ["n1"], age=60, end=True)

    dry = records.prune(3600, dry_run=True)
    assert (dry.batches, dry.jobs, dry.kept_running) == (1, 2, 1)
    assert records.count_jobs() == 4 and records.exists("o1")

    done = records.prune(3600)
    assert (done.batches, done.jobs, done.kept_running) == (1, 2, 1)
    assert not records.exists("o1") and not records.exists("o2f")
    with pytest.raises(JobNotFound):
        records.batch("old")
    assert records.redis.exists(keys.batch_jobs("old"), keys.idempotency("key-o1")) == 0
    assert sorted(b.id for b in records.batches()) == ["new", "old-running"]
    assert records.count_jobs() == 2 and records.job("r1").state is JobState.queued
    assert records.redis.get(keys.idempotency("key-n1")) == b"n1"
    assert records.prune(3600) == type(done)(0, 0, 1)  # nothing more to do


def test_prune_limit_deletes_that_many_batches_a_pass(records):
    for batch_id in ("a", "b", "c"):
        records.add_jobs(batch_id, [(f"{batch_id}1", JobRequest(prompt="x", model="tiny", seed=1))])
        records.cancel(f"{batch_id}1")
        records.redis.zadd(keys.BATCHES, {batch_id: time.time() - 100})
        records.redis.hset(keys.batch(batch_id), "created_at", time.time() - 100)
    assert records.prune(10, limit=2).batches == 2
    assert records.count_jobs() == 1
    assert records.prune(10, limit=2).batches == 1 and records.count_jobs() == 0


def test_update_many_answers_for_each_job(records):
    for job_id in ("m1", "m2", "m3"):
        records.add_jobs("bm", [(job_id, JobRequest(prompt="x", model="tiny", seed=1))])
    records.claim("m1", "w1", 30, 3)
    records.claim("m2", "w2", 30, 3)  # someone else's
    records.claim("m3", "w1", 30, 3)
    records.cancel("m3")  # running: flagged, not moved
    answers = records.update_many(["m1", "m2", "m3", "nope"], "w1", JobState.rendering, step=2)
    assert answers == [("ok", False), ("lost", False), ("ok", True), ("missing", False)]
    assert records.job("m1").step == 2 and records.job("m2").step == 0


def test_farm_wide_state_counts_never_drift(records):
    """rf:counts (GET /metrics' jobs by state) against the job records themselves, after every
    kind of transition: retry, cancel, reap, give back, abandon, claim_more, extension, prune."""
    def truth() -> dict[JobState, int]:
        out = dict.fromkeys(JobState, 0)
        for key in records.redis.scan_iter("rf:job:*"):
            out[JobState(records.redis.hget(key, "state").decode())] += 1
        return out

    def request(prompt: str) -> JobRequest:
        return JobRequest(prompt=prompt, model="tiny", seed=1)

    records.add_jobs("d1", [(f"d1-{n}", request(str(n))) for n in range(6)])
    assert records.state_counts() == truth()  # built from the batches' counters at first
    steps = [
        lambda: records.add_jobs("d1", [("d1-6", request("6"))]),  # the batch extended
        lambda: records.claim("d1-0", "w", 30, 3),
        lambda: records.succeed("d1-0", "w", []),
        lambda: records.claim("d1-1", "w", 30, 3),
        lambda: records.fail("d1-1", "w", "boom"),
        lambda: records.retry("d1-1"),
        lambda: records.cancel("d1-2"),
        lambda: records.retry("d1-2"),
        lambda: records.cancel("d1-2"),
        lambda: records.claim("d1-3", "w", 30, 3),
        lambda: records.update("d1-3", "w", JobState.rendering, step=1),
        lambda: records.cancel("d1-3"),  # running: flagged, then ended by its worker
        lambda: records.update("d1-3", "w", JobState.cancelled),
        lambda: records.claim("d1-4", "lost-worker", -1, 3),  # a lease already run out
        lambda: records.reap("d1-4", 3),
        lambda: records.claim("d1-5", "w", 30, 3),
        lambda: records.give_back("d1-5", "w"),
        lambda: records.claim_more(["renderfarm"], "w2", 30, 3, 2),
        lambda: records.add_jobs("d2", [("d2-0", request("x")), ("d2-1", request("y"))]),
        lambda: records.abandon(["d2-0", "d2-1"], "not sent"),
    ]
    for step in steps:
        step()
        assert records.state_counts() == truth()
    old = time.time() - 7200
    records.redis.hset(keys.batch("d2"), "created_at", old)
    records.redis.zadd(keys.BATCHES, {"d2": old})
    assert records.prune(3600).batches == 1
    assert records.state_counts() == truth()
    assert sum(records.state_counts().values()) == 7
    records.redis.delete(keys.COUNTS)  # lost (a restored Redis): rebuilt from the batches
    assert records.state_counts() == truth()


def test_adopt_puts_pre_fair_share_jobs_in_the_fair_set_in_chunks(records, monkeypatch):
    """Jobs queued before fair share existed (in the pending set, not the fair set) join the
    fair set when a worker starts; a paused batch's and an ended job do not; chunked calls find
    them all; a second pass adopts none."""
    monkeypatch.setattr("renderfarm.records.ADOPT_CHUNK", 4)  # 7 pending: 4 + 3
    for n in range(5):
        add(records, f"old{n}", "b-old")
    add(records, "held", "b-held")
    add(records, "ended", "b-ended")
    queue = records.job("old0").queue
    pending, fair = keys.pending(queue), keys.fair(queue)
    assert records.pause("b-held") == 1
    assert records.cancel("ended") == "cancelled"
    for n in range(5):  # as a record written before fair share: pending only
        records.redis.zrem(fair, f"old{n}")
        records.redis.hdel(keys.job(f"old{n}"), "fair")
    records.redis.zadd(pending, {"ended": 0})  # a stale pending entry of an ended job
    assert records.adopt([queue]) == 5
    assert {m.decode() for m in records.redis.zrange(fair, 0, -1)} == {f"old{n}" for n in range(5)}
    assert records.adopt([queue]) == 0
