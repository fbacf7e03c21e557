"""Routing, refusals, priorities, model affinity and heartbeats, with real worker processes.

Each farm here has its own Redis database on this module's own redis-server, local storage in
a temp dir, and workers started one by one with their own models dir and options, so the
workers of one test never take the jobs of another.
"""

from __future__ import annotations

import itertools
import signal
import socket
import time
from pathlib import Path

import pytest

from producer import FarmClient
from renderfarm import keys
from renderfarm.connection import connect
from renderfarm.embedded import EmbeddedRedis
from renderfarm.errors import InvalidJob
from renderfarm.farm import EmbeddedFarm
from renderfarm.fleet import WorkerInfo, live_workers, read_workers
from renderfarm.schema import JobRequest, JobState, now
from renderfarm.settings import Settings
from tests.fault_fixtures import wait_for

JOB = {"width": 64, "height": 64, "steps": 3, "scheduler": "euler"}
HEARTBEAT_FIELDS = {"id", "host", "hardware", "device", "device_name", "memory_total",
                    "memory_free", "max_pixels", "max_batch", "models", "loaded", "speeds",
                    "status", "current_job", "step", "jobs_done", "loads", "beat"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Models dirs: ``a`` holds tiny, ``b`` holds tiny2 (another tiny model), ``ab`` both."""
    from worker.modelgen import make_model

    root = tmp_path_factory.mktemp("routing-models")
    make_model("tiny", root / "a" / "tiny")
    make_model("tiny", root / "b" / "tiny2")
    (root / "ab").mkdir()
    (root / "ab" / "tiny").symlink_to(root / "a" / "tiny")
    (root / "ab" / "tiny2").symlink_to(root / "b" / "tiny2")
    return {"a": root / "a", "b": root / "b", "ab": root / "ab"}


@pytest.fixture(scope="module")
def routing_redis(tmp_path_factory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("routing-redis"))
    server.start()
    yield server
    server.stop()


_databases = itertools.count(1)


def new_farm(redis: EmbeddedRedis, models_dir: Path, data_dir: Path) -> EmbeddedFarm:
    """A started farm with no worker, on a Redis database of its own."""
    url = redis.url.rsplit("/", 1)[0] + f"/{next(_databases)}"
    settings = Settings(redis_url=url, data_dir=data_dir, models_dir=models_dir, lease_seconds=3)
    connect(settings).flushdb()
    return EmbeddedFarm(settings, workers=0, profile="cpu").start()


@pytest.fixture
def farms(routing_redis, models, tmp_path):
    """Make farms (models dir ``ab`` for the client); all stop when the test ends."""
    made: list[EmbeddedFarm] = []

    def make() -> EmbeddedFarm:
        made.append(new_farm(routing_redis, models["ab"], tmp_path / f"farm{len(made)}"))
        return made[-1]

    yield make
    for farm in made:
        farm.stop()


@pytest.fixture
def farm(farms) -> EmbeddedFarm:
    return farms()


def start_worker(farm: EmbeddedFarm, models_dir: Path, *args: str) -> int:
    """Start a worker process with its own models dir; returns its pid."""
    env = {"RENDERFARM_MODELS_DIR": str(models_dir), "OMP_NUM_THREADS": "1"}
    return farm.start_worker(env=env, args=list(args)).pid


def heartbeat(farm: EmbeddedFarm, pid: int, after: float = 0.0, timeout: float = 60) -> WorkerInfo:
    """The live heartbeat of the worker process ``pid`` (its id is host:pid:random), the first
    one written after ``after``."""
    redis = connect(farm.settings)
    deadline = time.monotonic() + timeout
    while True:
        for info in live_workers(redis):
            if info.id.split(":")[1] == str(pid) and info.beat > after:
                return info
        if any(p.pid == pid and p.poll() is not None for p in farm.workers):
            raise RuntimeError(f"worker {pid} exited; see the logs in {farm.log_dir}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no heartbeat from worker {pid} after {timeout}s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def fleet(routing_redis, models, tmp_path_factory):
    """Worker A has only tiny, worker B only tiny2. Yields (farm, A's beat, B's beat)."""
    farm = new_farm(routing_redis, models["ab"], tmp_path_factory.mktemp("fleet"))
    try:
        pids = start_worker(farm, models["a"]), start_worker(farm, models["b"])
        yield farm, *(heartbeat(farm, pid) for pid in pids)
    finally:
        farm.stop()


def test_each_job_runs_on_a_worker_that_has_its_model(fleet):
    farm, a, b = fleet
    assert (a.models, b.models) == (["tiny"], ["tiny2"])
    client = FarmClient(farm.settings)
    jobs = [{**JOB, "model": m, "prompt": f"job {i}", "steps": 2 + i}
            for i, m in enumerate(["tiny", "tiny2"] * 4)]
    jobs.append({**JOB, "model": "tiny2", "prompt": "cpu only", "hardware": "cpu"})
    batch = client.submit_batch(jobs)
    assert batch.wait(timeout=60).counts == {JobState.succeeded: 9}
    owner = {"tiny": a.id, "tiny2": b.id}
    queue = farm.settings.queue
    for record in batch.records():
        assert record.worker == owner[record.request.model], record.request.prompt
    assert {r.queue for r in batch.records()} == {
        f"{queue}.tiny", f"{queue}.tiny2", f"{queue}.tiny2.cpu"}


def test_a_job_no_live_worker_can_run_is_refused_at_submit(fleet):
    farm, *_ = fleet
    client = FarmClient(farm.settings)
    client.redis.hset(keys.MODELS, "ghost", now())  # a model a worker that left once had
    before = client.records.count_jobs()
    cases = [
        ({"model": "ghost"}, "model", "ghost"),
        ({"model": "tiny", "hardware": "gpu"}, "hardware", "gpu"),
        ({"model": "tiny2", "width": 2048, "height": 1024}, "width", 2048),
    ]
    for fields, field, value in cases:
        with pytest.raises(InvalidJob) as refused:
            client.submit({**JOB, "prompt": "refused", **fields})
        [error] = refused.value.errors
        assert (error.field, error.value) == (field, value), str(error)
    with pytest.raises(InvalidJob) as refused:  # one job the fleet cannot run refuses the batch
        client.submit_batch([{**JOB, "model": "tiny", "prompt": "fine"},
                             {**JOB, "model": "tiny", "prompt": "gpu", "hardware": "gpu"}])
    assert [(e.field, e.index) for e in refused.value.errors] == [("hardware", 1)]
    assert client.records.count_jobs() == before  # nothing was enqueued


def test_without_live_workers_jobs_wait_in_their_queue_then_run(farm, models):
    client = FarmClient(farm.settings)
    batch = client.submit_batch([{**JOB, "model": "tiny", "prompt": f"early {i}", "steps": 2 + i}
                                 for i in range(3)])
    queue = f"{farm.settings.queue}.tiny"
    assert {r.state for r in batch.records()} == {JobState.queued}
    assert client.redis.zcard(keys.pending(queue)) == 3  # visible: the queues page reads these
    assert queue.encode() in client.redis.smembers(keys.QUEUES)
    start_worker(farm, models["a"])
    assert batch.wait(timeout=60).counts == {JobState.succeeded: 3}
    assert client.redis.zcard(keys.pending(queue)) == 0


def test_higher_priority_jobs_run_first(farm, models):
    client = FarmClient(farm.settings)
    # Other steps than the high ones: a micro-batch never mixes the two groups.
    low = client.submit_batch([{**JOB, "model": "tiny", "prompt": f"low {i}", "priority": 1}
                               for i in range(4)])
    high = client.submit_batch([{**JOB, "model": "tiny", "prompt": f"high {i}", "priority": 9,
                                 "steps": 4} for i in range(3)])
    start_worker(farm, models["a"])
    assert high.wait(timeout=60).counts == {JobState.succeeded: 3}
    assert low.wait(timeout=60).counts == {JobState.succeeded: 4}
    for state in ("started", "succeeded"):
        last_high = max(r.timestamps[state] for r in high.records())
        first_low = min(r.timestamps[state] for r in low.records())
        assert last_high < first_low, state


def test_affinity_loads_each_model_once_where_fifo_reloads(farms, models):
    """One model slot (max_models 1) and jobs of two models at equal priority: kombu rotates
    the two models' queues, so the broker hands them out A, B, A, B; steps differ per job so
    micro-batching cannot group them. The same workload runs beside it with affinity off.
    (Affinity orders jobs of equal priority only: a higher-priority job of another model
    makes a worker leave its loaded model — see WorkerService._next_loaded_group.)"""
    with_affinity, fifo = farms(), farms()
    pids = (start_worker(with_affinity, models["ab"], "--max-models", "1"),
            start_worker(fifo, models["ab"], "--max-models", "1", "--no-affinity"))
    for f, pid in zip((with_affinity, fifo), pids, strict=True):
        assert heartbeat(f, pid).models == ["tiny", "tiny2"]
    jobs = [{**JOB, "model": ("tiny", "tiny2")[i % 2], "prompt": f"job {i}", "steps": 2 + i,
             "priority": 5} for i in range(10)]
    batches = [FarmClient(f.settings).submit_batch(jobs) for f in (with_affinity, fifo)]
    for batch in batches:
        assert batch.wait(timeout=90).counts == {JobState.succeeded: 10}
    done = time.time()
    loads = [heartbeat(f, pid, after=done).loads
             for f, pid in zip((with_affinity, fifo), pids, strict=True)]
    assert loads[0] <= 2, loads
    assert loads[1] >= 8, loads  # the baseline really reloads: the test can tell them apart


def test_a_starting_worker_beats_starting_until_its_models_are_warm(farm, models):
    """A worker beats from the start, ``starting`` while it loads (or compiles: minutes on a
    GPU), so the fleet sees it and ``wait_for_workers`` waits for it past ``timeout``."""
    pid = start_worker(farm, models["ab"], "--preload", "tiny", "--preload", "tiny2")
    first = heartbeat(farm, pid)
    assert first.status == "starting"
    farm.wait_for_workers(1, timeout=0.01, warmup_timeout=120)  # starting: the wait goes on
    ready = heartbeat(farm, pid, after=time.time())
    assert ready.status == "ready" and sorted(ready.loaded) == ["tiny", "tiny2"]
    assert not ready.current_job


def test_workers_prune_old_ended_batches_with_keep_days_beat_and_a_killed_one_shows_lost(
        farm, models):
    """RENDERFARM_KEEP_DAYS: a worker removes an old ended batch on its own; a new one stays.
    The same worker (one process start for both checks) then renders a job; its heartbeat
    describes it; SIGKILLed, it is shown lost, still listed."""
    from renderfarm.records import Records

    records = Records(connect(farm.settings))
    for batch_id, age_days in (("old", 3.0), ("new", 0.5)):
        records.add_jobs(batch_id, [(f"{batch_id}-1", JobRequest(prompt="x", model="tiny",
                                                                 seed=1))])
        records.cancel(f"{batch_id}-1")
        t = time.time() - age_days * 86400
        records.redis.zadd(keys.BATCHES, {batch_id: t})
        records.redis.hset(keys.batch(batch_id), "created_at", t)
    pid = farm.start_worker(env={"RENDERFARM_MODELS_DIR": str(models["a"]),
                                 "RENDERFARM_KEEP_DAYS": "2", "OMP_NUM_THREADS": "1"}).pid
    deadline = time.monotonic() + 60
    while records.exists("old-1"):
        assert time.monotonic() < deadline, "the worker did not prune the old batch"
        time.sleep(0.2)
    assert records.exists("new-1") and [b.id for b in records.batches()] == ["new"]
    assert "pruned 1 batches (1 jobs) older than 2 days" in (
        farm.log_dir / "worker-0.log").read_text()

    client = FarmClient(farm.settings)
    assert client.submit({**JOB, "model": "tiny", "prompt": "beat"}).wait(60).state is \
        JobState.succeeded
    info = heartbeat(farm, pid, after=time.time())
    fields = {k.decode() for k in client.redis.hkeys(keys.worker(info.id))}
    assert HEARTBEAT_FIELDS <= fields
    assert (info.host, info.hardware) == (socket.gethostname(), "cpu")
    assert info.device_name and info.memory_total > 0
    assert info.max_pixels == 1024 * 1024
    assert (info.models, info.loaded, info.loads) == (["tiny"], ["tiny"], 1)
    assert info.speeds["tiny@64x64"] > 0
    assert not info.lost

    [proc] = farm.workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [last] = [w for w in read_workers(client.redis) if w.id == info.id]
    # Shown lost once LOST_AFTER_BEATS beats are missed (WorkerInfo.lost, from the recorded
    # beat; its clock edge is tested in test_api), still listed: not dropped.
    shown = wait_for(lambda: next((w for w in read_workers(client.redis)
                                   if w.id == info.id and w.lost), None),
                     30, "the killed worker shown as lost")
    assert shown.beat == last.beat  # nothing beat for the dead worker after the kill
    assert info.id not in {w.id for w in live_workers(client.redis)}
