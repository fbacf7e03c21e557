"""A job whose worker died shows "worker lost, re-queue in N s" (N from its lease) on the
batch and job pages, instead of looking alive. A real worker renders, is held at a step
(worker/testhooks.py) and SIGKILLed; the pages are read through the dashboard app."""

from __future__ import annotations

import re

from tests.fault_fixtures import wait_for

pytest_plugins = ["tests.fault_fixtures"]

SLOW = {"model": "tiny", "width": 64, "height": 64, "steps": 6, "scheduler": "euler"}


def test_a_job_whose_worker_died_says_when_it_will_be_requeued(make_fault_farm):
    from dashboard import create_app

    ff = make_fault_farm(workers=1, lease_seconds=120)
    app = create_app({"TESTING": True, "SETTINGS": ff.settings})
    ff.hold_step("orphan", 2)
    job = ff.client.submit({**SLOW, "prompt": "orphan"})
    assert ff.wait_held() == ("step", job.id, 2)
    with app.test_client() as browser:
        assert "worker lost" not in browser.get(f"/jobs/{job.id}").get_data(as_text=True)
        ff.kill(0).wait()

        def lost_note() -> str | None:
            page = browser.get(f"/batches/{job.status().batch_id}").get_data(as_text=True)
            found = re.search(r"worker lost, re-queue in (\d+) s", page)
            return found.group(0) if found else None

        note = wait_for(lost_note, 60, "the batch page saying the worker is lost")
        seconds = int(note.split()[-2])
        record = job.status()
        lease = float(ff.client.redis.hget(f"rf:job:{job.id}", "lease_until"))
        assert 0 < seconds <= round(lease - record.timestamps["rendering"])
        api = browser.get(f"/api/v1/jobs/{job.id}").get_json()
        assert api["worker_lost"].startswith("worker lost, re-queue in")
        assert "worker lost, re-queue in" in browser.get(f"/jobs/{job.id}").get_data(
            as_text=True)
