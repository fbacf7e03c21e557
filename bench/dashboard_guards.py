"""What the dashboard's guards cost (issue 11, items 15 and 17), over HTTP with waitress.

    .venv/bin/python bench/dashboard_guards.py --jobs 400 --rounds 3 --requests 300

1. ``POST /api/v1/batches`` of ``--jobs`` img2img jobs sharing one 2048x2048 PNG (a fresh one
   each round, so no earlier check is reused): the submit check decodes it once. For
   comparison, ``decode_all_s`` times decoding that image once per job, which is what the
   submit check did before.
2. ``GET /api/v1/models`` latency with the rate limits on (defaults: two counters in Redis per
   request) and off (both settings empty).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests
from PIL import Image

from dashboard import create_app
from dashboard.serve import make_server
from renderfarm.embedded import EmbeddedRedis
from renderfarm.images import decode_init_image
from renderfarm.settings import Settings


def shared_png() -> str:
    img = Image.new("RGB", (2048, 2048), (20, 90, 160))
    img.paste(Image.frombytes("RGB", (16, 16), os.urandom(16 * 16 * 3)), (0, 0))
    out = io.BytesIO()
    img.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def serve(settings: Settings):
    httpd = make_server(create_app({"SETTINGS": settings}), port=0)
    threading.Thread(target=httpd.run, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.effective_port}"


def latency(url: str, n: int) -> dict:
    s, times = requests.Session(), []
    for _ in range(n):
        t = time.perf_counter()
        assert s.get(url, timeout=30).status_code == 200
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 2),
            "p95_ms": round(times[int(0.95 * (len(times) - 1))], 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp, "models")
        (models / "tiny").mkdir(parents=True)
        (models / "tiny" / "model_index.json").write_text("{}")
        server = EmbeddedRedis(Path(tmp, "redis"))
        settings = Settings(redis_url=server.start(), data_dir=Path(tmp), models_dir=models)
        try:
            httpd, base = serve(settings)
            submit, decode_all = [], []
            for _ in range(args.rounds):
                image = shared_png()
                jobs = [{"mode": "img2img", "prompt": f"job {n}", "model": "tiny", "width": 64,
                         "height": 64, "steps": 2, "init_image": image} for n in range(args.jobs)]
                t = time.perf_counter()
                r = requests.post(f"{base}/api/v1/batches", json={"jobs": jobs}, timeout=600)
                submit.append(time.perf_counter() - t)
                assert r.status_code == 201, r.text[:300]
                t = time.perf_counter()
                for _ in range(args.jobs):
                    decode_init_image(image)
                decode_all.append(time.perf_counter() - t)
            limited = latency(f"{base}/api/v1/models", args.requests)
            httpd.close()
            httpd, base = serve(settings.model_copy(update={"rate_limit_address": "",
                                                            "rate_limit_token": ""}))
            unlimited = latency(f"{base}/api/v1/models", args.requests)
            httpd.close()
        finally:
            server.stop()
    print(json.dumps({
        "bench": "dashboard_guards", "jobs_sharing_one_image": args.jobs, "rounds": args.rounds,
        "submit_s": [round(s, 2) for s in submit],
        "decode_all_s": [round(s, 2) for s in decode_all],
        "get_models_with_limits": limited, "get_models_without_limits": unlimited,
    }, indent=2))


if __name__ == "__main__":
    main()
