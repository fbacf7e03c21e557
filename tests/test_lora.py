"""LoRAs through the real farm (the session's Celery worker on the tiny model): tag and field
give the same record and pixels, weight 0 is no LoRA, switching sets reloads nothing,
micro-batches never mix sets, refusals at submit, and the images' LoRA metadata."""

from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from renderfarm import keys
from renderfarm.errors import InvalidJob
from renderfarm.fleet import WorkerInfo, live_workers
from storage.png import parse_parameters, read_png_info
from tests.test_lora_render import write_sdxl_lora
from worker.compat import lora_set
from worker.modelgen import make_lora

JOB = {"prompt": "a lighthouse at dusk", "model": "tiny", "width": 64, "height": 64,
       "steps": 2, "seed": 11}


def wait_for(check, timeout: float = 60.0, what: str = "a condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not after {timeout}s")


def worker(client) -> WorkerInfo:
    [info] = live_workers(client.redis)
    return info


def beat_after(client, t: float) -> WorkerInfo:
    """The worker's first heartbeat written after time ``t``."""
    return wait_for(lambda: (w := worker(client)).beat > t and w, 30, "a fresh heartbeat")


@pytest.fixture(scope="module")
def loras(farm, models_dir):
    folder = models_dir / "loras"
    make_lora(models_dir / "tiny", folder / "ink.safetensors", "peft", seed=1)
    make_lora(models_dir / "tiny", folder / "sketch.safetensors", "kohya", seed=2)
    write_sdxl_lora(folder / "xl_style.safetensors")
    # Workers re-read their loras folder at every heartbeat: no restart.
    wait_for(lambda: len(worker_loras(farm)) == 3, 30, "the worker advertising the LoRAs")
    return folder


def worker_loras(farm) -> dict[str, str]:
    from producer import FarmClient

    workers = live_workers(FarmClient(farm.settings).redis)
    return workers[0].loras if workers else {}


def png(client, result) -> tuple[np.ndarray, dict]:
    data = client.storage.get(result.key)
    return np.asarray(Image.open(io.BytesIO(data)), np.int16), read_png_info(data)


def test_workers_advertise_loras_with_family(client, loras):
    assert worker(client).loras == {"ink": "sd15", "sketch": "sd15", "xl_style": "sdxl"}
    assert client.loras() == {"ink": "sd15", "sketch": "sd15", "xl_style": "sdxl"}


def test_tag_and_field_same_record_pixels_and_metadata(client, loras):
    batch = client.submit_batch([
        {**JOB, "prompt": "a lighthouse at dusk <lora:ink:0.8>"},
        {**JOB, "loras": [{"name": "ink", "weight": 0.8}]},
        JOB,
        {**JOB, "prompt": "<lora:ink:0> a lighthouse at dusk"},
    ])
    batch.wait(timeout=120)
    tag, field, plain, zero = batch.records()
    assert [r.state.value for r in (tag, field, plain, zero)] == ["succeeded"] * 4, tag.error
    assert tag.request == field.request
    assert tag.compat == field.compat != plain.compat != zero.compat
    (a, info), (b, _), (c, _), (d, _) = (png(client, r.results[0])
                                         for r in (tag, field, plain, zero))
    assert np.abs(a - b).max() <= 2  # equal up to batched kernels' rounding
    assert np.abs(a - c).max() > 20  # the LoRA changes the picture
    assert np.array_equal(d, c)  # weight 0: exactly the picture without it

    raw = (loras / "ink.safetensors").read_bytes()
    sha256 = hashlib.sha256(raw).hexdigest()
    header = 8 + int.from_bytes(raw[:8], "little")
    addnet = hashlib.sha256(raw[header:]).hexdigest()  # A1111's LoRA hash: tensors only
    params = parse_parameters(info["parameters"])
    assert params["Lora hashes"] == f"ink: {addnet[:12]}"
    assert params["prompt"] == "a lighthouse at dusk <lora:ink:0.8>"
    expected = [{"name": "ink", "weight": 0.8, "sha256": sha256, "addnet_sha256": addnet}]
    assert info["renderfarm"]["lora_hashes"] == expected
    assert info["renderfarm"]["loras"] == [{"name": "ink", "weight": 0.8}]
    sidecar = json.loads(client.storage.get(f"{tag.batch_id}/{tag.id}.json"))
    assert sidecar["lora_hashes"] == expected
    assert sidecar["request"]["loras"] == [{"name": "ink", "weight": 0.8}]


