"""Stable Diffusion 1.x (1.1 to 1.5 and their fine-tunes): 512x512, a CLIP ViT-L text encoder,
every scheduler of :data:`renderfarm.schema.SCHEDULERS` but the flow-matching one."""

from __future__ import annotations

from renderfarm.schema import SCHEDULERS
from worker.families import Family, Shapes


class SD15(Family):
    def owns_checkpoint(self, shapes: Shapes) -> bool:
        # Told by names and shapes, with a reason for each near miss (worker.singlefile).
        from worker.singlefile import detect_architecture

        return detect_architecture(shapes)[0] == "sd1"

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
    latent_rgb_factors=(
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
)
