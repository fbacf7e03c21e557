"""SDXL and Flux through real workers: jobs submitted with FarmClient, rendered by a Celery
worker process from tiny random models, stored in S3 (moto); and the submit-time refusals of
fields a model's family has no use for, with families learnt from the workers' heartbeats."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from renderfarm.errors import InvalidJob
from renderfarm.farm import EmbeddedFarm
from renderfarm.images import encode_init_image
from storage.png import read_png_info

BASE = {"width": 64, "height": 64, "steps": 2, "prompt": "a lighthouse at dusk"}
UNICODE_NAME = "Ghibli 风格 (v2)"


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, models_dir):
    """tiny-sdxl and tiny-flux; ``xlfile``: tiny-sdxl as a civitai-style single file (original
    layout) with its config folder; and LoRAs, as people's loras folders hold them: for SDXL
    in diffusers' format (``xl_ink``), kohya's (``xl_kohya``, SGM block names, ``lora_te1_`` /
    ``lora_te2_``) and UNet-only (``xl_unet``, nothing but its shapes to tell it by); for Flux
    (``fx_ink``); for SD 1.5 (``sd_ink``, made on the session's tiny model); one named with
    spaces and unicode; and files in ``loras/`` that are no usable LoRA."""
    import torch
    from safetensors.torch import save_file

    from tests.single_file_fixtures import write_sdxl_single_file
    from worker.modelgen import make_lora, make_model
    from worker.singlefile import copy_configs

    root = tmp_path_factory.mktemp("family-models")
    make_model("tiny-sdxl", root / "tiny-sdxl")
    make_model("tiny-flux", root / "tiny-flux")
    write_sdxl_single_file(root / "tiny-sdxl", root / "xlfile.safetensors")
    copy_configs(root / "tiny-sdxl", root / "xlfile.config")
    loras = root / "loras"
    make_lora(root / "tiny-sdxl", loras / "xl_ink.safetensors", "peft", seed=1)
    make_lora(root / "tiny-sdxl", loras / "xl_kohya.safetensors", "kohya", seed=2)
    make_lora(root / "tiny-sdxl", loras / "xl_unet.safetensors", "peft", seed=3,
              text_encoders=False)
    make_lora(root / "tiny-flux", loras / "fx_ink.safetensors", "peft", seed=4)
    write_flux_kohya_lora(loras / "fx_ink.safetensors", loras / "fx_kohya.safetensors",
                          loras / "fx_double.safetensors")
    make_lora(models_dir / "tiny", loras / "sd_ink.safetensors", "peft", seed=5)
    make_lora(root / "tiny-sdxl", loras / f"{UNICODE_NAME}.safetensors", "peft", seed=6)
    save_file({"conv.weight": torch.randn(8, 4, 3, 3), "conv.bias": torch.randn(8)},
              str(loras / "not_a_lora.safetensors"))
    whole = (loras / "xl_ink.safetensors").read_bytes()
    (loras / "cut_short.safetensors").write_bytes(whole[:len(whole) // 2])
    return root


#: kohya's sd-scripts names of a Flux double block's layers -> diffusers' names of the layers
#: (a fused qkv projection -> its three), as diffusers' _convert_kohya_flux_lora_to_diffusers
#: reads them. A single block's fused ``linear1`` (q, k, v and the MLP) is left out: diffusers
#: splits it at FLUX.1's own widths (3072, 3072, 3072, 12288), which a tiny Flux has not.
KOHYA_FLUX_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
}


def write_flux_kohya_lora(peft: Path, kohya: Path, double_only: Path) -> None:
    """Write the diffusers-format Flux LoRA ``peft``'s double-block layers in kohya's naming
    (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, alpha = rank), to ``kohya``,
    and the same layers in diffusers' format to ``double_only``. A fused qkv gets the three
    downs stacked and the three ups on the diagonal of its up: diffusers splits such a
    block-diagonal LoRA back into the three exactly (its "sparse" case), so both files give
    the same model."""
    import torch
    from safetensors.torch import load_file, save_file

    given = load_file(str(peft))
    out: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    blocks = sorted({int(k.split(".")[2]) for k in given
                     if k.startswith("transformer.transformer_blocks.")})
    for i in blocks:
        for name, layers in KOHYA_FLUX_DOUBLE.items():
            prefix = f"transformer.transformer_blocks.{i}."
            downs = [given[f"{prefix}{layer}.lora_A.weight"] for layer in layers]
            ups = [given[f"{prefix}{layer}.lora_B.weight"] for layer in layers]
            for layer in layers:
                for part in ("lora_A", "lora_B"):
                    kept[f"{prefix}{layer}.{part}.weight"] = given[f"{prefix}{layer}.{part}.weight"]
            key = f"lora_unet_double_blocks_{i}_{name}"
            out[f"{key}.lora_down.weight"] = torch.cat(downs).contiguous()
            out[f"{key}.lora_up.weight"] = torch.block_diag(*ups).contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(sum(d.shape[0] for d in downs)))
    save_file(out, str(kohya))
    save_file(kept, str(double_only))
    # The same layers in the original (BFL) names, as ComfyUI and ai-toolkit write them.
    renames = (("lora_unet_double_blocks_", "double_blocks."), ("_img_attn_", ".img_attn."),
               ("_txt_attn_", ".txt_attn."), (".lora_down.", ".lora_A."), (".lora_up.", ".lora_B."))
    bfl = {}
    for key, value in out.items():
        if not key.endswith(".alpha"):
            for old, new in renames:
                key = key.replace(old, new)
            bfl[key] = value
    save_file(bfl, str(kohya.with_name("fx_bfl.safetensors")))


@pytest.fixture(scope="module")
def family_farm(farm_settings, module_redis_url, family_models, tmp_path_factory):
    """One worker with tiny-sdxl and tiny-flux, on a Redis database of its own (the session
    farm's models and heartbeats stay out of it), storing to the session's S3 bucket."""
    settings = farm_settings.model_copy(update={
        "redis_url": module_redis_url, "models_dir": family_models,
        "data_dir": tmp_path_factory.mktemp("family-farm")})
    # One torch thread: the suite runs two test processes on two cores, and two OpenMP
    # threads per worker on a busy CPU made its renders many times slower, not faster.
    with EmbeddedFarm(settings, workers=1, profile="cpu", preload=["tiny-sdxl", "tiny-flux"],
                      extra_env={"OMP_NUM_THREADS": "1"}) as running:
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
    assert fclient.model_families() == {"tiny-flux": "flux", "tiny-sdxl": "sdxl",
                                        "xlfile": "sdxl"}


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
    ({"model": "tiny-flux", "scheduler": "Euler a"}, "scheduler",
     ["flux", "allowed: flow_match_euler (A1111 names: Euler)", "'Euler a'"]),
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


def test_the_native_api_reads_a1111_sampler_names_as_the_a1111_api_does(family_farm, fclient):
    """'Euler' on Flux is its flow-matching Euler, as on the A1111 routes (one mapping:
    renderfarm/samplers.from_a1111 with the model's family); on SDXL it is Euler."""
    from dashboard import create_app
    from storage.png import parse_parameters

    requests = fclient.validate([{**BASE, "model": "tiny-flux", "scheduler": "Euler"},
                                 {**BASE, "model": "tiny-flux", "scheduler": "k_euler"},
                                 {**BASE, "model": "tiny-sdxl", "scheduler": "Euler"}])
    assert [r.scheduler for r in requests] == ["flow_match_euler", "flow_match_euler", "euler"]

    app = create_app({"TESTING": True, "SETTINGS": fclient.settings})
    answer = app.test_client().post("/api/v1/batches", json={"jobs": [
        {**BASE, "model": "tiny-flux", "scheduler": "Euler", "seed": 3}]})
    assert answer.status_code == 201, answer.get_json()
    [job_id] = answer.get_json()["job_ids"]
    record = fclient.job(job_id).wait(timeout=120)
    assert record.state.value == "succeeded", record.error
    assert record.request.scheduler == "flow_match_euler"
    info = read_png_info(fclient.storage.get(record.results[0].key))
    params = parse_parameters(info["parameters"])
    assert (params["Sampler"], params["Schedule type"]) == ("Euler", "Simple")


def test_models_api_shows_families(family_farm, fclient):
    from dashboard import create_app

    app = create_app({"TESTING": True, "SETTINGS": fclient.settings})
    data = app.test_client().get("/api/v1/models").get_json()
    assert data["families"] == {"tiny-flux": "flux", "tiny-sdxl": "sdxl", "xlfile": "sdxl"}


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


# -- LoRAs on SDXL and Flux ------------------------------------------------------------------

def test_workers_advertise_each_loras_family_from_the_family_layer(fclient):
    """Each family's module says how its LoRAs look: the UNet-only SDXL LoRA (tiny widths,
    no second text encoder) is SDXL's by its several transformer layers per block; files no
    model can use are advertised with the reason."""
    from worker.lorafiles import UNUSABLE

    loras = fclient.loras()
    unusable = {name: family for name, family in loras.items() if family.startswith(UNUSABLE)}
    assert {n: f for n, f in loras.items() if n not in unusable} == {
        "fx_ink": "flux", "fx_kohya": "flux", "fx_double": "flux", "fx_bfl": "flux",
        "sd_ink": "sd15",
        "xl_ink": "sdxl", "xl_kohya": "sdxl",
        "xl_unet": "sdxl", UNICODE_NAME: "sdxl"}
    assert set(unusable) == {"cut_short", "not_a_lora"}
    assert "truncated" in unusable["cut_short"]
    assert "not a LoRA" in unusable["not_a_lora"]


@pytest.mark.parametrize("model, a, b", [("tiny-sdxl", "xl_ink", "xl_kohya"),
                                         ("tiny-flux", "fx_ink", "fx_kohya")])
def test_switching_lora_sets_on_sdxl_and_flux_never_reloads_the_model(fclient, model, a, b):
    """Jobs alternating LoRA A, LoRA B and none on one worker: the base model is never loaded
    again, each LoRA file is read once (the worker's heartbeat counts both), and a set renders
    the same pixels each time it comes back."""
    from tests.test_lora import beat_after

    before = beat_after(fclient, time.time())
    warm = set(before.loaded_loras.get(model, []))
    sets = [[{"name": a}], [{"name": b, "weight": 0.5}], [], [{"name": a}],
            [{"name": b, "weight": 0.5}], []]
    records = [fclient.submit({**BASE, "model": model, "seed": 5, "steps": 1, "loras": loras})
               .wait(timeout=120) for loras in sets]  # one at a time: each job switches
    assert [r.state.value for r in records] == ["succeeded"] * 6, [r.error for r in records]
    after = beat_after(fclient, time.time())
    assert after.loads == before.loads  # the base model was never reloaded
    assert after.lora_loads - before.lora_loads == len({a, b} - warm)
    assert set(after.loaded_loras[model]) >= {a, b}
    images = [pixels(fclient, r.results[0].key) for r in records]
    for first, again in ((0, 3), (1, 4), (2, 5)):
        assert np.array_equal(images[first], images[again])
    assert len({image.tobytes() for image in images[:3]}) == 3


def test_a_kohya_flux_lora_renders_as_its_diffusers_twin(fclient):
    """A Flux LoRA in kohya's sd-scripts naming (fused qkv of the double blocks), written from
    a diffusers-format one: it changes the picture, and exactly as the diffusers-format LoRA
    of the same layers does."""
    job = {**BASE, "model": "tiny-flux", "seed": 13}
    batch = fclient.submit_batch([job, {**job, "loras": [{"name": "fx_double", "weight": 0.9}]},
                                  {**job, "prompt": f"{BASE['prompt']} <lora:fx_kohya:0.9>"}])
    batch.wait(timeout=240)
    records = batch.records()
    assert [r.state.value for r in records] == ["succeeded"] * 3, [r.error for r in records]
    plain, diffusers_format, kohya = (pixels(fclient, r.results[0].key) for r in records)
    assert np.abs(diffusers_format - plain).max() > 20
    assert np.abs(kohya - diffusers_format).max() <= 1


def test_a_flux_lora_in_the_original_names_fails_its_job_saying_why(fclient):
    """A Flux LoRA in the original (BFL) layer names: the family layer knows it for Flux's,
    but diffusers reads those names only as a full-size FLUX.1 control LoRA and places none of
    its layers in the model: the job fails saying so (not diffusers' "adapter not present"),
    and the next job renders."""
    from renderfarm.schema import JobState

    job = {**BASE, "model": "tiny-flux", "seed": 2}
    bad = fclient.submit({**job, "loras": [{"name": "fx_bfl"}]}).wait(timeout=120)
    assert bad.state is JobState.failed
    assert "fx_bfl.safetensors: diffusers placed none of its layers" in bad.error, bad.error
    assert fclient.submit(job).wait(timeout=120).state is JobState.succeeded


def _lora_batch(fclient, model: str, name: str, extra: dict | None = None):
    """Plain, by tag, by field and at weight 0: the records and their PNGs' pixels and info."""
    job = {**BASE, "model": model, "seed": 21, **(extra or {})}
    batch = fclient.submit_batch([
        job,
        {**job, "prompt": f"{job['prompt']} <lora:{name}:0.9>"},
        {**job, "loras": [{"name": name, "weight": 0.9}]},
        {**job, "loras": [{"name": name, "weight": 0}]},
    ])
    batch.wait(timeout=240)
    records = batch.records()
    assert [r.state.value for r in records] == ["succeeded"] * 4, [r.error for r in records]
    datas = [fclient.storage.get(r.results[0].key) for r in records]
    images = [np.asarray(Image.open(io.BytesIO(d)), np.int16) for d in datas]
    return records, images, [read_png_info(d) for d in datas]


@pytest.mark.parametrize("model, name", [("tiny-sdxl", "xl_ink"), ("tiny-flux", "fx_ink")])
def test_a_lora_by_field_and_tag_on_sdxl_and_flux(fclient, family_models, model, name):
    import hashlib

    from storage.png import parse_parameters

    (plain, tag, field, zero), (a, b, c, d), infos = _lora_batch(fclient, model, name)
    assert tag.request == field.request
    assert np.abs(b - c).max() <= 2  # tag and field: the same job
    assert np.abs(b - a).max() > 20  # the LoRA changes the picture
    assert np.array_equal(d, a)  # weight 0: exactly the picture without it
    raw = (family_models / "loras" / f"{name}.safetensors").read_bytes()
    addnet = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    params = parse_parameters(infos[1]["parameters"])
    assert params["Lora hashes"] == f"{name}: {addnet[:12]}"
    assert params["Model"] == model
    assert infos[1]["renderfarm"]["lora_hashes"][0]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert "Lora hashes" not in parse_parameters(infos[0]["parameters"])


def test_kohya_and_unet_only_sdxl_loras_on_a_single_file_checkpoint(fclient):
    """A civitai-style SDXL single file with a kohya LoRA (SGM block names) and a UNet-only
    one: each changes the picture, and the kohya one gives the pixels it gives on the
    diffusers folder the file was converted from. And a LoRA named with spaces and unicode,
    by its tag."""
    kohya, unet = [{"name": "xl_kohya", "weight": 0.8}], [{"name": "xl_unet"}]
    jobs = [{**BASE, "model": model, "seed": 8, "loras": loras}
            for model, loras in (("xlfile", []), ("xlfile", kohya), ("xlfile", unet),
                                 ("tiny-sdxl", []), ("tiny-sdxl", kohya))]
    jobs.append({**BASE, "model": "tiny-sdxl", "seed": 8,
                 "prompt": f"{BASE['prompt']} <lora:{UNICODE_NAME}:0.7>"})
    batch = fclient.submit_batch(jobs)
    batch.wait(timeout=240)
    records = batch.records()
    assert [r.state.value for r in records] == ["succeeded"] * 6, [r.error for r in records]
    file_plain, file_kohya, file_unet, folder_plain, folder_kohya, named = (
        pixels(fclient, r.results[0].key) for r in records)
    assert np.abs(file_kohya - file_plain).max() > 20
    assert np.abs(file_unet - file_plain).max() > 20
    assert np.abs(file_kohya - folder_kohya).max() <= 2
    assert np.abs(file_plain - folder_plain).max() <= 2

    assert records[-1].request.loras[0].name == UNICODE_NAME
    assert np.abs(named - folder_plain).max() > 20
    info = read_png_info(fclient.storage.get(records[-1].results[0].key))
    assert f"<lora:{UNICODE_NAME}:0.7>" in info["parameters"]
    assert f'Lora hashes: "{UNICODE_NAME}: ' in info["parameters"]


@pytest.mark.parametrize("fields, value, words", [
    ({"model": "tiny-sdxl", "loras": [{"name": "sd_ink"}]}, "sd_ink",
     ["is a LoRA for model family 'sd15'", "'tiny-sdxl' is 'sdxl'"]),
    ({"model": "xlfile", "prompt": "a cat <lora:fx_ink:0.5>"}, "fx_ink",
     ["is a LoRA for model family 'flux'", "'xlfile' is 'sdxl'"]),
    ({"model": "tiny-flux", "loras": [{"name": "xl_unet"}]}, "xl_unet",
     ["is a LoRA for model family 'sdxl'", "'tiny-flux' is 'flux'"]),
    ({"model": "tiny-sdxl", "loras": [{"name": "not_a_lora"}]}, "not_a_lora",
     ["cannot be used: not a LoRA", "none of its 2 tensors is a LoRA weight"]),
    ({"model": "tiny-sdxl", "prompt": "a cat <lora:cut_short>"}, "cut_short",
     ["cannot be used: truncated"]),
])
def test_a_lora_that_cannot_apply_is_refused_at_submit(fclient, fields, value, words):
    before = fclient.redis.dbsize()
    with pytest.raises(InvalidJob) as caught:
        fclient.submit({**BASE, **fields})
    [error] = caught.value.errors
    assert (error.field, error.value) == ("loras.0.name", value)
    for word in words:
        assert word in str(error), str(error)
    assert fclient.redis.dbsize() == before  # nothing recorded or enqueued


def test_a_lora_tag_without_its_weight_is_refused_naming_the_tag(fclient):
    with pytest.raises(InvalidJob) as caught:
        fclient.submit({**BASE, "model": "tiny-sdxl", "prompt": "a cat <lora:xl_ink:>"})
    [error] = caught.value.errors
    assert error.field == "prompt" and "<lora:xl_ink:>" in str(error)
    assert "no weight after" in str(error)


def test_a_lora_file_broken_after_submit_fails_its_job_and_the_worker_lives_on(
        fclient, family_models):
    """A LoRA whose file is cut short between submit and render: the job fails naming the
    LoRA and why, and the worker renders the next job."""
    from renderfarm.schema import JobState

    loras = family_models / "loras"
    good = (loras / "xl_ink.safetensors").read_bytes()
    (loras / "swap.safetensors").write_bytes(good)
    try:
        blocker = fclient.submit({**BASE, "model": "tiny-sdxl", "width": 128, "height": 128,
                                  "steps": 150, "seed": 1})
        _until_rendering(blocker)
        _until(lambda: "swap" in fclient.loras(), "the worker advertising 'swap'")
        job = fclient.submit({**BASE, "model": "tiny-sdxl", "loras": [{"name": "swap"}]})
        (loras / "swap.safetensors").write_bytes(good[:len(good) // 2])
        blocker.cancel()
        record = job.wait(timeout=120)
        assert record.state is JobState.failed
        assert "LoRA 'swap' (swap.safetensors) cannot be used: truncated" in record.error
        after = fclient.submit({**BASE, "model": "tiny-sdxl", "loras": [{"name": "xl_ink"}]})
        assert after.wait(timeout=120).state is JobState.succeeded
    finally:
        (loras / "swap.safetensors").unlink()


def _until(check, what: str, timeout: float = 30.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not after {timeout}s")
