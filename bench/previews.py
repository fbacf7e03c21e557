"""What live previews cost a render: the same render with previews on and off, in one run.

    .venv/bin/python bench/previews.py --rounds 3 [--models-dir DIR] [--method taesd]

One process, the ``sd15-random`` model (the real SD 1.5 shapes; built in ``--models-dir`` if it
is not there yet: about a minute and 2 GB), ``--size`` x ``--size``, ``--steps`` steps, on the
CPU profile. Rounds alternate a render without previews (``on_latents=None``) and one with the
worker's own previews (:class:`worker.previews.Previews`, every ``--every`` seconds, writing
JPEGs to a real redis-server), so both see the same machine load. Reported: each side's
median, their ratio (target: on <= 1.02x off), and the time the preview hook itself took on
the render thread (the part previews add there; encode and write run in their thread).

``--method taesd``: the previews are decoded by a TAESD with the real one's shapes and seeded
random weights (built in ``--models-dir``/vae_approx/taesd; it costs what the real one costs),
in the preview thread, beside the render; each decode's time and the previews written per
render are reported too.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=float, default=1.0,
                        help="seconds between previews (RENDERFARM_PREVIEW_SECONDS)")
    parser.add_argument("--method", choices=("linear", "taesd"), default="linear",
                        help="RENDERFARM_PREVIEW_METHOD")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="where sd15-random is (or is built); default: a temporary dir")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import redis
    import torch

    from renderfarm import keys
    from renderfarm.embedded import EmbeddedRedis
    from renderfarm.schema import JobRequest
    from worker.modelgen import make_model
    from worker.pipelines import PipelineCache
    from worker.previews import Previews
    from worker.profiles import detect_profile
    from worker.render import render
    from worker.taesd import make_random

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models_dir or Path(tmp) / "models"
        if not (models / "sd15-random" / "model_index.json").exists():
            make_model("sd15-random", models / "sd15-random")
        if args.method == "taesd" and not (models / "vae_approx" / "taesd").exists():
            make_random("taesd", models / "vae_approx" / "taesd")
        server = EmbeddedRedis(Path(tmp) / "redis")
        r = redis.Redis.from_url(server.start())
        try:
            cache = PipelineCache(models, detect_profile("cpu"))
            request = JobRequest(prompt="a lighthouse at dawn, oil painting", model="sd15-random",
                                 width=args.size, height=args.size, steps=args.steps, seed=1,
                                 scheduler="euler")
            family = cache.family(request.model)
            previews = Previews(r, every=args.every, method=args.method, models_dir=models)
            decode_s: list[float] = []
            decoder = previews.decoder(family)
            if args.method == "taesd":
                if decoder is None:
                    raise SystemExit("no TAESD decoder: see the log")
                plain_decode = decoder.decode

                def timed_decode(latents, size):
                    t0 = time.perf_counter()
                    try:
                        return plain_decode(latents, size)
                    finally:
                        decode_s.append(time.perf_counter() - t0)

                decoder.decode = timed_decode
            render(cache, request)  # load and warm

            off, on, hook_s, written, decodes = [], [], [], [], []
            for i in range(args.rounds):
                t = time.perf_counter()
                render(cache, request)
                off.append(time.perf_counter() - t)

                job_id = f"bench-{i}"
                hook = previews.hook([job_id], family, request.width, request.height)
                spent = 0.0

                def timed(latents, owners, hook=hook):
                    nonlocal spent
                    t0 = time.perf_counter()
                    hook(latents, owners)
                    spent += time.perf_counter() - t0

                t = time.perf_counter()
                render(cache, request, on_latents=timed)
                on.append(time.perf_counter() - t)
                hook_s.append(spent)
                deadline = time.monotonic() + 10
                while r.get(keys.preview(job_id)) is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                previews.writer.flush(600)  # the last decode must not run into the next round
                written.append(len(r.get(keys.preview(job_id)) or b""))
                decodes.append(len(decode_s) - sum(decodes))
        finally:
            server.stop()

    m_off, m_on = statistics.median(off), statistics.median(on)
    print(json.dumps({
        "bench": "previews", "model": "sd15-random", "size": args.size, "steps": args.steps,
        "every_s": args.every, "method": args.method,
        "taesd_decode_ms": [round(x * 1000, 1) for x in decode_s],
        "taesd_decodes_per_render": decodes, "off_s": [round(x, 3) for x in off],
        "on_s": [round(x, 3) for x in on], "median_off_s": round(m_off, 3),
        "median_on_s": round(m_on, 3), "ratio_on_over_off": round(m_on / m_off, 4),
        "target": "<= 1.02",
        "hook_on_render_thread_ms": [round(x * 1000, 2) for x in hook_s],
        "hook_share_of_render": round(statistics.median(hook_s) / m_on, 5),
        "preview_jpeg_bytes": written,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.machine(), "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
