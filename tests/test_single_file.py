"""Single-file checkpoints load offline (worker.singlefile): real weights, the tiny model saved
in the original LDM layout, and the SD 1.5 config the farm carries."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from safetensors.torch import save_file  # noqa: E402

from renderfarm.schema import JobRequest, Mode  # noqa: E402
from tests.single_file_fixtures import diffusers_folder_to_ldm, write_single_file  # noqa: E402
from worker.clip_tokenizer import is_clip_tokenizer  # noqa: E402
from worker.modelfiles import list_models  # noqa: E402
from worker.modelgen import (  # noqa: E402
    SCHEDULER_CONFIG,
    SD15_TEXT_CONFIG,
    SD15_UNET_CONFIG,
    SD15_VAE_CONFIG,
    make_model,
    make_tokenizer,
)
from worker.pipelines import PipelineCache  # noqa: E402
from worker.profiles import Profile  # noqa: E402
from worker.render import render  # noqa: E402
from worker.singlefile import (  # noqa: E402
    CheckpointError,
    checkpoint_shapes,
    copy_configs,
    detect_architecture,
    sd15_config,
    single_file_options,
)

CPU = Profile("cpu", "cpu", torch.float32)

# The LDM config of the tiny model (worker.modelgen TINY_*), as a .yaml next to a checkpoint.
TINY_LDM_YAML = """\
model:
  params:
    scale_factor: 0.18215
    unet_config:
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [2]
        num_res_blocks: 2
        channel_mult: [1, 2]
        num_heads: 8
        use_linear_in_transformer: false
        transformer_depth: 1
        context_dim: 32
    first_stage_config:
      params:
        embed_dim: 4
        ddconfig:
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 1, 2, 2]
          num_res_blocks: 1
          attn_resolutions: []
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test: nothing may be fetched from the hub."""

    def refuse(self, address):
        raise AssertionError(f"network access attempted: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """``tiny`` as a diffusers folder; the same weights as ``tiny-ckpt.safetensors`` (LDM
    layout) with its config-only ``tiny-ckpt.config/``."""
    directory = tmp_path_factory.mktemp("models")
    make_model("tiny", directory / "tiny")
    write_single_file(directory / "tiny", directory / "tiny-ckpt.safetensors")
    copy_configs(directory / "tiny", directory / "tiny-ckpt.config")
    return directory


def job(**fields) -> JobRequest:
    values = {"prompt": "a lighthouse at dusk", "model": "tiny", "width": 64, "height": 64,
              "steps": 4, "seed": 42, "scheduler": "euler_a"}
    return JobRequest(**(values | fields))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def assert_same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert set(left) == set(right), name
        for key in left:
            assert left[key].device.type != "meta", key
            assert torch.equal(left[key], right[key]), key


def test_the_checkpoint_is_a_model_and_its_config_folder_is_not(models):
    found = list_models(models)
    assert found["tiny-ckpt"] == models / "tiny-ckpt.safetensors"
    assert "tiny-ckpt.config" not in found
    assert sorted(found) == ["tiny", "tiny-ckpt"]
    copied = {p.relative_to(models / "tiny-ckpt.config").as_posix()
              for p in (models / "tiny-ckpt.config").rglob("*") if p.is_file()}
    assert "model_index.json" in copied and "unet/config.json" in copied
    assert not [p for p in copied if p.endswith((".safetensors", ".bin"))]


def test_single_file_loads_offline_and_renders_like_the_folder(models):
    cache = PipelineCache(models, CPU, max_models=2)
    single = cache.get("tiny-ckpt", Mode.txt2img)
    folder = cache.get("tiny", Mode.txt2img)
    assert cache.loads == 2
    assert_same_weights(single, folder)
    assert single.tokenizer("a fox").input_ids == folder.tokenizer("a fox").input_ids
    assert single.scheduler.config.items() == folder.scheduler.config.items()
    a = render(cache, job(model="tiny-ckpt"))[0]
    b = render(cache, job(model="tiny"))[0]
    assert a.size == (64, 64)
    assert np.abs(pixels(a) - pixels(b)).max() <= 1
    assert pixels(a).std() > 0
    img2img = render(cache, job(model="tiny-ckpt", mode="img2img", strength=0.5,
                                init_image=_init_image(b)))[0]
    assert img2img.size == (64, 64)


def _init_image(image) -> str:
    import io

    from renderfarm.images import encode_init_image

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return encode_init_image(buffer.getvalue())


def test_a_ckpt_pickle_loads_with_weights_only(models, tmp_path):
    state = diffusers_folder_to_ldm(models / "tiny")
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "old.ckpt")
    copy_configs(models / "tiny", tmp_path / "old.config")
    pipe = PipelineCache(tmp_path, CPU).get("old")
    assert_same_weights(pipe, PipelineCache(models, CPU).get("tiny"))


class NotATensor:
    """Stands for the training objects (callbacks) some old .ckpt files pickle."""


def test_a_ckpt_with_pickled_objects_is_refused_clearly(models, tmp_path):
    state = diffusers_folder_to_ldm(models / "tiny")
    torch.save({"state_dict": state, "callback": NotATensor()}, tmp_path / "trained.ckpt")
    with pytest.raises(CheckpointError, match=r"trained\.ckpt: holds pickled Python objects.*"
                       r"weights_only=True.*convert it to \.safetensors"):
        checkpoint_shapes(tmp_path / "trained.ckpt")


def test_unknown_architecture_without_a_config_names_the_file_and_the_fix(models, tmp_path):
    shutil.copy(models / "tiny-ckpt.safetensors", tmp_path / "mystery.safetensors")
    shapes = checkpoint_shapes(tmp_path / "mystery.safetensors")
    assert detect_architecture(shapes)[0] is None
    (tmp_path / "tiny").symlink_to(models / "tiny", target_is_directory=True)
    cache = PipelineCache(tmp_path, CPU, max_models=1)
    cache.get("tiny")
    with pytest.raises(CheckpointError) as caught:
        cache.get("mystery")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'mystery.safetensors'}: cannot load this checkpoint")
    assert "not Stable Diffusion 1.x's" in message
    assert "next to it as mystery.config/" in message
    assert cache.loads == 1 and cache.loaded() == ["tiny"]  # the warm model was not evicted
    assert not (tmp_path / ".configs").exists()  # nothing written for a refused file


def test_a_config_folder_without_model_index_is_refused(models, tmp_path):
    shutil.copy(models / "tiny-ckpt.safetensors", tmp_path / "half.safetensors")
    (tmp_path / "half.config").mkdir()
    with pytest.raises(CheckpointError, match=r"half\.config has no model_index\.json"):
        single_file_options(tmp_path / "half.safetensors", tmp_path)


def test_an_ldm_yaml_next_to_the_checkpoint_configures_unet_and_vae(models, tmp_path):
    shutil.copy(models / "tiny-ckpt.safetensors", tmp_path / "withyaml.safetensors")
    copy_configs(models / "tiny", tmp_path / "withyaml.config")
    (tmp_path / "withyaml.yaml").write_text(TINY_LDM_YAML)
    options = single_file_options(tmp_path / "withyaml.safetensors", tmp_path)
    assert options == {"config": str(tmp_path / "withyaml.config"),
                       "original_config": str(tmp_path / "withyaml.yaml")}
    cache = PipelineCache(tmp_path, CPU)
    pipe = cache.get("withyaml")
    # The UNet's config came from the yaml: image_size 512 (the SD 1 default) / 8, not 32.
    assert pipe.unet.config.sample_size == 64
    assert_same_weights(pipe, PipelineCache(models, CPU).get("tiny"))

    # A .yaml alone does not describe the text encoder: not enough for a non-SD 1.x one.
    shutil.copy(models / "tiny-ckpt.safetensors", tmp_path / "yamlonly.safetensors")
    (tmp_path / "yamlonly.yaml").write_text(TINY_LDM_YAML)
    with pytest.raises(CheckpointError, match=r"yamlonly\.yaml alone serves only .*SD 1\.x"):
        single_file_options(tmp_path / "yamlonly.safetensors", tmp_path)


def _as_lists(values: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def test_the_sd15_config_is_written_once_hidden_and_matches_modelgen(tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    folder = sd15_config(tmp_path)
    assert folder == tmp_path / ".configs" / "sd15"
    assert list_models(tmp_path) == {}
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert unet["_class_name"] == "UNet2DConditionModel"
    assert unet.items() >= _as_lists(SD15_UNET_CONFIG).items()
    assert vae["_class_name"] == "AutoencoderKL"
    assert vae.items() >= _as_lists(SD15_VAE_CONFIG).items()
    assert text.items() >= SD15_TEXT_CONFIG.items()
    assert scheduler["_class_name"] == "PNDMScheduler"
    assert scheduler.items() >= SCHEDULER_CONFIG.items()
    assert not [p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin")]

    index = StableDiffusionPipeline.load_config(folder)
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) == SD15_TEXT_CONFIG["vocab_size"]  # CLIP's own (test_clip_tokenizer)
    ids = tokenizer("a photo of a cat", padding="max_length").input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]  # openai/CLIP's ids
    assert len(ids) == 77 and set(ids[7:]) == {tokenizer.eos_token_id}

    # Written once: a second call keeps what is there (real tokenizer files put there stay).
    (folder / "tokenizer" / "marker").write_text("kept")
    assert sd15_config(tmp_path) == folder
    assert (folder / "tokenizer" / "marker").read_text() == "kept"
    assert [p.name for p in (tmp_path / ".configs").iterdir()] == ["sd15"]  # no temporaries


def test_an_older_farms_stand_in_tokenizer_is_replaced_by_clips(tmp_path, caplog):
    folder = sd15_config(tmp_path)
    shutil.rmtree(folder / "tokenizer")
    make_tokenizer(folder / "tokenizer")  # what the config of an older farm held
    assert sd15_config(tmp_path) == folder
    assert is_clip_tokenizer(folder / "tokenizer")
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temporaries
    # A <stem>.config/ with a small tokenizer is used as it is, with a warning naming the fix.
    checkpoint = _sd1_probe(tmp_path / "mine.safetensors")
    copy_configs(folder, tmp_path / "mine.config")
    shutil.rmtree(tmp_path / "mine.config" / "tokenizer")
    make_tokenizer(tmp_path / "mine.config" / "tokenizer")
    with caplog.at_level("WARNING", logger="renderfarm.worker"):
        options = single_file_options(checkpoint, tmp_path)
    assert options == {"config": str(tmp_path / "mine.config")}
    assert not is_clip_tokenizer(tmp_path / "mine.config" / "tokenizer")
    assert "install_clip_tokenizer" in caplog.text and "mine.safetensors" in caplog.text


def _sd1_probe(path: Path, **overrides) -> Path:
    """A file with the names and shapes by which an SD 1.x checkpoint is told (zeros)."""
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
            (320, 768),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight":
            (49408, 768),
    } | overrides
    save_file({k: torch.zeros(v, dtype=torch.bool) for k, v in shapes.items()}, path)
    return path


def test_an_sd1_checkpoint_gets_the_generated_sd15_config(tmp_path):
    probe = _sd1_probe(tmp_path / "sd1.safetensors")
    assert detect_architecture(checkpoint_shapes(probe)) == ("sd1", "Stable Diffusion 1.x")
    assert single_file_options(probe, tmp_path) == {
        "config": str(tmp_path / ".configs" / "sd15")}
    sd2 = _sd1_probe(tmp_path / "sd2.safetensors", **{
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
            (320, 1024)})
    with pytest.raises(CheckpointError, match=r"sd2\.safetensors: .*Stable Diffusion 2\.x"):
        single_file_options(sd2, tmp_path)
    inpaint = _sd1_probe(tmp_path / "inpaint.safetensors", **{
        "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)})
    with pytest.raises(CheckpointError, match=r"takes 9 input channels"):
        single_file_options(inpaint, tmp_path)
    # A .yaml lets an SD 1.x-text-encoder checkpoint of another UNet use the SD 1.5 config.
    (tmp_path / "inpaint.yaml").write_text(TINY_LDM_YAML)
    assert single_file_options(inpaint, tmp_path) == {
        "config": str(tmp_path / ".configs" / "sd15"),
        "original_config": str(tmp_path / "inpaint.yaml")}


@pytest.mark.slow
def test_sd15_architecture_single_file_loads_with_the_generated_config(tmp_path):
    """The full SD 1.5 architecture (random weights, ~2 GB): minutes, so not in `make test`."""
    make_model("sd15-random", tmp_path / "sd15")
    write_single_file(tmp_path / "sd15", tmp_path / "sd15-ckpt.safetensors")
    cache = PipelineCache(tmp_path, CPU, max_models=2)
    single = cache.get("sd15-ckpt")
    assert (tmp_path / ".configs" / "sd15" / "model_index.json").is_file()
    assert_same_weights(single, cache.get("sd15"))
    assert render(cache, job(model="sd15-ckpt", steps=2))[0].size == (64, 64)
