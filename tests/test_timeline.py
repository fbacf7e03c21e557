"""A job's timeline: ``timestamps[state]`` is when the job entered that state, progress writes
keep their own field (``progressed_at``), and the numbers shown from them (the Workers page's
it/s, the job's timings) are read from the right fields. The session farm's real worker
renders; the test acts while the job is stopped at a test hold (worker/testhooks.py, the
``holds`` fixture), never after a sleep."""

from __future__ import annotations

from renderfarm.schema import JobState
from tests.fault_fixtures import wait_for

SLOW = {"model": "tiny", "width": 64, "height": 64, "steps": 6, "scheduler": "euler"}


def test_rendering_is_entered_once_and_its_per_second_comes_from_the_records(
        farm, farm_settings, client, holds):
    from dashboard import create_app

    app = create_app({"TESTING": True, "SETTINGS": farm_settings})
    first, later = holds.hold_step("timeline", 1), holds.hold_step("timeline later", 4)
    job = client.submit({**SLOW, "prompt": "timeline"})
    assert holds.wait_held() == ("step", job.id, 1)
    at_one = job.status()
    entered = at_one.timestamps["rendering"]
    assert at_one.state is JobState.rendering and at_one.step == 1
    assert at_one.timestamps["started"] <= entered < at_one.progressed_at
    holds.release(first)
    record = job.wait(timeout=90)
    assert record.state is JobState.succeeded, record.error
    # later progress writes (steps 2..6) moved progressed_at, never the state's timestamp
    assert record.timestamps["rendering"] == entered
    assert record.progressed_at > at_one.progressed_at  # (kept once the job has ended)

    # The Workers page while a job is held at step 4: it/s is steps over render time, both
    # from the record (Redis' clock), within the rounding the page shows.
    job = client.submit({**SLOW, "prompt": "timeline later"})
    assert holds.wait_held() == ("step", job.id, 4)
    held = job.status()
    expected = 4 / (held.progressed_at - held.timestamps["rendering"])
    with app.test_client() as browser:
        def beat_shows_the_held_job() -> dict | None:
            workers = browser.get("/api/v1/workers").get_json()["workers"]
            return next((w for w in workers if w["current_job"] == job.id), None)

        # the worker says what it renders at its next heartbeat (every few seconds)
        worker = wait_for(beat_shows_the_held_job, 60, "a heartbeat naming the held job")
        page = browser.get("/workers").get_data(as_text=True)
    assert worker["step"] == 4
    assert abs(worker["its_per_second"] - expected) <= 0.01
    assert f"<td>{worker['its_per_second']}</td>" in page
    holds.release(later)
    record = job.wait(timeout=90)

    # The job's timings: rendered is rendering -> uploading, not the tail after the last step
    with app.test_client() as browser:
        timings = browser.get(f"/api/v1/jobs/{job.id}").get_json()["timings"]
    t = record.timestamps
    assert timings["rendered"] == round(t["uploading"] - t["rendering"], 3)
    assert timings["loaded"] == round(t["rendering"] - t["started"], 3)
    assert t["queued"] <= t["started"] <= t["rendering"] < t["uploading"] <= t["succeeded"]
