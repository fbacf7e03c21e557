"""Fixtures of the dashboard's tests; test modules load them with
``pytest_plugins = ["tests.dashboard_fixtures"]`` (and import nothing else from here).

They use the lead's session ``redis_url`` fixture when conftest.py provides one, else start
their own redis-server. Either way the dashboard tests use their own Redis database number,
which each test empties first, so they never touch other tests' keys.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from dashboard import create_app
from renderfarm import keys
from renderfarm.embedded import EmbeddedRedis
from renderfarm.settings import Settings

DASHBOARD_DB = 7
TOKEN = "s3cret-token"


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


@pytest.fixture(scope="session")
def dashboard_redis_url(request, tmp_path_factory) -> str:
    try:
        take = request.getfixturevalue("take_redis_db")
    except pytest.FixtureLookupError:
        server = EmbeddedRedis(tmp_path_factory.mktemp("dashboard-redis"))
        url = server.start()
        request.addfinalizer(server.stop)
        return _with_db(url, DASHBOARD_DB)
    return take(request)  # a database of the session's redis-server, for the session


@pytest.fixture
def dash_settings(dashboard_redis_url: str, tmp_path: Path) -> Settings:
    """Settings of a fresh farm: empty Redis db, local storage and a models dir with 'tiny'."""
    import redis

    r = redis.Redis.from_url(dashboard_redis_url)
    r.flushdb()
    r.close()
    models = tmp_path / "models"
    (models / "tiny").mkdir(parents=True)
    (models / "tiny" / "model_index.json").write_text("{}")
    return Settings(redis_url=dashboard_redis_url, data_dir=tmp_path / "data", models_dir=models,
                    storage_url=(tmp_path / "images").as_uri())


@pytest.fixture
def make_dash_app(dash_settings: Settings):
    """``make_app(**config)``: a dashboard app on the test farm, with config overrides."""

    def make(**config):
        return create_app({"TESTING": True, "SETTINGS": dash_settings, **config})

    return make


@pytest.fixture
def dash_app(make_dash_app):
    return make_dash_app()


@pytest.fixture
def dash_client(dash_app):
    return dash_app.test_client()


@pytest.fixture
def dash_farm(dash_app):
    """The dashboard's FarmClient."""
    return dash_app.extensions["renderfarm"]


def _job(**fields) -> dict:
    return {"prompt": "a red bicycle", "model": "tiny", "width": 64, "height": 64, "steps": 2,
            **fields}


@pytest.fixture
def make_job():
    """``make_job(**fields)``: a small valid job as a dict."""
    return _job


@pytest.fixture
def queue_depth(dash_farm):
    """``queue_depth()``: messages waiting in the farm's queue, all priority sub-queues."""
    def depth() -> int:
        queues = [q.decode() for q in dash_farm.redis.smembers(keys.QUEUES)]
        names = [n for q in queues for n in [q] + [f"{q}\x06\x16{p}" for p in range(1, 10)]]
        return sum(dash_farm.redis.llen(n) for n in names)

    return depth


@pytest.fixture
def fake_beat(dash_farm):
    """``fake_beat(worker_id, age, current_job="", status="ready")``: a worker's heartbeat,
    ``age`` s old."""

    def beat(worker_id: str, age: float, current_job: str = "", status: str = "ready") -> None:
        t = time.time() - age
        dash_farm.redis.hset(keys.worker(worker_id), mapping={
            "id": worker_id, "host": "testhost", "hardware": "cpu", "device": "cpu",
            "models": json.dumps(["tiny"]), "loaded": json.dumps(["tiny"]),
            "current_job": current_job, "jobs_done": 3, "beat": t, "status": status,
        })
        dash_farm.redis.zadd(keys.WORKERS, {worker_id: t})

    return beat
