"""LoRAs in the worker's pipelines, in process on the tiny model: both file formats change the
pixels, weight 0 is no LoRA, switching sets reloads neither the model nor a LoRA, and a LoRA
that cannot apply is refused with its reason."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402

from renderfarm.schema import JobRequest, parse_job  # noqa: E402
from worker.adapters import LoraMismatch, UnknownLora  # noqa: E402
from worker.lorafiles import (  # noqa: E402
    NotALora,
    lora_family,
    loras_with_family,
    safetensors_shapes,
)
from worker.modelgen import make_lora, make_model  # noqa: E402
from worker.pipelines import PipelineCache  # noqa: E402
from worker.profiles import Profile  # noqa: E402
from worker.render import render, render_batch  # noqa: E402

CPU = Profile("cpu", "cpu", torch.float32, max_batch=4)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_sdxl_lora(path: Path) -> Path:
    """A kohya-format LoRA as made for SDXL (second text encoder ``lora_te2_``, UNet blocks
    named the SGM way), with the tiny model's widths: only its names say SDXL."""
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name in ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"):
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, 32, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(32, 4, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    make_model("tiny", directory / "tiny")
    make_lora(directory / "tiny", directory / "loras" / "ink.safetensors", "peft", seed=1)
    make_lora(directory / "tiny", directory / "loras" / "sketch.safetensors", "kohya", seed=2)
    write_sdxl_lora(directory / "loras" / "xl_style.safetensors")
    return directory


@pytest.fixture(scope="module")
def cache(models) -> PipelineCache:
    return PipelineCache(models, CPU)


def job(**fields) -> JobRequest:
    values = {"prompt": "a lighthouse at dusk", "model": "tiny", "width": 64, "height": 64,
              "steps": 3, "seed": 42}
    return parse_job(values | fields)


def pixels(cache: PipelineCache, **fields) -> np.ndarray:
    [image] = render(cache, job(**fields))
    return np.asarray(image, np.int16)


def test_made_loras_are_in_both_formats_and_read_as_sd15(models):
    ink = safetensors_shapes(models / "loras" / "ink.safetensors")
    sketch = safetensors_shapes(models / "loras" / "sketch.safetensors")
    assert any(k.endswith(".lora_A.weight") and k.startswith("unet.") for k in ink)
    assert any(k.startswith("text_encoder.text_model.") for k in ink)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in sketch)
    assert any(k.startswith("lora_te_text_model_") for k in sketch)
    assert loras_with_family(models) == {"ink": "sd15", "sketch": "sd15", "xl_style": "sdxl"}


def test_family_from_names_and_cross_attention_width():
    assert lora_family({"lora_te2_x.lora_down.weight": (4, 1280)}) == "sdxl"
    assert lora_family({"lora_unet_input_blocks_4_1_x.lora_down.weight": (4, 640)}) == "sdxl"
    assert lora_family({"transformer.single_blocks.0.attn.to_q.lora_A.weight": (4, 64)}) == "flux"
    to_k = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    assert lora_family({to_k: (4, 2048)}) == "sdxl"
    assert lora_family({to_k: (4, 768)}) == "sd15"
    assert lora_family({to_k: (4, 32)}) == "sd15"  # a toy width: SD's names decide
    with pytest.raises(NotALora, match="no model family the farm knows .* cross-attention "
                                       "width 1024"):  # SD 2.x
        lora_family({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
                     ".lora_down.weight": (4, 1024)})
    with pytest.raises(NotALora, match="not a LoRA: none of its 2 tensors is a LoRA weight"):
        lora_family({"model.diffusion_model.out.2.weight": (4, 320), "x.bias": (4,)})


def test_a_family_is_recognised_from_its_own_module_alone(monkeypatch):
    """A new family's LoRAs are told by its own ``lora_keys`` / ``cross_attention_widths``
    once it is in the registry: lorafiles holds no table of its own."""
    from worker import families

    new = families.Family(name="sd3", label="Stable Diffusion 3",
                          txt2img="StableDiffusion3Pipeline",
                          img2img="StableDiffusion3Img2ImgPipeline",
                          folder_classes=("StableDiffusion3Pipeline",),
                          lora_keys=(r"^transformer\.joint_",), cross_attention_widths=(4096,))
    # Its registry line, first (its transformer LoRAs would otherwise look like Flux's).
    monkeypatch.setattr(families, "FAMILIES", {"sd3": new, **families.FAMILIES})
    assert lora_family({"transformer.joint_blocks.0.x.lora_A.weight": (4, 64)}) == "sd3"
    to_k = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    assert lora_family({to_k: (4, 4096)}) == "sd3"


