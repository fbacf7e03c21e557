"""it/s and images/s of the worker's own pipeline at several batch sizes, and peak memory.

    python3 bench/batch_sweep.py                         # GPU: sd15-random, 512, 25 steps
    python3 bench/batch_sweep.py --compile max-autotune  # compiled UNet, warm-up timed
    .venv/bin/python bench/batch_sweep.py --device cpu --model tiny --size 64 --steps 10

The pipeline is the one a worker renders with: ``PipelineCache`` under the ``gpu`` profile
(fp16, SDPA, channels_last; with ``--compile MODE`` a ``torch.compile``d UNet warmed up by
``PipelineCache.warmup`` for ``--size`` at each batch size just before it is timed, its
seconds per bucket recorded),
or on ``--device cpu`` ``Profile("cpu", "cpu", float32, max_batch=8)``. Each batch size B gets
one untimed call, then ``--repeats`` timed calls of B prompts (classifier-free guidance 7.0,
so the UNet sees 2B), PIL images out as the worker gets them. Per B: seconds per call (median),
images/s, it/s of the whole call (steps / call seconds) and of the denoising loop alone (from
the step-end callbacks). Then, unless ``--mem-batch 0``, peak ``torch.cuda.max_memory_allocated``
of one call at ``--mem-size`` and ``--mem-batch``. With ``--compile``, one call at batch 1
after switching to the ``ddim`` scheduler (integer timesteps) says whether a scheduler swap
compiles a new graph (``unique_graphs`` before and after).

Each result is printed as a JSON line as soon as it exists, and the whole as one JSON object
at the end (also to ``--json``). ``--budget-s`` skips what would start after that many seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model", default="sd15-random", help="tiny or sd15-random (built)")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="a folder holding --model; default: build it in a temp dir")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scheduler", default="euler")
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help="torch.compile the UNet with this mode (max-autotune, "
                             "reduce-overhead, default)")
    parser.add_argument("--mem-size", type=int, default=768)
    parser.add_argument("--mem-batch", type=int, default=8, help="0: no memory measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--budget-s", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.monotonic()

    import torch

    from worker.modelgen import make_model
    from worker.pipelines import PipelineCache, set_scheduler
    from worker.profiles import Profile, detect_profile

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        profile = detect_profile("gpu")  # raises if torch sees no CUDA device
    else:
        profile = Profile("cpu", "cpu", torch.float32, max_batch=8)
    largest = max(batches + ([args.mem_batch] if args.mem_batch and not args.compile else []))
    profile = dataclasses.replace(
        profile, max_batch=largest, compile=bool(args.compile),
        compile_mode=args.compile or profile.compile_mode,
        compile_backend="inductor", warmup_sizes=((args.size, args.size),))
    cuda = profile.device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def over_budget() -> bool:
        return args.budget_s is not None and time.monotonic() - start > args.budget_s

    def call(pipe, batch: int, size: int, seed: int) -> dict:
        """One pipeline call of ``batch`` images; seconds and the denoising loop's it/s."""
        ends: list[float] = []

        def on_step_end(_pipe, _i, _t, kwargs):
            sync()
            ends.append(time.perf_counter())
            return kwargs

        sync()
        t = time.perf_counter()
        images = pipe(
            prompt=[f"a lighthouse on a cliff at dusk, painting number {seed + k}"
                    for k in range(batch)],
            width=size, height=size, num_inference_steps=args.steps, guidance_scale=7.0,
            generator=[torch.Generator("cpu").manual_seed(seed + k) for k in range(batch)],
            callback_on_step_end=on_step_end,
        ).images
        sync()
        seconds = time.perf_counter() - t
        assert len(images) == batch, f"{len(images)} images for batch {batch}"
        loop = (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else None
        return {"s": seconds, "loop_it_per_s": loop}

    result: dict = {
        "bench": "batch_sweep", "date": datetime.date.today().isoformat(),
        "model": args.model, "size": args.size, "steps": args.steps,
        "scheduler": args.scheduler, "guidance_scale": 7.0, "device": profile.device,
        "device_name": torch.cuda.get_device_name(0) if cuda
        else platform.processor() or platform.machine(),
        "dtype": str(profile.dtype).replace("torch.", ""), "compile": args.compile,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "batches": [], "skipped": [],
    }
    with tempfile.TemporaryDirectory(prefix="batch-sweep-") as tmp:
        models = args.models_dir
        if models is None:
            models = Path(tmp) / "models"
            t = time.perf_counter()
            make_model(args.model, models / args.model)
            result["build_s"] = round(time.perf_counter() - t, 2)
        cache = PipelineCache(models, profile)
        t = time.perf_counter()
        pipe = cache.get(args.model)
        sync()
        result["load_s"] = round(time.perf_counter() - t, 2)
        set_scheduler(pipe, args.scheduler)
        emit({"load_s": result["load_s"], "build_s": result.get("build_s")})

        if args.compile:
            result["warmup_s"] = {}
        for batch in batches:
            if over_budget():
                result["skipped"].append(f"batch {batch}")
                continue
            if args.compile:
                # One compile per batch bucket at --size (PipelineCache.warmup): its seconds.
                warm = cache.warmup(args.model, sizes=[(args.size, args.size)],
                                    batch_sizes=[batch])
                result["warmup_s"].update(warm)
                emit({"warmup_s": warm})
                set_scheduler(pipe, args.scheduler)
            call(pipe, batch, args.size, 1000)  # untimed: cuDNN / autotune / allocator
            runs = [call(pipe, batch, args.size, 2000 + 100 * r) for r in range(args.repeats)]
            seconds = statistics.median(r["s"] for r in runs)
            loops = [r["loop_it_per_s"] for r in runs if r["loop_it_per_s"]]
            row = {"batch": batch, "call_s": round(seconds, 4),
                   "call_s_runs": [round(r["s"], 4) for r in runs],
                   "images_per_s": round(batch / seconds, 3),
                   "it_per_s_call": round(args.steps / seconds, 2),
                   "it_per_s_loop": round(statistics.median(loops), 2) if loops else None}
            result["batches"].append(row)
            emit(row)

        if args.compile:
            from torch._dynamo.utils import counters

            if over_budget():
                result["skipped"].append("scheduler swap")
            else:
                before = counters["stats"]["unique_graphs"]
                set_scheduler(pipe, "ddim")
                swap = call(pipe, 1, args.size, 3000)
                result["scheduler_swap"] = {
                    "to": "ddim", "call_s": round(swap["s"], 3),
                    "unique_graphs_before": before,
                    "unique_graphs_after": counters["stats"]["unique_graphs"]}
                emit({"scheduler_swap": result["scheduler_swap"]})
                set_scheduler(pipe, args.scheduler)

        if args.mem_batch and not args.compile:
            if over_budget():
                result["skipped"].append(f"memory {args.mem_size} x{args.mem_batch}")
            else:
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                run = call(pipe, args.mem_batch, args.mem_size, 4000)
                result["memory"] = {
                    "size": args.mem_size, "batch": args.mem_batch,
                    "call_s": round(run["s"], 3),
                    "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30,
                                                      3) if cuda else None,
                    "max_memory_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30,
                                                     3) if cuda else None}
                emit({"memory": result["memory"]})

    result["total_s"] = round(time.monotonic() - start, 1)
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
