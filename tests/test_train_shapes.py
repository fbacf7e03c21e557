"""tools/train_shapes.py end to end at a toy length: it writes a diffusers folder the farm's
pipeline loads, and the same seed gives the same weights (the issue asks for a model
reproducible from a seed), another seed other weights."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
# A few steps of each phase: what is checked is the script's plumbing, not the model's quality.
TOY = ["--vae-steps", "2", "--vae-refine-steps", "2", "--vae-batch", "4", "--dataset", "64",
       "--unet-steps", "3", "--batch", "4", "--ckpt-every", "2"]


def train(work: Path, out: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "train_shapes.py"),
                           "--work", str(work), "--out", str(out), *TOY, *extra],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def test_train_shapes_writes_a_pipeline_reproducible_from_its_seed(tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    train(tmp_path / "w1", tmp_path / "a")
    train(tmp_path / "w2", tmp_path / "b")
    train(tmp_path / "w3", tmp_path / "c", "--seed", "1")
    first = digest(tmp_path / "a")
    assert set(first) == {"vae/diffusion_pytorch_model.safetensors",
                          "unet/diffusion_pytorch_model.safetensors",
                          "text_encoder/model.safetensors"}
    assert digest(tmp_path / "b") == first  # same seed: the same weights, file for file
    other = digest(tmp_path / "c")
    assert all(other[name] != first[name] for name in first)
    # The schedule and sampling options are reproducible too, and change the weights.
    options = ("--decay-from", "1", "--focus", "2", "--vae-schedule", "cosine",
               "--caption-tokens", "16", "--fused-adam", "--low-t-from", "1",
               "--low-t-range", "50", "450")
    train(tmp_path / "w4", tmp_path / "d", *options)
    train(tmp_path / "w5", tmp_path / "e", *options)
    assert digest(tmp_path / "d") == digest(tmp_path / "e")
    assert all(digest(tmp_path / "d")[name] != first[name] for name in (
        "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"))

    pipe = StableDiffusionPipeline.from_pretrained(
        tmp_path / "a", dtype=torch.float32, safety_checker=None, requires_safety_checker=False,
        local_files_only=True)
    # DDIM made from the model's config must not clip its latents to a pixel range
    from diffusers import DDIMScheduler

    assert DDIMScheduler.from_config(pipe.scheduler.config).config.clip_sample is False
    image = pipe("a red circle on a blue background", height=64, width=64,
                 num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    # --caption-tokens is the exported tokenizer's length: the pipeline pads prompts to what
    # the text encoder was trained on (77 by default, as CLIP's).
    assert pipe.tokenizer.model_max_length == 77
    short = StableDiffusionPipeline.from_pretrained(
        tmp_path / "d", dtype=torch.float32, safety_checker=None, requires_safety_checker=False,
        local_files_only=True)
    assert short.tokenizer.model_max_length == 16
    ids = short.tokenizer("a small white circle at the bottom right on a yellow background",
                          padding="max_length", max_length=short.tokenizer.model_max_length,
                          truncation=True).input_ids
    assert len(ids) == 16 and ids[13] == short.tokenizer.eos_token_id  # 14 tokens fit
    image = short("a red circle on a blue background", height=64, width=64,
                  num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def load_script():
    import importlib.util

    path = ROOT / "tools" / "train_shapes.py"
    spec = importlib.util.spec_from_file_location("train_shapes", path)
    train_shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_shapes)
    return train_shapes


def test_learning_rate_warms_up_holds_then_falls_to_zero_at_the_last_step():
    import argparse

    factor = load_script().lr_factor

    decayed = argparse.Namespace(unet_steps=1000, decay_from=600)
    assert factor(decayed, 0) == pytest.approx(0.01)  # warm-up over the first 100 steps
    assert factor(decayed, 99) == factor(decayed, 599) == 1.0
    assert factor(decayed, 800) == pytest.approx(0.5)
    assert factor(decayed, 999) == pytest.approx(1 / 400)  # the last step's update is tiny
    constant = argparse.Namespace(unet_steps=1000, decay_from=None)
    assert factor(constant, 999) == 1.0


def test_vae_learning_rate_falls_to_zero_on_whole_pictures_unless_constant():
    import argparse

    vae_lr = load_script().vae_lr
    cosine = argparse.Namespace(vae_steps=1200, vae_refine_steps=600, vae_schedule="cosine")
    assert vae_lr(cosine, 0) == pytest.approx(1e-3 / 50)  # warm-up on crops
    assert vae_lr(cosine, 1199) == pytest.approx(1e-4, rel=1e-3)  # crops end at a tenth
    assert vae_lr(cosine, 1200) == pytest.approx(2e-4)  # whole pictures start at 2e-4
    assert vae_lr(cosine, 1500) == pytest.approx(1e-4)
    assert vae_lr(cosine, 1799) < 1e-8  # and end at (almost) nothing: no last-step spike
    constant = argparse.Namespace(vae_steps=1200, vae_refine_steps=600, vae_schedule="constant")
    assert vae_lr(constant, 1799) == 2e-4  # the shipped recipe: held to the end


@pytest.mark.parametrize(("option", "says"), [
    (["--caption-tokens", "13"], "--caption-tokens 13: the world's longest caption has 14 tokens"),
    (["--caption-tokens", "78"], "the text encoder 77 positions; it must be between them"),
    (["--low-t-range", "400", "100"], "--low-t-range 400 100: must be two timesteps"),
    (["--low-t-range", "0", "1001"], "--low-t-range 0 1001: must be two timesteps"),
])
def test_options_out_of_range_are_refused_before_training(tmp_path, option, says):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "train_shapes.py"),
                           "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out"), *TOY,
                           *option],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]  # argparse's usage error
    assert says in done.stderr
    assert not (tmp_path / "w" / "vae.pt").exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "w" / "args.json").exists()  # nothing recorded for a refused run


def test_timesteps_come_from_the_low_range_from_the_step_it_starts_at():
    import argparse

    import torch

    timesteps = load_script().timesteps
    args = argparse.Namespace(low_t=0.8, low_t_range=[50, 450], low_t_from=100)
    torch.manual_seed(0)
    before = timesteps(args, 99, 4000)
    assert before.min() < 50 and before.max() >= 450  # uniform over 0..999
    assert 0.35 < ((before >= 50) & (before < 450)).float().mean() < 0.45
    after = timesteps(args, 100, 4000)
    inside = ((after >= 50) & (after < 450)).float().mean()
    assert 0.85 < inside < 0.91  # 80 % from the range, and 40 % of the uniform 20 %
    assert after.max() >= 450  # the rest still uniform
