"""Webhooks (renderfarm/webhooks.py): events recorded with the state changes, signed per
Standard Webhooks and checked by the reference verifier in a real HTTP receiver, retried from
Redis across a deliverer's restart, refused for private targets (SSRF).

Most tests write records in a Redis database of their own and deliver in-process: no worker
needed. One submits through the session farm, whose worker delivers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from redis import Redis

from renderfarm import keys
from renderfarm.errors import InvalidJob
from renderfarm.records import Records
from renderfarm.schema import ImageResult, JobRequest
from renderfarm.webhooks import WebhookSender, batch_deliveries
from tests.conftest import WEBHOOK_SECRET
from tests.fault_fixtures import wait_for
from tests.webhook_receiver import Receiver, body


@pytest.fixture
def receiver():
    running = Receiver(WEBHOOK_SECRET)
    yield running
    running.close()


@pytest.fixture(scope="module")
def hook_settings(farm_settings, module_redis_url):
    return farm_settings.model_copy(update={"redis_url": module_redis_url})


@pytest.fixture(scope="module")
def redis(hook_settings) -> Redis:
    return Redis.from_url(hook_settings.redis_url)


@pytest.fixture(autouse=True)
def nothing_due_from_other_tests(redis):
    """Each test's sender sees only its own deliveries (a sender claims 20 at a time): the
    module's database forgets the due deliveries the tests before left behind."""
    redis.delete(keys.HOOKS_DUE)


@pytest.fixture
def sender(hook_settings):
    from producer import FarmClient

    return WebhookSender(hook_settings, FarmClient(hook_settings), "test-sender")


def delivering(sender: WebhookSender):
    """Run ``sender`` in a thread for the block's length."""
    stop = threading.Event()
    thread = threading.Thread(target=sender.run, args=(stop,), daemon=True)

    class Running:
        def __enter__(self):
            thread.start()

        def __exit__(self, *exc):
            stop.set()
            thread.join(10)

    return Running()


def job(prompt: str, **fields) -> JobRequest:
    return JobRequest(prompt=prompt, model="tiny", seed=1, width=64, height=64, **fields)


def test_job_and_batch_events_signed_retried_with_one_id(redis, sender, receiver):
    records = Records(redis)
    records.add_jobs("wh1", [("wh1-a", job("a")), ("wh1-b", job("b")), ("wh1-c", job("c"))],
                     webhook_url=receiver.url)
    assert records.claim("wh1-a", "w1", 30, 3).ok
    records.succeed("wh1-a", "w1", [ImageResult(key="wh1/a-0.png", seed=1, width=64, height=64)])
    assert records.claim("wh1-b", "w1", 30, 3).ok
    records.fail("wh1-b", "w1", "out of luck")
    assert records.cancel("wh1-c") == "cancelled"  # the last to end: the batch completes
    assert records.batch("wh1").webhooks == {"pending": 4}

    receiver.status = 500  # every first try fails ...
    assert sender.run_once() == 4
    receiver.status = 200  # ... and the retries (schedule: 0.2 s) get through
    with delivering(sender):
        receiver.wait_for(lambda got: sum(r.answered == 200 for r in got) == 4)

    assert all(r.payload is not None for r in receiver.received), [
        r.error for r in receiver.received]  # every request verified by standardwebhooks
    by_type = {r.payload["type"]: r for r in receiver.received if r.answered == 200}
    assert sorted(by_type) == ["batch.completed", "job.cancelled", "job.failed", "job.succeeded"]
    for ok in by_type.values():  # the failed try and the retry: one webhook-id, one body
        [failed] = [r for r in receiver.received
                    if r.answered == 500 and r.headers["webhook-id"] == ok.headers["webhook-id"]]
        assert failed.body == ok.body
        assert ok.headers["webhook-signature"].startswith("v1,")
    succeeded = body(by_type["job.succeeded"])["data"]
    assert succeeded["job_id"] == "wh1-a" and succeeded["state"] == "succeeded"
    assert succeeded["images"][0]["key"].endswith("wh1/a-0.png")
    assert succeeded["images"][0]["url"].startswith("http")
    assert body(by_type["job.failed"])["data"]["error"] == "out of luck"
    assert body(by_type["job.cancelled"])["data"]["job_id"] == "wh1-c"
    completed = body(by_type["batch.completed"])["data"]
    assert completed["counts"] == {"succeeded": 1, "failed": 1, "cancelled": 1}
    assert [j["job_id"] for j in completed["jobs"]] == ["wh1-a", "wh1-b", "wh1-c"]

    assert records.batch("wh1").webhooks == {"pending": 0, "delivered": 4}
    shown = batch_deliveries(redis, "wh1")
    assert [(d["attempts"], d["status"], d["last_answer"]) for d in shown] == [
        (2, "delivered", "HTTP 200")] * 4