@pytest.mark.parametrize("name", ["ink", "sketch"])
def test_each_format_changes_the_pixels_and_weight_zero_does_not(cache, name):
    plain = pixels(cache)
    with_lora = pixels(cache, loras=[{"name": name, "weight": 1.0}])
    assert np.abs(with_lora - plain).max() > 20
    assert np.array_equal(pixels(cache), plain)  # LoRA off again for a job without one
    assert np.array_equal(pixels(cache, loras=[{"name": name, "weight": 0}]), plain)


def test_tag_and_field_render_the_same_pixels(cache):
    by_tag = pixels(cache, prompt="a lighthouse at dusk <lora:ink:0.7> <lora:sketch:0.4>")
    by_field = pixels(cache, loras=[{"name": "sketch", "weight": 0.4},
                                    {"name": "ink", "weight": 0.7}])
    assert np.array_equal(by_tag, by_field)
    assert not np.array_equal(by_tag, pixels(cache, loras=[{"name": "ink", "weight": 0.7}]))


def test_switching_sets_reloads_neither_model_nor_lora(models):
    from prometheus_client import REGISTRY

    def timed(name: str) -> float:  # the worker's /metrics histograms (worker/metrics.py)
        return REGISTRY.get_sample_value(f"renderfarm_worker_{name}_seconds_count",
                                         {"model": "tiny"}) or 0.0

    before = timed("model_load"), timed("lora_load")
    cache = PipelineCache(models, CPU)
    sets = [[], [{"name": "ink"}], [{"name": "sketch", "weight": 0.5}], [],
            [{"name": "ink"}], [{"name": "sketch", "weight": 0.5}], [{"name": "ink"}]]
    images = [pixels(cache, loras=s) for s in sets]
    assert (cache.loads, cache.lora_loads) == (1, 2)
    assert (timed("model_load") - before[0], timed("lora_load") - before[1]) == (1, 2)
    assert cache.loaded_loras() == {"tiny": ["sketch", "ink"]}
    for a, b in ((0, 3), (1, 4), (1, 6), (2, 5)):  # the same set gives the same pixels again
        assert np.array_equal(images[a], images[b])


def test_lora_cache_is_bounded(models):
    cache = PipelineCache(models, CPU, max_loras=1)
    pixels(cache, loras=[{"name": "ink"}])
    pixels(cache, loras=[{"name": "sketch"}])
    assert cache.loaded_loras() == {"tiny": ["sketch"]}
    pixels(cache, loras=[{"name": "ink"}])
    assert cache.lora_loads == 3 and cache.loads == 1


def test_batch_with_loras_equals_alone(cache):
    requests = [job(prompt="a red barn <lora:ink:0.8>", seed=1),
                job(prompt="a cat <lora:ink:0.8>", seed=9, num_images=2)]
    together = render_batch(cache, requests)
    for request, images in zip(requests, together, strict=True):
        for a, b in zip(images, render(cache, request), strict=True):
            assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 2


def test_batch_of_other_lora_sets_is_refused(cache):
    with pytest.raises(ValueError, match="loras"):
        render_batch(cache, [job(prompt="a <lora:ink:0.8>"), job(prompt="a <lora:ink:0.5>")])


def test_unknown_and_wrong_family_loras_fail_with_the_reason(cache):
    with pytest.raises(UnknownLora, match="'nope' is not in .*LoRAs present: ink, sketch"):
        pixels(cache, loras=[{"name": "nope"}])
    with pytest.raises(LoraMismatch, match="'xl_style' is for model family 'sdxl', but model "
                                           "'tiny' is 'sd15'"):
        pixels(cache, loras=[{"name": "xl_style"}])
    assert "xl_style" not in cache.loaded_loras().get("tiny", [])


