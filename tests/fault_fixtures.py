"""Fixtures of the fault tests: a farm of N real worker processes on its own redis-server and its
own S3 prefix, which a test may kill, restart and starve without disturbing the session farm.

Test modules load them with ``pytest_plugins = ["tests.fault_fixtures"]``.

Their workers run with test holds on (worker/testhooks.py): ``ff.hold_step(prompt, n)`` /
``ff.hold_upload(prompt)`` make a job stop at a point, ``ff.wait_held()`` waits until one has,
``ff.release(...)`` lets it go on. A test acts while a job is provably there, never after a sleep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from renderfarm import keys
from renderfarm.embedded import EmbeddedRedis
from renderfarm.farm import EmbeddedFarm
from renderfarm.schema import JobRecord, JobState
from renderfarm.settings import Settings
from worker import testhooks

FAULT_BUCKET = "faults"
#: The fault tests' jobs (test_faults.py, test_outages.py, test_stops.py): a quick one, and one
#: that a test holds at a step (worker/testhooks.py), never one timed to still be running.
SMALL = {"model": "tiny", "width": 64, "height": 64, "steps": 4, "scheduler": "euler"}
SLOW = {**SMALL, "width": 128, "height": 128, "steps": 12}
T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, what: str, poll: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout}s")
        time.sleep(poll)


class BrokenEndpoint:
    """S3 down: a listener on the endpoint's port that drops the connections it accepts,
    counting them, so the test sees that uploads met the outage and were retried. With
    ``forward_to``, connections after the first ``drop`` are passed through to that port (the
    endpoint comes back at a known point, with no race against a server's start)."""

    def __init__(self, port: int, drop: int | None = None, forward_to: int | None = None):
        self.connections = 0
        self.drop, self.forward_to = drop, forward_to
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.forward_to is None or self.drop is None or self.connections <= self.drop:
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.forward_to))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class HoldControl:
    """The test's side of worker/testhooks.py on one farm's Redis (its workers must run with
    holds on): ``hold_step`` / ``hold_upload`` make jobs with a prompt stop at a point,
    ``wait_held`` waits until one has, ``release`` lets it go on."""

    def __init__(self, redis, logs: Callable[[], str] = lambda: ""):
        self.redis, self.logs = redis, logs
        self.fields: set[str] = set()  # set by this control and not yet released

    def hold_step(self, prompt: str, step: int) -> str:
        """Jobs with ``prompt`` stop after denoising step ``step`` until released."""
        field = f"step:{prompt}"
        self.redis.hset(testhooks.HOLDS, field, step)
        self.fields.add(field)
        return field

    def move_hold(self, prompt: str, step: int) -> str:
        """A job held at a step of a ``hold_step`` goes on and stops again after ``step``."""
        return self.hold_step(prompt, step)

    def hold_upload(self, prompt: str) -> str:
        """Jobs with ``prompt`` stop after rendering, before storing anything, until released."""
        field = f"upload:{prompt}"
        self.redis.hset(testhooks.HOLDS, field, "")
        self.fields.add(field)
        return field

    def wait_held(self, timeout: float = 90) -> tuple[str, str, int]:
        """The next stop at a hold: (point, job id, step)."""
        try:
            event = wait_for(lambda: self.redis.lpop(testhooks.REACHED), timeout,
                             "a job stopping at a test hold")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; the workers' logs end:\n{self.logs()[-3000:]}") from None
        point, job_id, step = event.decode().split(":")
        return point, job_id, int(step)

    def release(self, *fields: str) -> None:
        if fields:
            self.redis.hdel(testhooks.HOLDS, *fields)
            self.fields.difference_update(fields)

    def release_all(self) -> None:
        """Every hold this control set (a failed test must not leave a shared worker held)."""
        self.release(*self.fields)


