"""How long one Redis script holds Redis when a big batch is paused, resumed and pruned.

    .venv/bin/python bench/big_batch_scripts.py --jobs 100000

A redis-server of its own (renderfarm.embedded.EmbeddedRedis), one batch of ``--jobs`` queued
jobs recorded with Records.add_jobs. Then Records.pause, Records.resume, a cancel of every job
(pipelined) and Records.prune, with Redis' SLOWLOG recording every command over 50 ms: the
longest one of each step is how long Redis answered no other client (workers renewing leases,
claims, the dashboard). Past ``busy-reply-threshold`` (5 s by default) Redis answers every
other client ``BUSY``; a thread pings Redis every 50 ms throughout and counts the errors. The
code under test is whatever is on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from redis import Redis

from renderfarm.embedded import EmbeddedRedis
from renderfarm.records import Records
from renderfarm.schema import JobRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    args = parser.parse_args()
    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="rf-bench-")))
    server.start()
    try:
        print(json.dumps(run(server.url.split("?")[0], args.jobs), indent=2))
    finally:
        server.stop()


def run(url: str, n: int) -> dict:
    redis = Redis.from_url(url, socket_timeout=None)
    records = Records(redis)
    request = JobRequest(prompt="x", model="tiny", seed=1)
    records.add_jobs("big", [(f"j{k}", request) for k in range(n)])
    errors: list[str] = []
    stop = threading.Event()

    def ping() -> None:
        probe = Redis.from_url(url, socket_timeout=None)
        while not stop.wait(0.05):
            try:
                probe.ping()
            except Exception as exc:  # BUSY while a script runs past the threshold
                errors.append(str(exc)[:60])

    threading.Thread(target=ping, daemon=True).start()
    redis.config_set("slowlog-log-slower-than", 50_000)
    out: dict = {"jobs": n, "date": datetime.now(UTC).isoformat(timespec="seconds"),
                 "python": platform.python_version()}

    def step(name: str, call) -> None:
        redis.slowlog_reset()
        started = time.monotonic()
        call()
        slow = redis.slowlog_get(10_000)
        out[name] = {"seconds": round(time.monotonic() - started, 2),
                     "longest_command_s": round(max((e["duration"] for e in slow),
                                                    default=0) / 1e6, 3)}

    def cancel_all() -> None:
        pipe = redis.pipeline(transaction=False)
        for k in range(n):
            records._cancel(keys=records._keys(f"j{k}"), args=[f"j{k}"], client=pipe)
            if k % 5000 == 4999:
                pipe.execute()
        pipe.execute()

    step("pause", lambda: records.pause("big"))
    step("resume", lambda: records.resume("big"))
    cancel_all()
    step("prune", lambda: records.prune(0))
    stop.set()
    out["ping_errors"] = len(errors)
    out["first_error"] = errors[0] if errors else ""
    return out


if __name__ == "__main__":
    main()
