"""Images per second: the plain diffusers loop a user would write against the farm, in one run.

    .venv/bin/python bench/throughput.py --model tiny --jobs 32 --size 64 --steps 10
    python bench/throughput.py --model sd15-random --jobs 64 --size 512 --steps 25  # on a GPU

The same jobs (``--jobs`` prompts, seeds 0..N-1, one model, size, step count and scheduler)
run two ways:
(a) plain: one ``StableDiffusionPipeline.from_pretrained`` of the model folder on the device
    (fp16 on CUDA), one call per job, each image saved as PNG; timed from the first call to
    the last file written, after one untimed warm-up call;
(b) farm: an embedded farm with one worker (real Redis, Celery, local storage in a temp dir,
    the model preloaded and warmed by two jobs), timed from submit until the latest record's
    ``succeeded`` timestamp (enqueue -> rendered -> PNG stored -> record succeeded).
``--rounds`` alternates (a) and (b) (the idle side waits); the medians are compared.
It prints one JSON object: both sides' images/s, the farm's ratio to the plain loop, the
per-job overhead, the farm's render share (the part of its wall time in which the worker held
a job it had not yet handed to the uploader: :func:`render_share`), and on CUDA the share of
wall time the GPU was busy (mean of ``utilization.gpu`` sampled every 100 ms by pynvml or
nvidia-smi; null where neither is).
``tiny`` and ``sd15-random`` are built in a temp dir unless ``--models-dir`` has them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

BUILT = ("tiny", "sd15-random")


def job(i: int, args: argparse.Namespace) -> dict:
    return {"prompt": f"a lighthouse on a cliff at dusk, painting number {i}",
            "model": args.model, "width": args.size, "height": args.size, "steps": args.steps,
            "scheduler": args.scheduler, "guidance_scale": 7.0, "seed": i}


class GpuBusy:
    """Sample the GPU's ``utilization.gpu`` (percent of time a kernel ran) every 100 ms while
    in the ``with`` block; ``share`` is the mean as a fraction, None without pynvml or
    nvidia-smi."""

    def __init__(self, enabled: bool, index: int = 0):
        self.enabled, self.index = enabled, index
        self.samples: list[float] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> GpuBusy:
        if not self.enabled:
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self.source = "pynvml"
            self._thread = threading.Thread(target=self._nvml, args=(pynvml, handle), daemon=True)
        except Exception:  # not installed, or no driver: try the command line tool
            if shutil.which("nvidia-smi") is None:
                return self
            self.source = "nvidia-smi"
            self._proc = subprocess.Popen(
                ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu",
                 "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._smi, daemon=True)
        self._thread.start()
        return self

    def _nvml(self, pynvml, handle) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

    def _smi(self) -> None:
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(5)
        if self._thread is not None:
            self._thread.join(5)

    @property
    def share(self) -> float | None:
        return round(statistics.mean(self.samples) / 100, 3) if self.samples else None


def find_or_make_model(args: argparse.Namespace, tmp: Path) -> Path:
    """The models folder holding ``args.model``: ``--models-dir``, else one built in ``tmp``."""
    from worker.modelfiles import list_models

    if args.models_dir is not None and args.model in list_models(args.models_dir):
        return args.models_dir
    if args.model not in BUILT:
        where = args.models_dir or "(no --models-dir)"
        raise SystemExit(f"model {args.model!r} is not in {where}; only {BUILT} are built here")
    from worker.modelgen import make_model

    models = tmp / "models"
    t = time.perf_counter()
    make_model(args.model, models / args.model)
    print(f"built {args.model} in {time.perf_counter() - t:.1f}s", flush=True)
    return models


class PlainLoop:
    """(a): what a user writes with diffusers: one pipeline, one call per job, PNGs saved."""

    def __init__(self, args: argparse.Namespace, device: str, model_dir: Path, out: Path):
        import torch
        from diffusers import StableDiffusionPipeline

        from worker.pipelines import SCHEDULER_CLASSES

        self.torch, self.device, self.out = torch, device, out
        dtype = torch.float16 if device == "cuda" else torch.float32
        self.pipe = StableDiffusionPipeline.from_pretrained(
            model_dir, dtype=dtype, safety_checker=None, requires_safety_checker=False,
            local_files_only=True).to(device)
        cls, options = SCHEDULER_CLASSES[args.scheduler]
        self.pipe.scheduler = cls.from_config(self.pipe.scheduler.config, **options)
        self.pipe.set_progress_bar_config(disable=True)
        out.mkdir(parents=True, exist_ok=True)

    def one(self, j: dict, path: Path) -> None:
        image = self.pipe(
            j["prompt"], width=j["width"], height=j["height"], num_inference_steps=j["steps"],
            guidance_scale=j["guidance_scale"],
            generator=self.torch.Generator(self.device).manual_seed(j["seed"])).images[0]
        image.save(path)

    def run(self, jobs: list[dict]) -> float:
        """Wall seconds from the first call to the last PNG written."""
        t = time.perf_counter()
        for i, j in enumerate(jobs):
            self.one(j, self.out / f"{i}.png")
        return time.perf_counter() - t


def farm_run(client, jobs: list[dict]) -> tuple[float, list, float]:
    """(b): submit every job, wait for all. Returns seconds from submit to the last
    ``succeeded``, the records, and the worker's render share of those seconds."""
    t0 = time.time()
    batch = client.submit_batch(jobs, label="throughput")
    batch.wait(timeout=3600, poll=0.05)
    records = batch.records()
    failed = [r for r in records if r.state.value != "succeeded"]
    if failed:
        raise SystemExit(f"{len(failed)} farm jobs did not succeed, e.g. {failed[0].error}")
    wall = max(r.timestamps["succeeded"] for r in records) - t0
    return wall, records, render_share(records, wall)


