"""``/metrics`` of the dashboard, parsed with prometheus_client's own parser and checked
against a farm state built through the real records (no worker: jobs stay where we put them)."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from renderfarm.schema import JobState

pytest_plugins = ["tests.dashboard_fixtures"]


def scrape(client, **headers) -> dict[str, dict[tuple, float]]:
    answer = client.get("/metrics", headers=headers)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(answer.get_data(as_text=True)):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


@pytest.mark.parametrize("rebuilt", [False, True])
def test_fleet_metrics_match_the_farm(dash_client, dash_farm, make_job, fake_beat, rebuilt):
    from renderfarm import keys

    begun = time.time()
    low = dash_farm.submit_batch([make_job(prompt=f"low {i}") for i in range(3)])
    high = dash_farm.submit_batch([make_job(prompt=f"high {i}", priority=8) for i in range(2)])
    claimed, cancelled = low.jobs()[0], low.jobs()[1]
    # a worker claims one job: the farm no longer counts it as queued (its message is still
    # in Celery's list, which is why the raw list lengths are wrong for an autoscaler)
    assert dash_farm.records.claim(claimed.id, "w1", 30, 3).ok
    assert cancelled.cancel() == "cancelled"
    fake_beat("w1", 0, current_job=claimed.id)
    fake_beat("w2", 0)
    fake_beat("w3", 0, status="starting")
    fake_beat("gone", 600)
    if rebuilt:  # the farm-wide counter lost (a Redis from before it): built from the batches
        dash_farm.redis.delete(keys.COUNTS)

    m = scrape(dash_client)
    queued = m["renderfarm_jobs_queued"]
    tiny = (("hardware", "any"), ("model", "tiny"))
    queue = ("queue", "renderfarm.tiny")
    assert queued == {(*tiny, ("priority", "5"), queue): 1, (*tiny, ("priority", "8"), queue): 2}
    by_state = {labels[0][1]: v for labels, v in m["renderfarm_jobs"].items()}
    assert by_state == {s.value: 0 for s in JobState} | {"queued": 3, "started": 1, "cancelled": 1}
    assert m["renderfarm_workers"] == {(("hardware", "cpu"), ("status", "busy")): 1,
                                       (("hardware", "cpu"), ("status", "idle")): 1,
                                       (("hardware", "cpu"), ("status", "starting")): 1}
    [age] = m["renderfarm_oldest_queued_job_age_seconds"].values()
    assert 0 <= age <= time.time() - begun
    assert high.jobs()[0].status().state is JobState.queued


def test_no_queued_job_reads_zero(dash_client):
    m = scrape(dash_client)
    assert m.get("renderfarm_jobs_queued", {}) == {}
    assert list(m["renderfarm_oldest_queued_job_age_seconds"].values()) == [0]


def test_metrics_take_the_token_not_the_login(make_dash_app):
    client = make_dash_app(TOKEN="s3cret", SECRET_KEY="k" * 32).test_client()
    refused = client.get("/metrics")
    assert refused.status_code == 401  # not a redirect to the login form
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert scrape(client, Authorization="Bearer s3cret")["renderfarm_jobs"]
    assert client.get("/healthz").status_code == 200  # probes carry no token


def test_healthz_answers_any_host_metrics_only_served_names(dash_client):
    assert dash_client.get("/healthz", headers={"Host": "10.1.2.3:8080"}).get_json() == {
        "status": "ok"}
    assert dash_client.get("/metrics", headers={"Host": "10.1.2.3:8080"}).status_code == 400


def test_health_dashboard_command(dash_app):
    """``renderfarm health dashboard`` against a real HTTP server of the dashboard."""
    import subprocess
    import sys
    import threading

    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, dash_app)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        ok = subprocess.run([sys.executable, "-m", "renderfarm", "health", "dashboard",
                             "--url", url], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "/healthz: 200" in ok.stdout
    finally:
        server.shutdown()
    down = subprocess.run([sys.executable, "-m", "renderfarm", "health", "dashboard",
                           "--url", url], capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "healthz" in down.stdout
