"""Flux.1 (dev, schnell and fine-tunes): a rectified-flow transformer with CLIP and T5 text
encoders. The flow-matching Euler scheduler only; ``guidance_scale`` is Flux's distilled
guidance (an input of the transformer, not classifier-free guidance), so there is no negative
prompt; sizes are multiples of 16 (8x VAE, 2x2 patches).

A Flux diffusers folder loads as it is. diffusers' ``from_single_file`` does not build a Flux
pipeline: a single file holds only the transformer (civitai's Flux checkpoints, in the original
or the diffusers layout), so, as diffusers documents, the transformer is loaded with
``FluxTransformer2DModel.from_single_file`` and given to ``FluxPipeline.from_pretrained`` of a
Flux diffusers folder: ``<stem>.config/`` next to the file, holding that folder's text
encoders, VAE, tokenizers and scheduler (a symlink to a Flux model folder will do; its own
transformer weights are not read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.families import Family


class Flux(Family):
    def single_file_note(self) -> str:
        return ("a Flux single file holds only the transformer: put a Flux diffusers folder "
                "with its text encoders, VAE, tokenizers and scheduler next to it, as "
                "<stem>.config/ (a symlink to a Flux model folder will do)")

    def load(self, path: Path, options: dict[str, Any]) -> Any:
        from diffusers import FluxPipeline, FluxTransformer2DModel

        path = Path(path)
        if path.is_dir():
            return FluxPipeline.from_pretrained(path, **options)
        options = dict(options)
        folder = options.pop("config")
        options.pop("original_config", None)
        transformer = FluxTransformer2DModel.from_single_file(
            str(path), config=folder, subfolder="transformer",
            torch_dtype=options["dtype"], local_files_only=True)
        return FluxPipeline.from_pretrained(folder, transformer=transformer, **options)


FAMILY = Flux(
    name="flux",
    label="Flux.1",
    txt2img="FluxPipeline",
    img2img="FluxImg2ImgPipeline",
    folder_classes=("FluxPipeline", "FluxImg2ImgPipeline"),
    # diffusers' CHECKPOINT_KEY_NAMES "flux" (the original layout, bare or under
    # model.diffusion_model.), and a transformer saved in diffusers' layout.
    checkpoint_keys=(
        "double_blocks.0.img_attn.norm.key_norm.scale",
        "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
        "single_transformer_blocks.0.proj_mlp.weight",
    ),
    denoiser="transformer",
    default_size=(1024, 1024),
    size_multiple=16,
    schedulers=("flow_match_euler",),
    default_scheduler="flow_match_euler",
    default_guidance=3.5,
    negative_prompt=False,
    # A 4096-token sequence per megapixel through 57 transformer blocks plus a 16-channel VAE
    # decode: an estimate that errs large.
    bytes_per_pixel=6144,
    # LoRAs adapt the transformer: diffusers / peft ``transformer.``, kohya-style
    # ``lora_transformer_``, and the original (BFL / kohya / civitai) ``double_blocks`` /
    # ``single_blocks`` names, bare or as ``lora_unet_double_blocks_...``.
    lora_keys=(
        r"^transformer\.",
        r"^lora_transformer_",
        r"^(lora_unet_|diffusion_model\.)?(double_blocks|single_blocks)[._]",
    ),
    # ComfyUI latent_formats.Flux (16 latent channels).
    taesd="taef1",
    latent_rgb_factors=(
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    ),
    latent_rgb_bias=(-0.0329, -0.0718, -0.0851),
)
