"""Celery's own tools against a real farm: ``celery -A renderfarm ...`` as subprocesses, task
states read from the real event stream, revoke cancelling farm jobs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from celery.events.state import State

from producer import FarmClient
from renderfarm.connection import celery_app
from renderfarm.embedded import free_port
from renderfarm.farm import EmbeddedFarm
from renderfarm.schema import JobState
from renderfarm.settings import Settings
from tests.fault_fixtures import HoldControl
from worker import testhooks

SMALL = {"model": "tiny", "width": 64, "height": 64, "steps": 2, "scheduler": "euler"}


@pytest.fixture(scope="module")
def tools_farm(tmp_path_factory, models_dir):
    models = tmp_path_factory.mktemp("tools-models")
    shutil.copytree(models_dir / "tiny", models / "tiny")
    shutil.copytree(models_dir / "tiny", models / "broken")
    weights = models / "broken" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    data = tmp_path_factory.mktemp("tools-farm")
    settings = Settings(data_dir=data, models_dir=models, storage_url=(data / "images").as_uri(),
                        lease_seconds=3, metrics_port=free_port())
    env = {testhooks.ENABLE_ENV: testhooks.ENABLE_VALUE}  # test holds: see the revoke test
    with EmbeddedFarm(settings, workers=1, profile="cpu", preload=["tiny"],
                      extra_env=env) as farm:
        yield farm


@pytest.fixture(scope="module")
def events(tools_farm):
    """Every task event of the farm, as celery's own event state (what Flower shows)."""
    app = celery_app(tools_farm.settings)
    state = State()
    stop = threading.Event()
    ready = threading.Event()

    def listen() -> None:
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": state.event})
            with receiver.consumer_context() as (connection, _, _):
                ready.set()
                while not stop.is_set():
                    try:
                        connection.drain_events(timeout=0.5)
                    except TimeoutError:
                        pass

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield state
    stop.set()
    thread.join(5)


def _cli(farm: EmbeddedFarm, *args: str) -> dict:
    """subprocess arguments for ``celery -A renderfarm <args>`` against ``farm``."""
    return {"args": [sys.executable, "-m", "celery", "-A", "renderfarm", *args],
            "env": {**farm.worker_env(), "PYTHONPATH": os.pathsep.join(sys.path)},
            "cwd": farm.settings.data_path, "text": True}


