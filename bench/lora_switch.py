"""LoRA switching against a model reload, on one worker's pipeline cache.

    .venv/bin/python bench/lora_switch.py --model sd15-random --jobs 12 --steps 1 --size 64

Builds the model (``renderfarm make-model`` kinds, random weights: ``tiny`` in seconds,
``sd15-random`` in about a minute) and two LoRAs for it (``make_lora``: one in diffusers/peft
format, one in kohya format, rank ``--rank``), then renders ``--jobs`` jobs through the worker's
own code (``worker.pipelines.PipelineCache`` and ``worker.render.render``, the path a Celery
worker runs) alternating LoRA A, LoRA B and no LoRA, so every job switches the set.

Reported:
- ``first load``: reading each LoRA into the loaded model (once per LoRA per worker);
- ``switch``: ``PipelineCache.use_loras`` of an alternating job, once both LoRAs are loaded
  (``set_adapters`` / ``disable_lora``: the whole cost of a LoRA change);
- ``model reload``: evicting the model and loading it again (what a LoRA change would cost a
  farm that baked LoRAs into its models), mean of ``--reloads``;
- ``job``: mean render time of the alternating jobs, and of as many jobs all with LoRA A.
Model loads (``PipelineCache.loads``) and LoRA loads (``lora_loads``) are printed as proof that
switching reloaded nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "sd15-random"])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument("--models-dir", type=Path, help="reuse a folder (the model is built "
                        "there once); default: a temporary one")
    args = parser.parse_args()

    import torch

    from renderfarm.schema import parse_job
    from worker.compat import lora_set
    from worker.modelgen import make_lora, make_model
    from worker.pipelines import PipelineCache
    from worker.profiles import detect_profile
    from worker.render import render

    folder = args.models_dir or Path(tempfile.mkdtemp(prefix="lora-bench-"))
    model_dir = folder / args.model
    if not (model_dir / "model_index.json").is_file():
        make_model(args.model, model_dir)
    names = (f"bench_{args.model}_a", f"bench_{args.model}_b")  # one pair per model kind
    for name, fmt, seed in ((names[0], "peft", 1), (names[1], "kohya", 2)):
        make_lora(model_dir, folder / "loras" / f"{name}.safetensors", fmt, seed=seed,
                  rank=args.rank, scale=0.05)
    profile = detect_profile("auto")
    cache = PipelineCache(folder, profile)

    t = time.perf_counter()
    cache.get(args.model)
    first_model_load = time.perf_counter() - t

    def job(k: int, loras: list[dict]):
        return parse_job({"prompt": f"a test image {k}", "model": args.model,
                          "width": args.size, "height": args.size, "steps": args.steps,
                          "seed": k, "loras": loras})

    def timed(request) -> float:
        t = time.perf_counter()
        render(cache, request)
        if profile.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    sets = [[{"name": names[0]}], [{"name": names[1], "weight": 0.7}], []]
    first_loads = []
    for k, loras in enumerate(sets[:2]):  # read each LoRA once
        t = time.perf_counter()
        cache.use_loras(args.model, lora_set(job(k, loras)))
        first_loads.append(time.perf_counter() - t)
    loads_before, lora_loads_before = cache.loads, cache.lora_loads

    switches, alternating = [], []
    for k in range(args.jobs):
        request = job(k, sets[k % 3])
        t = time.perf_counter()
        cache.use_loras(args.model, lora_set(request))
        switches.append(time.perf_counter() - t)
        cache.use_loras(args.model, lora_set(job(k, sets[(k + 1) % 3])))  # leave another set
        alternating.append(timed(request))
    same = [timed(job(k, sets[0])) for k in range(args.jobs)]
    switch_loads = (cache.loads - loads_before, cache.lora_loads - lora_loads_before)

    reloads = []
    for _ in range(args.reloads):
        t = time.perf_counter()
        cache.evict(args.model)
        cache.get(args.model)
        reloads.append(time.perf_counter() - t)

    lora_mb = sum((folder / "loras" / f"{n}.safetensors").stat().st_size
                  for n in names) / 2 / 2**20
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {profile.name} profile",
        "model": args.model, "size": args.size, "steps": args.steps, "jobs": args.jobs,
        "lora_rank": args.rank, "lora_mb": round(lora_mb, 1),
        "first_model_load_s": round(first_model_load, 3),
        "lora_first_load_s": [round(x, 3) for x in first_loads],
        "switch_s_median": round(statistics.median(switches), 4),
        "switch_s_max": round(max(switches), 4),
        "model_reload_s_mean": round(statistics.mean(reloads), 3),
        "job_s_alternating_mean": round(statistics.mean(alternating), 3),
        "job_s_same_lora_mean": round(statistics.mean(same), 3),
        "model_loads_while_switching": switch_loads[0],
        "lora_loads_while_switching": switch_loads[1],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