def test_gives_up_after_the_schedule(redis, hook_settings, receiver):
    from producer import FarmClient

    settings = hook_settings.model_copy(update={"webhook_retry_schedule": "0,0"})
    sender = WebhookSender(settings, FarmClient(settings), "short-schedule")
    records = Records(redis)
    records.add_jobs("wh2", [("wh2-a", job("a", webhook_url=receiver.url))])
    records.cancel("wh2-a")
    receiver.status = 503
    with delivering(sender):
        receiver.wait_for(lambda got: len(got) == 3)
        deadline = time.monotonic() + 10
        while records.batch("wh2").webhooks.get("failed") != 1:
            assert time.monotonic() < deadline, batch_deliveries(redis, "wh2")
            time.sleep(0.05)
    [delivery] = batch_deliveries(redis, "wh2")
    assert delivery["status"] == "failed" and delivery["attempts"] == 3
    assert delivery["last_answer"].startswith("HTTP 503")
    assert redis.zscore(keys.HOOKS_DUE, delivery["id"]) is None
    assert len(receiver.received) == 3  # no fourth try


def test_one_sender_per_attempt(redis, hook_settings):
    from producer import FarmClient

    records = Records(redis)
    records.add_jobs("wh3", [(f"wh3-{n}", job(str(n))) for n in range(30)],
                     webhook_url="http://127.0.0.1:9/")
    for n in range(30):
        records.cancel(f"wh3-{n}")
    senders = [WebhookSender(hook_settings, FarmClient(hook_settings), f"s{k}") for k in range(3)]
    claims: list[list[bytes]] = [[] for _ in senders]
    start = threading.Barrier(len(senders))

    def take(k: int) -> None:
        start.wait()
        for _ in range(5):
            claims[k] += senders[k]._claim(args=[4, 60, senders[k].name])[::2]

    threads = [threading.Thread(target=take, args=(k,)) for k in range(len(senders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = [i for c in claims for i in c]
    # each delivery (30 jobs' and the batch's) claimed once, by one sender
    assert len(taken) == len(set(taken)) == 31
    assert {int(redis.hget(keys.hook(i.decode()), "attempts")) for i in taken} == {1}


def test_delivery_survives_a_restart_of_the_deliverer(redis, hook_settings, receiver):
    records = Records(redis)
    records.add_jobs("wh4", [("wh4-a", job("a", webhook_url=receiver.url))])
    records.cancel("wh4-a")
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "RENDERFARM_REDIS_URL":
           hook_settings.redis_url, "RENDERFARM_WEBHOOK_SECRET": WEBHOOK_SECRET,
           "RENDERFARM_WEBHOOK_ALLOW_PRIVATE": "1", "RENDERFARM_WEBHOOK_RETRY_SCHEDULE": "0.2,0.2",
           "RENDERFARM_STORAGE_URL": hook_settings.resolved_storage_url,
           "RENDERFARM_S3_ENDPOINT_URL": hook_settings.s3_endpoint_url or ""}
    command = [sys.executable, "-m", "renderfarm", "webhooks"]
    receiver.status = 500
    first = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        receiver.wait_for(lambda got: len(got) >= 1)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    # the deliverer is gone: the delivery waits in Redis, due again, not lost
    [waiting] = batch_deliveries(redis, "wh4")
    assert waiting["status"] == "pending" and redis.zscore(keys.HOOKS_DUE, waiting["id"])
    receiver.status = 200
    second = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        [*_, ok] = receiver.wait_for(lambda got: any(r.answered == 200 for r in got))
    finally:
        second.terminate()
        second.wait(10)
    assert ok.payload["type"] == "job.cancelled"
    assert {r.headers["webhook-id"] for r in receiver.received} == {waiting["id"]}
    deadline = time.monotonic() + 10
    while batch_deliveries(redis, "wh4")[0]["status"] != "delivered":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_private_targets_refused_at_submit(hook_settings):
    from producer import FarmClient

    client = FarmClient(hook_settings.model_copy(update={"webhook_allow_private": False}))
    jobs = [{"prompt": "a", "model": "tiny", "steps": 2, "width": 64, "height": 64}]
    for url, why in [("http://127.0.0.1:8000/hook", "loopback"),
                     ("http://169.254.169.254/latest/meta-data/", "link-local"),
                     ("http://10.1.2.3/hook", "private"),
                     ("http://[::1]/hook", "loopback"),
                     ("http://0.0.0.0/hook", "unspecified")]:
        with pytest.raises(InvalidJob) as raised:
            client.submit_batch(jobs, webhook_url=url)
        [error] = raised.value.errors
        assert (error.field, error.value) == ("webhook_url", url)
        assert why in error.message
        with pytest.raises(InvalidJob) as raised:  # a job's own URL: the same, with its index
            client.submit_batch([*jobs, {**jobs[0], "webhook_url": url}])
        [error] = raised.value.errors
        assert (error.field, error.value, error.index) == ("webhook_url", url, 1)
    with pytest.raises(InvalidJob) as raised:
        client.submit_batch(jobs, webhook_url="ftp://example.com/hook")
    assert "http:// or https://" in raised.value.errors[0].message


def test_private_target_refused_at_delivery(redis, hook_settings, receiver):
    """Accepted when allowed, then the deliverer's settings forbid it (or DNS changed): no
    request goes out, the try is recorded as refused."""
    from producer import FarmClient

    settings = hook_settings.model_copy(update={"webhook_allow_private": False})
    sender = WebhookSender(settings, FarmClient(settings), "strict")
    records = Records(redis)
    records.add_jobs("wh5", [("wh5-a", job("a", webhook_url=receiver.url))])
    records.cancel("wh5-a")
    assert sender.run_once() == 1
    [delivery] = batch_deliveries(redis, "wh5")
    assert delivery["last_answer"].startswith("refused: resolves to 127.0.0.1, a loopback")
    assert delivery["status"] == "pending" and delivery["attempts"] == 1
    assert receiver.received == []


def test_worker_delivers_a_rendered_job(farm, farm_settings, client, receiver):
    """Through the session farm: its worker renders the job and delivers both events; the
    image URL in the body fetches the PNG; the API's batch record shows the deliveries."""
    from dashboard import create_app

    handle = client.submit_batch(
        [{"prompt": "a hook", "model": "tiny", "steps": 2, "width": 64, "height": 64}],
        webhook_url=receiver.url)
    got = receiver.wait_for(lambda got: {r.payload["type"] for r in got if r.payload}
                            >= {"job.succeeded", "batch.completed"}, timeout=120)
    [succeeded] = [r for r in got if r.payload and r.payload["type"] == "job.succeeded"]
    assert succeeded.payload["data"]["batch_id"] == handle.id
    [image] = succeeded.payload["data"]["images"]
    with urllib.request.urlopen(image["url"], timeout=10) as response:
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"
    api = create_app({"SETTINGS": farm_settings, "TESTING": True}).test_client()
    deadline = time.monotonic() + 10
    while True:
        answer = api.get(f"/api/v1/batches/{handle.id}").get_json()
        if answer["batch"]["webhooks"]["delivered"] == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert answer["batch"]["webhooks"] == {"pending": 0, "delivered": 2, "failed": 0}
    assert answer["batch"]["webhook_url"] == receiver.url
    assert {d["type"] for d in answer["webhook_deliveries"]} == {"job.succeeded",
                                                                  "batch.completed"}
    page = api.get(f"/batches/{handle.id}").get_data(as_text=True)  # the dashboard's page
    table = page[page.index('id="webhooks"'):]
    assert "2 delivered, 0 pending, 0 failed" in table
    assert table.count('class="hook-delivered"') == 2 and "HTTP 200" in table


def test_redirects_not_followed_and_slow_receivers_time_out(redis, hook_settings):
    """A 3xx is a failed try (its target gets nothing); a receiver that does not answer within
    RENDERFARM_WEBHOOK_TIMEOUT is a failed try too, and the delivery stays pending."""
    from producer import FarmClient

    target, redirecting, hanging = (Receiver(WEBHOOK_SECRET) for _ in range(3))
    redirecting.status, redirecting.location = 307, target.url
    hanging.hang = threading.Event()
    try:
        settings = hook_settings.model_copy(update={"webhook_timeout": 0.5})
        sender = WebhookSender(settings, FarmClient(settings), "impatient")
        records = Records(redis)
        records.add_jobs("wh6", [("wh6-a", job("a", webhook_url=redirecting.url)),
                                 ("wh6-b", job("b", webhook_url=hanging.url))])
        records.cancel("wh6-a")
        records.cancel("wh6-b")
        sender.run_once()
        by_job = {d["job_id"]: d for d in batch_deliveries(redis, "wh6")}
        assert by_job["wh6-a"]["last_answer"].startswith("HTTP 307")
        assert "timed out" in by_job["wh6-b"]["last_answer"]
        assert {d["status"] for d in by_job.values()} == {"pending"}
        assert len(redirecting.received) == 1 and len(hanging.received) == 1
        assert target.received == []
    finally:
        hanging.hang.set()
        for receiver in (target, redirecting, hanging):
            receiver.close()


def test_a_slow_receiver_holds_one_sender_thread_not_every_delivery(redis, hook_settings):
    """RENDERFARM_WEBHOOK_SENDERS threads per process: while one receiver hangs on its try
    (due first), another receiver's delivery goes out; with one thread it would wait for the
    hanging try's timeout and the hanging delivery would already say "timed out"."""
    from producer import FarmClient
    from renderfarm.webhooks import start_sender

    hanging, fast = Receiver(WEBHOOK_SECRET), Receiver(WEBHOOK_SECRET)
    hanging.hang = threading.Event()
    stop = threading.Event()
    try:
        settings = hook_settings.model_copy(update={"webhook_timeout": 20, "webhook_senders": 2})
        records = Records(redis)
        records.add_jobs("wh9", [("wh9-slow", job("a", webhook_url=hanging.url)),
                                 ("wh9-fast", job("b", webhook_url=fast.url))])
        records.cancel("wh9-slow")  # due first: a single sender would take it first
        records.cancel("wh9-fast")
        threads = start_sender(settings, FarmClient(settings), stop, "pool")
        assert len(threads) == 2
        hanging.wait_for(lambda got: len(got) == 1)
        fast.wait_for(lambda got: len(got) == 1)
        def by_job() -> dict:
            return {d["job_id"]: d for d in batch_deliveries(redis, "wh9")}

        wait_for(lambda: by_job()["wh9-fast"]["status"] == "delivered", 10, "fast delivered")
        assert by_job()["wh9-slow"]["status"] == "pending"
        assert not by_job()["wh9-slow"]["last_answer"]  # its try is still open
    finally:
        stop.set()
        hanging.hang.set()
        hanging.close()
        fast.close()


def test_api_refuses_bad_webhook_urls_naming_the_field(hook_settings):
    from dashboard import create_app

    settings = hook_settings.model_copy(update={"webhook_allow_private": False})
    api = create_app({"SETTINGS": settings, "TESTING": True}).test_client()
    jobs = [{"prompt": "a", "model": "tiny", "steps": 2, "width": 64, "height": 64}]
    for url, says in [("http://169.254.169.254/latest/meta-data/", "link-local"),
                      (42, "http:// or https://"), ("gopher://example.com/", "http:// or https://")]:
        answer = api.post("/api/v1/batches", json={"jobs": jobs, "webhook_url": url})
        assert answer.status_code == 400, answer.get_data(as_text=True)
        [error] = answer.get_json()["errors"]
        assert (error["field"], error["value"]) == ("webhook_url", url)
        assert says in error["message"]


def test_rotating_the_secret_signs_with_both_keys(redis, hook_settings):
    """RENDERFARM_WEBHOOK_SECRET="NEW OLD": a receiver still on the old key and one on the new
    key both verify (the reference verifier), and one on neither refuses."""
    import base64

    from pydantic import SecretStr

    from producer import FarmClient

    new_key = "whsec_" + base64.b64encode(b"n" * 32).decode()
    stranger = "whsec_" + base64.b64encode(b"s" * 32).decode()
    on_old, on_new, on_neither = (Receiver(k) for k in (WEBHOOK_SECRET, new_key, stranger))
    try:
        settings = hook_settings.model_copy(
            update={"webhook_secret": SecretStr(f"{new_key} {WEBHOOK_SECRET}")})
        records = Records(redis)
        records.add_jobs("wh10", [(f"wh10-{n}", job(str(n), webhook_url=r.url))
                                  for n, r in enumerate((on_old, on_new, on_neither))])
        for n in range(3):
            records.cancel(f"wh10-{n}")
        WebhookSender(settings, FarmClient(settings), "rotating").run_once()
        for receiver in (on_old, on_new, on_neither):
            receiver.wait_for(lambda got: len(got) == 1)
        assert on_old.received[0].payload["type"] == "job.cancelled"
        assert on_new.received[0].payload["type"] == "job.cancelled"
        assert on_neither.received[0].payload is None  # neither signature is its key's
        assert on_old.received[0].headers["webhook-signature"].count("v1,") == 2
    finally:
        for receiver in (on_old, on_new, on_neither):
            receiver.close()


def test_webhook_secret_must_be_whsec_base64():
    from pydantic import ValidationError

    from renderfarm.settings import Settings

    for bad in ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!", "whsec_c2hvcnQ="):
        with pytest.raises(ValidationError) as raised:
            Settings(webhook_secret=bad)
        assert "webhook_secret" in str(raised.value)
    assert Settings(webhook_secret=WEBHOOK_SECRET).webhook_secret.get_secret_value() == (
        WEBHOOK_SECRET)
    with pytest.raises(ValidationError, match="key 2 must be 'whsec_'"):
        Settings(webhook_secret=f"{WEBHOOK_SECRET} MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
