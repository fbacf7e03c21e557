"""Issue 11, items 2 and 5-7 against real worker processes: S3 stopped and restarted under
the workers, a worker whose clock is an hour ahead, jobs left queued with no message.

Item 2's outage is moto's server, stopped and started again on the same port (its state lives
in this process, so the bucket survives), not a mock.
"""

from __future__ import annotations

import pytest

from renderfarm.embedded import free_port
from renderfarm.schema import JobRequest, JobState
from tests.fault_fixtures import wait_for

pytest_plugins = ["tests.fault_fixtures"]

SMALL = {"model": "tiny", "width": 64, "height": 64, "steps": 3, "scheduler": "euler"}


class RestartableS3:
    """moto's S3 server on a fixed port that a test can stop and start again."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def s3():
    server = RestartableS3()
    server.start()
    yield server
    server.stop()


def test_s3_outage_is_waited_out_and_a_cancel_before_storing_wins(make_fault_farm, s3):
    ff = make_fault_farm(workers=1, s3_endpoint=s3.endpoint, store_retry_seconds=300)
    objects = ff.client.storage

    # 2. S3 down while a job stores: it waits, leased and shown retrying, and succeeds after.
    s3.stop()
    job = ff.client.submit({**SMALL, "prompt": "through an outage"})
    retrying = wait_for(lambda: (r := job.status()).retrying and r, 60, "job retrying")
    assert retrying.state is JobState.uploading and "EndpointConnectionError" in retrying.retrying
    assert ff.client.redis.zscore("rf:running", job.id), "the job is no longer leased"
    s3.start()
    record = job.wait(timeout=90)
    assert record.state is JobState.succeeded, record.error
    assert record.attempts == 1 and record.retrying is None
    assert ff.objects(record) == ff.expected_objects(record)

    # 7. Cancelled while retrying its first object: cancelled, and nothing in storage.
    s3.stop()
    doomed = ff.client.submit({**SMALL, "prompt": "cancelled while S3 is down"})
    wait_for(lambda: doomed.status().retrying, 60, "second job retrying")
    assert doomed.cancel() == "cancelling"
    ended = doomed.wait(timeout=60)
    s3.start()
    assert ended.state is JobState.cancelled, (ended.state, ended.error)
    assert objects.list(f"{ended.batch_id}/") == []
    after = ff.client.submit({**SMALL, "prompt": "after the outages"}).wait(timeout=60)
    assert after.state is JobState.succeeded, after.error
    assert ff.farm.workers[0].poll() is None


def test_skewed_worker_clock_reaps_no_live_job_and_unsent_jobs_are_sent(make_fault_farm):
    # A worker whose clock is an hour ahead, beside a job another (live) worker holds.
    ff = make_fault_farm(workers=1, env={"RENDERFARM_CLOCK_SKEW": "3600"}, start=False,
                         lease_seconds=2, resend_after=1)
    records = ff.client.records
    queue = f"{ff.settings.queue}.tiny"
    request = JobRequest(prompt="held by a live worker", seed=1, **SMALL)
    records.add_jobs("held", [("held", request)], queues=[queue])
    records.sent(["held"])
    assert records.claim("held", "live:1:x", 600, 3).ok  # a lease of 10 minutes, on Redis' clock

    # 5. A job the reaper re-queued before dying (no message), and one whose submitter died
    # between recording it and sending its message.
    records.add_jobs("lost", [("reaped", request.model_copy(update={"prompt": "reaped"})),
                              ("unsent", request.model_copy(update={"prompt": "unsent"}))],
                     queues=[queue, queue])
    records.sent(["reaped"])
    assert records.claim("reaped", "dead:1:x", 0.01, 3).ok
    while records.reap("reaped", 3) != "requeued":  # the dead worker's 10 ms lease ends
        pass

    ff.start()
    for job_id in ("reaped", "unsent"):
        record = ff.wait_state(job_id, {JobState.succeeded, JobState.failed}, timeout=90)
        assert record.state is JobState.succeeded, record.error
    # The skewed worker's reaper has run many times by now (every second): the live job is
    # untouched, and the skewed worker's heartbeat reads as current.
    held = records.job("held")
    assert held.state is JobState.started and held.worker == "live:1:x" and held.attempts == 1
    worker = ff.client.redis.zrange("rf:workers", 0, -1, withscores=True)[0]
    assert abs(worker[1] - records.clock()) < 60, worker
    assert "queued with no message sent" in ff.log(0)
