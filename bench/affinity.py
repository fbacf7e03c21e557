"""Model affinity against FIFO: model loads and wall time of a mixed two-model workload.

    .venv/bin/python bench/affinity.py --jobs 40 --order both

Two tiny models, ``--jobs`` jobs of each (64x64, ``--steps`` steps), submitted interleaved
(A, B, A, B, ...) as one batch to an embedded farm (real Redis, Celery, local storage) with two
worker processes that keep one model loaded (``--max-models 1``, so memory pressure is real).
Each workload runs once with affinity (the default) and once with ``--no-affinity``.

Orders:
- ``equal``: every job at priority 5. kombu rotates a worker's queues of equal priority, so
  without affinity the broker hands a worker A, B, A, B: the case affinity is for.
- ``alternating``: priorities 9, 8, ..., 0 repeating, model A on odd ones and B on even ones.
  Priority beats affinity (a worker leaves its loaded model when a job of higher priority
  waits for another), so here both modes reload: the price of honouring priorities.

Reported per run and worker: model loads (heartbeat ``loads``), jobs run, model switches seen
in the jobs' start order; and the wall time from submit to the last ``succeeded`` timestamp.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

MODELS = ("tiny", "tiny2")


def jobs(n: int, steps: int, order: str) -> list[dict]:
    out = []
    for i in range(2 * n):
        job = {"prompt": f"a small test image number {i}", "model": MODELS[i % 2], "width": 64,
               "height": 64, "steps": steps, "seed": i, "scheduler": "euler"}
        if order == "alternating":
            job["priority"] = 9 - i % 10
        out.append(job)
    return out


def run(models_dir: Path, data_dir: Path, workload: list[dict], affinity: bool) -> dict:
    from producer import FarmClient
    from renderfarm.connection import connect
    from renderfarm.farm import EmbeddedFarm
    from renderfarm.fleet import live_workers
    from renderfarm.settings import Settings

    settings = Settings(data_dir=data_dir, models_dir=models_dir)
    args = ["--max-models", "1"] + ([] if affinity else ["--no-affinity"])
    with EmbeddedFarm(settings, workers=0, profile="cpu") as farm:
        threads = str(max(1, (os.cpu_count() or 1) // 2))
        for _ in range(2):
            farm.start_worker(env={"OMP_NUM_THREADS": threads}, args=args)
        farm.wait_for_workers(2)
        client = FarmClient(farm.settings)
        t0 = time.time()
        batch = client.submit_batch(workload)
        batch.wait(timeout=1800, poll=0.05)
        records = batch.records()
        failed = [r.id for r in records if r.state.value != "succeeded"]
        if failed:
            raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {failed[0]}")
        wall = max(r.timestamps["succeeded"] for r in records) - t0
        done = time.time()
        redis = connect(farm.settings)
        while True:  # a heartbeat of each worker written after the last job
            workers = live_workers(redis)
            if len(workers) == 2 and all(w.beat > done for w in workers):
                break
            time.sleep(0.2)
    per_worker = []
    for w in workers:
        mine = sorted((r for r in records if r.worker == w.id),
                      key=lambda r: r.timestamps["started"])
        switches = sum(a.request.model != b.request.model for a, b in pairwise(mine))
        per_worker.append({"worker": w.id, "loads": w.loads, "jobs": len(mine),
                           "model_switches": switches})
    return {"affinity": affinity, "wall_s": round(wall, 3),
            "loads_total": sum(w["loads"] for w in per_worker), "workers": per_worker}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=40, help="Jobs of each model.")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--order", choices=["equal", "alternating", "both"], default="both")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in [n for n in os.environ if n.startswith("RENDERFARM_")]:
        del os.environ[name]  # a developer's own farm must not be measured instead

    import torch

    from worker.modelgen import make_model

    orders = ["equal", "alternating"] if args.order == "both" else [args.order]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp) / "models"
        for name in MODELS:
            make_model("tiny", models_dir / name)
        for order in orders:
            workload = jobs(args.jobs, args.steps, order)
            for affinity in (True, False):
                data_dir = Path(tmp) / f"{order}-{'affinity' if affinity else 'fifo'}"
                results.append({"order": order,
                                **run(models_dir, data_dir, workload, affinity)})

    print(json.dumps({
        "bench": "affinity", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "models": list(MODELS), "jobs_per_model": args.jobs, "size": "64x64",
        "steps": args.steps, "workers": 2, "max_models": 1, "runs": results,
        "cpus": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
        "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
