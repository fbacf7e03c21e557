"""The embedded farm's redis-server (renderfarm/embedded.py), as the README promises it: a
password, 127.0.0.1 only, AOF fsynced every second, no eviction; and a crash (SIGKILL, not a
clean SIGTERM) loses no acknowledged job."""

from __future__ import annotations

import os
import signal

import pytest
import redis

from renderfarm.embedded import EmbeddedRedis
from renderfarm.records import Records
from renderfarm.schema import JobRequest, JobState
from tests.fault_fixtures import wait_for


def aof_written(client: redis.Redis) -> bool:
    info = client.info("persistence")
    return info["aof_enabled"] == 1 and info["aof_buffer_length"] == 0 and \
        info["aof_pending_bio_fsync"] == 0


@pytest.fixture
def server(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_hardening(server: EmbeddedRedis):
    client = redis.Redis.from_url(server.url)
    config = {k: client.config_get(k)[k] for k in
              ("bind", "appendonly", "appendfsync", "maxmemory-policy", "requirepass", "save")}
    assert config == {"bind": "127.0.0.1", "appendonly": "yes", "appendfsync": "everysec",
                      "maxmemory-policy": "noeviction", "requirepass": server.password,
                      "save": ""}
    assert len(server.password) >= 32  # a fresh random one per farm
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=server.port).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=server.port, password="guess").ping()


def test_sigkill_loses_no_acknowledged_job(server: EmbeddedRedis):
    records = Records(redis.Redis.from_url(server.url))
    request = JobRequest(prompt="survives a crash", model="tiny", seed=1)
    records.add_jobs("crash", [(f"job-{i}", request) for i in range(20)])
    records.cancel("job-3")
    # appendfsync everysec: a write is in the AOF file once Redis says its AOF buffer is
    # empty (it may hold up to ~2 s of writes under load: the loss everysec allows).
    wait_for(lambda: aof_written(records.redis), 30, "the AOF buffer written")
    os.kill(server.process.pid, signal.SIGKILL)  # no shutdown: no final save, no fsync
    server.process.wait()

    server.start()  # the same directory, port and password: the AOF is replayed
    after = Records(redis.Redis.from_url(server.url))
    jobs = after.jobs([f"job-{i}" for i in range(20)])
    assert [j.state for j in jobs] == [JobState.cancelled if i == 3 else JobState.queued
                                      for i in range(20)]
    assert [j.request.prompt for j in jobs] == ["survives a crash"] * 20
