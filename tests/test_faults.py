"""Faults the farm must survive, each against real processes: a redis-server, Celery worker
processes rendering the tiny model, and an S3 endpoint (moto's server). Every farm here is its
own (tests/fault_fixtures.py), so killing and restarting things leaves the session farm alone.

The promise checked throughout: every accepted job ends succeeded, failed with a reason, or
cancelled — with exactly one set of objects in storage when it succeeded.

A test acts while a job is provably at a point — stopped at a test hold (worker/testhooks.py:
``ff.hold_step`` / ``ff.hold_upload``, then ``ff.wait_held``) — never after a sleep, so neither a
faster nor a slower machine makes it miss its window.
"""

from __future__ import annotations

import shutil
import signal

import pytest

from producer.enqueue import publish
from renderfarm import keys
from renderfarm.errors import FarmUnavailable
from renderfarm.schema import JobState
from tests.fault_fixtures import BrokenEndpoint, FaultFarm, wait_for

pytest_plugins = ["tests.fault_fixtures"]

SMALL = {"model": "tiny", "width": 64, "height": 64, "steps": 4, "scheduler": "euler"}
SLOW = {**SMALL, "width": 128, "height": 128, "steps": 12}  # held at a step, never timed
RUNNING = {JobState.started, JobState.rendering}
ENDED = {JobState.succeeded, JobState.failed, JobState.cancelled}


def assert_one_set(ff: FaultFarm, job_id: str) -> None:
    record = ff.client.records.job(job_id)
    assert record.state is JobState.succeeded, (record.state, record.error)
    assert ff.objects(record) == ff.expected_objects(record)


def test_sigkill_mid_render_runs_again_once(make_fault_farm):
    ff = make_fault_farm(workers=2)
    hold = ff.hold_step("killed once", 2)
    job = ff.client.submit({**SLOW, "prompt": "killed once"})
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
    batch = ff.client.submit_batch([{**SLOW, "prompt": "batched", "seed": i}
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
        assert_one_set(ff, job_id)
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
    job = ff.client.submit({**SLOW, "prompt": "long"})
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
    job = ff.client.submit({**SMALL, "prompt": "twice", "width": 128, "height": 128,
                            "steps": 20})
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
    poison = ff.client.submit({**SLOW, "prompt": "poison"})
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
        assert_one_set(ff, other.id)


def test_exception_in_pipeline_fails_job_and_worker_serves_on(make_fault_farm, models_dir,
                                                              tmp_path):
    models = tmp_path / "models"
    shutil.copytree(models_dir / "tiny", models / "tiny")
    shutil.copytree(models_dir / "tiny", models / "broken")
    weights = models / "broken" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    ff = make_fault_farm(workers=1, models_dir=models)

    bad = ff.client.submit({**SMALL, "model": "broken", "prompt": "bad weights"}).wait(60)
    assert bad.state is JobState.failed
    assert bad.error and "safetensors" in bad.error.lower(), bad.error
    good = ff.client.submit({**SMALL, "prompt": "after the bad one"}).wait(60)
    assert good.state is JobState.succeeded, good.error
    assert good.worker == bad.worker
    assert ff.farm.workers[0].poll() is None


def test_redis_restart_every_job_completes(make_fault_farm):
    ff = make_fault_farm(workers=2, lease_seconds=3)
    batch = ff.client.submit_batch(
        [{**SMALL, "prompt": f"through a restart {i}", "steps": 4 + i % 5} for i in range(40)]
        + [{**SLOW, "prompt": f"slow {i}", "steps": 30 + i} for i in range(4)])
    wait_for(lambda: batch.status().counts.get(JobState.succeeded, 0) >= 3, 60, "3 done")
    from dashboard import create_app

    dashboard = create_app({"SETTINGS": ff.settings, "TESTING": True}).test_client()
    assert dashboard.get(f"/api/v1/batches/{batch.id}").status_code == 200

    ff.redis_server.stop()
    with pytest.raises(FarmUnavailable, match="Redis"):
        ff.client.submit({**SMALL, "prompt": "while Redis is down"})
    down = dashboard.get(f"/api/v1/batches/{batch.id}")
    assert down.status_code == 503 and "Redis" in down.get_data(as_text=True)
    for i in range(len(ff.farm.workers)):  # every worker has met the outage
        wait_for(lambda i=i: "lease thread:" in ff.log(i), 30, f"worker {i} sees Redis down")
    ff.redis_server.start()
    # the dashboard reconnects by itself: the same app, no restart
    assert dashboard.get(f"/api/v1/batches/{batch.id}").status_code == 200

    after = ff.client.submit({**SMALL, "prompt": "after the restart"})
    record = batch.wait(timeout=180)
    assert record.counts == {JobState.succeeded: 44}, record.counts
    for job in batch.records():
        assert ff.objects(job) == ff.expected_objects(job), job.id
    assert after.wait(timeout=60).state is JobState.succeeded
    assert all(p.poll() is None for p in ff.farm.workers), "a worker died with Redis"


def test_s3_down_during_uploads(make_fault_farm, tmp_path):
    from moto.server import ThreadedMotoServer

    from renderfarm.embedded import free_port

    port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    s3.start()
    try:
        ff = make_fault_farm(workers=2, s3_endpoint=f"http://127.0.0.1:{port}")
        hold = ff.hold_upload("upload 5")
        batch = ff.client.submit_batch(
            [{**SMALL, "prompt": f"upload {i}", "width": 128, "height": 128, "steps": 4 + i % 3}
             for i in range(8)])
        _, held_id, _ = ff.wait_held()  # "upload 5" is rendered; nothing of it stored yet
        done_before = {r.id for r in batch.records() if r.state is JobState.succeeded}
        s3.stop()
        broken = BrokenEndpoint(port)
        ff.release(hold)
        # The held upload (and any other) now meets the outage: a first try and a retry.
        wait_for(lambda: broken.connections >= 2, 60, "uploads retried against the outage")
        broken.close()
        s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        s3.start()  # moto's state lives in the process: the bucket and objects are still there

        record = batch.wait(timeout=150)
        assert record.counts == {JobState.succeeded: 8}, [
            (r.state.value, r.error) for r in batch.records() if r.error]
        for job in batch.records():
            assert ff.objects(job) == ff.expected_objects(job), job.id
        held = ff.client.records.job(held_id)
        assert held.attempts == 1  # the upload was retried, not the job
        assert held_id not in done_before
    finally:
        s3.stop()


def test_cancel_running_job_writes_nothing_and_worker_goes_on(make_fault_farm):
    # The README: a running job stops at its next denoising step. It is held at step 3 while
    # the cancel is recorded, then let go: it must stop at step 3 or 4 of its 12.
    ff = make_fault_farm(workers=1)
    hold = ff.hold_step("cancelled mid-render", 3)
    running = ff.client.submit({**SLOW, "prompt": "cancelled mid-render"})
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
    running = ff.client.submit({**SLOW, "prompt": "finishes on SIGTERM"})
    ff.wait_held()
    first = running.status()
    behind = ff.client.submit_batch(
        [{**SMALL, "prompt": f"behind {i}", "width": 128, "height": 128, "steps": 4 + i}
         for i in range(6)])
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
        assert_one_set(ff, job.id)
        assert job.worker != first.worker


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
