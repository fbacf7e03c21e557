"""The farm's overhead against calling the pipeline directly, in one run.

    .venv/bin/python bench/overhead.py --jobs 50 --rounds 2

(a) direct: one process, one tiny-model pipeline, ``--jobs`` calls (64x64, 10 steps) in a loop;
(b) farm: the same jobs submitted to an embedded farm with one worker process (real Redis,
    Celery, local storage) and timed from submit until the last record says ``succeeded``
    (the records' own timestamps, so no polling delay is counted).
Rounds alternate (a) and (b); the medians are compared. Target: farm <= 1.10x direct.
Each side gets ``--threads`` torch threads (default 1: OpenMP threads spinning against other
processes make 2-thread runs on a shared 2-core box swing by 10x); the farm's worker is idle
while (a) runs, and (a) is idle during (b). ``--max-batch 1`` (default) turns micro-batching
off, so the ratio is the farm's own overhead; a larger value shows what batching adds.

``--compare-events`` (issue 12) runs a second farm beside the first, with Celery task events
off and no worker /metrics (``RENDERFARM_TASK_EVENTS=0``, no ``RENDERFARM_METRICS_PORT``),
against the first with both on; rounds alternate direct, quiet farm, farm.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def job(i: int, size: int, steps: int) -> dict:
    return {"prompt": f"a small test image number {i}", "model": "tiny", "width": size,
            "height": size, "steps": steps, "seed": i, "scheduler": "euler"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on each side (1 is steady on a shared 2-core box)")
    parser.add_argument("--compare-events", action="store_true",
                        help="also time a farm without task events and worker metrics")
    parser.add_argument("--max-batch", type=int, default=1,
                        help="the worker's micro-batch; 1 measures the farm's pure overhead")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from producer import FarmClient
    from renderfarm.farm import EmbeddedFarm
    from renderfarm.schema import JobRequest
    from renderfarm.settings import Settings
    from worker.modelgen import make_model
    from worker.pipelines import PipelineCache
    from worker.profiles import detect_profile
    from worker.render import render

    torch.set_num_threads(args.threads)
    jobs = [job(i, args.size, args.steps) for i in range(args.jobs)]
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), max_batch=args.max_batch)
        make_model("tiny", settings.models_path / "tiny")
        cache = PipelineCache(settings.models_path, detect_profile("cpu"))
        requests = [JobRequest(**j) for j in jobs]
        render(cache, requests[0])  # warm, as the farm's worker is warmed by --preload

        from contextlib import ExitStack

        from renderfarm.embedded import free_port

        variants = {"farm": settings.model_copy(update={"metrics_port": free_port()})}
        if args.compare_events:
            variants["quiet"] = Settings(data_dir=Path(tmp) / "quiet", task_events=False,
                                         models_dir=settings.models_path,
                                         max_batch=args.max_batch)
        direct, times = [], {name: [] for name in variants}
        with ExitStack() as stack:
            clients = {}
            for name, farm_settings in variants.items():
                farm = stack.enter_context(EmbeddedFarm(
                    farm_settings, workers=1, profile="cpu", preload=["tiny"],
                    extra_env={"OMP_NUM_THREADS": str(args.threads)}))
                clients[name] = FarmClient(farm.settings)
                clients[name].submit_batch(jobs[:2]).wait(timeout=120)  # warm its first call
            for _ in range(args.rounds):
                t = time.perf_counter()
                for request in requests:
                    render(cache, request)
                direct.append(time.perf_counter() - t)
                for name, client in clients.items():
                    t0 = time.time()
                    batch = client.submit_batch(jobs)
                    batch.wait(timeout=600, poll=0.05)
                    records = batch.records()
                    assert all(r.state.value == "succeeded" for r in records)
                    times[name].append(max(r.timestamps["succeeded"] for r in records) - t0)
        farm_times = times["farm"]

    d, f = statistics.median(direct), statistics.median(farm_times)
    print(json.dumps({
        "bench": "overhead", "jobs": args.jobs, "size": args.size, "steps": args.steps,
        "direct_s": [round(x, 3) for x in direct], "farm_s": [round(x, 3) for x in farm_times],
        "direct_images_per_s": round(args.jobs / d, 2),
        "farm_images_per_s": round(args.jobs / f, 2),
        "ratio_farm_over_direct": round(f / d, 3), "target": "<= 1.10",
        "farm_max_batch": args.max_batch,
        "per_job_overhead_ms": round((f - d) / args.jobs * 1000, 1),
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.machine(), "torch": torch.__version__,
        **({"quiet_farm_s": [round(x, 3) for x in times["quiet"]],
            "events_and_metrics_over_quiet": round(f / statistics.median(times["quiet"]), 3)}
           if "quiet" in times else {}),
    }, indent=2))


if __name__ == "__main__":
    main()
