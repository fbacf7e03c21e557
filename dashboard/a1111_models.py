"""A1111's request bodies (its ``modules/api/models.py``), and how one becomes farm jobs.

``Txt2ImgRequest`` / ``Img2ImgRequest`` take every field A1111's API takes, with A1111's
defaults, and ignore fields A1111 does not know (as A1111 does: SillyTavern sends its own
``url`` and ``auth`` in the body). :func:`unsupported` lists the fields set to a value that asks
for a feature the farm does not have (``enable_hr: true``, a mask, a script, a style, clip skip):
those are refused with 422 naming the field, never dropped. :func:`to_jobs` turns a request into
``batch_size x n_iter`` single-image farm jobs with the seeds A1111 would use.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from renderfarm.errors import FieldError
from renderfarm.samplers import from_a1111
from renderfarm.schema import MAX_SEED

#: Images one A1111 call may ask for (batch_size x n_iter); each is one farm job.
MAX_IMAGES = 100
#: The sampler A1111's API uses when a body names none (its ``sampler_index`` default).
DEFAULT_SAMPLER = "Euler"

#: Settings the farm reports in ``GET /sdapi/v1/options`` besides the checkpoint, at the only
#: value it has. ``override_settings`` and ``POST options`` may repeat them, not change them.
FIXED_OPTIONS: dict[str, Any] = {
    "CLIP_stop_at_last_layers": 1,
    "sd_vae": "Automatic",
    "samples_format": "png",
    "eta_noise_seed_delta": 0,
    "forge_additional_modules": [],
}
#: Values of FIXED_OPTIONS keys that mean the same (A1111 treats "None"/"Automatic" VAE alike
#: when the checkpoint has its own VAE, which every farm model has).
_SAME_OPTION = {"sd_vae": {"Automatic", "None", None}, "forge_additional_modules": {None}}


class GenerationRequest(BaseModel):
    """Fields txt2img and img2img share (A1111's ``StableDiffusionProcessing`` + API fields)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = DEFAULT_SAMPLER
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None
    force_task_id: str | None = None

    @property
    def images(self) -> int:
        return self.batch_size * self.n_iter

    def sampler(self) -> str:
        return self.sampler_name or self.sampler_index or DEFAULT_SAMPLER


class Txt2ImgRequest(GenerationRequest):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_additional_modules: list[str] | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool | int = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


def _off(value: Any) -> bool:
    return value in (None, False, 0, "", "None") or value == [] or value == {}


def unsupported(req: GenerationRequest) -> list[FieldError]:
    """The fields whose value asks for something the farm cannot do (each names why)."""
    checks: list[tuple[str, bool, str]] = [
        ("styles", not req.styles, "the farm has no prompt styles"),
        ("subseed_strength", req.subseed_strength == 0, "variation seeds are not supported"),
        ("seed_resize_from_h", req.seed_resize_from_h in (-1, 0),
         "seed resizing is not supported"),
        ("seed_resize_from_w", req.seed_resize_from_w in (-1, 0),
         "seed resizing is not supported"),
        ("restore_faces", not req.restore_faces, "face restoration is not supported"),
        ("tiling", not req.tiling, "tiling is not supported"),
        ("s_min_uncond", req.s_min_uncond in (None, 0), "the farm's samplers take no s_min_uncond"),
        ("s_churn", req.s_churn in (None, 0), "the farm's samplers take no s_churn"),
        ("s_tmin", req.s_tmin in (None, 0), "the farm's samplers take no s_tmin"),
        ("s_tmax", req.s_tmax in (None, 0), "the farm's samplers take no s_tmax"),
        ("s_noise", req.s_noise in (None, 1), "the farm's samplers take no s_noise"),
        ("refiner_checkpoint", _off(req.refiner_checkpoint), "refiners are not supported"),
        ("disable_extra_networks", not req.disable_extra_networks,
         "prompt <lora:...> tags are always applied"),
        ("firstpass_image", _off(req.firstpass_image), "hires fix is not supported"),
        ("comments", _off(req.comments), "comments are not written to the farm's infotext"),
        ("script_name", _off(req.script_name), "the farm runs no scripts"),
        ("script_args", not req.script_args, "the farm runs no scripts"),
        ("alwayson_scripts", not req.alwayson_scripts,
         "the farm runs no scripts or extensions (ControlNet, ADetailer, ...)"),
        ("infotext", _off(req.infotext), "reading parameters from an infotext is not supported"),
    ]
    sampler = req.sampler().strip().lower()
    if sampler in ("euler a", "k_euler_a", "k_euler_ancestral"):
        checks.append(("eta", req.eta in (None, 1), "Euler a runs with eta 1 on the farm"))
    elif sampler == "ddim":
        checks.append(("eta", req.eta in (None, 0), "DDIM runs with eta 0 on the farm"))
    if isinstance(req, Txt2ImgRequest):
        checks.append(("enable_hr", not req.enable_hr, "hires fix is not supported"))
    if isinstance(req, Img2ImgRequest):
        checks += [
            ("mask", _off(req.mask), "inpainting is not supported"),
            ("latent_mask", _off(req.latent_mask), "inpainting is not supported"),
            ("resize_mode", req.resize_mode == 0,
             "only resize mode 0 (just resize) is supported"),
            ("initial_noise_multiplier", req.initial_noise_multiplier in (None, 1),
             "the farm's img2img takes no initial noise multiplier"),
            ("include_init_images", not req.include_init_images,
             "init images are not sent back"),
        ]
    errors = [FieldError(name, f"is not supported: {why}", getattr(req, name))
              for name, ok, why in checks if not ok]
    errors += option_errors(req.override_settings or {}, "override_settings")
    return errors


def option_errors(options: dict[str, Any], where: str) -> list[FieldError]:
    """Settings other than ``sd_model_checkpoint`` may only repeat the farm's fixed values."""
    errors = []
    for key, value in options.items():
        if key == "sd_model_checkpoint":
            continue
        if key not in FIXED_OPTIONS:
            errors.append(FieldError(f"{where}.{key}", "is not a setting the farm has (it takes "
                                     f"sd_model_checkpoint, and {', '.join(FIXED_OPTIONS)} at "
                                     "their values in GET /sdapi/v1/options)", value))
        elif value != FIXED_OPTIONS[key] and value not in _SAME_OPTION.get(key, ()):
            errors.append(FieldError(f"{where}.{key}", f"must be {FIXED_OPTIONS[key]!r}: the "
                                     "farm has no other", value))
    return errors


#: Farm job fields -> the A1111 field a request names them by, for error messages.
FARM_TO_A1111 = {
    "guidance_scale": "cfg_scale",
    "scheduler": "sampler_name",
    "strength": "denoising_strength",
    "init_image": "init_images",
    "model": "override_settings.sd_model_checkpoint",
    "seed": "seed",
}


def resolve_seed(seed: int) -> int:
    """A1111: -1 (or any negative seed) is a random one."""
    return random.randint(0, MAX_SEED) if seed < 0 else seed


def to_jobs(req: GenerationRequest, model: str, seed: int,
            family: str | None = None) -> list[dict[str, Any]]:
    """One farm job per image: image ``i`` (of ``batch_size x n_iter``) has seed ``seed + i``,
    as A1111 numbers them. Raises ValueError (message for ``sampler_name``) for an unknown
    sampler or schedule type, or one the model's ``family`` has not."""
    scheduler = from_a1111(req.sampler(), req.scheduler, family)
    common = {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "model": model,
        "width": req.width,
        "height": req.height,
        "steps": req.steps,
        "guidance_scale": req.cfg_scale,
        "scheduler": scheduler,
        "num_images": 1,
    }
    inits: list[str] = []
    if isinstance(req, Img2ImgRequest):
        inits = req.init_images or []
        common["mode"] = "img2img"
        common["strength"] = req.denoising_strength if req.denoising_strength is not None else 0.75
    jobs = []
    for i in range(req.images):
        job = {**common, "seed": (seed + i) % (MAX_SEED + 1)}
        if inits:
            # A1111: one init image serves the whole batch; k images serve k batch positions.
            job["init_image"] = inits[(i % req.batch_size) % len(inits)]
        jobs.append(job)
    return jobs


def check_counts(req: GenerationRequest) -> list[FieldError]:
    errors = []
    if req.images > MAX_IMAGES:
        errors.append(FieldError("batch_size", f"times n_iter must be at most {MAX_IMAGES} "
                                 "images in one call", req.images))
    if isinstance(req, Img2ImgRequest):
        inits = req.init_images or []
        if not inits:
            errors.append(FieldError("init_images", "must hold one base64 image", inits))
        elif len(inits) > 1 and len(inits) != req.batch_size:
            errors.append(FieldError("init_images", f"must hold 1 image or batch_size "
                                     f"({req.batch_size}) images", len(inits)))
    return errors
