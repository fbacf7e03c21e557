"""A1111 ``txt2img`` of ``batch_size`` N on a farm of W workers, against N sequential calls.

    .venv/bin/python bench/a1111.py --workers 2 --batch 4 --size 128 --steps 20 --rounds 3

An embedded farm (real Redis, Celery worker processes, local storage, a tiny model built here
with seeded random weights), its dashboard served by waitress, and plain HTTP calls to
``/sdapi/v1/txt2img`` as an A1111 client makes them. Rounds alternate:

- **batch**: one call with ``batch_size: N`` (N single-image farm jobs, any worker takes them);
- **sequential**: N calls of ``batch_size: 1``, one after the other (what a client does against
  one A1111 process, and what the farm's spreading should beat).

Timed client side, call start to answer. Also reported: which worker rendered each image of the
batch calls (so one can see whether the batch was spread or micro-batched on one worker).
Medians are compared; the JSON object is printed last.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = parser.parse_args()

    from dashboard import create_app
    from dashboard.serve import make_server
    from renderfarm.connection import connect
    from renderfarm.farm import EmbeddedFarm
    from renderfarm.records import Records
    from renderfarm.settings import Settings
    from worker.modelgen import make_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_model("tiny", root / "models" / "tiny")
        settings = Settings(data_dir=root / "data", models_dir=root / "models",
                            storage_url=(root / "images").as_uri())
        with EmbeddedFarm(settings, workers=0, profile="cpu") as farm:
            for _ in range(args.workers):
                farm.start_worker(env={"OMP_NUM_THREADS": str(args.threads)},
                                  args=["--preload", "tiny"])
            farm.wait_for_workers(args.workers)
            server = make_server(create_app({"SETTINGS": farm.settings}), port=0)
            threading.Thread(target=server.run, daemon=True).start()
            url = f"http://127.0.0.1:{server.effective_port}/sdapi/v1/txt2img"
            records = Records(connect(farm.settings))
            body = {"prompt": "a lighthouse on a cliff", "width": args.size,
                    "height": args.size, "steps": args.steps, "sampler_name": "Euler a"}

            def call(seed: int, batch_size: int) -> dict:
                answer = requests.post(url, json={**body, "seed": seed,
                                                  "batch_size": batch_size}, timeout=1800)
                answer.raise_for_status()
                return json.loads(answer.json()["info"])

            for w in range(2):  # warm-up: every worker has rendered this size once
                call(10_000 + w * 10, args.batch)
            batch_s, sequential_s, spread = [], [], []
            for r in range(args.rounds):
                t0 = time.perf_counter()
                info = call(r * 100, args.batch)
                batch_s.append(time.perf_counter() - t0)
                jobs = records.batch_jobs(info["renderfarm_batch_id"])
                spread.append(sorted({j.worker or "" for j in jobs}).__len__())
                t0 = time.perf_counter()
                for i in range(args.batch):
                    call(r * 100 + 50 + i, 1)
                sequential_s.append(time.perf_counter() - t0)
            server.close()

    batch_med, seq_med = statistics.median(batch_s), statistics.median(sequential_s)
    result = {
        "bench": "a1111", "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.system()}", "workers": args.workers,
        "batch_size": args.batch, "size": args.size, "steps": args.steps,
        "threads_per_worker": args.threads,
        "batch_call_s": [round(x, 2) for x in batch_s],
        "sequential_calls_s": [round(x, 2) for x in sequential_s],
        "median_batch_s": round(batch_med, 2), "median_sequential_s": round(seq_med, 2),
        "speedup_batch_over_sequential": round(seq_med / batch_med, 2),
        "workers_used_per_batch_call": spread,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
