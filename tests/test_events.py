"""``GET /api/v1/batches/<id>/events``: Server-Sent Events from the batch's Redis stream, read
through a served dashboard (waitress) while the session's real worker renders the batch."""

from __future__ import annotations

import json
import threading

import pytest
import requests


@pytest.fixture(scope="module")
def dashboard_url(farm, farm_settings):
    from dashboard import create_app
    from dashboard.serve import make_server

    server = make_server(create_app({"SETTINGS": farm_settings}), port=0)
    threading.Thread(target=server.run, name="events-dashboard", daemon=True).start()
    yield f"http://127.0.0.1:{server.effective_port}"
    server.close()


def read_events(response: requests.Response) -> list[dict]:
    """Parse an SSE body into [{id, event, data}] (comments and retry lines skipped)."""
    events, current = [], {}
    for line in response.iter_lines(decode_unicode=True):
        if not line:
            if "event" in current:
                events.append(current)
            current = {}
        elif line.startswith(("id: ", "event: ")):
            name, _, value = line.partition(": ")
            current[name] = value
        elif line.startswith("data: "):
            current["data"] = json.loads(line[6:])
    return events


def test_events_follow_a_batch_to_its_end_and_resume(dashboard_url, client):
    handle = client.submit_batch([
        {"prompt": f"a kite {i}", "model": "tiny", "width": 64, "height": 64, "steps": 3,
         "seed": i} for i in range(2)])
    url = f"{dashboard_url}/api/v1/batches/{handle.id}/events"
    # From the stream's start ("0-0"): every event, whenever this client connected.
    with requests.get(url, headers={"Last-Event-ID": "0-0"}, stream=True, timeout=120) as live:
        assert live.headers["Content-Type"].startswith("text/event-stream")
        events = read_events(live)  # returns only when the server ends the stream
    assert events[-1]["event"] == "end" and events[-1]["data"]["counts"]["succeeded"] == 2
    for job_id in (j.id for j in handle.jobs()):
        states = [e["data"]["state"] for e in events
                  if e["event"] == "job" and e["data"]["job_id"] == job_id]
        assert states[0] == "started" and "rendering" in states and states[-1] == "succeeded"
        done = next(e for e in events if e["event"] == "job" and e["data"]["job_id"] == job_id
                    and e["data"]["state"] == "succeeded")
        assert done["data"]["results"][0]["key"].endswith(f"{job_id}-0.png")
        steps = [e["data"]["step"] for e in events
                 if e["event"] == "step" and e["data"]["job_id"] == job_id]
        assert steps == sorted(steps) and steps[-1] == 3
    ids = [e["id"] for e in events]
    assert len(set(ids[:-1])) == len(ids) - 1  # every change once, in stream order
    # Reconnect after the third event: exactly the events after it, then the end.
    resumed_from = events[2]["id"]
    with requests.get(url, headers={"Last-Event-ID": resumed_from}, stream=True,
                      timeout=60) as again:
        replay = read_events(again)
    assert [e["id"] for e in replay[:-1]] == ids[3:-1]
    assert replay[-1]["event"] == "end"
    # A new client (no Last-Event-ID) gets the batch as it is, then the end.
    with requests.get(url, stream=True, timeout=60) as fresh:
        first = read_events(fresh)
    assert [e["event"] for e in first] == ["snapshot", "end"]
    assert first[0]["data"]["counts"]["succeeded"] == 2 and first[0]["id"] == ids[-1]


