"""Ctrl-C of `renderfarm up`, as a user would press it, with a job mid-render (stopped at a test
hold, worker/testhooks.py, so the signal provably lands while it renders): the job finishes and
is stored before Redis stops, and no process is left; a second Ctrl-C puts the job back in the
queue at once (no lease to wait out). The records are read afterwards from the farm's own Redis
files, started again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading

import pytest

from renderfarm.embedded import EmbeddedRedis
from renderfarm.schema import JobState
from renderfarm.settings import Settings
from tests.fault_fixtures import wait_for
from tests.test_cli import RF
from worker import testhooks

SLOW = {"model": "tiny", "width": 64, "height": 64, "steps": 6, "scheduler": "euler"}


class Up:
    """`renderfarm up` in a subprocess; its output collected line by line."""

    def __init__(self, tmp_path, models_dir):
        self.data = tmp_path / "data"
        shutil.copytree(models_dir, self.data / "models")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RENDERFARM_")}
        env.update({"RENDERFARM_DATA_DIR": str(self.data), "RENDERFARM_LEASE_SECONDS": "60",
                    testhooks.ENABLE_ENV: testhooks.ENABLE_VALUE})
        self.proc = subprocess.Popen([*RF, "up", "--workers", "1", "--no-dashboard"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_line("Ctrl-C stops the farm", 120)
        from producer import FarmClient

        self.client = FarmClient(Settings(data_dir=self.data))
        self.pids = [int(w.decode().split(":")[1])
                     for w in self.client.redis.zrange("rf:workers", 0, -1)]
        self.pids.append(int(self.client.redis.info("server")["process_id"]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def ctrl_c(self) -> None:
        """What a terminal does on Ctrl-C: SIGINT to its whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait_line(self, text: str, timeout: float = 60) -> None:
        def seen() -> bool:
            assert self.proc.poll() is None or any(text in x for x in self.lines), self.output
            return any(text in line for line in self.lines)

        wait_for(seen, timeout, f"{text!r} in the output of renderfarm up")

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def held_job(self, prompt: str, step: int) -> str:
        redis = self.client.redis
        redis.hset(testhooks.HOLDS, f"step:{prompt}", step)
        job = self.client.submit({**SLOW, "prompt": prompt})
        event = wait_for(lambda: redis.lpop(testhooks.REACHED), 90, "the job held")
        assert event.decode() == f"step:{job.id}:{step}"
        return job.id

    def release(self, prompt: str) -> None:
        self.client.redis.hdel(testhooks.HOLDS, f"step:{prompt}")

    def stop_or_kill(self) -> None:
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def ended(self) -> None:
        assert self.proc.wait(120) == 0, self.output
        for pid in self.pids:  # the workers, their process groups and redis-server: all gone
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
            with pytest.raises(ProcessLookupError):
                os.killpg(pid, 0)

    def records_after(self):
        """The farm's Redis (its append-only file) started again, to read what it kept."""
        from producer import FarmClient

        server = EmbeddedRedis(self.data / "redis")
        url = server.start()
        return server, FarmClient(Settings(data_dir=self.data, redis_url=url))


@pytest.mark.timeout(300)
def test_ctrl_c_lets_the_running_job_finish_then_stops_everything(tmp_path, models_dir):
    up = Up(tmp_path, models_dir)
    try:
        job_id = up.held_job("finish me", 2)
        up.ctrl_c()
        up.wait_line("stopping: no new jobs")
        up.release("finish me")  # the worker goes on: Redis is still there for it
        up.wait_line("workers stopped")
    finally:
        up.stop_or_kill()
    up.ended()
    out = up.output
    assert out.index("workers stopped") < out.index("farm stopped")
    assert "logs: " in out and str(up.data / "logs") in out
    server, client = up.records_after()
    try:
        record = client.records.job(job_id)
        assert record.state is JobState.succeeded, (record.state, record.error, out)
        assert record.attempts == 1
        assert (up.data / "images" / record.results[0].key).exists()
    finally:
        server.stop()


@pytest.mark.timeout(300)
def test_second_ctrl_c_puts_the_running_job_back_in_the_queue_at_once(tmp_path, models_dir):
    up = Up(tmp_path, models_dir)
    try:
        job_id = up.held_job("give me back", 2)
        up.ctrl_c()
        up.wait_line("stopping: no new jobs")
        up.ctrl_c()
        up.wait_line("second Ctrl-C")
        up.release("give me back")  # the worker stops at its next step
        up.wait_line("workers stopped")
    finally:
        up.stop_or_kill()
    up.ended()
    server, client = up.records_after()
    try:
        record = client.records.job(job_id)
        assert record.state is JobState.queued, (record.state, record.error, up.output)
        assert record.attempts == 0 and record.step == 0  # the attempt did not count
        assert client.redis.zscore("rf:running", job_id) is None  # no lease to wait out
        assert record.history and record.history[-1]["state"] == "rendering"
        assert client.redis.zscore("rf:outbox", job_id) is None  # its message was sent
        messages = [json.loads(m) for k in client.redis.keys("renderfarm*")
                    for m in client.redis.lrange(k, 0, -1)]
        assert [m["headers"]["id"] for m in messages] == [job_id]  # its message, once
    finally:
        server.stop()