def celery_cli(farm: EmbeddedFarm, *args: str, timeout: float = 120) -> str:
    done = subprocess.run(**_cli(farm, *args), capture_output=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
    return found


def task_state(events: State, task_id: str, timeout: float = 60) -> str:
    """The task's state once it is a ready one (SUCCESS, FAILURE, REVOKED)."""
    ready = {"SUCCESS", "FAILURE", "REVOKED"}
    wait_for(lambda: (t := events.tasks.get(task_id)) is not None and t.state in ready,
             timeout, f"no final event of task {task_id}")
    return events.tasks[task_id].state


def test_ping_answered_between_jobs_of_a_batch(tools_farm):
    """The worker keeps taking the batch's jobs (model affinity) yet answers a ping between
    them: the reply comes while the batch still runs (before, a task held on to the model's
    jobs for up to 120 s and a ping waited for all five). The first job is held in its render
    until the ping's broadcast is on Redis (seen by a subscriber of the control channel, as the
    worker sees it), so the ping meets the batch with four jobs left whatever the speed of the
    machine or of the CLI's start. The four others render 50 steps each, so the batch outlasts
    the worker's next turn of its event loop by seconds (at 6 steps, a clean-clone CI run once
    saw all four end before the pong: under a second of work)."""
    client = FarmClient(tools_farm.settings)
    holds = HoldControl(client.redis)
    holds.hold_step("p0", 1)
    control = client.redis.pubsub(ignore_subscribe_messages=True)
    control.psubscribe("*celery.pidbox*")  # kombu's Redis fanout: PUBLISH on this channel
    ping = None
    try:
        # different sizes: no micro-batch joins them, each is one render
        batch = client.submit_batch([{**SMALL, "steps": 6 if k == 0 else 50,
                                      "height": 64 + 8 * k, "prompt": f"p{k}"}
                                     for k in range(5)])
        holds.wait_held(120)
        hostname = f"w0-{os.getpid()}@"  # EmbeddedFarm names its workers w<index>-<its pid>
        ping = subprocess.Popen(**_cli(tools_farm, "inspect", "ping", "--timeout", "300",
                                       "-d", _node(hostname)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: control.get_message(timeout=0.2), 120, "the ping's broadcast")
        holds.release_all()
        out, err = ping.communicate(timeout=300)
        assert ping.returncode == 0 and "pong" in out, out + err
        counts = batch.status().counts
        assert counts.get(JobState.succeeded, 0) < 5, "the ping waited for the whole batch"
        assert batch.wait(timeout=300).counts.get(JobState.succeeded) == 5
    finally:
        holds.release_all()
        control.close()
        if ping is not None and ping.poll() is None:
            ping.kill()


def _node(prefix: str) -> str:
    import socket

    return prefix + socket.gethostname()


def test_failed_job_is_failure_with_its_reason(tools_farm, events):
    client = FarmClient(tools_farm.settings)
    good = client.submit({**SMALL, "prompt": "fine"})
    bad = client.submit({**SMALL, "model": "broken", "prompt": "bad weights"})
    assert bad.wait(120).state is JobState.failed
    assert good.wait(120).state is JobState.succeeded
    assert task_state(events, bad.id) == "FAILURE"
    assert "safetensors" in events.tasks[bad.id].exception.lower()
    assert task_state(events, good.id) == "SUCCESS"
    assert good.id in events.tasks[good.id].result


def test_revoke_cancels_queued_and_running_jobs(tools_farm, events):
    """Revoked while provably rendering (held after step 2 of 20 by a test hold until both
    revokes are answered), the running job stops at its next step; the queued one never runs."""
    client = FarmClient(tools_farm.settings)
    holds = HoldControl(client.redis)
    prompt = "to be revoked while rendering"
    hold = holds.hold_step(prompt, 2)
    try:
        running = client.submit({**SMALL, "steps": 20, "prompt": prompt})
        queued = client.submit({**SMALL, "prompt": "revoked before it runs", "priority": 0})
        assert holds.wait_held() == ("step", running.id, 2)
        # the worker renders: Celery's handler answers later, the farm's listener at once
        assert f"{queued.id} cancelled" in celery_cli(tools_farm, "control", "revoke",
                                                      queued.id)
        assert queued.wait(60).state is JobState.cancelled
        assert queued.status().attempts == 0  # never ran
        answer = celery_cli(tools_farm, "control", "revoke", running.id)
        assert f"{running.id} cancelling" in answer, answer  # recorded before the reply
        assert running.status().cancel_requested
    finally:
        holds.release(hold)
    record = running.wait(60)
    assert record.state is JobState.cancelled and 2 <= record.step <= 3, record.step
    assert task_state(events, running.id) == "REVOKED"
    assert task_state(events, queued.id) == "REVOKED"


def test_health_worker_command(tools_farm):
    env = {**tools_farm.worker_env(), "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "renderfarm", "health", "worker"]
    ok = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ": ready, beat" in ok.stdout, ok.stdout + ok.stderr
    other = subprocess.run([*command, "--host", "no-such-host"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert other.returncode == 1 and "no worker of host no-such-host" in other.stdout


def test_worker_metrics_count_what_the_worker_did(tools_farm):
    """The worker's own /metrics (RENDERFARM_METRICS_PORT), parsed with prometheus_client's
    parser, against the records of every job this one-worker farm ran."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    client = FarmClient(tools_farm.settings)
    done = client.submit({**SMALL, "prompt": "counted"}).wait(120)
    assert done.state is JobState.succeeded
    ended: dict[tuple[str, str], int] = {}
    images: dict[tuple[str, str], int] = {}
    taken = 0
    for batch in client.records.batches(limit=1000):
        for job in client.records.batch_jobs(batch.id):
            if not job.attempts:
                continue  # cancelled before any worker took it: no worker ended it
            key = (job.request.model, job.state.value)
            ended[key] = ended.get(key, 0) + 1
            images[key] = images.get(key, 0) + job.request.num_images
            taken += 1
    url = f"http://127.0.0.1:{tools_farm.settings.metrics_port}/metrics"

    def scrape() -> dict[str, dict[tuple, float]]:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out: dict[str, dict[tuple, float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out

    # the counters are bumped right after the record is written: wait for them to catch up
    def caught_up() -> dict | None:
        m = scrape()
        succeeded = ended[("tiny", "succeeded")]
        return m if (m["renderfarm_worker_jobs_total"].get(
            (("model", "tiny"), ("outcome", "succeeded"))) == succeeded
            and m.get("renderfarm_worker_upload_seconds_count", {}).get(
                (("model", "tiny"),)) == succeeded) else None

    m = wait_for(caught_up, 30, "worker counters")
    jobs = {(dict(k)["model"], dict(k)["outcome"]): v
            for k, v in m["renderfarm_worker_jobs_total"].items()}
    assert jobs == ended
    assert {(dict(k)["model"], dict(k)["outcome"]): v
            for k, v in m["renderfarm_worker_images_total"].items()} == images
    loads = m["renderfarm_worker_model_load_seconds_count"]
    assert loads[(("model", "tiny"),)] == 1  # preloaded once, kept warm
    assert (("model", "broken"),) not in loads  # its load failed: no load time to report
    rendered = m["renderfarm_worker_render_seconds_count"][(("model", "tiny"), ("size", "64x64"))]
    assert rendered >= 1
    assert m["renderfarm_worker_step_seconds_count"][(("model", "tiny"), ("size", "64x64"))] \
        == rendered
    assert m["renderfarm_worker_upload_seconds_count"][(("model", "tiny"),)] == \
        ended[("tiny", "succeeded")]
    waited = sum(v for k, v in m["renderfarm_worker_queue_wait_seconds_count"].items())
    assert waited == taken  # every job it took (a job revoked before it ran was not)



def test_flower_shows_what_happened_to_each_job(tools_farm):
    """``celery -A renderfarm flower`` (the real Flower) reads the farm's events: a failed job
    is FAILURE with its error, a stored one SUCCESS."""
    import json
    import urllib.request

    port = free_port()
    env = {**tools_farm.worker_env(), "PYTHONPATH": os.pathsep.join(sys.path),
           "FLOWER_UNAUTHENTICATED_API": "true"}
    log = open(tools_farm.settings.data_path / "flower.log", "wb")  # noqa: SIM115
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "renderfarm", "flower",
                               f"--port={port}", "--address=127.0.0.1"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, cwd=tools_farm.settings.data_path)
    try:
        def tasks() -> dict | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tasks",
                                            timeout=5) as answer:
                    return json.load(answer)
            except OSError:
                return None

        wait_for(lambda: tasks() is not None, 120, "flower answering")

        def final(job_id: str) -> dict | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/task/info/{job_id}",
                                            timeout=5) as answer:
                    task = json.load(answer)
            except OSError:
                return None
            return task if task["state"] in ("SUCCESS", "FAILURE") else None

        client = FarmClient(tools_farm.settings)
        # Flower answers HTTP before its event receiver is subscribed: a first job it has seen
        # end says it is listening, so the jobs under test cannot fall in that gap.
        def listening() -> bool:
            probe = client.submit({**SMALL, "prompt": "is flower listening?"})
            assert probe.wait(120).state is JobState.succeeded
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if final(probe.id):
                    return True
                time.sleep(0.2)
            return False  # its events came before Flower subscribed: try another probe

        wait_for(listening, 120, "flower receiving events")
        bad = client.submit({**SMALL, "model": "broken", "prompt": "flower sees it fail"})
        good = client.submit({**SMALL, "prompt": "flower sees it succeed"})
        assert bad.wait(120).state is JobState.failed
        assert good.wait(120).state is JobState.succeeded

        failed = wait_for(lambda: final(bad.id), 60, f"flower's FAILURE in {tasks()}")
        assert failed["state"] == "FAILURE" and "safetensors" in failed["exception"].lower()
        done = wait_for(lambda: final(good.id), 60, "flower's SUCCESS")
        assert done["state"] == "SUCCESS" and good.id in done["result"]
    finally:
        flower.terminate()
        flower.wait(30)
        log.close()
