"""Faults the farm must survive, each against real processes: a redis-server, Celery worker
processes rendering the tiny model, and an S3 endpoint (moto's server). Every farm here is its
own (tests/fault_fixtures.py), so killing and restarting things leaves the session farm alone.

The promise checked throughout: every accepted job ends succeeded, failed with a reason, or
cancelled — with exactly one set of objects in storage when it succeeded.

A test acts while a job is provably at a point — stopped at a test hold (worker/testhooks.py:
``ff.hold_step`` / ``ff.hold_upload``, then ``ff.wait_held``) — never after a sleep, so neither a
faster nor a slower machine makes it miss its window.

This file holds worker deaths and redeliveries; outages (Redis, S3, broken weights) are in
test_outages.py, cancels and warm shutdowns in test_stops.py: three files that pytest-xdist
(``--dist loadfile``) can run side by side.
"""

from __future__ import annotations

from producer.enqueue import publish
from renderfarm.schema import JobState
from tests.fault_fixtures import SMALL, wait_for

pytest_plugins = ["tests.fault_fixtures"]


def test_sigkill_mid_render_runs_again_once(make_fault_farm):
    ff = make_fault_farm(workers=1)
    hold = ff.hold_step("killed once", 2)
    job = ff.client.submit({**SMALL, "prompt": "killed once"})
    assert ff.wait_held() == ("step", job.id, 2)
    first = job.status()
    assert first.state is JobState.rendering and first.step == 2
    victim = ff.index_of(ff.pid_of(first))
    ff.kill(victim).wait()
    ff.release(hold)
    ff.restart(victim, wait=False)

    record = job.wait(timeout=90)
    assert record.state is JobState.succeeded, record.error
    assert record.attempts == 2
    assert record.worker != first.worker
    assert ff.objects(record) == ff.expected_objects(record)
    assert "its worker was lost; re-queued" in ff.logs()


def test_sigkill_mid_micro_batch_runs_each_of_its_jobs_again_once(make_fault_farm):
    """Three compatible jobs share one pipeline call (the worker claims the other two as
    partners); the worker is killed mid-call. Each job comes back and runs once more, alone."""
    ff = make_fault_farm(workers=1)
    hold = ff.hold_step("batched", 2)
    batch = ff.client.submit_batch([{**SMALL, "prompt": "batched", "seed": i}
                                    for i in range(3)])
    ids = [r.id for r in batch.records()]

    ff.wait_held()
    together = ff.client.records.jobs(ids)
    assert all(r.state is JobState.rendering and r.step == 2 for r in together), together
    assert len({r.worker for r in together}) == 1
    ff.kill(0).wait()
    ff.release(hold)
    ff.restart(0, wait=False)

    batch.wait(timeout=180)
    for job_id in ids:
        ff.assert_one_set(job_id)
        assert ff.client.records.job(job_id).attempts == 2  # one claim after the crash, no more


def test_render_longer_than_visibility_timeout_runs_once(make_fault_farm):
    # Past the 2 s visibility timeout, the Redis transport's sweep (run by every worker at
    # start and then periodically; run here by the test, to not wait for it) restores the
    # message of the job being rendered, and the idle worker is handed it: its claim finds the
    # job busy and drops the message.
    # The job is held at a step for as long as the sweep takes to find its message overdue.
    ff = make_fault_farm(workers=2, visibility_timeout=2,
                         env={"RENDERFARM_VISIBILITY_TIMEOUT": "2"})
    hold = ff.hold_step("long", 2)
    job = ff.client.submit({**SMALL, "prompt": "long"})
    ff.wait_held()
    rendering = job.status()
    idle = 1 - ff.index_of(ff.pid_of(rendering))

    def redelivered_and_dropped() -> bool:
        with ff.client.celery.connection_for_write() as connection:
            connection.default_channel.qos.restore_visible(num=100, interval=1)
        return f"job {job.id} not run: busy" in ff.log(idle)

    wait_for(redelivered_and_dropped, 30, "redelivery dropped", poll=0.5)
    ff.release(hold)
    record = job.wait(timeout=120)
    assert record.state is JobState.succeeded, record.error
    assert record.attempts == 1
    assert record.worker == rendering.worker
    assert ff.objects(record) == ff.expected_objects(record)


def test_same_message_twice_at_once(make_fault_farm):
    ff = make_fault_farm(workers=2)
    job = ff.client.submit({**SMALL, "prompt": "twice"})
    publish(ff.client.celery, ff.settings, [(job.id, job.status().request)])

    record = job.wait(timeout=60)
    assert record.state is JobState.succeeded, record.error
    assert record.attempts == 1
    assert ff.objects(record) == ff.expected_objects(record)
    wait_for(lambda: f"job {job.id} not run:" in ff.logs(), 20, "the second delivery dropped")
    assert ff.client.records.batch(record.batch_id).counts == {JobState.succeeded: 1}


def test_poison_job_fails_after_max_attempts_and_others_flow(make_fault_farm):
    # A job that kills whichever worker runs it: the test plays the crash, with SIGKILL.
    # Every attempt of the poison job stops at step 2, where the test kills its worker.
    ff = make_fault_farm(workers=2, max_attempts=3)
    ff.hold_step("poison", 2)
    # other steps than the innocent jobs': never in a micro-batch with them
    poison = ff.client.submit({**SMALL, "prompt": "poison", "steps": 6})
    others = ff.client.submit_batch([{**SMALL, "prompt": f"innocent {i}"} for i in range(3)])
    for attempt in (1, 2, 3):
        assert ff.wait_held() == ("step", poison.id, 2)
        record = poison.status()
        assert record.attempts == attempt
        index = ff.index_of(ff.pid_of(record))
        ff.kill(index).wait()
        ff.restart(index, wait=False)

    record = poison.wait(timeout=150)
    assert record.state is JobState.failed
    assert "gave up after 3 attempts" in record.error
    assert ff.objects(record) == []
    others.wait(timeout=120)
    for other in others.records():
        ff.assert_one_set(other.id)


def test_sigkill_while_the_upload_is_pending_runs_again_once(make_fault_farm):
    """Killed after rendering, before its background upload stored anything: the job comes back
    with its lease and runs once more; one set of objects."""
    ff = make_fault_farm(workers=1)
    hold = ff.hold_upload("killed before its upload")
    job = ff.client.submit({**SMALL, "prompt": "killed before its upload"})
    assert ff.wait_held() == ("upload", job.id, 0)
    held = job.status()
    assert held.state is JobState.uploading and held.attempts == 1
    ff.kill(0).wait()
    assert ff.objects(held) == []
    ff.release(hold)
    ff.restart(0, wait=False)

    record = job.wait(timeout=120)
    assert record.state is JobState.succeeded, record.error
    assert record.attempts == 2
    assert ff.objects(record) == ff.expected_objects(record)
