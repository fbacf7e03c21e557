"""Fair share: time-to-last-image of a small batch submitted right after a big one.

    .venv/bin/python bench/fairness.py --big 2000 --small 4

One worker process (embedded farm: real Redis, Celery, local storage in a temp dir) with the
tiny model preloaded and warmed by a few jobs. A ``--big``-job batch is submitted, then at
once a ``--small``-job batch (same model, size and steps, so they share micro-batches), all at
priority 5. Measured from the records (Redis' clock): the small batch's time from its submit to
its last job's ``succeeded``; how many big jobs had succeeded by then; and that time in
job-times (the worker's mean time per job over every job it ended from the big batch's submit
to then). The rest of the big batch is then cancelled: it measures nothing more. The code under
test is whatever is on ``PYTHONPATH``: run it once against a tree before fair share and once
after to compare (FIFO serves the whole big batch first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path


def job(prompt: str, steps: int, seed: int) -> dict:
    return {"prompt": prompt, "model": "tiny", "width": 64, "height": 64, "steps": steps,
            "seed": seed, "scheduler": "euler"}


def run(models_dir: Path, data_dir: Path, big: int, small: int, steps: int,
        timeout: float) -> dict:
    from producer import FarmClient
    from renderfarm.farm import EmbeddedFarm
    from renderfarm.settings import Settings
    from storage import open_storage

    settings = Settings(data_dir=data_dir, models_dir=models_dir)
    with EmbeddedFarm(settings, workers=1, profile="cpu", preload=["tiny"]) as farm:
        client = FarmClient(farm.settings)
        client.submit_batch([job("warm-up", steps, i) for i in range(8)]).wait(timeout=300)
        big_batch = client.submit_batch([job(f"big {i}", steps, i) for i in range(big)])
        small_batch = client.submit_batch([job(f"small {i}", steps, i) for i in range(small)])
        small_batch.wait(timeout=timeout, poll=0.05)
        small_records = small_batch.records()
        small_created = small_batch.status().created_at
        small_last = max(r.timestamps["succeeded"] for r in small_records)
        big_records = big_batch.records()
        big_created = big_batch.status().created_at
        big_done_before = sum(1 for r in big_records
                              if r.timestamps.get("succeeded", float("inf")) <= small_last)
        calls = pipeline_calls(open_storage(farm.settings), big_records, small_records,
                               small_last)
        big_batch.cancel()  # the rest of the big batch measures nothing more
    failed = [r.id for r in small_records if r.state.value != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {failed[0]}")
    # one job-time: the worker's mean time per job over the jobs it ended in that window
    job_time = (small_last - big_created) / (big_done_before + small)
    return {
        "small_time_to_last_image_s": round(small_last - small_created, 3),
        "small_in_job_times": round((small_last - small_created) / job_time, 1),
        "big_jobs_succeeded_before_small_last": big_done_before,
        "mean_job_time_s": round(job_time, 4),
        "pipeline_calls": calls,
    }


def pipeline_calls(storage, big_records, small_records, until: float) -> list[str]:
    """The worker's pipeline calls (micro-batches) that ended jobs by ``until``, in the order
    they began rendering, each as a string of its jobs' batches (B big, S small): read from
    the sidecars' ``rendered_with``."""
    letter = {r.id: "B" for r in big_records} | {r.id: "S" for r in small_records}
    ended = [r for r in [*big_records, *small_records]
             if r.timestamps.get("succeeded", float("inf")) <= until]
    calls: dict[frozenset, float] = {}
    for record in ended:
        sidecar = json.loads(storage.get(f"{record.batch_id}/{record.id}.json"))
        group = frozenset([record.id, *sidecar.get("rendered_with", [])])
        calls[group] = min(calls.get(group, float("inf")), record.timestamps["rendering"])
    return ["".join(sorted(letter.get(i, "?") for i in group))
            for group, _ in sorted(calls.items(), key=lambda item: item[1])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", type=int, default=2000)
    parser.add_argument("--small", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--label", default="", help="What code this run measures (e.g. main).")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in [n for n in os.environ if n.startswith("RENDERFARM_")]:
        del os.environ[name]  # a developer's own farm must not be measured instead

    import torch

    from worker.modelgen import make_model

    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp) / "models"
        make_model("tiny", models_dir / "tiny")
        t0 = time.monotonic()
        result = run(models_dir, Path(tmp) / "farm", args.big, args.small, args.steps,
                     args.timeout)
    print(json.dumps({
        "bench": "fairness", "label": args.label,
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "model": "tiny",
        "size": "64x64", "steps": args.steps, "workers": 1, "big": args.big,
        "small": args.small, **result, "bench_wall_s": round(time.monotonic() - t0, 1),
        "cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
