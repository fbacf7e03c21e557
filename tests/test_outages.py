"""Outages the farm must survive, against real processes: the farm's redis-server stopped and
started again, the S3 endpoint down during uploads, a model whose weights are broken. Every
accepted job ends succeeded (one set of objects) or failed with a reason; no worker dies.

Every farm here is its own (tests/fault_fixtures.py), so killing and restarting things leaves
the session farm alone; a test acts while a job is provably at a point (a test hold,
worker/testhooks.py), never after a sleep. The fault tests are split over test_faults.py,
test_outages.py and test_stops.py so that pytest-xdist runs them in parallel."""

from __future__ import annotations

import re
import shutil

import pytest

from renderfarm.errors import FarmUnavailable
from renderfarm.schema import JobState
from tests.fault_fixtures import SLOW, SMALL, BrokenEndpoint, wait_for

pytest_plugins = ["tests.fault_fixtures"]


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
        [{**SMALL, "prompt": f"through a restart {i}", "steps": 4 + i % 5} for i in range(16)]
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
    assert record.counts == {JobState.succeeded: 20}, (
        record.counts, [(j.id, j.error) for j in batch.records() if j.error])
    for job in batch.records():
        assert ff.objects(job) == ff.expected_objects(job), job.id
    assert after.wait(timeout=60).state is JobState.succeeded
    assert all(p.poll() is None for p in ff.farm.workers), "a worker died with Redis"


def test_redis_away_mid_render_the_job_runs_again_and_succeeds(make_fault_farm):
    """A real outage while a job is provably mid-render (held at its second step, its hold
    polled in Redis): the worker leaves it to its lease, and once Redis is back the job runs
    again and succeeds with one set of objects; the worker lives on. That it is never recorded
    failed when Redis comes back at once is tests/test_worker_redis_away.py's deterministic
    check (here the outage outlasts the worker's ``fail``)."""
    ff = make_fault_farm(workers=1, lease_seconds=2)
    prompt = "held as Redis goes away"
    hold = ff.hold_step(prompt, 2)
    job = ff.client.submit({**SLOW, "prompt": prompt})
    assert ff.wait_held()[1] == job.id
    ff.redis_server.stop()
    met = re.compile(rf"job {job.id}(: Redis unreachable| failed)")
    wait_for(lambda: met.search(ff.log(0)), 60, "the held job meets the outage")
    ff.redis_server.start()

    def again_or_failed():
        record = ff.client.records.job(job.id)
        return record if record.attempts == 2 or record.state is JobState.failed else None

    record = wait_for(again_or_failed, 60, "the job claimed again after its lease ran out")
    assert record.state is not JobState.failed, record.error
    assert ff.wait_held()[1] == job.id  # the same hold (Redis kept it) stops the second run
    ff.release(hold)
    assert job.wait(timeout=60).state is JobState.succeeded
    ff.assert_one_set(job.id)
    assert ff.farm.workers[0].poll() is None


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
