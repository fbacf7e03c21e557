"""A running job cancelled, a worker told to stop (SIGTERM, Celery's warm shutdown): what was
asked for happens at a known point, nothing is stored twice or left behind.

Every farm here is its own (tests/fault_fixtures.py), so killing and restarting things leaves
the session farm alone; a test acts while a job is provably at a point (a test hold,
worker/testhooks.py), never after a sleep. The fault tests are split over test_faults.py,
test_outages.py and test_stops.py so that pytest-xdist runs them in parallel."""

from __future__ import annotations

import signal

from renderfarm import keys
from renderfarm.schema import JobState
from tests.fault_fixtures import SMALL, wait_for

pytest_plugins = ["tests.fault_fixtures"]


def test_cancel_running_job_writes_nothing_and_worker_goes_on(make_fault_farm):
    # The README: a running job stops at its next denoising step. It is held at step 3 while
    # the cancel is recorded, then let go: it must stop at step 3 or 4 of its 12.
    ff = make_fault_farm(workers=1)
    hold = ff.hold_step("cancelled mid-render", 3)
    running = ff.client.submit({**SMALL, "prompt": "cancelled mid-render", "steps": 12})
    queued = ff.client.submit({**SMALL, "prompt": "cancelled in the queue"})
    after = ff.client.submit({**SMALL, "prompt": "runs after the cancel", "steps": 5})
    assert queued.cancel() == "cancelled"
    assert ff.wait_held() == ("step", running.id, 3)
    assert running.cancel() == "cancelling"
    ff.release(hold)

    record = running.wait(timeout=30)
    assert record.state is JobState.cancelled
    assert 3 <= record.step <= 4, record.step
    assert ff.objects(record) == []
    assert queued.wait(timeout=5).state is JobState.cancelled
    assert queued.status().attempts == 0
    done = after.wait(timeout=60)
    assert done.state is JobState.succeeded, done.error
    assert done.worker == record.worker
    # no lease left behind for a reaper to find and re-queue
    assert ff.client.redis.zscore(keys.RUNNING, running.id) is None
    assert running.status().state is JobState.cancelled
    assert ff.client.storage.list(f"{record.batch_id}/") == []


def test_warm_shutdown_finishes_running_job(make_fault_farm):
    # The job is held mid-render until the worker has begun its warm shutdown.
    ff = make_fault_farm(workers=2)
    hold = ff.hold_step("finishes on SIGTERM", 2)
    running = ff.client.submit({**SMALL, "prompt": "finishes on SIGTERM", "steps": 3})
    ff.wait_held()
    first = running.status()
    behind = ff.client.submit_batch(
        [{**SMALL, "prompt": f"behind {i}", "steps": 4 + i} for i in range(6)])
    stopping = ff.index_of(ff.pid_of(first))
    proc = ff.kill(stopping, signal.SIGTERM)
    wait_for(lambda: "Warm shutdown" in ff.log(stopping), 30, "warm shutdown begun")
    ff.release(hold)

    record = running.wait(timeout=90)
    assert record.state is JobState.succeeded, record.error
    assert record.worker == first.worker, "the job was taken from the stopping worker"
    assert record.attempts == 1
    assert ff.objects(record) == ff.expected_objects(record)
    assert proc.wait(30) == 0
    behind.wait(timeout=90)
    for job in behind.records():
        ff.assert_one_set(job.id)
        assert job.worker != first.worker
