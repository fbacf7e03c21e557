"""Stable Diffusion 1.x (1.1 to 1.5 and their fine-tunes): 512x512, a CLIP ViT-L text encoder,
every scheduler of :data:`renderfarm.schema.SCHEDULERS` but the flow-matching one."""

from __future__ import annotations

import re

from renderfarm.schema import SCHEDULERS
from worker.families import Family, Shapes, lora_cross_attention_width

#: LoRA tensor names of SD's UNet and (one) CLIP text encoder: diffusers / peft (``unet.``,
#: ``text_encoder.``) and kohya / A1111 / civitai (``lora_unet_``, ``lora_te_``).
_SD_LORA = re.compile(r"^(unet\.|text_encoder\.|lora_unet_|lora_te_)")
#: The text-encoder width of a LoRA's CLIP self-attention (``q_proj``'s input).
_TEXT_DOWN = re.compile(r"(text_encoder\.|lora_te_).*q_proj.*(lora_down|lora_A|lora\.down)")
#: Widths of released models' text embeddings (SD 1.x 768, SD 2.x 1024, SDXL 2048). A smaller
#: one is a toy model's (the tiny test models: 32), which has no other family to belong to.
_SMALLEST_RELEASED_WIDTH = 768


class SD15(Family):
    def owns_checkpoint(self, shapes: Shapes) -> bool:
        # Told by names and shapes, with a reason for each near miss (worker.singlefile).
        from worker.singlefile import detect_architecture

        return detect_architecture(shapes)[0] == "sd1"

    def owns_lora(self, shapes: Shapes) -> bool:
        """A 768-wide cross-attention (CLIP ViT-L), or SD's UNet / text-encoder LoRA names
        with no width that says another model (asked after SDXL's and Flux's markers: a
        second text encoder, SDXL's block names, a transformer)."""
        if super().owns_lora(shapes):
            return True
        if not any(_SD_LORA.match(key) for key in shapes):
            return False
        text = next((shape[1] for key, shape in shapes.items()
                     if len(shape) == 2 and _TEXT_DOWN.search(key)), None)
        return all(width is None or width < _SMALLEST_RELEASED_WIDTH
                   for width in (lora_cross_attention_width(shapes), text))

    def load_options(self) -> dict:
        return {"safety_checker": None, "requires_safety_checker": False}


FAMILY = SD15(
    name="sd15",
    label="Stable Diffusion 1.x",
    txt2img="StableDiffusionPipeline",
    img2img="StableDiffusionImg2ImgPipeline",
    folder_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    checkpoint_keys=("model.diffusion_model.output_blocks.11.0.skip_connection.weight",),
    bundled_config="sd15",
    tokenizers=(("tokenizer", "clip-l"),),
    default_size=(512, 512),
    schedulers=tuple(s for s in SCHEDULERS if s != "flow_match_euler"),
    default_scheduler="euler_a",
    bytes_per_pixel=4096,
    cross_attention_widths=(768,),
    taesd="taesd",
    latent_rgb_factors=(
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
)
