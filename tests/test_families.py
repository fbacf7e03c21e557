"""The model-family registry (worker/families): how models are told apart, and what a family
refuses at submit."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from worker.families import FAMILIES, UnknownFamily, family_of, model_families
from worker.modelfiles import safetensors_shapes


def test_the_registry_is_torch_free_for_the_producer():
    import subprocess

    code = ("import sys; import worker.families, producer.client; "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, "
            "sorted(m for m in sys.modules if m in ('torch', 'diffusers'))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_family_says_what_the_rest_of_the_code_asks(tmp_path):
    from renderfarm.schema import SCHEDULERS

    for name, family in FAMILIES.items():
        assert family.name == name
        assert family.folder_classes and family.txt2img in family.folder_classes
        assert set(family.schedulers) <= set(SCHEDULERS) and family.default_scheduler in \
            family.schedulers
        width, height = family.default_size
        assert family.min_side <= min(width, height) <= max(width, height) <= family.max_side
        assert width % family.size_multiple == 0 == height % family.size_multiple
        assert family.bytes_per_pixel > 0 and family.latent_rgb_factors
        assert all(len(row) == 3 for row in family.latent_rgb_factors)


def test_a_folder_is_told_by_its_pipeline_class(models_dir, tmp_path):
    assert family_of(models_dir / "tiny").name == "sd15"
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UnknownFamily, match="KandinskyPipeline"):
        family_of(other)
    assert model_families(models_dir)["tiny"] == "sd15"


def test_safetensors_shapes_reads_the_header_without_torch(models_dir, tmp_path):
    from safetensors import safe_open

    path = models_dir / "tiny" / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert safetensors_shapes(path) == expected
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header length"):
        safetensors_shapes(bad)
    assert family_of(bad) is None  # listed as a model, but of no family the producer can tell


def test_models_command_and_api_show_each_models_family(farm_settings, models_dir):
    from click.testing import CliRunner

    from renderfarm.cli import main

    env = {"RENDERFARM_REDIS_URL": farm_settings.redis_url,
           "RENDERFARM_MODELS_DIR": str(models_dir)}
    result = CliRunner().invoke(main, ["models", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tiny"]["family"] == "sd15"
    table = CliRunner().invoke(main, ["models"], env=env).output
    rows = [[cell.strip() for cell in line.split("│")[1:3]] for line in table.splitlines()
            if " tiny " in line]
    assert rows == [["tiny", "sd15"]]


# -- SDXL and Flux models in the worker's pipeline cache (in-process renders) ---------------
@pytest.fixture(scope="module")
def xl_models(tmp_path_factory):
    """tiny-sdxl and tiny-flux folders; ``xlfile.safetensors``: tiny-sdxl as an SDXL
    single-file checkpoint (Stability's layout) with its configs as ``xlfile.config/``;
    ``fluxfile.safetensors``: tiny-flux's transformer alone, with ``fluxfile.config``
    pointing at the tiny-flux folder; ``lone.safetensors``: the same without a folder."""
    import shutil

    from tests.single_file_fixtures import write_sdxl_single_file
    from worker.modelgen import make_model
    from worker.singlefile import copy_configs

    root = tmp_path_factory.mktemp("xl-models")
    make_model("tiny-sdxl", root / "tiny-sdxl")
    make_model("tiny-flux", root / "tiny-flux")
    write_sdxl_single_file(root / "tiny-sdxl", root / "xlfile.safetensors")
    copy_configs(root / "tiny-sdxl", root / "xlfile.config")
    transformer = root / "tiny-flux" / "transformer" / "diffusion_pytorch_model.safetensors"
    shutil.copy(transformer, root / "fluxfile.safetensors")
    shutil.copy(transformer, root / "lone.safetensors")
    (root / "fluxfile.config").symlink_to(root / "tiny-flux")
    return root


@pytest.fixture(scope="module")
def xl_cache(xl_models, one_torch_thread):
    import torch

    from worker.pipelines import PipelineCache
    from worker.profiles import Profile

    return PipelineCache(xl_models, Profile("cpu", "cpu", torch.float32), max_models=2)


def _job(**fields):
    from renderfarm.schema import JobRequest

    return JobRequest(**{"prompt": "a red fox", "width": 64, "height": 64, "steps": 2,
                         "seed": 7, **fields})


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_an_sdxl_single_file_renders_as_its_folder(xl_cache, xl_models):
    from worker.render import render

    assert family_of(xl_models / "xlfile.safetensors").name == "sdxl"
    folder = render(xl_cache, _job(model="tiny-sdxl", scheduler="euler"))[0]
    single = render(xl_cache, _job(model="xlfile", scheduler="euler"))[0]
    assert xl_cache.family("xlfile").name == "sdxl"
    assert type(xl_cache.get("xlfile")).__name__ == "StableDiffusionXLPipeline"
    assert np.abs(_pixels(folder) - _pixels(single)).max() <= 1


def test_sdxl_batched_equals_unbatched(xl_cache):
    from worker.render import render, render_batch

    jobs = [_job(model="tiny-sdxl", seed=21, num_images=2),
            _job(model="tiny-sdxl", seed=40, prompt="a blue jay", negative_prompt="rain")]
    batched = render_batch(xl_cache, jobs)
    assert [len(images) for images in batched] == [2, 1]
    alone = [render(xl_cache, _job(model="tiny-sdxl", seed=22))[0],
             render(xl_cache, jobs[1])[0]]
    assert np.abs(_pixels(batched[0][1]) - _pixels(alone[0])).max() <= 2
    assert np.abs(_pixels(batched[1][0]) - _pixels(alone[1])).max() <= 2
    assert np.abs(_pixels(batched[0][0]) - _pixels(batched[0][1])).max() > 10  # seeds differ


def test_a_flux_transformer_file_loads_with_its_folder(xl_cache, xl_models):
    from worker.render import render
    from worker.singlefile import CheckpointError, single_file_options

    flux = {"scheduler": "flow_match_euler", "guidance_scale": 3.5}
    folder = render(xl_cache, _job(model="tiny-flux", **flux))[0]
    single = render(xl_cache, _job(model="fluxfile", **flux))[0]
    assert np.abs(_pixels(folder) - _pixels(single)).max() <= 1
    assert family_of(xl_models / "lone.safetensors").name == "flux"
    with pytest.raises(CheckpointError, match=r"Flux\.1 checkpoint.*lone\.config/"):
        single_file_options(xl_models / "lone.safetensors", xl_models)


def test_the_worker_refuses_a_field_the_family_has_no_use_for(xl_cache):
    from worker.render import render

    with pytest.raises(ValueError, match=r"scheduler is not a scheduler of flux.*'euler_a'"):
        render(xl_cache, _job(model="tiny-flux"))
    with pytest.raises(ValueError, match=r"negative_prompt is not used by flux"):
        render(xl_cache, _job(model="tiny-flux", scheduler="flow_match_euler",
                              negative_prompt="rain"))


def test_an_sdxl_checkpoint_without_configs_gets_the_bundled_sdxl_config(tmp_path):
    """A civitai SDXL file (here: its tensor names with tiny tensors) gets the SDXL config the
    farm ships, with CLIP's two tokenizers; the config is the full SDXL base architecture."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    from worker.clip_tokenizer import is_clip_tokenizer
    from worker.singlefile import single_file_options

    fake = {key: torch.zeros(1) for key in (
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
        "model.diffusion_model.input_blocks.0.0.weight")}
    save_file(fake, tmp_path / "pony.safetensors")
    options = single_file_options(tmp_path / "pony.safetensors", tmp_path)
    folder = tmp_path / ".configs" / "sdxl"
    assert options == {"config": str(folder)}
    assert family_of(tmp_path / "pony.safetensors").name == "sdxl"
    assert is_clip_tokenizer(folder / "tokenizer") and is_clip_tokenizer(folder / "tokenizer_2")
    assert CLIPTokenizer.from_pretrained(folder / "tokenizer_2").pad_token == "!"
    assert CLIPTokenizer.from_pretrained(folder / "tokenizer").pad_token == "<|endoftext|>"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    assert 2.5e9 < sum(p.numel() for p in unet.parameters()) < 2.7e9  # SDXL base: 2.57 B
    text_2 = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    assert (text_2["hidden_size"], text_2["num_hidden_layers"]) == (1280, 32)


@pytest.mark.parametrize("model, fields", [
    ("tiny-sdxl", {"scheduler": "euler"}),
    ("tiny-flux", {"scheduler": "flow_match_euler", "guidance_scale": 3.5}),
])
def test_compiled_sdxl_and_flux_render_as_eager_without_recompiling(xl_models, xl_cache, model,
                                                                    fields):
    """The compile path (worker.pipelines._compile_unet) for a UNet with SDXL's extra
    conditioning and for Flux's transformer: warmed up once, a job renders the eager pixels
    and compiles nothing more (dynamo with the ``eager`` backend: tracing and guards, no
    code generation)."""
    import torch
    from torch._dynamo.utils import counters

    from worker.pipelines import PipelineCache, denoiser
    from worker.profiles import Profile
    from worker.render import render

    profile = Profile("cpu", "cpu", torch.float32, compile=True, compile_backend="eager",
                      warmup_sizes=((64, 64),), max_batch=1)
    compiled = PipelineCache(xl_models, profile, max_models=1)
    assert hasattr(denoiser(compiled.get(model)), "renderfarm_compiled")
    compiled.warmup(model, steps=2, guidance_scale=fields.get("guidance_scale", 7.0))
    warmed = counters["stats"]["unique_graphs"]
    a = render(xl_cache, _job(model=model, **fields))[0]
    b = render(compiled, _job(model=model, **fields))[0]
    assert np.abs(_pixels(a) - _pixels(b)).max() <= 1
    assert counters["stats"]["unique_graphs"] == warmed
