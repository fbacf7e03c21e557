"""The embedded farm: a private Redis, N worker processes and the dashboard, started together.

``renderfarm up`` and ``renderfarm demo`` use it; so do the tests. With
``RENDERFARM_REDIS_URL`` set it starts no Redis and uses that one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pydantic import SecretStr

from renderfarm import keys
from renderfarm.connection import connect
from renderfarm.embedded import EmbeddedRedis, die_with_parent, read_farm_file, write_farm_file
from renderfarm.fleet import live_workers
from renderfarm.settings import Settings


class EmbeddedFarm:
    """Start with ``with EmbeddedFarm(settings, workers=2) as farm:``; everything stops on exit."""

    def __init__(
        self,
        settings: Settings,
        workers: int = 1,
        profile: str = "auto",
        preload: list[str] | None = None,
        log_dir: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ):
        self.settings = settings
        self.n_workers = workers
        self.profile = profile
        self.preload = preload or []
        self.log_dir = log_dir or settings.data_path / "logs"
        self.extra_env = extra_env or {}
        self.redis_server: EmbeddedRedis | None = None
        self.workers: list[subprocess.Popen] = []
        self.redis_url = settings.redis_url

    # -- redis ------------------------------------------------------------------------------
    def start_redis(self) -> str:
        if self.redis_url:
            return self.redis_url
        running = read_farm_file(self.settings.farm_file)
        if running:
            raise RuntimeError(
                f"a farm is already running in {self.settings.data_path}; "
                "stop it first or use another RENDERFARM_DATA_DIR"
            )
        self.redis_server = EmbeddedRedis(self.settings.data_path / "redis")
        self.redis_url = self.redis_server.start()
        write_farm_file(self.settings.farm_file, self.redis_url)
        self.settings = self.settings.model_copy(update={"redis_url": self.redis_url})
        return self.redis_url

    # -- workers ----------------------------------------------------------------------------
    def worker_env(self) -> dict[str, str]:
        """The workers' environment: this farm's settings (every one of them) over ours."""
        # The cores shared out between the workers, unless OMP_NUM_THREADS says otherwise here.
        threads = os.environ.get("OMP_NUM_THREADS") or str(
            max(1, (os.cpu_count() or 1) // max(1, self.n_workers)))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
        for name in type(self.settings).model_fields:
            value = getattr(self.settings, name)
            if isinstance(value, SecretStr):  # str() would give '**********'
                value = value.get_secret_value()
            if value is not None:
                env[f"RENDERFARM_{name.upper()}"] = str(value)
        env["RENDERFARM_REDIS_URL"] = self.redis_url or ""
        env["RENDERFARM_DATA_DIR"] = str(self.settings.data_path)
        env.update(self.extra_env)
        return env

    def start_worker(
        self,
        index: int | None = None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> subprocess.Popen:
        """Start worker ``index`` (the next one by default). ``env`` is added to (and overrides)
        :meth:`worker_env` for this worker only, and ``args`` are appended to its
        ``renderfarm worker`` command line: two workers can then have different
        ``RENDERFARM_MODELS_DIR``, ``--profile`` or other options."""
        index = len(self.workers) if index is None else index
        self.log_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "renderfarm", "worker", "--profile", self.profile,
                   "--name", f"w{index}-{os.getpid()}"]
        for model in self.preload:
            command += ["--preload", model]
        command += args or []
        log = open(self.log_dir / f"worker-{index}.log", "ab")  # noqa: SIM115 (owned by the child)
        # A session (and process group) of its own: a Ctrl-C in the terminal reaches only the
        # farm's owner, which stops the workers in order; the group is killed at the end, so
        # no child of a worker (a compile helper) outlives it.
        proc = subprocess.Popen(command, env={**self.worker_env(), **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=die_with_parent)
        log.close()
        if index < len(self.workers):
            self.workers[index] = proc
        else:
            self.workers.append(proc)
        return proc

    def wait_for_workers(self, count: int | None = None, timeout: float = 120.0,
                         warmup_timeout: float = 3600.0) -> None:
        """Block until ``count`` workers are ready: beating, models loaded and warmed up,
        consuming. ``timeout`` bounds the wait for workers that do not beat at all;
        while they beat ``starting`` (loading models, compiling: minutes with
        ``RENDERFARM_COMPILE=1`` on a GPU), the wait goes on up to ``warmup_timeout``."""
        count = self.n_workers if count is None else count
        redis = connect(self.settings)
        begun = time.monotonic()
        while True:
            live = live_workers(redis)
            ready = sum(w.status == "ready" for w in live)
            if ready >= count:
                return
            dead = [p for p in self.workers if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a worker exited with code {dead[0].returncode}; "
                                   f"see the logs in {self.log_dir}")
            waited = time.monotonic() - begun
            if waited > (warmup_timeout if len(live) >= count else timeout):
                raise TimeoutError(f"{ready} of {count} workers ready after {waited:.0f}s "
                                   f"({len(live) - ready} starting); see the logs in "
                                   f"{self.log_dir}")
            time.sleep(0.2)

    # -- whole farm -------------------------------------------------------------------------
    def start(self, wait: bool = True) -> EmbeddedFarm:
        self.start_redis()
        connect(self.settings).delete(keys.WORKERS)
        for i in range(self.n_workers):
            self.start_worker(i)
        if wait:
            self.wait_for_workers()
        return self

    def stop_workers(self, timeout: float = 30.0, hurry: threading.Event | None = None,
                     grace: float = 30.0) -> list[int]:
        """Stop the workers in order: SIGTERM (Celery's warm shutdown: no new job is taken, the
        running one finishes and is stored). When ``hurry`` is set or ``timeout`` passes,
        SIGUSR2: running jobs stop at their next step and go back to the queue at once (no
        lease to wait out). Whatever still runs ``grace`` seconds later is killed, with its
        process group. Returns the pids that had to be killed."""
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        gave_back = False
        killed = []
        while any(p.poll() is None for p in self.workers):
            now = time.monotonic()
            if not gave_back and (now > deadline or (hurry is not None and hurry.is_set())):
                for proc in self.workers:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGUSR2)
                gave_back, deadline = True, now + grace
            elif gave_back and now > deadline:
                killed = [p.pid for p in self.workers if p.poll() is None]
                break
            time.sleep(0.05)
        for proc in self.workers:
            _kill_group(proc)
        self.workers = []
        return killed

    def stop_redis(self) -> None:
        if self.redis_server:
            self.redis_server.stop()
            self.redis_server = None
            self.settings.farm_file.unlink(missing_ok=True)

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_workers(timeout, grace=min(30.0, timeout))
        self.stop_redis()

    def __enter__(self) -> EmbeddedFarm:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill what is left of a worker's process group (the worker, if it still runs, and any
    child it left behind), then reap the worker."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
