"""Build SDXL and Flux models locally with seeded random weights (``renderfarm make-model``):
nothing is downloaded.

- ``tiny-sdxl``: the shapes of diffusers' own SDXL tests (``get_dummy_components``: a 2-level
  UNet with ``text_time`` micro-conditioning, two tiny CLIP text encoders, the second one
  wider as in SDXL), with SD's 4-level VAE so latents are 1/8 of the image as in the real
  model. Seconds to build.
- ``tiny-flux``: the shapes of diffusers' Flux tests (one double and one single transformer
  block, a tiny CLIP and a tiny T5 encoder), a 4-level VAE (8x smaller latents, so sizes are
  multiples of 16 as for real Flux) and guidance embedding (Flux-dev's distilled guidance).
  The T5 tokenizer is a small unigram vocabulary built here from a word list.
- ``sdxl-random``: the full SDXL base architecture (the bundled config of
  ``worker/families/configs/sdxl``: ~2.6 billion parameters, ~5 GB in fp16) with CLIP's real
  tokenizers, for GPU benchmarks: load time and speed per step, not pictures.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from worker import clip_tokenizer
from worker.families import CONFIGS_DIR

KINDS = ("tiny-sdxl", "tiny-flux", "sdxl-random")

# diffusers' tests/pipelines/stable_diffusion_xl get_dummy_components().
TINY_SDXL_UNET_CONFIG = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 2),
    "projection_class_embeddings_input_dim": 80,  # 6 size numbers x 8 + the pooled text (32)
    "cross_attention_dim": 80,  # the two encoders' hidden states side by side (32 + 48)
    "norm_num_groups": 1,
}
TINY_TEXT_CONFIG = {
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_size": 32,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "pad_token_id": 1,
    "vocab_size": 1000,
    "hidden_act": "gelu",
    "projection_dim": 32,
}
# The second encoder is wider than the first, as in SDXL (768 and 1280): diffusers' single-file
# loader tells SDXL's two encoders apart by their width.
TINY_TEXT_2_CONFIG = {**TINY_TEXT_CONFIG, "hidden_size": 48}
SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
# diffusers' tests/pipelines/flux get_dummy_components(), but for the VAE and guidance.
TINY_FLUX_TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 16,  # 4 latent channels, packed 2x2
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,  # the T5 encoder's width
    "pooled_projection_dim": 32,  # the CLIP encoder's width
    "axes_dims_rope": (4, 4, 8),
    "guidance_embeds": True,
}
TINY_T5_CONFIG = {"d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4,
                  "relative_attention_num_buckets": 8, "is_encoder_decoder": False}
# FLUX.1-dev's scheduler/scheduler_config.json.
FLUX_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def make(kind: str, directory: Path) -> Path:
    """Build model ``kind`` (:data:`KINDS`) as a diffusers folder in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "tiny-sdxl":
        return _tiny_sdxl(directory)
    if kind == "tiny-flux":
        return _tiny_flux(directory)
    if kind == "sdxl-random":
        return _sdxl_random(directory)
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def _tiny_vae(latent_channels: int = 4, **extra) -> AutoencoderKL:
    from worker.modelgen import TINY_VAE_CONFIG

    torch.manual_seed(0)
    return AutoencoderKL(**{**TINY_VAE_CONFIG, "latent_channels": latent_channels, **extra})


def _tiny_clip_tokenizer(directory: Path, pad_token: str | None = None) -> CLIPTokenizer:
    from worker.modelgen import make_tokenizer

    tokenizer = make_tokenizer(directory)
    if pad_token is not None:  # SDXL's second tokenizer pads with "!"
        tokenizer.pad_token = pad_token
        tokenizer.save_pretrained(directory)
    return tokenizer


def _tiny_sdxl(directory: Path) -> Path:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG)
    vae = _tiny_vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT_2_CONFIG))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_tiny_clip_tokenizer(directory / "tokenizer"),
        tokenizer_2=_tiny_clip_tokenizer(directory / "tokenizer_2", pad_token="!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def make_t5_tokenizer(directory: Path, words: list[str] | None = None) -> T5Tokenizer:
    """A small T5 tokenizer (unigram, as T5's sentencepiece one) written to ``directory``:
    ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, every printable ASCII character, and ``▁word`` for
    each of ``words`` (default: :data:`worker.modelgen.WORDS`). Built here, never fetched."""
    from worker.modelgen import WORDS

    words = list(dict.fromkeys(words or WORDS))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(c), -5.0) for c in range(33, 127)]
    pieces += [("▁" + chr(c), -4.0) for c in range(33, 127)]
    pieces += [("▁" + word, -1.0 - i / len(words)) for i, word in enumerate(words)]
    seen: set[str] = set()
    vocab = [(p, s) for p, s in pieces if not (p in seen or seen.add(p))]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(directory)
    return T5Tokenizer.from_pretrained(directory)


def _tiny_flux(directory: Path) -> Path:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER_CONFIG)
    vae = _tiny_vae(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                    use_post_quant_conv=False)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
    tokenizer_2 = make_t5_tokenizer(directory / "tokenizer_2")
    torch.manual_seed(0)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **TINY_T5_CONFIG))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tiny_clip_tokenizer(directory / "tokenizer"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def sdxl_config(part: str) -> dict:
    """``part``'s config.json of the bundled SDXL config."""
    return json.loads((CONFIGS_DIR / "sdxl" / part / "config.json").read_text())


def _sdxl_random(directory: Path) -> Path:
    def text(part: str, cls: type) -> torch.nn.Module:
        config = {k: v for k, v in sdxl_config(part).items()
                  if k not in ("architectures", "transformers_version", "model_type")}
        torch.manual_seed(0)
        return cls(CLIPTextConfig(**config)).half()

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(sdxl_config("unet")).half()
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(sdxl_config("vae")).half()
    tokenizers = {
        name: CLIPTokenizer.from_pretrained(
            clip_tokenizer.install_clip_tokenizer(directory / name, variant))
        for name, variant in (("tokenizer", "clip-l"), ("tokenizer_2", "clip-g"))
    }
    scheduler = EulerDiscreteScheduler.from_pretrained(CONFIGS_DIR / "sdxl" / "scheduler")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text("text_encoder", CLIPTextModel),
        text_encoder_2=text("text_encoder_2", CLIPTextModelWithProjection),
        unet=unet,
        scheduler=scheduler,
        **tokenizers,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
