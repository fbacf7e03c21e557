"""SDXL and Flux through real workers: jobs submitted with FarmClient, rendered by a Celery
worker process from tiny random models, stored in S3 (moto); and the submit-time refusals of
fields a model's family has no use for, with families learnt from the workers' heartbeats."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from renderfarm.errors import InvalidJob
from renderfarm.farm import EmbeddedFarm
from renderfarm.images import encode_init_image
from storage.png import read_png_info

BASE = {"width": 64, "height": 64, "steps": 2, "prompt": "a lighthouse at dusk"}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    from worker.modelgen import make_model

    root = tmp_path_factory.mktemp("family-models")
    make_model("tiny-sdxl", root / "tiny-sdxl")
    make_model("tiny-flux", root / "tiny-flux")
    return root


@pytest.fixture(scope="module")
def family_farm(farm_settings, family_models, tmp_path_factory):
    """One worker with tiny-sdxl and tiny-flux, on a Redis database of its own (the session
    farm's models and heartbeats stay out of it), storing to the session's S3 bucket."""
    from renderfarm.connection import connect

    url = farm_settings.redis_url.rsplit("/", 1)[0] + "/9"
    settings = farm_settings.model_copy(update={
        "redis_url": url, "models_dir": family_models,
        "data_dir": tmp_path_factory.mktemp("family-farm")})
    connect(settings).flushdb()
    with EmbeddedFarm(settings, workers=1, profile="cpu",
                      preload=["tiny-sdxl", "tiny-flux"]) as running:
        yield running


@pytest.fixture
def fclient(family_farm, tmp_path):
    """A client whose own models dir is empty: what it knows of families comes from the
    worker's heartbeats."""
    from producer import FarmClient

    empty = tmp_path / "no-models"
    empty.mkdir()
    return FarmClient(family_farm.settings.model_copy(update={"models_dir": empty}))


def pixels(client, key: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.storage.get(key))), dtype=np.int16)


def test_the_heartbeats_tell_the_client_each_models_family(fclient):
    assert fclient.model_families() == {"tiny-flux": "flux", "tiny-sdxl": "sdxl"}


def test_sdxl_txt2img_and_img2img_end_to_end_to_s3(fclient):
    batch = fclient.submit_batch([
        {**BASE, "model": "tiny-sdxl", "seed": 11, "num_images": 2, "scheduler": "euler"},
        {**BASE, "model": "tiny-sdxl", "seed": 12, "negative_prompt": "fog"},
    ])
    results = batch.result(timeout=240)
    keys = [r.key for job in results.values() for r in job]
    assert len(keys) == 3
    for key in keys:
        data = fclient.storage.get(key)
        assert Image.open(io.BytesIO(data)).size == (64, 64)
        assert "Model: tiny-sdxl" in read_png_info(data)["parameters"]
    first = next(iter(results.values()))[0]
    init = encode_init_image(fclient.storage.get(first.key))
    job = fclient.submit({**BASE, "model": "tiny-sdxl", "mode": "img2img", "init_image": init,
                          "strength": 0.9, "steps": 3, "seed": 5})
    [image] = job.result(timeout=240)
    data = fclient.storage.get(image.key)
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    assert "Denoising strength: 0.9" in read_png_info(data)["parameters"]
    assert np.abs(pixels(fclient, image.key) - pixels(fclient, first.key)).max() > 0


def test_flux_txt2img_gets_its_scheduler_and_guidance_by_default(fclient):
    job = fclient.submit({**BASE, "model": "tiny-flux", "seed": 3, "num_images": 2})
    images = job.result(timeout=240)
    record = fclient.records.job(job.id)
    assert record.request.scheduler == "flow_match_euler"
    assert record.request.guidance_scale == 3.5
    assert [Image.open(io.BytesIO(fclient.storage.get(i.key))).size for i in images] == \
        [(64, 64)] * 2
    assert [i.seed for i in images] == [3, 4]
    # Image k is seed + k: the second image equals a job of seed 4 alone.
    alone = fclient.submit({**BASE, "model": "tiny-flux", "seed": 4}).result(timeout=240)
    assert np.abs(pixels(fclient, alone[0].key) - pixels(fclient, images[1].key)).max() <= 2


def test_sdxl_without_a_size_gets_1024(fclient):
    [request] = fclient.validate([{"model": "tiny-sdxl", "prompt": "x"}])
    assert (request.width, request.height, request.scheduler) == (1024, 1024, "euler_a")
    [request] = fclient.validate([{"model": "tiny-sdxl", "prompt": "x", "width": 512}])
    assert (request.width, request.height) == (512, 512)  # a size given is kept


@pytest.mark.parametrize("fields, field, words", [
    ({"model": "tiny-flux", "negative_prompt": "blurry"}, "negative_prompt",
     ["flux", "no negative prompt", "blurry"]),
    ({"model": "tiny-flux", "scheduler": "euler_a"}, "scheduler",
     ["flux", "allowed: flow_match_euler", "euler_a"]),
    ({"model": "tiny-flux", "width": 72}, "width", ["multiple of 16", "flux", "72"]),
    ({"model": "tiny-sdxl", "scheduler": "flow_match_euler"}, "scheduler",
     ["sdxl", "dpmpp_2m_karras", "flow_match_euler"]),
])
def test_a_field_the_family_has_no_use_for_is_refused_at_submit(fclient, fields, field, words):
    before = fclient.redis.dbsize()
    with pytest.raises(InvalidJob) as caught:
        fclient.submit({**BASE, **fields})
    [error] = caught.value.errors
    assert error.field == field
    text = str(error)
    for word in words:
        assert word in text, text
    assert fclient.redis.dbsize() == before  # nothing recorded or enqueued


def test_models_api_shows_families(family_farm, fclient):
    from dashboard import create_app

    app = create_app({"TESTING": True, "SETTINGS": fclient.settings})
    data = app.test_client().get("/api/v1/models").get_json()
    assert data["families"] == {"tiny-flux": "flux", "tiny-sdxl": "sdxl"}


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_a_running_sdxl_or_flux_job_cancels_at_a_step(fclient, model):
    from renderfarm.schema import JobState

    job = fclient.submit({**BASE, "model": model, "width": 128, "height": 128, "steps": 150,
                          "seed": 1})
    _until_rendering(job)
    assert job.cancel() == "cancelling"
    record = job.wait(timeout=60)
    assert record.state is JobState.cancelled and record.step < 150
    assert not fclient.storage.list(f"{record.batch_id}/")


def _until_rendering(job, timeout: float = 120.0):
    """Poll the job's record until a worker reports a denoising step (recorded state, no
    fixed sleep for a window)."""
    import time

    from renderfarm.schema import JobState

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = job.status()
        if record.state is JobState.rendering and record.step > 0:
            return record
        time.sleep(0.05)
    raise AssertionError(f"job {job.id} never reported a step: {job.status()}")


def test_the_families_api_says_what_each_family_takes(fclient):
    from dashboard import create_app

    app = create_app({"TESTING": True, "SETTINGS": fclient.settings})
    families = app.test_client().get("/api/v1/families").get_json()["families"]
    assert families["flux"]["schedulers"] == ["flow_match_euler"]
    assert families["flux"]["negative_prompt"] is False
    assert families["sdxl"]["default_size"] == [1024, 1024]
    assert families["sd15"]["size_multiple"] == 8 and families["flux"]["size_multiple"] == 16
