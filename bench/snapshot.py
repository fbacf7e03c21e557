"""A batch event stream's snapshot with 100,000 jobs in the batch: time and Redis commands.

    .venv/bin/python bench/snapshot.py --jobs 100000 --running 4 --requests 50

Seeds one batch of ``--jobs`` queued jobs (``Records.add_jobs``, on a queue no worker reads)
in a redis-server of its own, ``--running`` of them claimed (running) with a live preview
each, and as many running jobs with previews in another batch (the farm's other work). Then
times ``GET /api/v1/batches/<id>/events`` (no ``Last-Event-ID``) through the dashboard app in
this process (Flask's test client: no HTTP, no socket), from the request to the last
``preview`` event the snapshot sends (one per running job of the batch), ``--requests`` times,
and counts the Redis commands one snapshot runs (``INFO commandstats`` before and after; no
other client uses this redis-server). Run it against another tree (the code before a change)
with ``PYTHONPATH=<that tree>``: the script imports the dashboard from there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from redis import Redis

from dashboard import create_app
from producer.client import new_id
from renderfarm import keys
from renderfarm.embedded import EmbeddedRedis
from renderfarm.records import Records
from renderfarm.schema import JobRequest
from renderfarm.settings import Settings

CHUNK = 10_000  #: jobs recorded per add_jobs call while seeding


def seed(records: Records, redis: Redis, batch_id: str, jobs: int, running: int) -> list[str]:
    """``jobs`` queued jobs of ``batch_id``, ``running`` of them claimed, each with a preview;
    returns the running ones. They are spread over the batch, the last one last: a snapshot
    that reads the batch's jobs in order reads them all before its last preview."""
    request = JobRequest(prompt="a queued job", model="tiny", seed=1, width=512, height=512,
                         steps=25)
    ids: list[str] = []
    while len(ids) < jobs:
        n = min(CHUNK, jobs - len(ids))
        ids += records.add_jobs(batch_id, [(new_id(), request) for _ in range(n)],
                                queues=["bench.nobody"] * n)
    chosen = [ids[(k + 1) * jobs // running - 1] for k in range(running)] if running else []
    for job_id in chosen:
        assert records.claim(job_id, "bench-worker", 3600, 3).ok
        redis.set(keys.preview(job_id), b"\xff\xd8 a small jpeg " + job_id.encode(), ex=3600)
    return chosen


def commands(redis: Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(stats["calls"])
            for name, stats in redis.info("commandstats").items()}


def snapshot(api, batch_id: str, previews: int) -> float:
    """Seconds from the request to the snapshot's ``previews``-th preview event."""
    t = time.perf_counter()
    response = api.get(f"/api/v1/batches/{batch_id}/events", buffered=False)
    seen = 0
    text = ""
    try:
        for chunk in response.response:
            text += chunk.decode() if isinstance(chunk, bytes) else chunk
            seen = text.count("event: preview\n")
            if seen >= previews and "event: snapshot\n" in text:
                return time.perf_counter() - t
    finally:
        response.close()
    raise AssertionError(f"{seen} of {previews} previews in the stream: {text[-500:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--running", type=int, default=4)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp, "redis"))
        settings = Settings(redis_url=server.start(), data_dir=Path(tmp, "data"),
                            storage_url=Path(tmp, "images").as_uri())
        try:
            redis = Redis.from_url(settings.redis_url)
            records = Records(redis)
            t = time.perf_counter()
            batch_id = new_id()
            seed(records, redis, batch_id, args.jobs, args.running)
            seed(records, redis, new_id(), args.running, args.running)  # another batch's
            seeded_s = time.perf_counter() - t
            api = create_app({"TESTING": True, "SETTINGS": settings,
                              "RATELIMIT_ENABLED": False}).test_client()
            snapshot(api, batch_id, args.running)  # connections made, scripts loaded
            before = commands(redis)
            snapshot(api, batch_id, args.running)
            after = commands(redis)
            calls = {name: n - before.get(name, 0) for name, n in after.items()
                     if name != "info" and n != before.get(name, 0)}
            times = sorted(snapshot(api, batch_id, args.running) * 1000
                           for _ in range(args.requests))
        finally:
            server.stop()
    print(json.dumps({
        "bench": "snapshot", "jobs_in_batch": args.jobs, "running_in_batch": args.running,
        "running_elsewhere": args.running, "seed_seconds": round(seeded_s, 1),
        "requests": args.requests,
        "snapshot_ms": {"p50": round(statistics.median(times), 2),
                        "p95": round(times[int(0.95 * (len(times) - 1))], 2),
                        "max": round(times[-1], 2)},
        "redis_commands_per_snapshot": sum(calls.values()), "by_command": calls,
    }, indent=2))


if __name__ == "__main__":
    main()
