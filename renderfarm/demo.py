"""``renderfarm demo``: the embedded farm renders a small batch end to end on any machine."""

from __future__ import annotations

import time

from rich.console import Console

from renderfarm.settings import Settings

PROMPTS = [
    "a lighthouse on a cliff at dawn, oil painting",
    "a red fox in fresh snow, photograph",
    "a futuristic city skyline at night, neon",
    "a bowl of ramen, studio lighting",
    "an astronaut riding a horse on mars",
    "a watercolor of a sailboat on a calm lake",
    "a cozy library with tall shelves, warm light",
    "a dragon made of autumn leaves",
]

console = Console()


def run_demo(settings: Settings, workers: int = 1) -> int:
    from producer import FarmClient
    from renderfarm.farm import EmbeddedFarm
    from renderfarm.images import encode_init_image
    from renderfarm.progress import follow_batch
    from worker.modelfiles import list_models

    started = time.monotonic()
    if "tiny" not in list_models(settings.models_path):
        from worker.modelgen import make_model

        console.print(f"making the tiny model in {settings.models_path / 'tiny'} ...")
        make_model("tiny", settings.models_path / "tiny")
    console.print("starting the embedded farm (its own Redis, local storage) ...")
    with EmbeddedFarm(settings, workers=workers, preload=["tiny"]) as farm:
        client = FarmClient(farm.settings)
        jobs = [{"prompt": p, "model": "tiny", "width": 128, "height": 128, "steps": 20,
                 "seed": 1000 + i} for i, p in enumerate(PROMPTS)]
        batch = client.submit_batch(jobs, label="demo txt2img")
        console.print(f"batch {batch.id}: {len(jobs)} txt2img jobs queued")
        ok = follow_batch(client, batch.id, timeout=300)
        first = client.records.batch_jobs(batch.id)[0]
        init = client.storage.get(first.results[0].key)
        img2img = client.submit({
            "mode": "img2img", "prompt": "the same scene, in winter", "model": "tiny",
            "init_image": encode_init_image(init), "strength": 0.6, "width": 128,
            "height": 128, "steps": 20, "seed": 7,
        })
        console.print(f"img2img job {img2img.id} from {first.results[0].key}")
        ok = follow_batch(client, img2img.status().batch_id, timeout=120) and ok
    console.print(f"images are in {client.storage.describe}")
    console.print(f"demo {'finished' if ok else 'FAILED'} in {time.monotonic() - started:.1f}s")
    return 0 if ok else 1
