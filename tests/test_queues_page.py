"""The Queues page leads with the number users act on (jobs queued, per queue) and explains
the Celery message count beside it, which can be higher: a cancelled job's message stays in
the list until a worker drops it. No worker runs here, so messages stay where they are."""

from __future__ import annotations

pytest_plugins = ["tests.dashboard_fixtures"]


def test_queues_page_shows_jobs_queued_and_explains_messages(dash_client, dash_farm,
                                                             models_dir):
    dash_farm.redis.flushdb()
    batch = dash_farm.submit_batch([{"prompt": f"p{i}", "model": "tiny"} for i in range(3)])
    dash_farm.cancel(batch.job_ids[:1])  # one job cancelled: its message stays (< 50)
    (queue,) = dash_client.get("/api/v1/queues").get_json()["queues"]
    assert queue["jobs"] == 2 and queue["depth"] == 3
    page = dash_client.get("/queues").get_data(as_text=True)
    assert '<td class="jobs"><strong>2</strong></td>' in page
    assert '<td class="depth">3</td>' in page and "Messages waiting is" in page
