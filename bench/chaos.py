"""Soak benchmark: many tiny jobs on a few workers while workers are SIGKILLed, Redis restarts
and S3 goes down.

    .venv/bin/python bench/chaos.py                 # 500 jobs, 3 workers, baseline then chaos
    .venv/bin/python bench/chaos.py --jobs 100 --skip-baseline

Each run starts its own farm (a redis-server with append-only file, N worker processes, an S3
endpoint: moto's server in this process), submits ``--jobs`` jobs of the tiny model and waits
for all of them. The chaos run SIGKILLs a random worker every ``--kill-every`` seconds (and
starts it again at once), restarts Redis once, on the same port and files, when ``--redis-at``
of the jobs are done, and stops S3 for ``--s3-down`` seconds ``--s3-outages`` times (when
1/3 and 2/3 of the jobs are done, for two). Printed as JSON: jobs per final state, lost jobs
(never ended), jobs done twice (not exactly one set of objects), orphan objects (of jobs not
succeeded), duplicate renders (attempts > 1), store retries the workers logged, and the wall
time of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
for _name, _value in (("AWS_ACCESS_KEY_ID", "chaos"), ("AWS_SECRET_ACCESS_KEY", "chaos"),
                      ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_name, _value)  # moto's S3 takes any credentials

from redis.exceptions import ConnectionError as RedisConnectionError  # noqa: E402

from producer import FarmClient  # noqa: E402
from renderfarm.embedded import EmbeddedRedis, free_port  # noqa: E402
from renderfarm.farm import EmbeddedFarm  # noqa: E402
from renderfarm.schema import JobState  # noqa: E402
from renderfarm.settings import Settings  # noqa: E402


class S3Server:
    """moto's S3 server on a fixed port, stopped and started again (its objects stay: moto
    keeps them in this process)."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def run(args: argparse.Namespace, models: Path, chaos: bool) -> dict:
    from storage.s3 import S3Storage

    root = Path(tempfile.mkdtemp(prefix="rf-chaos-"))
    server = EmbeddedRedis(root / "redis")
    s3 = S3Server()
    s3.start()
    S3Storage("chaos", endpoint_url=s3.endpoint).ensure_bucket()
    settings = Settings(redis_url=server.start(), data_dir=root / "data", models_dir=models,
                        storage_url=f"s3://chaos/{root.name}", s3_endpoint_url=s3.endpoint,
                        lease_seconds=args.lease, max_attempts=args.max_attempts)
    outages = [(k + 1) / (args.s3_outages + 1) for k in range(args.s3_outages)] if chaos else []
    s3_back_at = None
    farm = EmbeddedFarm(settings, workers=args.workers, profile="cpu", preload=["tiny"])
    events: Counter = Counter()
    stop = threading.Event()
    try:
        farm.start()
        client = FarmClient(settings)
        jobs = [{"prompt": f"chaos {i}", "model": "tiny", "width": 64, "height": 64,
                 "steps": args.steps, "scheduler": "euler", "seed": i} for i in range(args.jobs)]
        started = time.monotonic()
        batch = client.submit_batch(jobs, label="chaos" if chaos else "baseline")
        redis_done = threading.Event()

        def killer() -> None:
            rng = random.Random(args.seed)
            while not stop.wait(args.kill_every * rng.uniform(0.5, 1.5)):
                index = rng.randrange(len(farm.workers))
                proc = farm.workers[index]
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    events["workers_killed"] += 1
                farm.start_worker(index)

        if chaos:
            threading.Thread(target=killer, daemon=True).start()
        deadline = started + args.timeout
        record = None
        while time.monotonic() < deadline:
            try:
                record = batch.status()
            except RedisConnectionError:
                time.sleep(0.2)
                continue
            if record.finished:
                break
            if s3_back_at is not None and time.monotonic() >= s3_back_at:
                s3.start()
                s3_back_at = None
            elif s3_back_at is None and outages and record.done >= outages[0] * args.jobs:
                outages.pop(0)
                s3.stop()
                events["s3_outages"] += 1
                s3_back_at = time.monotonic() + args.s3_down
            if chaos and not redis_done.is_set() and record.done >= args.redis_at * args.jobs:
                server.stop()
                events["redis_restarts"] += 1
                time.sleep(args.redis_down)
                server.start()
                redis_done.set()
            time.sleep(0.2)
        wall = time.monotonic() - started
        stop.set()
        if s3_back_at is not None:
            s3.start()
        logs = "".join(p.read_text(errors="replace") for p in farm.log_dir.glob("*.log"))
        events["store_retries"] = logs.count("storage unavailable")
        return {"wall_s": round(wall, 1), **audit(client, batch.id), **events}
    finally:
        stop.set()
        farm.stop(timeout=20)
        server.stop()
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)


def audit(client: FarmClient, batch_id: str) -> dict:
    """Final states, lost jobs, and the objects each job left in storage."""
    records = client.records.batch_jobs(batch_id)
    objects = Counter(key.split("/", 1)[1].split("-")[0].removesuffix(".json")
                      for key in client.storage.list(f"{batch_id}/"))
    states = Counter(r.state.value for r in records)
    expected = {r.id: r.request.num_images + 1 for r in records}
    return {
        "states": dict(states),
        "lost": sum(not r.state.terminal for r in records),
        "submitted": len(records),
        "done_twice_or_not_one_set": sum(objects[r.id] != expected[r.id] for r in records
                                         if r.state is JobState.succeeded),
        "orphan_objects": sum(objects[r.id] for r in records
                              if r.state is not JobState.succeeded),
        "duplicate_renders": sum(r.attempts > 1 for r in records),
        "attempts_total": sum(r.attempts for r in records),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=4.0, help="seconds between kills")
    parser.add_argument("--redis-at", type=float, default=0.4,
                        help="restart Redis once this share of the jobs is done")
    parser.add_argument("--redis-down", type=float, default=2.0, help="seconds Redis is down")
    parser.add_argument("--s3-outages", type=int, default=2, help="times S3 is stopped")
    parser.add_argument("--s3-down", type=float, default=30.0, help="seconds S3 is down")
    parser.add_argument("--lease", type=float, default=3.0)
    parser.add_argument("--max-attempts", type=int, default=3,
                        help="the farm's default; a job hit by 3 random kills fails as poison")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()

    from worker.modelgen import make_model

    models = Path(tempfile.mkdtemp(prefix="rf-chaos-models-"))
    make_model("tiny", models / "tiny")
    out: dict = {"jobs": args.jobs, "workers": args.workers, "steps": args.steps,
                 "kill_every_s": args.kill_every, "lease_s": args.lease,
                 "s3_outages": args.s3_outages, "s3_down_s": args.s3_down}
    if not args.skip_baseline:
        out["baseline"] = run(args, models, chaos=False)
    out["chaos"] = run(args, models, chaos=True)
    if "baseline" in out:
        out["slowdown"] = round(out["chaos"]["wall_s"] / out["baseline"]["wall_s"], 2)
    shutil.rmtree(models, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
