"""Pause and resume from the API, the dashboard's batch page and the CLI (no worker: the records
say what a worker may take; tests/test_fair_share.py runs one)."""

from __future__ import annotations

import re

from click.testing import CliRunner

from renderfarm import keys
from renderfarm.cli import main

pytest_plugins = ["tests.dashboard_fixtures"]


def claimable(farm, queue: str = "renderfarm.tiny") -> int:
    """Jobs of the queue a worker may take now."""
    return farm.redis.zcard(keys.fair(queue))


def test_pause_and_resume_from_the_api(dash_client, dash_farm, make_job, queue_depth):
    rv = dash_client.post("/api/v1/batches", json={"jobs": [make_job(), make_job()]})
    batch_id = rv.get_json()["id"]
    assert claimable(dash_farm) == 2
    rv = dash_client.post(f"/api/v1/batches/{batch_id}/pause")
    assert rv.status_code == 200 and rv.get_json()["held"] == 2
    assert rv.get_json()["batch"]["paused"] is True
    assert rv.get_json()["batch"]["counts"]["queued"] == 2  # still queued, not taken
    assert claimable(dash_farm) == 0
    before = queue_depth()
    rv = dash_client.post(f"/api/v1/batches/{batch_id}/resume")
    assert rv.status_code == 200 and rv.get_json()["resumed"] == 2
    assert rv.get_json()["batch"]["paused"] is False
    assert claimable(dash_farm) == 2
    assert queue_depth() == before + 2  # their messages were sent again
    for action in ("pause", "resume"):
        rv = dash_client.post(f"/api/v1/batches/nope/{action}")
        assert rv.status_code == 404, action


def test_batch_page_buttons_follow_the_paused_state(dash_client, dash_farm, make_job):
    rv = dash_client.post("/api/v1/batches", json={"jobs": [make_job()]})
    batch_id = rv.get_json()["id"]
    page = dash_client.get(f"/batches/{batch_id}").get_data(as_text=True)
    assert re.search(r'id="pause-batch"(?! disabled)', page)
    assert re.search(r'id="resume-batch" disabled', page)
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)
    rv = dash_client.post(f"/batches/{batch_id}/pause", data={"csrf_token": token})
    assert rv.status_code == 303 and dash_farm.records.batch(batch_id).paused
    page = dash_client.get(f"/batches/{batch_id}").get_data(as_text=True)
    assert re.search(r'id="pause-batch" disabled', page)
    assert re.search(r'id="resume-batch"(?! disabled)', page)
    assert re.search(r'id="batch-paused"[^>]*>paused<', page)  # not hidden
    rv = dash_client.post(f"/batches/{batch_id}/resume", data={"csrf_token": token})
    assert rv.status_code == 303 and not dash_farm.records.batch(batch_id).paused


def test_pause_and_resume_from_the_cli(dash_settings, dash_farm, make_job):
    batch = dash_farm.submit_batch([make_job(), make_job(), make_job()])
    env = {"RENDERFARM_REDIS_URL": dash_settings.redis_url,
           "RENDERFARM_DATA_DIR": str(dash_settings.data_path),
           "RENDERFARM_STORAGE_URL": dash_settings.storage_url}

    def cli(*args: str):  # in-process (click's runner): a subprocess would import for seconds
        return CliRunner().invoke(main, list(args), env=env)

    out = cli("pause", batch.id)
    assert out.exit_code == 0 and "3 queued job(s) held" in out.stdout, out.output
    assert dash_farm.records.batch(batch.id).paused and claimable(dash_farm) == 0
    out = cli("resume", batch.id)
    assert out.exit_code == 0 and "3 queued job(s) back in line" in out.stdout, out.output
    assert claimable(dash_farm) == 3
    out = cli("pause", "no-such-batch")
    assert out.exit_code == 2 and "no-such-batch" in out.output, out.output
