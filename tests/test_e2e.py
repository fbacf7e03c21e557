"""End to end through real processes: FarmClient → Redis → Celery worker → diffusers → S3."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from renderfarm.images import encode_init_image
from renderfarm.schema import JobState
from storage.png import parse_parameters, read_png_info

JOB = {"model": "tiny", "width": 64, "height": 64, "steps": 4, "scheduler": "euler"}


def pixels(client, key: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.storage.get(key))))


def test_batch_of_txt2img_and_img2img(farm, client):
    prompts = ["a red cube", "a blue sphere", "a green cone", "a yellow torus"]
    sizes = [(64, 64), (96, 64), (64, 96), (64, 64)]
    batch = client.submit_batch(
        [{**JOB, "prompt": p, "width": w, "height": h, "seed": 10 + i}
         for i, (p, (w, h)) in enumerate(zip(prompts, sizes, strict=True))]
    )
    record = batch.wait(timeout=120)
    assert record.counts == {JobState.succeeded: 4}
    jobs = batch.records()
    for job, prompt, (w, h) in zip(jobs, prompts, sizes, strict=True):
        assert job.state is JobState.succeeded
        assert {"queued", "started", "rendering", "uploading", "succeeded"} <= set(job.timestamps)
        order = [job.timestamps[s] for s in ("queued", "started", "rendering", "uploading",
                                             "succeeded")]
        assert order == sorted(order)
        assert job.step == job.steps_total == 4
        assert job.attempts == 1
        [image] = job.results
        assert image.key == f"{batch.id}/{job.id}-0.png"
        data = client.storage.get(image.key)
        assert Image.open(io.BytesIO(data)).size == (w, h)
        info = read_png_info(data)
        params = parse_parameters(info["parameters"])
        assert params["prompt"] == prompt
        assert params["Seed"] == job.request.seed
        assert params["Size"] == f"{w}x{h}"
        assert params["Model"] == "tiny"
        assert info["renderfarm"]["id"] == job.id
        assert client.storage.exists(f"{batch.id}/{job.id}.json")
        url = client.urls(job)[0].url
        assert "X-Amz-Expires=" in url

    # img2img from the first result
    init = client.storage.get(jobs[0].results[0].key)
    handle = client.submit({**JOB, "mode": "img2img", "prompt": "the same, at night",
                            "init_image": encode_init_image(init), "strength": 0.5, "seed": 3})
    done = handle.wait(timeout=60)
    assert done.state is JobState.succeeded, done.error
    assert done.step == done.steps_total == 2  # 4 steps at strength 0.5
    [image] = handle.result()
    assert Image.open(io.BytesIO(client.storage.get(image.key))).size == (64, 64)
    assert "Denoising strength: 0.5" in read_png_info(client.storage.get(image.key))["parameters"]


def test_same_seed_same_pixels_and_seed_plus_k(farm, client):
    job = {**JOB, "prompt": "a lighthouse", "seed": 1234}
    first = client.submit({**job, "num_images": 2}).result(timeout=60)
    again = client.submit({**job, "num_images": 2}).result(timeout=60)
    other = client.submit({**job, "seed": 1235}).result(timeout=60)
    assert [r.seed for r in first] == [1234, 1235]
    for a, b in zip(first, again, strict=True):  # the same job renders the same pixels
        assert np.array_equal(pixels(client, a.key), pixels(client, b.key))
    # image k of a job is the image seed+k renders alone (batched math: within rounding)
    diff = np.abs(pixels(client, first[1].key).astype(int) - pixels(client, other[0].key))
    assert diff.max() <= 2
    assert not np.array_equal(pixels(client, first[0].key), pixels(client, first[1].key))


def test_random_seed_is_recorded_and_reproduces_the_image(farm, client):
    """Two jobs without a seed get different seeds; the recorded seed renders the same pixels."""
    job = {**JOB, "prompt": "no seed given"}
    first, second = (client.submit(job).wait(timeout=60) for _ in range(2))
    for record in (first, second):
        assert record.state is JobState.succeeded, record.error
        assert record.results[0].seed == record.request.seed is not None
    assert first.request.seed != second.request.seed  # a constant "random" seed fails here
    again = client.submit({**job, "seed": first.request.seed}).result(timeout=60)
    assert np.array_equal(pixels(client, again[0].key), pixels(client, first.results[0].key))


def test_largest_seed_and_its_next_image_wrap_around(farm, client):
    """Seed 2**32-1 is accepted; image 1 of its job gets seed 0 (uint32, as A1111 wraps)."""
    top = client.submit({**JOB, "prompt": "max seed", "seed": 2**32 - 1, "num_images": 2})
    record = top.wait(timeout=60)
    assert record.state is JobState.succeeded, record.error
    assert [r.seed for r in record.results] == [2**32 - 1, 0]
    [zero] = client.submit({**JOB, "prompt": "max seed", "seed": 0}).result(timeout=60)
    diff = np.abs(pixels(client, record.results[1].key).astype(int) - pixels(client, zero.key))
    assert diff.max() <= 2  # image k is the image of seed+k (batched math: within rounding)
    assert parse_parameters(read_png_info(client.storage.get(record.results[0].key))[
        "parameters"])["Seed"] == 2**32 - 1


def test_sidecar_json_describes_the_job(farm, client):
    """``<batch>/<job>.json`` next to the PNGs: the request, the images, worker and timings."""
    import json

    handle = client.submit({**JOB, "prompt": "a sidecar", "seed": 77, "num_images": 2,
                            "negative_prompt": "rain"})
    record = handle.wait(timeout=60)
    assert record.state is JobState.succeeded, record.error
    body = json.loads(client.storage.get(f"{record.batch_id}/{record.id}.json"))
    assert (body["id"], body["batch_id"]) == (record.id, record.batch_id)
    assert body["request"] == record.request.model_dump(mode="json", exclude={"init_image"})
    assert body["has_init_image"] is False
    assert body["worker"] == record.worker and body["attempts"] == record.attempts == 1
    assert [(i["key"], i["seed"], i["width"], i["height"]) for i in body["images"]] == [
        (r.key, r.seed, 64, 64) for r in record.results]
    assert [i["seed"] for i in body["images"]] == [77, 78]
    stamps = body["timestamps"]
    assert stamps["queued"] <= stamps["started"] <= stamps["rendering"] <= stamps["uploading"] \
        <= stamps["stored"]
    spans = {"waited": ("queued", "started"), "loaded": ("started", "rendering"),
             "rendered": ("rendering", "uploading"), "uploaded": ("uploading", "stored")}
    assert body["timings"] == pytest.approx(
        {name: stamps[b] - stamps[a] for name, (a, b) in spans.items()}, abs=1e-3)


def test_cancel_queued_and_running(farm, client, holds):
    """A queued job is cancelled at once; a running one stops at its next denoising step:
    cancelled while provably held after step 2 of 20 (worker/testhooks.py), it records no
    step past 3 and stores nothing."""
    slow = {**JOB, "prompt": "cancelled at step 2", "steps": 20}
    held = holds.hold_step(slow["prompt"], 2)
    running = client.submit(slow)
    queued = client.submit({**JOB, "prompt": "never rendered"})
    assert queued.cancel() == "cancelled"
    assert holds.wait_held() == ("step", running.id, 2)
    assert running.status().state is JobState.rendering
    assert running.cancel() == "cancelling"
    holds.release(held)
    record = running.wait(timeout=30)
    assert record.state is JobState.cancelled
    assert 2 <= record.step <= 3, record.step  # the step it was held at, or the next one
    assert not client.storage.list(f"{record.batch_id}/")
    assert queued.wait(timeout=5).state is JobState.cancelled
    assert queued.status().attempts == 0


def test_idempotency_key_submits_once(farm, client):
    job = {**JOB, "prompt": "once", "idempotency_key": "order-77"}
    first = client.submit(job)
    second = client.submit(job)
    assert second.id == first.id
    assert first.wait(timeout=60).state is JobState.succeeded
