"""Issue 11, item 1: one bad record never takes down a worker, the reaper or a page.

Every way in goes through the schema's validation (a bad batch id is refused at submit); and a
record that is bad however it got there (an older version, a hand edit: written here by hand)
fails alone, with its reason, while the jobs around it run.
"""

from __future__ import annotations

import pytest

from producer.enqueue import publish_records
from renderfarm import keys
from renderfarm.errors import InvalidJob
from renderfarm.schema import JobRequest, JobState, parse_job
from tests.fault_fixtures import wait_for

pytest_plugins = ["tests.fault_fixtures"]

SMALL = {"model": "tiny", "width": 64, "height": 64, "steps": 3, "scheduler": "euler"}
BAD_IDS = ["deep/nested/dir", "../x", "a:jobs", "", "x" * 65]


@pytest.mark.parametrize("batch_id", BAD_IDS)
def test_client_refuses_a_bad_batch_id_and_enqueues_nothing(client, batch_id):
    before = client.records.count_jobs()
    with pytest.raises(InvalidJob) as caught:
        client.submit_batch([{**SMALL, "prompt": "refused"}], batch_id=batch_id)
    [error] = caught.value.errors
    assert error.field == "batch_id" and error.value == batch_id, str(caught.value)
    assert client.records.count_jobs() == before


def _bad(request: JobRequest, batch_id: str) -> JobRequest:
    """The request as an older version wrote it: a batch id the schema refuses."""
    return JobRequest.model_construct(**{**dict(request), "batch_id": batch_id})


def test_bad_records_fail_alone_and_worker_reaper_and_pages_go_on(make_fault_farm):
    ff = make_fault_farm(workers=1)
    records, redis = ff.client.records, ff.client.redis
    good = parse_job({**SMALL, "prompt": "innocent", "seed": 1})
    queue = f"{ff.settings.queue}.tiny"
    compat = f"txt2img:tiny:64x64:3:euler:{float(good.guidance_scale)!r}"

    # A bad job queued where no worker looks: the oldest job waiting, for /queues to show.
    records.add_jobs("stuck", [("bad-stuck", _bad(good, "a:jobs"))],
                     queues=[f"{ff.settings.queue}.ghost"])
    # Two jobs a dead worker held, the bad one's lease ending first: the reaper meets it first.
    records.add_jobs("reaped", [("bad-reaped", _bad(good, "../x")), ("good-reaped", good)],
                     queues=[queue, queue], compat=[compat, compat])
    for n, job_id in enumerate(["bad-reaped", "good-reaped"], start=1):
        redis.hset(keys.job(job_id), mapping={"state": "started", "lease_owner": "ghost:1:x",
                                              "lease_until": n, "attempts": 1})
        redis.zrem(keys.pending(queue), job_id)
    redis.hincrby(keys.batch("reaped"), "n:queued", -2)
    redis.hincrby(keys.batch("reaped"), "n:started", 2)
    # A bad job that shares a pipeline call with innocent partners, first in line.
    records.add_jobs("deep/nested/dir", [("bad-partner", _bad(good.model_copy(
        update={"priority": 9}), "deep/nested/dir"))], queues=[queue], compat=[compat])
    redis.zadd(keys.RUNNING, {"bad-reaped": 1, "good-reaped": 2})

    batch = ff.client.submit_batch([{**SMALL, "prompt": f"innocent {i}"} for i in range(3)])
    publish_records(ff.client.celery, records, ["bad-partner"])

    def state(job_id: str) -> str:
        return (redis.hget(keys.job(job_id), "state") or b"").decode()

    wait_for(lambda: batch.status().finished and state("good-reaped") == "succeeded"
             and state("bad-reaped") in ("failed", "succeeded")
             and state("bad-partner") in ("failed", "succeeded"), 90,
             "the innocent jobs and the bad ones ended")
    for job in batch.records():
        assert job.state is JobState.succeeded and job.attempts == 1, (job.id, job.error)
    for job_id in ("bad-partner", "bad-reaped"):
        assert state(job_id) == "failed"
        error = redis.hget(keys.job(job_id), "error").decode()
        assert "unreadable" in error and "batch_id" in error, error
    assert ff.farm.workers[0].poll() is None, "the worker died"
    assert "lease thread" not in ff.log(0), ff.log(0)

    from dashboard import create_app

    dashboard = create_app({"SETTINGS": ff.settings, "TESTING": True}).test_client()
    answer = dashboard.get("/api/v1/queues")
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.get_json()["oldest_waiting"]["id"] == "bad-stuck"
    assert dashboard.get("/queues").status_code == 200
    answer = dashboard.get("/api/v1/jobs/bad-stuck")
    assert answer.status_code == 500 and "batch_id" in answer.get_data(as_text=True)
    assert dashboard.get(f"/api/v1/batches/{batch.id}").status_code == 200
    assert dashboard.get("/api/v1/batches/reaped").get_json()["jobs"][0]["id"] == "good-reaped"