def test_a_quiet_batchs_stream_stays_open_with_keep_alives(dashboard_url, client, holds):
    """While nothing happens to a batch (its job held at a step), the stream sends keep-alive
    comments, never an error: a blocked read as long as the Redis client's socket timeout
    failed the stream of every quiet batch (found by the fuzzer of test_hostile.py)."""
    hold = holds.hold_step("a quiet kite", 1)
    handle = client.submit({"prompt": "a quiet kite", "model": "tiny", "width": 64,
                            "height": 64, "steps": 3})
    assert holds.wait_held() == ("step", handle.id, 1)
    batch_id = handle.status().batch_id
    url = f"{dashboard_url}/api/v1/batches/{batch_id}/events"
    comments = []
    with requests.get(url, stream=True, timeout=60) as quiet:
        for line in quiet.iter_lines(decode_unicode=True):
            assert not line.startswith("event: error"), line
            if line.startswith(":"):
                comments.append(line)
                if len(comments) == 2:  # two blocked reads in a row, each ended in time
                    break
    assert comments == [": keep-alive"] * 2
    holds.release(hold)
    assert handle.wait(timeout=60).state.value == "succeeded"


def test_events_refuse_unknown_batches_and_bad_ids(dashboard_url, client):
    assert requests.get(f"{dashboard_url}/api/v1/batches/nope/events",
                        timeout=10).status_code == 404
    handle = client.submit({"prompt": "a kite", "model": "tiny", "width": 64, "height": 64,
                            "steps": 2})
    batch_id = handle.status().batch_id
    bad = requests.get(f"{dashboard_url}/api/v1/batches/{batch_id}/events",
                       headers={"Last-Event-ID": "yesterday"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "Last-Event-ID"
    # digits, but past Redis' 64-bit ids: refused as well, not a stream that fails at once
    # (its error event carries no id, so a browser would reconnect with the same id forever)
    for huge in ("99999999999999999999-0", "0-18446744073709551616"):
        bad = requests.get(f"{dashboard_url}/api/v1/batches/{batch_id}/events",
                           headers={"Last-Event-ID": huge}, timeout=10)
        assert bad.status_code == 400, (huge, bad.text[:200])
        assert bad.json()["errors"][0]["field"] == "Last-Event-ID"
    handle.wait(timeout=120)


def test_the_event_stream_is_written_with_each_change_and_pruned_with_its_batch(
        take_redis_db, request):
    import redis

    from renderfarm import keys
    from renderfarm.records import Records
    from renderfarm.schema import JobRequest

    r = redis.Redis.from_url(take_redis_db(request))  # a db of its own (emptied): prune
    records = Records(r)
    request = JobRequest(prompt="a kite", model="tiny", seed=1)
    records.add_jobs("b1", [("j1", request), ("j2", request)])
    records.cancel("j1")
    [(_, fields)] = r.xrange(keys.batch_events("b1"))
    assert fields == {b"job": b"j1", b"state": b"cancelled", b"from": b"queued",
                      b"t": fields[b"t"]}
    records.cancel("j2")
    assert records.prune(older_than=-60).batches == 1
    assert not r.exists(keys.batch_events("b1"))


def test_submit_wait_follows_the_stream_else_polls(dashboard_url, farm_settings, monkeypatch):
    """``renderfarm submit --wait`` (progress.follow_batch) with RENDERFARM_DASHBOARD_URL reads
    the event stream and never polls; with the dashboard unreachable it polls Redis."""
    from producer import FarmClient
    from renderfarm import progress

    job = {"prompt": "a kite", "model": "tiny", "width": 64, "height": 64, "steps": 2}
    polls: list[str] = []
    poll = progress._poll_until_end

    def counted(client, batch_id, *args):
        polls.append(batch_id)
        return poll(client, batch_id, *args)

    monkeypatch.setattr(progress, "_poll_until_end", counted)
    streamed = FarmClient(farm_settings.model_copy(update={"dashboard_url": dashboard_url}))
    handle = streamed.submit_batch([job])
    assert progress.follow_batch(streamed, handle.id, timeout=120)
    assert polls == [] and handle.status().finished

    unreachable = FarmClient(farm_settings.model_copy(
        update={"dashboard_url": "http://127.0.0.1:9"}))
    handle = unreachable.submit_batch([job])
    assert progress.follow_batch(unreachable, handle.id, timeout=120)
    assert polls == [handle.id]