def test_a_lora_matching_no_layer_is_refused(models, tmp_path):
    (tmp_path / "loras").mkdir()
    (tmp_path / "tiny").symlink_to(models / "tiny")
    g = torch.Generator().manual_seed(0)
    save_file({"unet.no_such.block.to_q.lora_A.weight": torch.randn(4, 32, generator=g),
               "unet.no_such.block.to_q.lora_B.weight": torch.randn(32, 4, generator=g)},
              str(tmp_path / "loras" / "stray.safetensors"))
    cache = PipelineCache(tmp_path, CPU)
    with pytest.raises(LoraMismatch, match="'stray' could not be loaded into model 'tiny': "
                                           ".*no_such.block.to_q"):
        pixels(cache, loras=[{"name": "stray"}])
    assert np.array_equal(pixels(cache), pixels(PipelineCache(models, CPU)))  # model unharmed
    # One layer of the model and one it has not: the half that did not land is not ignored.
    layer = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{layer}.lora_A.weight": torch.randn(4, 64, generator=g),
               f"{layer}.lora_B.weight": torch.randn(64, 4, generator=g),
               "unet.down_blocks.1.no_such.to_q.lora_A.weight": torch.randn(4, 64, generator=g),
               "unet.down_blocks.1.no_such.to_q.lora_B.weight": torch.randn(64, 4, generator=g)},
              str(tmp_path / "loras" / "half.safetensors"))
    with pytest.raises(LoraMismatch, match="half.safetensors: its unet weights did not load"):
        pixels(cache, loras=[{"name": "half"}])


@pytest.mark.parametrize("name", ["ink", "sketch"])
def test_lora_layers_hold_the_files_update(models, name):
    """Each adapted layer computes W x + B A x (peft) / up down x (kohya, alpha = rank): in the
    UNet and in the text encoder (whose LoRA names diffusers writes for transformers 4)."""
    from safetensors.torch import load_file

    cache = PipelineCache(models, CPU)
    pipe = cache.get("tiny")
    cache.use_loras("tiny", ((name, 1.0),))
    tensors = load_file(str(models / "loras" / f"{name}.safetensors"))
    checks = {
        pipe.unet: "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        pipe.text_encoder: "encoder.layers.0.self_attn.q_proj",
    }
    for module, layer in checks.items():
        part = "unet" if module is pipe.unet else "text_encoder"
        full = layer if part == "unet" else f"text_model.{layer}"
        if name == "ink":
            down = tensors[f"{part}.{full}.lora_A.weight"]
            up = tensors[f"{part}.{full}.lora_B.weight"]
        else:
            prefix = "lora_unet_" if part == "unet" else "lora_te_"
            down = tensors[f"{prefix}{full.replace('.', '_')}.lora_down.weight"]
            up = tensors[f"{prefix}{full.replace('.', '_')}.lora_up.weight"]
        target = module.get_submodule(layer)
        base = target.base_layer
        x = torch.randn(3, base.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = base(x) + x @ (up @ down).T
            assert torch.allclose(target(x), expected, atol=1e-4)


def test_compiled_unet_renders_lora_jobs_eagerly_and_never_recompiles(models):
    """A compiled UNet (dynamo's eager backend, as tests/test_compile.py) runs LoRA jobs on
    its eager forward, and its compiled graph serves the jobs without LoRA as before: no
    recompile, pixels equal to an eager worker's."""
    from torch._dynamo.utils import counters

    profile = Profile("cpu", "cpu", torch.float32, compile=True, compile_backend="eager",
                      warmup_sizes=((64, 64),), max_batch=1)
    compiled = PipelineCache(models, profile)
    compiled.warmup("tiny")
    warmed = counters["stats"]["unique_graphs"]
    eager = PipelineCache(models, CPU)
    for loras in ([], [{"name": "ink"}], [{"name": "sketch", "weight": 0.5}], [],
                  [{"name": "ink"}], []):
        a = pixels(compiled, loras=loras, scheduler="euler")
        b = pixels(eager, loras=loras, scheduler="euler")
        assert np.abs(a - b).max() <= 1, loras
    assert counters["stats"]["unique_graphs"] == warmed
    assert compiled.loads == 1
    assert compiled.lora_loads == 3  # unloaded before each job without LoRA: ink read twice


def test_img2img_applies_the_lora_too(cache):
    import io

    from PIL import Image

    from renderfarm.images import encode_init_image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, format="PNG")
    init = {"mode": "img2img", "init_image": encode_init_image(buffer.getvalue()),
            "strength": 0.8, "steps": 4}
    plain = pixels(cache, **init)
    ink = pixels(cache, **init, prompt="a lighthouse at dusk <lora:ink>")
    assert np.abs(ink - plain).max() > 20
    assert np.array_equal(pixels(cache, **init, prompt="a lighthouse at dusk <lora:ink:0>"), plain)
