"""Dashboard latency with a big farm history: 100,000 job records in Redis.

    .venv/bin/python bench/dashboard_latency.py --jobs 100000 --requests 200

Seeds 100 batches of 1,000 jobs (in various states) straight through ``Records.add_jobs``,
serves the dashboard with waitress on 127.0.0.1, and times over HTTP: the batches page, the
page of one 1,000-job batch, GET /api/v1/batches and GET /api/v1/batches/<id>. Target: p95
under 150 ms for the first three.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests

from dashboard import create_app
from dashboard.serve import make_server
from producer.client import new_id
from renderfarm.embedded import EmbeddedRedis
from renderfarm.records import Records
from renderfarm.schema import JobRequest
from renderfarm.settings import Settings


def seed(records: Records, jobs: int, per_batch: int) -> list[str]:
    request = JobRequest(prompt="a seeded history job", model="tiny", seed=1, width=512,
                         height=512, steps=25)
    batches = []
    for _ in range(jobs // per_batch):
        batch_id = new_id()
        records.add_jobs(batch_id, [(new_id(), request) for _ in range(per_batch)],
                         label="history", queues=["renderfarm.tiny"] * per_batch)
        batches.append(batch_id)
    return batches


def timed(session: requests.Session, url: str, n: int) -> dict:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        r = session.get(url, timeout=30)
        times.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, (url, r.status_code)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 1),
            "p95_ms": round(times[int(0.95 * (len(times) - 1))], 1),
            "max_ms": round(times[-1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--per-batch", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp, "redis"))
        settings = Settings(redis_url=server.start(), data_dir=Path(tmp))
        try:
            from redis import Redis

            t = time.perf_counter()
            batches = seed(Records(Redis.from_url(settings.redis_url)), args.jobs, args.per_batch)
            seeded_s = time.perf_counter() - t
            httpd = make_server(create_app({"SETTINGS": settings}), port=0)
            threading.Thread(target=httpd.run, daemon=True).start()
            base = f"http://127.0.0.1:{httpd.effective_port}"
            s = requests.Session()
            big = batches[len(batches) // 2]
            results = {
                "GET /batches (page)": timed(s, f"{base}/batches", args.requests),
                f"GET /batches/<id> (page, {args.per_batch} jobs)":
                    timed(s, f"{base}/batches/{big}", args.requests),
                "GET /api/v1/batches": timed(s, f"{base}/api/v1/batches", args.requests),
                "GET /metrics": timed(s, f"{base}/metrics", args.requests),
                "GET /api/v1/batches/<id>?limit=100":
                    timed(s, f"{base}/api/v1/batches/{big}?limit=100", args.requests),
            }
            httpd.close()
        finally:
            server.stop()
    print(json.dumps({"bench": "dashboard", "job_records": args.jobs,
                      "seed_seconds": round(seeded_s, 1), "requests_each": args.requests,
                      "results": results, "target": "p95 < 150 ms"}, indent=2))


if __name__ == "__main__":
    main()
