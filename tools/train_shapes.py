"""Train the ``shapes`` model: a small Stable Diffusion pipeline that draws renderfarm.shapes.

Reproducible from ``--seed`` (same seed, same steps, same thread count: same weights;
tests/test_train_shapes.py checks it at a toy length). Three phases, each checkpointed in
``--work`` so an interrupted run resumes where it stopped:

1. ``vae``: a small AutoencoderKL (64x64x3 <-> 4x16x16), trained on 32x32 crops of drawn
   scenes (it is fully convolutional; crops cost a quarter), then refined on whole pictures.
   The shipped VAE (400 + 300 steps, a constant rate on whole pictures) draws 9 % of the shapes
   it round-trips wrong (small squares and triangles round); ``--vae-steps 1200
   --vae-refine-steps 600 --vae-schedule cosine`` draws none, but a UNet trained on its latents
   learnt shapes no faster (docs/BENCHMARKS.md, session 9), so the shipped recipe stays.
2. ``encode``: a fixed set of scenes is drawn and encoded once (the posterior's mean).
3. ``unet``: the UNet (three levels, 16x16/8x8/4x4, cross-attention below the top one, the
   pooled caption added to the time embedding) and a small CLIP text encoder (own word-level
   vocabulary) learn v (``prediction_type`` v_prediction; loss weight 1 where noise dominates,
   capped where it is fine detail) from the cached latents; captions leave parts out at random
   and are dropped entirely 10% of the time (classifier-free guidance). EMA weights. From step
   ``--low-t-from`` on, half of each batch's timesteps come from the low-noise end, where
   outlines are decided (colours and layout are learnt first, from the noisy end).
   (``--prediction epsilon`` is the first recipe, noise with min-SNR-5 weights: its weight on
   the picture's error is the SNR, ~0 at the noisy end where the colours are decided, and at
   900 steps its UNet drew the same from any caption.)
   The learning rate is constant after a warm-up, so ``--unet-steps N`` on a work folder whose
   checkpoint is at step N just exports it: the same weights as a run asked for N steps.
   ``--caption-tokens 16 --fused-adam`` make a step ~28 % cheaper (0.27 against 0.38 s, two
   threads; the exported tokenizer pads to 16), but such runs drew the shape worse at the same
   step (docs/BENCHMARKS.md, session 10), so the defaults stay CLIP's 77 and plain AdamW.

The result is a diffusers folder (``--out``), fp16 safetensors. The shipped weights
(renderfarm/data/shapes) are this script's defaults, run on the 2-core CPU VM as written in
docs/BENCHMARKS.md ("The shapes model against the pixel judge"): one thread to UNet step 6500,
then two (resumed from the checkpoint) to 20,500, the default of ``--unet-steps``:

    python tools/train_shapes.py --threads 1 --work W --unet-steps 6500 --out /tmp/unused
    python tools/train_shapes.py --threads 2 --work W --out renderfarm/data/shapes
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from renderfarm import shapes  # noqa: E402
from worker.modelgen import make_tokenizer  # noqa: E402

LATENT = 16
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 48, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": shapes.SIZE,
}
UNET_CONFIG = {
    "sample_size": LATENT,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}
TEXT_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# DDPM's linear betas: the last step is (almost) pure noise, so flat black or white
# backgrounds are reachable (SD's scaled_linear leaves the mean of the noise in the picture).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
    # As SD's own scheduler config: a DDIM (or another scheduler that reads these) made from
    # this config must not clip its x0 to [-1, 1], which is a pixel range, not a latent one
    # (this model's latents have deviation 1: clipped, DDIM drew 20 % of the colours right).
    "clip_sample": False,
    "set_alpha_to_one": False,
}


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def to_tensor(images: list) -> torch.Tensor:
    array = np.stack([shapes.to_array(im) for im in images]).astype(np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def save_ckpt(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def vae_lr(args, step: int) -> float:
    """The VAE's learning rate: on crops, a warm-up and a cosine from 1e-3 down to 1e-4; on whole
    pictures, held at 2e-4 (``--vae-schedule constant``, the shipped recipe; run longer, its loss
    spikes) or falling on a cosine to 0 (``cosine``, with the gradient's norm clipped to 1).
    """
    if step < args.vae_steps:
        return 1e-3 * min(1.0, (step + 1) / 50) * (
            0.1 + 0.9 * (1 + math.cos(math.pi * step / args.vae_steps)) / 2)
    if args.vae_schedule == "constant":
        return 2e-4
    done = (step - args.vae_steps) / max(1, args.vae_refine_steps)
    return 2e-4 * (1 + math.cos(math.pi * done)) / 2


def train_vae(args, work: Path) -> AutoencoderKL:
    path = work / "vae.pt"
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config(args))
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    rng = random.Random(args.seed)
    step = 0
    if path.exists():
        state = torch.load(path, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, rng = state["step"], state["rng"]
        torch.set_rng_state(state["torch"])
        log(f"vae: resumed at step {step}")
    started = time.monotonic()
    total = args.vae_steps + args.vae_refine_steps
    while step < total:
        refine = step >= args.vae_steps  # whole pictures: the mid-block attention
        batch = args.vae_batch // 2 if refine else args.vae_batch  # sees the real 16x16 grid
        images = [shapes.draw(scene, rng) for scene in
                  (shapes.random_scene(rng) for _ in range(batch))]
        x = to_tensor(images)
        crop = shapes.SIZE if refine else args.vae_crop
        if crop < shapes.SIZE:
            ox, oy = rng.randrange(0, shapes.SIZE - crop + 1, 4), rng.randrange(
                0, shapes.SIZE - crop + 1, 4)
            x = x[:, :, oy:oy + crop, ox:ox + crop]
        for group in opt.param_groups:
            group["lr"] = vae_lr(args, step)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        kl = posterior.kl().mean() / (4 * x.shape[2] * x.shape[3] / 16)
        loss = rec + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.vae_schedule == "cosine":
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0 or step == total:
            rate = (time.monotonic() - started) / max(1, step)
            log(f"vae step {step}/{total} rec {rec.item():.4f} kl {kl.item():.2f} "
                f"({rate:.2f}s/step)")
        if step % 100 == 0 or step == total:
            save_ckpt(path, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                             "rng": rng, **rng_state()})
    return vae


@torch.no_grad()
def encode_dataset(args, work: Path, vae: AutoencoderKL) -> tuple[list, torch.Tensor, float]:
    path = work / "latents.pt"
    if path.exists():
        state = torch.load(path, weights_only=False)
        return state["scenes"], state["latents"], state["scale"]
    rng = random.Random(args.seed + 1)
    scenes = [shapes.random_scene(rng) for _ in range(args.dataset)]
    chunks = []
    vae.eval()
    for i in range(0, len(scenes), 64):
        images = [shapes.draw(s, rng) for s in scenes[i:i + 64]]
        chunks.append(vae.encode(to_tensor(images)).latent_dist.mean)
        if i % 1024 == 0:
            log(f"encode {i}/{len(scenes)}")
    latents = torch.cat(chunks)
    scale = float(1.0 / latents.std())
    # Check the decoder on a few of them.
    images = [shapes.draw(s, random.Random(7)) for s in scenes[:16]]
    recon = vae.decode(vae.encode(to_tensor(images)).latent_dist.mean).sample
    log(f"encode: {len(scenes)} latents, std {latents.std():.3f} -> scaling_factor {scale:.4f}, "
        f"reconstruction mse {F.mse_loss(recon, to_tensor(images)).item():.4f}")
    save_ckpt(path, {"scenes": scenes, "latents": latents, "scale": scale})
    return scenes, latents, scale


@torch.no_grad()
def normalize_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Give every latent channel mean 0 and deviation 1, inside the VAE (scaling_factor 1).

    The encoder's last 1x1 conv (quant_conv) now outputs (z - mean) / std per channel and the
    decoder's first (post_quant_conv) undoes it: the same autoencoder, reparametrised. Left as
    they came, this VAE's channels differ 5x in spread, and the faint ones (which carry the
    colours) drown in the noise early in the diffusion, where the UNet learns least.
    """
    mean = latents.mean(dim=(0, 2, 3))
    std = latents.std(dim=(0, 2, 3))
    channels = mean.numel()
    q, pq = vae.quant_conv, vae.post_quant_conv
    q.weight[:channels] /= std.view(-1, 1, 1, 1)
    q.bias[:channels] = (q.bias[:channels] - mean) / std
    q.bias[channels:] -= 2 * torch.log(std)
    pq.bias += (pq.weight[:, :, 0, 0] * mean.view(1, -1)).sum(dim=1)
    pq.weight *= std.view(1, -1, 1, 1)
    vae.register_to_config(scaling_factor=1.0)
    log(f"latent channels: mean {[round(v, 3) for v in mean.tolist()]}, "
        f"std {[round(v, 3) for v in std.tolist()]} -> 0 and 1 inside the VAE")
    return (latents - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def vae_config(args) -> dict:
    """VAE_CONFIG, with ``--vae-width`` levels: 3 give a 16x16 latent, 4 an 8x8 (SD's 8x)."""
    config = dict(VAE_CONFIG)
    levels = len(args.vae_width)
    config["block_out_channels"] = tuple(args.vae_width)
    config["down_block_types"] = ("DownEncoderBlock2D",) * levels
    config["up_block_types"] = ("UpDecoderBlock2D",) * levels
    return config


def unet_config(args) -> dict:
    config = dict(UNET_CONFIG)
    config["sample_size"] = shapes.SIZE // 2 ** (len(args.vae_width) - 1)
    config["attention_head_dim"] = args.heads
    config["block_out_channels"] = tuple(args.width)
    # Cross-attention at every level but the top one with --plain-top (at 16x16: 256 tokens,
    # ~40% of a step's time); the mid block always has it.
    attn = [not (args.plain_top and level == 0) for level in range(len(args.width))]
    config["down_block_types"] = tuple(
        "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    config["up_block_types"] = tuple(
        "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    config["layers_per_block"] = args.layers
    if args.text_time:
        # The caption, pooled by attention, is added to the time embedding: every ResNet block
        # gets it as a bias (a colour is a global property; cross-attention alone learns it
        # slowly). StableDiffusionPipeline passes encoder_hidden_states: nothing else needed.
        config["addition_embed_type"] = "text"
        config["addition_embed_type_num_heads"] = args.text_time_heads
    return config


def lr_factor(args, step: int) -> float:
    """Warm-up, then constant (EMA does the averaging); with ``--decay-from``, from that step a
    straight line to 0 at the last step.

    Constant (the default), a run stopped at step N has the weights of a run asked for N steps,
    so a checkpoint can be exported as it is; the decay ties the weights to ``--unet-steps``.
    It did not help (docs/BENCHMARKS.md: at 9500 steps, shape 54 % with a decay from step 5500).
    """
    factor = min(1.0, (step + 1) / 100)
    if args.decay_from is not None and step >= args.decay_from:
        factor *= (args.unet_steps - step) / max(1, args.unet_steps - args.decay_from)
    return factor


def timesteps(args, step: int, count: int) -> torch.Tensor:
    """The batch's timesteps: uniform over 0..999; from step ``--low-t-from`` on, a share
    ``--low-t`` of them drawn from ``--low-t-range`` (t < 400 by default) instead.

    Once colours and layout are learnt, that is where outlines are decided: from t ~ 500 up the
    picture is noise (uniform t spends 60 % of the steps there). At 6000 steps: shape 57 % with
    it from step 4500, 43 % without (docs/BENCHMARKS.md).
    """
    t = torch.randint(0, 1000, (count,))
    if args.low_t and step >= args.low_t_from:
        low = torch.rand(count) < args.low_t
        t = torch.where(low, torch.randint(*args.low_t_range, (count,)), t)
    return t


def train_unet(args, work: Path, scenes, latents, tokenizer):
    path = work / "unet.pt"
    torch.manual_seed(args.seed + 2)
    unet = UNet2DConditionModel(**unet_config(args))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT_CONFIG))
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, fused=args.fused_adam or None)
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text)
    rng = random.Random(args.seed + 3)
    step = 0
    if path.exists():
        state = torch.load(path, weights_only=False)
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        step, rng = state["step"], state["rng"]
        torch.set_rng_state(state["torch"])
        trained = state.get("prediction", "epsilon")
        if trained != args.prediction:
            raise SystemExit(f"--prediction {args.prediction}: the checkpoint in {path} was "
                             f"trained for {trained}")
        log(f"unet: resumed at step {step}")
    betas = torch.linspace(SCHEDULER_CONFIG["beta_start"], SCHEDULER_CONFIG["beta_end"], 1000)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    started, first = time.monotonic(), step
    # --focus: the shapes the model draws round longest (small squares and triangles) drawn
    # that many times as often; 1 (the default) draws every cached scene alike.
    focus = [args.focus if sc.size == "small" and sc.shape != "circle" else 1.0 for sc in scenes]
    while step < args.unet_steps:
        if args.focus == 1:
            idx = [rng.randrange(len(scenes)) for _ in range(args.batch)]
        else:
            idx = rng.choices(range(len(scenes)), weights=focus, k=args.batch)
        prompts = ["" if rng.random() < args.uncond else
                   shapes.caption(scenes[i], rng, drop=args.drop) for i in idx]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        x0 = latents[idx]
        noise = torch.randn_like(x0)
        t = timesteps(args, step, len(idx))
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        lr = args.lr * lr_factor(args, step)
        for group in opt.param_groups:
            group["lr"] = lr
        hidden = text(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=hidden).sample
        snr = a.view(-1) / (1 - a.view(-1))
        if args.prediction == "v_prediction":
            # The v loss is (snr + 1) times the error on the picture (x0): weight 1 where the
            # noise dominates (snr <= 5), where the colours and the layout are decided and the
            # caption is all the UNet has to go on; capped at 6x the x0 error where it is fine
            # detail (a truncated min-SNR: min-SNR-5's weight on x0 is snr there, ~0).
            target = a.sqrt() * noise - (1 - a).sqrt() * x0
            weight = torch.clamp(6.0 / (snr + 1), max=1.0)
        else:
            target = noise
            weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 (Hang et al. 2023)
        loss = (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, model in ((ema_unet, unet), (ema_text, text)):
                averaged = list(ema.parameters())
                torch._foreach_mul_(averaged, decay)
                torch._foreach_add_(averaged, list(model.parameters()), alpha=1 - decay)
        if step % 20 == 0:
            rate = (time.monotonic() - started) / max(1, step - first)
            log(f"unet step {step}/{args.unet_steps} loss {loss.item():.4f} lr {lr:.2e} "
                f"({rate:.2f}s/step, {rate * (args.unet_steps - step) / 60:.0f} min left)")
        if step % args.ckpt_every == 0 or step == args.unet_steps:
            save_ckpt(path, {"unet": unet.state_dict(), "text": text.state_dict(),
                             "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(),
                             "opt": opt.state_dict(), "step": step, "rng": rng,
                             "prediction": args.prediction, **rng_state()})
    return ema_unet, ema_text


def longest_caption(tokenizer) -> int:
    """Tokens (the start and end ones included) of the longest full caption of the world."""
    scenes = (shapes.Scene(shape, color, background, size, position, count)
              for shape in shapes.SHAPES for color in shapes.COLORS for background in shapes.COLORS
              for size in shapes.SIZES for position in (*shapes.POSITIONS, None)
              for count in shapes.COUNTS)
    captions = sorted({shapes.caption(scene) for scene in scenes})
    return max(len(ids) for ids in tokenizer(captions).input_ids)


def export(out: Path, vae, unet, text, tokenizer, prediction: str) -> None:
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(
            {**SCHEDULER_CONFIG, "prediction_type": prediction}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    for model in (vae, unet, text):
        model.half()
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {out} ({size / 1e6:.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("renderfarm/data/shapes"))
    parser.add_argument("--work", type=Path, default=Path("shapes-train"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--vae-width", type=int, nargs="+", default=[32, 48, 64],
                        help="channels of each VAE level: 3 levels, a 16x16 latent; 4, 8x8")
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-crop", type=int, default=32)
    parser.add_argument("--vae-refine-steps", type=int, default=300,
                        help="then this many on whole 64x64 pictures, half the batch")
    parser.add_argument("--vae-schedule", choices=["constant", "cosine"], default="constant",
                        help="the learning rate on whole pictures (cosine: falls to 0, clipped)")
    parser.add_argument("--dataset", type=int, default=8192)
    parser.add_argument("--unet-steps", type=int, default=20500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--drop", type=float, default=0.15, help="chance to leave a part out")
    parser.add_argument("--uncond", type=float, default=0.1, help="chance of an empty caption")
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--low-t", type=float, default=0.5,
                        help="share of the batch whose timestep is drawn from --low-t-range")
    parser.add_argument("--low-t-range", type=int, nargs=2, default=[0, 400],
                        metavar=("FROM", "TO"), help="the timesteps --low-t draws from")
    parser.add_argument("--low-t-from", type=int, default=4500,
                        help="the UNet step --low-t starts at")
    parser.add_argument("--prediction", choices=["v_prediction", "epsilon"],
                        default="v_prediction", help="what the UNet predicts (the scheduler's "
                        "prediction_type)")
    parser.add_argument("--heads", type=int, default=4,
                        help="attention heads per transformer block (attention_head_dim)")
    parser.add_argument("--width", type=int, nargs="+", default=[32, 64, 128],
                        help="channels of each UNet level (one level per number)")
    parser.add_argument("--layers", type=int, default=1, help="ResNet blocks per UNet level")
    parser.add_argument("--text-time", action=argparse.BooleanOptionalAction, default=True,
                        help="add the pooled caption to the time embedding")
    parser.add_argument("--text-time-heads", type=int, default=4)
    parser.add_argument("--plain-top", action=argparse.BooleanOptionalAction, default=True,
                        help="no attention blocks at the UNet's top (16x16) level")
    parser.add_argument("--decay-from", type=int, default=None,
                        help="the UNet step the learning rate starts a linear decay to 0 at "
                        "(default: constant to the end)")
    parser.add_argument("--focus", type=float, default=1.0,
                        help="draw scenes of small squares and triangles this many times as "
                        "often in the UNet's batches")
    parser.add_argument("--caption-tokens", type=int, default=77,
                        help="the tokenizer's model_max_length: captions are padded to it in "
                        "training and by the pipeline (the longest caption of the world is 14)")
    parser.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=False,
                        help="PyTorch's fused AdamW (the same update, ~5 %% faster a step)")
    parser.add_argument("--ckpt-every", type=int, default=100)
    args = parser.parse_args()
    if args.decay_from is not None and not 0 <= args.decay_from < args.unet_steps:
        parser.error(f"--decay-from {args.decay_from}: must be a step in 0..{args.unet_steps - 1} "
                     "(below --unet-steps)")
    low, high = args.low_t_range
    if not 0 <= low < high <= 1000:
        parser.error(f"--low-t-range {low} {high}: must be two timesteps 0 <= FROM < TO <= 1000")
    if args.focus <= 0:
        parser.error(f"--focus {args.focus}: must be above 0")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = args.work / "tokenizer"
    tokenizer = make_tokenizer(tokenizer_dir, vocab_size=100_000, words=shapes.WORDS)
    longest, positions = longest_caption(tokenizer), TEXT_CONFIG["max_position_embeddings"]
    if not longest <= args.caption_tokens <= positions:
        parser.error(f"--caption-tokens {args.caption_tokens}: the world's longest caption has "
                     f"{longest} tokens and the text encoder {positions} positions; it must "
                     "be between them")
    tokenizer.model_max_length = args.caption_tokens
    # Written once the options are checked: a refused command leaves a resumed folder's record.
    (args.work / "args.json").write_text(json.dumps(vars(args), default=str, indent=1))
    vae = train_vae(args, args.work)
    scenes, latents, _ = encode_dataset(args, args.work, vae)
    latents = normalize_latents(vae, latents)
    unet, text = train_unet(args, args.work, scenes, latents, tokenizer)
    export(args.out, vae, unet, text, tokenizer, args.prediction)


if __name__ == "__main__":
    main()