def test_switching_sets_reloads_neither_model_nor_lora(client, loras):
    before = beat_after(client, time.time())
    warm = set(before.loaded_loras.get("tiny", []))
    sets = [[{"name": "ink"}], [{"name": "sketch", "weight": 0.5}], [],
            [{"name": "ink"}], [{"name": "sketch", "weight": 0.5}]]
    records = []
    for loras_ in sets:  # one at a time: every job switches the set
        records.append(client.submit({**JOB, "loras": loras_}).wait(timeout=60))
    assert all(r.state.value == "succeeded" for r in records), [r.error for r in records]
    after = beat_after(client, time.time())
    assert after.loads == before.loads  # the base model was never reloaded
    assert after.lora_loads - before.lora_loads == len({"ink", "sketch"} - warm)
    assert set(after.loaded_loras["tiny"]) >= {"ink", "sketch"}
    pixels = [png(client, r.results[0])[0] for r in records]
    assert np.array_equal(pixels[0], pixels[3]) and np.array_equal(pixels[1], pixels[4])
    assert len({p.tobytes() for p in pixels[:3]}) == 3


def test_micro_batches_never_mix_lora_sets(client, loras):
    sets = [[], [{"name": "ink"}], [{"name": "ink", "weight": 0.5}], [{"name": "sketch"}]]
    jobs = [{**JOB, "prompt": f"a lighthouse, view {k}", "seed": k, "loras": sets[k % 4]}
            for k in range(8)]
    batch = client.submit_batch(jobs)
    batch.wait(timeout=180)
    records = {r.id: r for r in batch.records()}
    shared = 0
    for record in records.values():
        assert record.state.value == "succeeded", record.error
        sidecar = json.loads(client.storage.get(f"{record.batch_id}/{record.id}.json"))
        for other in sidecar["rendered_with"]:  # the jobs its pipeline calls held too
            assert lora_set(records[other].request) == lora_set(record.request)
            shared += 1
    assert shared  # some jobs did share a call


def test_unknown_lora_is_refused_at_submit(client, loras):
    depth = client.redis.zcard(keys.JOBS)
    with pytest.raises(InvalidJob) as info:
        client.submit({**JOB, "prompt": "a cat <lora:nope:0.5>"})
    [error] = info.value.errors
    assert (error.field, error.value) == ("loras.0.name", "nope")
    assert "is not a LoRA the farm has (known: ink, sketch, xl_style)" in str(info.value)
    assert client.redis.zcard(keys.JOBS) == depth


def test_lora_of_another_family_is_refused_at_submit(client, loras):
    with pytest.raises(InvalidJob) as info:
        client.submit({**JOB, "loras": [{"name": "ink"}, {"name": "xl_style"}]})
    [error] = info.value.errors
    assert (error.field, error.value) == ("loras.1.name", "xl_style")
    assert "is a LoRA for model family 'sdxl', but model 'tiny' is 'sd15'" in str(info.value)


def test_lora_on_no_live_worker_is_refused_at_submit(client, loras):
    client.redis.hset(keys.LORAS, "ghost", "sd15")  # advertised once by a worker now gone
    try:
        with pytest.raises(InvalidJob) as info:
            client.submit({**JOB, "prompt": "a cat <lora:ghost>"})
        [error] = info.value.errors
        assert (error.field, error.value) == ("loras.0.name", "ghost")
        assert "is a LoRA on no live worker with model 'tiny'" in str(info.value)
    finally:
        client.redis.hdel(keys.LORAS, "ghost")
