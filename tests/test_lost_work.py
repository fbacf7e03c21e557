"""Issue 11, items 3-10: nothing lost, nothing wedged, against a real Redis (and, where the
item is about processes, real workers: tests/test_lost_work_farm.py).

Most tests here use a redis-server of their own: they fill its memory, count its commands or
leave jobs in queues that no worker of the session farm may take.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from redis import Redis

from producer import FarmClient
from producer.enqueue import priority_lists
from renderfarm import keys
from renderfarm.embedded import EmbeddedRedis
from renderfarm.schema import JobRequest, JobState
from renderfarm.settings import Settings

JOB = {"model": "tiny", "width": 64, "height": 64, "steps": 2}


@pytest.fixture
def own_farm(tmp_path: Path, models_dir: Path):
    """A client and a dashboard on a redis-server of their own, with no worker."""
    from dashboard import create_app

    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    settings = Settings(redis_url=url, data_dir=tmp_path / "data", models_dir=models_dir,
                        storage_url=(tmp_path / "images").as_uri())
    app = create_app({"SETTINGS": settings, "TESTING": True})
    yield FarmClient(settings), app.test_client()
    server.stop()


def depth(redis: Redis, queue: str) -> int:
    return sum(redis.llen(k) for k in priority_lists(queue))


def big_png(side: int = 900) -> str:
    from PIL import Image

    noise = Image.frombytes("RGB", (side, side), bytes(range(256)) * (side * side * 3 // 256 + 1))
    out = io.BytesIO()
    noise.save(out, format="PNG", compress_level=0)
    return base64.b64encode(out.getvalue()).decode()


# -- 3. a failed submit leaves its idempotency key free ----------------------------------------
def test_submit_refused_by_redis_leaves_the_idempotency_key_free(own_farm):
    client, _ = own_farm
    job = {**JOB, "prompt": "paid once", "mode": "img2img", "init_image": big_png(),
           "idempotency_key": "order-1"}
    redis = client.redis
    used = int(redis.info("memory")["used_memory"])
    redis.config_set("maxmemory", used + 512 * 1024)  # the key fits; the 2 MB request does not
    try:
        with pytest.raises(Exception) as caught:  # noqa: B017 (before the fix: Redis' own)
            client.submit(job)
        assert "OOM" in str(caught.value) or "memory" in str(caught.value), caught.value
    finally:
        redis.config_set("maxmemory", 0)
    assert client.records.count_jobs() == 0
    handle = client.submit(job)  # the same request again: recorded now, not pointed at nothing
    assert handle.status().state is JobState.queued
    assert client.submit(job).id == handle.id  # and from then on, idempotent


def test_abandoned_submit_gives_its_idempotency_key_back(own_farm):
    client, _ = own_farm
    records = client.records
    [first] = records.add_jobs("b", [("j1", JobRequest(prompt="x", model="tiny", seed=1,
                                                      idempotency_key="k1"))])
    assert first == "j1" and records.redis.get(keys.idempotency("k1")) == b"j1"
    records.abandon(["j1"], "not enqueued: boom")
    assert records.job("j1").state is JobState.failed
    assert records.redis.get(keys.idempotency("k1")) is None


# -- 4. an idempotent replay through the API -----------------------------------------------
def test_api_replay_answers_what_the_first_request_did(own_farm):
    _, api = own_farm
    jobs = [{**JOB, "prompt": "a", "idempotency_key": "ka"},
            {**JOB, "prompt": "b", "idempotency_key": "kb"}]
    first = api.post("/api/v1/batches", json={"jobs": jobs})
    assert first.status_code == 201, first.get_json()
    again = api.post("/api/v1/batches", json={"jobs": jobs})
    assert again.status_code == 200, again.get_json()
    assert again.get_json()["job_ids"] == first.get_json()["job_ids"]
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.get_json()["batch"]["total"] == 2

    mixed = api.post("/api/v1/batches", json={"jobs": [{**JOB, "prompt": "new"}, jobs[1]]})
    assert mixed.status_code == 201, mixed.get_json()
    ids = mixed.get_json()["job_ids"]
    assert len(ids) == 2 and ids[1] == first.get_json()["job_ids"][1]
    assert ids[0] not in first.get_json()["job_ids"]


# -- 8. a cancelled batch leaves no messages behind ----------------------------------------
def test_cancelled_batch_takes_its_messages_off_the_queue(own_farm):
    client, api = own_farm
    queue = f"{client.settings.queue}.tiny"
    batch = client.submit_batch([{**JOB, "prompt": f"dead {i}", "priority": i % 10}
                                 for i in range(300)])
    assert depth(client.redis, queue) == 300
    answer = api.post(f"/api/v1/batches/{batch.id}/cancel")
    assert set(answer.get_json()["outcomes"].values()) == {"cancelled"}
    assert depth(client.redis, queue) == 0
    keep = client.submit_batch([{**JOB, "prompt": f"alive {i}"} for i in range(60)])
    client.batch(client.submit({**JOB, "prompt": "cancelled"}).status().batch_id).cancel()
    assert depth(client.redis, queue) == 61  # one dead message left: not worth a pass
    assert keep.cancel() and depth(client.redis, queue) == 0


def test_dropping_dead_messages_keeps_the_live_ones_in_order_across_chunks(own_farm):
    """drop_dead_messages reads a queue a chunk at a time and replaces it with the kept copy:
    with chunks of 7 over 40 messages, the 20 live ones stay, in their order, and nothing else
    (no scratch list is left behind)."""
    import json

    from producer.enqueue import drop_dead_messages
    from renderfarm.records import Records

    client, _ = own_farm
    redis, records, queue = client.redis, Records(client.redis), "dropq"
    request = JobRequest(prompt="x", model="tiny", seed=1)
    ids = [f"m{k}" for k in range(40)]
    records.add_jobs("drop", [(i, request) for i in ids], queues=[queue] * len(ids))
    messages = [json.dumps({"body": "x", "headers": {"id": i}}) for i in ids]
    redis.rpush(queue, *messages)
    for i in ids[1::2]:
        records.cancel(i)
    assert drop_dead_messages(redis, [queue], chunk=7) == 20
    assert redis.lrange(queue, 0, -1) == [m.encode() for m in messages[0::2]]
    assert not [k for k in redis.scan_iter(f"{queue}*") if k != queue.encode()
                and redis.type(k) == b"list" and b"rf-kept" in k]
    assert drop_dead_messages(redis, [queue], chunk=7) == 0  # nothing dead: queue untouched
    assert redis.llen(queue) == 20
    records.cancel(ids[0])  # one dead message, in a queue longer than the pass is allowed
    assert drop_dead_messages(redis, [queue], chunk=7, most=19) == 0
    assert redis.llen(queue) == 20
    assert drop_dead_messages(redis, [queue], chunk=7, most=20) == 1


# -- 9. a retry starts a new timeline ------------------------------------------------------
def test_retry_and_reap_start_a_new_attempt_with_history(own_farm):
    from dashboard.api import timings

    client, api = own_farm
    records = client.records
    records.add_jobs("b", [("r1", JobRequest(prompt="x", model="tiny", seed=1))])
    assert records.claim("r1", "w1", 30, 3).ok
    records.update("r1", "w1", JobState.rendering)
    records.fail("r1", "w1", "boom")
    assert records.retry("r1")
    assert records.claim("r1", "w2", 0.01, 3).ok
    while records.reap("r1", 3) != "requeued":  # w2 is lost: its lease ends in 10 ms
        pass
    assert records.claim("r1", "w3", 30, 3).ok
    for state in (JobState.rendering, JobState.uploading):
        records.update("r1", "w3", state)
    records.succeed("r1", "w3", [])

    record = records.job("r1")
    assert set(record.timestamps) == {"queued", "started", "rendering", "uploading",
                                      "succeeded"}, record.timestamps
    assert [h["state"] for h in record.history] == ["failed", "started"]
    assert record.history[0]["error"] == "boom" and "failed" in record.history[0]["timestamps"]
    assert "lost" in record.history[1]["error"] and record.history[1]["worker"] == "w2"
    assert record.error is None
    t = record.timestamps  # this (third) attempt's: from its re-queue to its success
    assert timings(record) == {
        "waited": round(t["started"] - t["queued"], 3),
        "loaded": round(t["rendering"] - t["started"], 3),
        "rendered": round(t["uploading"] - t["rendering"], 3),
        "uploaded": round(t["succeeded"] - t["uploading"], 3),
        "total": round(t["succeeded"] - t["queued"], 3)}
    page = api.get("/jobs/r1").get_data(as_text=True)
    assert "Earlier attempts (2)" in page and "failed on w1: boom" in page


# -- 10. /queues costs the same whatever the number of batches kept ------------------------
def test_queues_costs_o_queues_not_o_batches(own_farm):
    client, api = own_farm
    redis = client.redis

    def commands_of_one_call() -> int:
        redis.config_resetstat()
        assert api.get("/api/v1/queues").status_code == 200
        return int(redis.info("stats")["total_commands_processed"])

    waiting = client.submit({**JOB, "prompt": "oldest waiting"})
    commands_of_one_call()  # connects
    few = commands_of_one_call()
    queue = f"{client.settings.queue}.tiny"
    for n in range(400):  # batches that ended long ago and are kept, in the same queue
        client.records.add_jobs(f"old{n}", [(f"old{n}", JobRequest(prompt="x", model="tiny",
                                                                   seed=1))], queues=[queue])
        client.records.cancel(f"old{n}")
    client.submit({**JOB, "prompt": "newer"})
    many = commands_of_one_call()
    assert many == few, (few, many)
    answer = api.get("/api/v1/queues").get_json()
    assert answer["oldest_waiting"]["id"] == waiting.id and answer["queued_jobs"] == 2


# -- 7. a cancel comes too late once the images are being stored ---------------------------
def test_cancel_after_the_first_object_is_stored_answers_storing(own_farm):
    client, _ = own_farm
    records = client.records
    for job_id in ("c1", "c2"):
        records.add_jobs("b", [(job_id, JobRequest(prompt="x", model="tiny", seed=1))])
        records.claim(job_id, "w1", 30, 3)
        records.update(job_id, "w1", JobState.uploading)
    assert records.cancel("c1") == "cancelling"  # nothing stored yet: the cancel wins
    assert records.renew("c1", "w1", 30) == "cancel"
    records.update("c2", "w1", JobState.uploading, storing=1)  # its first object is stored
    assert records.cancel("c2") == "storing"
    assert records.renew("c2", "w1", 30) == "ok"
    records.succeed("c2", "w1", [])
    assert records.job("c2").state is JobState.succeeded


# -- a publish that fails after the records are written: all or error ----------------------
def test_publish_refused_mid_batch_fails_every_job_and_tells_the_caller(own_farm):
    """README: "a submit either records and enqueues every job of a batch or reports the error".
    A batch of 2,001 jobs: 2,000 for one queue (one full publish pipeline, sent), then one for
    another queue that Redis refuses (the submitting ACL user of the real redis-server may not
    touch that queue's keys), after every record is written. The submit raises, naming the
    failure; every job of the batch is ``failed`` ("not enqueued"), none sits queued with no
    message; the messages that did go out are dropped by the worker that claims them."""
    from renderfarm.errors import FarmUnavailable

    client, _ = own_farm
    queue = client.settings.queue
    allowed = [f"~{keys.PREFIX}*", "~_kombu*", f"~{queue}.tiny", f"~{queue}.tiny[^.]*"]
    client.redis.acl_setuser("submitter", enabled=True, passwords=["+submitter-pw"],
                             keys=allowed, commands=["+@all"])
    url = "redis://submitter:submitter-pw@" + client.settings.redis_url.split("@", 1)[1]
    limited = FarmClient(client.settings.model_copy(update={"redis_url": url}))
    jobs = [{**JOB, "prompt": f"sent {i}"} for i in range(2000)]
    jobs.append({**JOB, "prompt": "refused", "hardware": "cpu"})  # queue <queue>.tiny.cpu
    with pytest.raises(FarmUnavailable, match=r"not enqueued.*no permissions.*marked failed"):
        limited.submit_batch(jobs, batch_id="half-sent")
    assert depth(client.redis, f"{queue}.tiny") == 2000  # the first pipeline went out ...
    assert depth(client.redis, f"{queue}.tiny.cpu") == 0  # ... the last message was refused
    batch = client.records.batch("half-sent")
    assert batch.total == 2001
    assert {s.value: n for s, n in batch.counts.items()} == {"failed": 2001}
    ids = [raw.decode() for raw in client.redis.lrange(keys.batch_jobs("half-sent"), 0, -1)]
    errors = {client.records.job(i).error for i in ids[::100] + ids[-1:]}
    assert len(errors) == 1 and errors.pop().startswith("not enqueued: the farm's Redis failed")
    assert {client.records.claim(i, "w1", 30, 3).status for i in ids[::100]} == {"terminal"}
