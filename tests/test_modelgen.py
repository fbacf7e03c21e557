"""Locally built models: the tiny pipeline loads and tokenizes anything; sd15-random is SD 1.5."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from worker.modelfiles import list_models  # noqa: E402
from worker.modelgen import CONFIGS, make_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


def test_tiny_is_a_loadable_diffusers_folder(tiny):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    assert (tiny / "model_index.json").is_file()
    assert list(tiny.glob("unet/*.safetensors")) and list(tiny.glob("text_encoder/*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None, local_files_only=True)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.clip_sample is False  # DDIM made from it must not clip
    assert pipe.tokenizer.model_max_length == 77


@pytest.mark.parametrize(
    "prompt",
    [
        "A painting of a squirrel eating a burger",
        "日本語のテキスト, café — ok?",
        "🐱🚀👩‍🚀",
        "x" * 500,
    ],
)
def test_tiny_tokenizer_takes_any_prompt(tiny, prompt):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny / "tokenizer")
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert max(ids) < CONFIGS["tiny"]["text_encoder"]["vocab_size"]
    assert tokenizer.unk_token_id not in ids[1 : ids.index(tokenizer.eos_token_id)]


def test_unknown_kind_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"kind must be one of tiny, sd15-random, shapes, "
                                         r"tiny-sdxl, tiny-flux, sdxl-random, got 'sdxl'"):
        make_model("sdxl", tmp_path)


def test_list_models_finds_folders_and_single_files(tmp_path, tiny):
    (tmp_path / "tiny").symlink_to(tiny, target_is_directory=True)
    (tmp_path / "photo.safetensors").write_bytes(b"0")
    (tmp_path / "old.ckpt").write_bytes(b"0")
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()  # no model_index.json
    (tmp_path / ".partial").mkdir()
    (tmp_path / ".partial" / "model_index.json").write_text("{}")
    (tmp_path / "tiny.safetensors").write_bytes(b"0")  # the folder of the same name wins

    assert list_models(tmp_path) == {
        "old": tmp_path / "old.ckpt",
        "photo": tmp_path / "photo.safetensors",
        "tiny": tmp_path / "tiny",
    }
    assert list_models(tmp_path / "missing") == {}


def test_list_models_does_not_import_torch():
    code = "import sys, worker, worker.modelfiles; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_sd15_random_has_the_sd15_architecture():
    """Configs and parameter counts of SD 1.5, checked without building the 1 B weights."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = CONFIGS["sd15-random"]
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    assert tuple(unet["block_out_channels"]) == (320, 640, 1280, 1280)
    assert unet["cross_attention_dim"] == 768 and unet["attention_head_dim"] == 8
    assert unet["layers_per_block"] == 2 and unet["sample_size"] == 64
    assert tuple(vae["block_out_channels"]) == (128, 256, 512, 512)
    assert vae["latent_channels"] == 4 and vae["scaling_factor"] == 0.18215
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (
        768,
        12,
        12,
    )
    assert text["vocab_size"] == 49408 and text["intermediate_size"] == 3072

    with init_empty_weights():  # meta tensors: shapes only, no memory
        models = [
            UNet2DConditionModel(**unet),
            AutoencoderKL(**vae),
            CLIPTextModel(CLIPTextConfig(**text)),
        ]
    counts = [sum(p.numel() for p in m.parameters()) for m in models]
    assert counts == [859_520_964, 83_653_863, 123_060_480]  # SD 1.5's UNet, VAE, CLIP ViT-L/14
