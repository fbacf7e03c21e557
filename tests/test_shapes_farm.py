"""The shipped shapes model through the real farm, read by the pixel judge: what pixels compared
with pixels could not tell. Each job of a micro-batch gets its own prompt's picture, img2img at
low strength keeps the init image's colours, and a negative prompt moves the picture away from
what it names.

A farm of its own (one real worker process, CPU profile: micro-batches of up to 4; local
storage; a Redis database of its own): a worker lists its models when it starts, so the session
farm, started with tiny only, cannot serve a model copied in later. The model's own sampling
settings (renderfarm.shapes.GUIDANCE, SCHEDULER) and 64x64 keep each picture at a fraction of a
second.
"""

from __future__ import annotations

import io
import json
import random

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from renderfarm import shapes  # noqa: E402
from renderfarm.shapes_judge import judge  # noqa: E402

Scene = shapes.Scene
JOB = {"model": "shapes", "width": 64, "height": 64, "steps": 20,
       "guidance_scale": shapes.GUIDANCE, "scheduler": shapes.SCHEDULER}


@pytest.fixture(scope="module")
def client(module_redis_url, tmp_path_factory):
    from producer import FarmClient
    from renderfarm.farm import EmbeddedFarm
    from renderfarm.settings import Settings
    from worker.modelgen import make_model

    data = tmp_path_factory.mktemp("shapes-farm")
    make_model("shapes", data / "models" / "shapes")
    settings = Settings(redis_url=module_redis_url, data_dir=data, models_dir=data / "models",
                        storage_url=(data / "images").as_uri(), lease_seconds=5)
    # One torch thread, as the session farm's worker (tests/conftest.py): two test processes
    # share the two cores.
    with EmbeddedFarm(settings, workers=1, profile="cpu", preload=["shapes"],
                      extra_env={"OMP_NUM_THREADS": "1"}):
        yield FarmClient(settings)


def picture(client, record) -> Image.Image:
    assert record.state.value == "succeeded", record.error
    return Image.open(io.BytesIO(client.storage.get(record.results[0].key)))


# Four prompts, no two with the same shape colour or background: a job given another job's
# prompt (or picture) draws colours its own prompt did not ask for. Large shapes, which the
# shipped weights draw as asked (the benchmark's 100 prompts: shape right in 90 %, most misses
# small squares drawn round): each job's shape is checked too.
MICRO_BATCH = [
    (Scene("circle", "red", "blue", size="large"), 11),
    (Scene("square", "yellow", "black", size="large"), 12),
    (Scene("triangle", "green", "white", size="large"), 15),
    (Scene("triangle", "blue", "yellow", size="large"), 16),
]


def test_a_micro_batch_gives_each_job_its_own_prompts_picture(client):
    batch = client.submit_batch([{**JOB, "prompt": shapes.caption(scene), "seed": seed}
                                 for scene, seed in MICRO_BATCH])
    batch.wait(timeout=300)
    records = batch.records()
    ids = [r.id for r in records]
    partners = {}
    for record in records:
        sidecar = json.loads(client.storage.get(f"{record.batch_id}/{record.id}.json"))
        partners[record.id] = set(sidecar["rendered_with"])
    # The idle worker took the four in one pipeline call (CPU profile: max_batch 4).
    assert all(partners[i] == set(ids) - {i} for i in ids), partners
    seen = [judge(picture(client, r)) for r in records]
    wanted = [(scene.color, scene.background, scene.shape) for scene, _ in MICRO_BATCH]
    assert [(v.color, v.background, v.shape) for v in seen] == wanted, seen


def test_img2img_at_low_strength_keeps_the_init_images_colours(client):
    from renderfarm.images import encode_init_image

    buffer = io.BytesIO()
    shapes.draw(Scene("circle", "red", "blue", size="large"), random.Random(0)).save(
        buffer, format="PNG")
    asked = Scene("square", "yellow", "green", size="large")
    job = {**JOB, "mode": "img2img", "prompt": shapes.caption(asked), "seed": 5,
           "init_image": encode_init_image(buffer.getvalue())}
    low = client.submit({**job, "strength": 0.25})
    full = client.submit({**job, "strength": 1.0})
    kept = judge(picture(client, low.wait(timeout=300)))
    redrawn = judge(picture(client, full.wait(timeout=300)))
    assert (kept.color, kept.background) == ("red", "blue"), kept
    # The same job at full strength draws its prompt: the prompt did reach the pipeline.
    assert (redrawn.color, redrawn.background) == ("yellow", "green"), redrawn


NEGATIVE_SEEDS = [23, 24, 25, 27]  # without the negative: black on each (in-process check)


def test_a_negative_prompt_moves_away_from_what_it_names(client):
    """The prompt leaves the background open; the negative prompt names one (a whole caption of
    the world: the model never saw a caption without its shape). Over the same seeds, that
    background shows up without the negative prompt and never with it."""
    base = {**JOB, "prompt": "a large yellow circle"}
    plain = client.submit_batch([{**base, "seed": s} for s in NEGATIVE_SEEDS])
    negative = client.submit_batch([
        {**base, "seed": s, "negative_prompt": "a large yellow circle on a black background"}
        for s in NEGATIVE_SEEDS])
    plain.wait(timeout=300)
    negative.wait(timeout=300)
    without = [judge(picture(client, r)).background for r in plain.records()]
    with_negative = [judge(picture(client, r)).background for r in negative.records()]
    assert without.count("black") >= 2, without
    assert with_negative.count("black") == 0, with_negative
