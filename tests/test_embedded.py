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


def test_the_farms_children_do_not_outlive_a_killed_owner(tmp_path):
    """The farm's children run in sessions of their own (a terminal's Ctrl-C reaches only their
    owner); when the owner itself is SIGKILLed (a test timeout, the OOM killer) they must not
    run on as orphans: the redis-server and the worker get SIGTERM and go."""
    import subprocess
    import sys

    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from renderfarm.farm import EmbeddedFarm\n"
        "from renderfarm.settings import Settings\n"
        "d = Path(sys.argv[1])\n"
        "farm = EmbeddedFarm(Settings(data_dir=d, models_dir=d / 'models'), workers=1,\n"
        "                    profile='cpu')\n"
        "farm.start_redis()\n"
        "worker = farm.start_worker(0)\n"
        "print(farm.redis_server.process.pid, worker.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        children = [int(pid) for pid in owner.stdout.readline().split()]
        assert len(children) == 2
        for pid in children:
            os.kill(pid, 0)  # alive while their owner is
    finally:
        owner.kill()
        owner.wait()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # an exited child of init is reaped at once; a zombie of ours would be reaped by wait
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] == "Z"

    try:
        wait_for(lambda: all(gone(pid) for pid in children), 60, "the owner's children gone")
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
