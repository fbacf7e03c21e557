"""Shared fixtures: a real redis-server, a real S3 endpoint (moto's server), the tiny model,
and a running farm of real Celery worker processes. Nothing here patches Redis, boto3 or Celery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from renderfarm.embedded import EmbeddedRedis, free_port
from renderfarm.settings import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One OpenMP thread for this process and every worker it starts (EmbeddedFarm keeps a set
# OMP_NUM_THREADS): two test processes share two cores, and two threads per worker on a busy
# CPU render many times slower, not faster (test_family_farm: 440 s -> 88 s).
os.environ["OMP_NUM_THREADS"] = "1"
# boto3 in this process and in worker processes reads these: moto accepts any credentials.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-key-id")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
for _name in list(os.environ):
    if _name.startswith("RENDERFARM_"):
        del os.environ[_name]  # a developer's own farm settings must not leak into tests

BUCKET = "renders"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # Standard Webhooks' docs' example


#: The test files that take longest (farms and worker processes of their own, compiles, a
#: browser), roughly longest first, as ranked by the per-test durations of the suite's runs on
#: the 2-core VM (2026-11-28). `make test` hands whole files to its 2 processes (``--dist
#: loadfile``) in the order collected (``--no-loadscope-reorder``), so these start first and the
#: files handed out last are short: neither process sits idle at the end while the other runs a
#: long file.
#: (xdist's own order, most tests first, put these last.) A new slow file goes in this list.
SLOWEST_FILES = [
    "test_faults.py", "test_routing.py", "test_compile.py", "test_celery_tools.py",
    "test_family_farm.py", "test_browser_ux.py", "test_cli.py", "test_previews.py",
    "test_e2e.py", "test_outages.py", "test_webhooks.py", "test_browser.py",
    "test_lost_work_farm.py", "test_hostile.py", "test_oom.py", "test_a1111.py",
    "test_fair_share.py", "test_fair_attacks.py", "test_stops.py", "test_up_stop.py",
    "test_multihost.py", "test_worker_lost_page.py", "test_lora_render.py", "test_families.py",
    "test_bad_records.py", "test_pipelines.py", "test_batching.py", "test_single_file.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of SLOWEST_FILES first, in its order; then the others, most tests first (as
    xdist would order them); each file's tests in their own order. Deterministic, so every
    xdist process collects the same order."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    counts: dict[str, int] = {}
    for item in items:
        counts[item.path.name] = counts.get(item.path.name, 0) + 1

    def key(indexed: tuple[int, pytest.Item]) -> tuple[int, int, str, int]:
        index, item = indexed
        name = item.path.name
        return rank.get(name, len(rank)), -counts[name], name, index

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> EmbeddedRedis:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


# Databases 1-15 of the session's redis-server, handed out one per user (db 0 is the session
# farm's). Under pytest-xdist every process has a redis-server, and so a pool, of its own.
_FREE_DBS = list(range(1, 16))


@pytest.fixture(scope="session")
def take_redis_db(redis_url):
    """``take_redis_db()``: the URL of an empty Redis database of the caller's own on the
    session's redis-server; it goes back to the pool when the caller's scope ends."""
    from redis import Redis

    def take(request: pytest.FixtureRequest) -> str:
        if not _FREE_DBS:
            raise RuntimeError("all 15 spare Redis databases are taken")
        db = _FREE_DBS.pop(0)
        url = f"{redis_url.rsplit('/', 1)[0]}/{db}"
        with Redis.from_url(url) as redis:
            redis.flushdb()
        request.addfinalizer(lambda: _FREE_DBS.append(db))
        return url

    return take


@pytest.fixture(scope="module")
def module_redis_url(request, take_redis_db) -> str:
    """A Redis database of this module's own (emptied at its start): its records and queues
    stay apart from the session farm's (db 0), whose workers reap and serve there."""
    return take_redis_db(request)


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    from worker.modelgen import make_model

    directory = tmp_path_factory.mktemp("models")
    make_model("tiny", directory / "tiny")
    return directory


@pytest.fixture(scope="session")
def farm_settings(tmp_path_factory, redis_url, s3_endpoint, models_dir) -> Settings:
    from storage.s3 import S3Storage

    S3Storage(BUCKET, "", endpoint_url=s3_endpoint).ensure_bucket()
    return Settings(
        redis_url=redis_url,
        data_dir=tmp_path_factory.mktemp("farm"),
        storage_url=f"s3://{BUCKET}/farm",
        s3_endpoint_url=s3_endpoint,
        models_dir=models_dir,
        lease_seconds=3,
        # webhooks (tests/test_webhooks.py): receivers listen on 127.0.0.1; retries come fast
        webhook_secret=WEBHOOK_SECRET,
        webhook_allow_private=True,
        webhook_retry_schedule="0.2,0.2,0.2,0.5,1,1",
        webhook_timeout=3,
    )


@pytest.fixture(scope="session")
def farm(farm_settings):
    """One real Celery worker process running the tiny model, shared by the session. It runs
    with test holds on (worker/testhooks.py; the ``holds`` fixture): only jobs whose prompt a
    test holds ever stop."""
    from renderfarm.farm import EmbeddedFarm
    from worker import testhooks

    # One torch thread: two test processes share the two cores, and two OpenMP threads per
    # worker on a busy CPU render many times slower, not faster (test_family_farm: 440 s -> 88 s).
    env = {testhooks.ENABLE_ENV: testhooks.ENABLE_VALUE, "OMP_NUM_THREADS": "1"}
    with EmbeddedFarm(farm_settings, workers=1, profile="cpu", preload=["tiny"],
                      extra_env=env) as running:
        yield running


@pytest.fixture
def holds(farm, client):
    """Test holds on the session farm's worker (tests/fault_fixtures.py ``HoldControl``): a job
    whose prompt the test holds stops at that point until released. Every hold the test set
    is released after it, so a failed test never leaves the shared worker waiting."""
    from tests.fault_fixtures import HoldControl

    def logs() -> str:
        path = farm.log_dir / "worker-0.log"
        return path.read_text(errors="replace") if path.exists() else ""

    control = HoldControl(client.redis, logs)
    yield control
    control.release_all()


@pytest.fixture
def client(farm_settings):
    from producer import FarmClient

    return FarmClient(farm_settings)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for in-process renders: on a busy 2-core machine the default (one per
    core) spins and runs the pipeline tests several times slower. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """Each test module starts with dynamo's caches empty. Compiled tests in several modules
    (test_compile, test_families, test_lora_render) share one process under xdist; every new
    UNet instance adds cache entries to the same ``forward`` code object, and past dynamo's
    recompile limit it silently runs eagerly: a later module would then count fewer graphs than
    it compiled. Nothing is imported for modules that never touched torch._dynamo."""
    import sys

    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()
    yield