def worker_warmup(log_dir: Path) -> dict[str, float]:
    """The seconds per ``WxHxB`` shape the worker's warm-up took (compiles, with
    ``RENDERFARM_COMPILE=1``), read from its log line ``warm-up of MODEL: {...}``."""
    import ast

    found: dict[str, float] = {}
    for path in sorted(log_dir.glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            _, marker, rest = line.partition("warm-up of ")
            if marker and ": {" in rest:
                found.update(ast.literal_eval(rest[rest.index("{"):]))
    return found


def render_share(records: list, wall: float) -> float:
    """The share of ``wall`` in which the worker held a claimed job that was not yet handed to
    the uploader: the union of the jobs' ``started`` -> ``uploading`` spans (claim, pipeline
    call with text encoding and VAE decode, progress writes). On any device, it says how much
    of the farm's time went to rendering rather than to waiting for or fetching work; on CUDA
    it bounds ``gpu_busy`` from above."""
    spans = sorted((r.timestamps["started"], r.timestamps["uploading"]) for r in records
                   if "started" in r.timestamps and "uploading" in r.timestamps)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return round(busy / wall, 3) if wall > 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, sd15-random, or a model name")
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--size", type=int, default=None, help="default: 64 tiny, else 512")
    parser.add_argument("--steps", type=int, default=None, help="default: 10 tiny, else 25")
    parser.add_argument("--scheduler", default="euler")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--rounds", type=int, default=2, help="alternating (a)/(b) runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of both sides (torch threads of (a), OMP_NUM_THREADS "
                             "of the farm's worker); default: one per core")
    args = parser.parse_args()
    args.size = args.size or (64 if args.model == "tiny" else 512)
    args.steps = args.steps or (10 if args.model == "tiny" else 25)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from producer import FarmClient
    from renderfarm.farm import EmbeddedFarm
    from renderfarm.settings import Settings

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda, but torch {torch.__version__} sees no CUDA device")
    profile = "gpu" if device == "cuda" else "cpu"
    extra_env = {}
    if args.threads:
        torch.set_num_threads(args.threads)
        extra_env["OMP_NUM_THREADS"] = str(args.threads)
    jobs = [job(i, args) for i in range(args.jobs)]

    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp_name:
        tmp = Path(tmp_name)
        models = find_or_make_model(args, tmp)
        settings = Settings(data_dir=tmp / "farm", models_dir=models)
        # The farm's worker idles while (a) runs, and (a) idles while (b) runs: each side has
        # the whole machine. Rounds alternate (a) and (b); medians are compared.
        with EmbeddedFarm(settings, workers=1, profile=profile, preload=[args.model],
                          extra_env=extra_env) as farm:
            client = FarmClient(farm.settings)
            farm_run(client, [job(10_000 + i, args) for i in range(2)])  # warm the worker
            plain = PlainLoop(args, device, models / args.model, tmp / "plain")
            plain.one(jobs[0], tmp / "warm-up.png")
            plain_rounds, farm_rounds, shares = [], [], []
            for _ in range(args.rounds):
                with GpuBusy(device == "cuda") as plain_busy:
                    plain_rounds.append(plain.run(jobs))
                with GpuBusy(device == "cuda") as farm_busy:
                    farm_s, records, share = farm_run(client, jobs)
                    farm_rounds.append(farm_s)
                    shares.append(share)
            warmup = worker_warmup(farm.log_dir)
            stored = sorted((settings.data_path / "images").rglob("*.png"))
            assert len(stored) >= args.jobs, f"{len(stored)} PNGs stored for {args.jobs} jobs"
        plain_s, farm_s = statistics.median(plain_rounds), statistics.median(farm_rounds)

    n = args.jobs
    plain_ips, farm_ips = n / plain_s, n / farm_s
    latency = [r.timestamps["succeeded"] - r.timestamps["queued"] for r in records
               if "queued" in r.timestamps]
    print(json.dumps({
        "bench": "throughput",
        "date": datetime.date.today().isoformat(),
        "model": args.model, "jobs": n, "size": args.size, "steps": args.steps,
        "scheduler": args.scheduler, "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor()
        or platform.machine(),
        "rounds": args.rounds,
        "plain": {"wall_s": round(plain_s, 3), "rounds_s": [round(x, 3) for x in plain_rounds],
                  "images_per_s": round(plain_ips, 3),
                  "s_per_image": round(plain_s / n, 4), "gpu_busy": plain_busy.share},
        "farm": {"wall_s": round(farm_s, 3), "rounds_s": [round(x, 3) for x in farm_rounds],
                 "images_per_s": round(farm_ips, 3),
                 "s_per_image": round(farm_s / n, 4), "gpu_busy": farm_busy.share,
                 "render_share": statistics.median(shares), "render_share_rounds": shares,
                 "median_latency_s": round(statistics.median(latency), 3) if latency else None,
                 "warmup_s": warmup},
        "ratio_farm_over_plain_images_per_s": round(farm_ips / plain_ips, 3),
        "per_job_overhead_ms": round((farm_s - plain_s) / n * 1000, 2),
        "gpu_busy_source": plain_busy.source,
        "targets": {"cpu_tiny_ratio": ">= 0.9",
                    "h100_sd15_512_25_64jobs": "ratio >= 2, farm >= 8 images/s, gpu_busy >= 0.9"},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "compile": os.environ.get("RENDERFARM_COMPILE", "0"),
    }, indent=2))


if __name__ == "__main__":
    main()
