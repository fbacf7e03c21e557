"""Stable Diffusion XL (base 1.0 and its fine-tunes: Pony, Illustrious, Noob...): 1024x1024,
two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG), size micro-conditioning as diffusers
does it for the requested size, every scheduler SD 1.5 has."""

from __future__ import annotations

from worker.families import Family
from worker.families.sd15 import FAMILY as SD15

FAMILY = Family(
    name="sdxl",
    label="Stable Diffusion XL",
    txt2img="StableDiffusionXLPipeline",
    img2img="StableDiffusionXLImg2ImgPipeline",
    folder_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    # diffusers' CHECKPOINT_KEY_NAMES "xl_base" and "open_clip_sdxl": the second text encoder
    # (OpenCLIP bigG) of an SDXL base checkpoint.
    checkpoint_keys=(
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
        "conditioner.embedders.1.model.positional_embedding",
    ),
    bundled_config="sdxl",
    tokenizers=(("tokenizer", "clip-l"), ("tokenizer_2", "clip-g")),
    default_size=(1024, 1024),
    schedulers=SD15.schedulers,
    default_scheduler="euler_a",
    # Fewer attention layers at full latent resolution than SD 1.5, but a 4x larger image at
    # its default size and a VAE that upcasts to float32 in fp16: an estimate that errs large.
    bytes_per_pixel=5120,
    # LoRAs: the second text encoder (kohya ``lora_te2_`` with ``lora_te1_`` for the first,
    # diffusers ``text_encoder_2.``); kohya names SDXL's UNet blocks the original (SGM) way
    # (``input_blocks``); several transformer layers per attention block (SDXL has 2 and 10,
    # SD 1.x and 2.x one), which marks a diffusers-named UNet-only LoRA whatever its widths;
    # the size micro-conditioning's embedding; and a 2048-wide cross-attention (both encoders'
    # 768 + 1280).
    lora_keys=(
        r"^lora_te[12]_",
        r"^text_encoder_2\.",
        r"^lora_unet_(input_blocks|output_blocks|middle_block)_",
        r"^(unet\.|lora_unet_).*transformer_blocks[._][1-9]",
        r"^(unet\.|lora_unet_)add_embedding",
    ),
    cross_attention_widths=(2048,),
    taesd="taesdxl",
    latent_rgb_factors=(
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    latent_rgb_bias=(0.1084, -0.0175, -0.0011),
)