class FaultFarm:
    """One farm under test: its Redis, its workers (``farm.workers``) and a client."""

    def __init__(self, settings: Settings, redis_server: EmbeddedRedis, workers: int,
                 extra_env: dict[str, str] | None = None):
        from producer import FarmClient

        self.redis_server = redis_server
        self.settings = settings
        self.farm = EmbeddedFarm(settings, workers=workers, profile="cpu", preload=["tiny"],
                                 extra_env=extra_env)
        self.client = FarmClient(settings)
        self.holds = HoldControl(self.client.redis, self.logs)

    # -- processes --------------------------------------------------------------------------
    def start(self) -> FaultFarm:
        self.farm.start()
        return self

    def stop(self) -> None:
        self.farm.stop(timeout=15)
        self.redis_server.stop()

    def pid_of(self, record: JobRecord) -> int | None:
        """The pid of the worker named in the job's record (owner ``host:pid:tag``)."""
        return int(record.worker.split(":")[1]) if record.worker else None

    def index_of(self, pid: int | None) -> int | None:
        for i, proc in enumerate(self.farm.workers):
            if proc.pid == pid:
                return i
        return None

    def kill(self, index: int, sig: int = signal.SIGKILL) -> subprocess.Popen:
        proc = self.farm.workers[index]
        os.kill(proc.pid, sig)
        return proc

    def restart(self, index: int, wait: bool = True) -> subprocess.Popen:
        """Start worker ``index`` again (after it died); wait for its first heartbeat."""
        proc = self.farm.start_worker(index)
        if wait:
            self.wait_ready(proc)
        return proc

    def wait_ready(self, proc: subprocess.Popen, timeout: float = 90) -> None:
        redis = self.client.redis

        def beating() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"worker {proc.pid} exited with {proc.returncode}")
            return any(f":{proc.pid}:".encode() in w for w in redis.zrange(keys.WORKERS, 0, -1))

        wait_for(beating, timeout, f"worker {proc.pid} ready", poll=0.2)

    def log(self, index: int) -> str:
        path = self.farm.log_dir / f"worker-{index}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(self.log(i) for i in range(len(self.farm.workers)))

    # -- test holds (worker/testhooks.py) ---------------------------------------------------
    def hold_step(self, prompt: str, step: int) -> str:
        return self.holds.hold_step(prompt, step)

    def hold_upload(self, prompt: str) -> str:
        return self.holds.hold_upload(prompt)

    def wait_held(self, timeout: float = 90) -> tuple[str, str, int]:
        return self.holds.wait_held(timeout)

    def release(self, *fields: str) -> None:
        self.holds.release(*fields)

    # -- jobs -------------------------------------------------------------------------------
    def wait_state(self, job_id: str, states: set[JobState], timeout: float = 60) -> JobRecord:
        def reached() -> JobRecord | None:
            record = self.client.records.job(job_id)
            return record if record.state in states else None

        return wait_for(reached, timeout, f"job {job_id} in {sorted(s.value for s in states)}")

    def objects(self, record: JobRecord) -> list[str]:
        """The job's objects in storage, as keys relative to its batch."""
        prefix = f"{record.batch_id}/{record.id}"
        return [k.split("/", 1)[1] for k in self.client.storage.list(prefix)]

    def assert_one_set(self, job_id: str) -> None:
        """The job succeeded with exactly one set of objects in storage."""
        record = self.client.records.job(job_id)
        assert record.state is JobState.succeeded, (record.state, record.error)
        assert self.objects(record) == self.expected_objects(record)

    def expected_objects(self, record: JobRecord) -> list[str]:
        """One PNG per image and the JSON sidecar: exactly one set."""
        n = record.request.num_images
        return sorted([f"{record.id}-{k}.png" for k in range(n)] + [f"{record.id}.json"])


@pytest.fixture
def make_fault_farm(tmp_path: Path, models_dir: Path, s3_endpoint: str):
    """``make_fault_farm(workers=2, **settings)``: a started farm of its own, stopped after
    the test. ``s3_endpoint=`` picks another S3 endpoint, ``models_dir=`` another models dir,
    ``env=`` extra worker environment."""
    from storage.s3 import S3Storage

    made: list[FaultFarm] = []

    def make(workers: int = 2, env: dict[str, str] | None = None, start: bool = True,
             **overrides) -> FaultFarm:
        endpoint = overrides.pop("s3_endpoint", s3_endpoint)
        S3Storage(FAULT_BUCKET, "", endpoint_url=endpoint).ensure_bucket()
        server = EmbeddedRedis(tmp_path / f"redis-{len(made)}")
        url = server.start()
        fields = {
            "redis_url": url,
            "data_dir": tmp_path / f"farm-{len(made)}",
            "storage_url": f"s3://{FAULT_BUCKET}/{uuid.uuid4().hex[:8]}",
            "s3_endpoint_url": endpoint,
            "models_dir": models_dir,
            "lease_seconds": 2,
            **overrides,
        }
        settings = Settings(**fields)
        env = {testhooks.ENABLE_ENV: testhooks.ENABLE_VALUE, **(env or {})}
        fault_farm = FaultFarm(settings, server, workers, extra_env=env)
        made.append(fault_farm)
        return fault_farm.start() if start else fault_farm

    yield make
    for fault_farm in made:
        fault_farm.stop()
