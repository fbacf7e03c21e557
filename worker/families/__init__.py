"""Model families: what kind of model a model is, and everything that follows from it.

A family (:class:`Family`) says which diffusers pipelines render it, how its diffusers folders
(``model_index.json``'s ``_class_name``) and single-file checkpoints (tensor names, as
diffusers' ``single_file_utils.CHECKPOINT_KEY_NAMES``) are recognised, which config it ships for
single files, its default and allowed sizes, its schedulers, whether it takes a negative
prompt, its memory per pixel (batch sizing), its latent-to-RGB preview factors and its TAESD.

The rest of the code asks :data:`FAMILIES` (``family_named``, ``family_of``, ``job_errors``)
and never tests a family's name. Adding a family is one module beside ``sd15.py`` holding a
``FAMILY`` and one line in :data:`FAMILIES`.

This package imports neither torch nor diffusers at import time (the producer imports it to
check jobs at submit); the worker-side methods import diffusers when called.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from renderfarm.errors import FieldError
from renderfarm.samplers import A1111_SAMPLERS, from_a1111

if TYPE_CHECKING:
    from renderfarm.schema import JobRequest

#: Where the families' bundled single-file configs live (package data, config JSON only).
CONFIGS_DIR = Path(__file__).parent / "configs"

Shapes = dict[str, tuple[int, ...]]


#: A cross-attention key projection's LoRA down-projection (its input is the text embedding),
#: in the diffusers / peft (``attn2.to_k.lora_A``), kohya (``attn2_to_k.lora_down``) and
#: older diffusers (``attn2.processor.to_k_lora.down``) names.
_CROSS_ATTENTION_DOWN = re.compile(
    r"attn2[._](processor[._])?to_k.*(lora_down|lora_A|lora\.down)")


def lora_cross_attention_width(shapes: Shapes) -> int | None:
    """The width of the text embeddings a LoRA's cross-attention layers read (768 for SD 1.x,
    1024 for SD 2.x, 2048 for SDXL), or None where the LoRA adapts no cross-attention."""
    for key, shape in shapes.items():
        if len(shape) == 2 and _CROSS_ATTENTION_DOWN.search(key):
            return shape[1]
    return None


@dataclass(frozen=True)
class Family:
    """One model family. Subclass it where a family loads differently (see ``flux.py``)."""

    name: str  #: short id, as in job records and heartbeats: ``"sd15"``
    label: str  #: for people: ``"Stable Diffusion 1.x"``
    txt2img: str  #: diffusers pipeline class name for txt2img
    img2img: str  #: ... and for img2img (made from the txt2img pipeline with ``from_pipe``)
    folder_classes: tuple[str, ...]  #: ``model_index.json`` ``_class_name`` values it owns
    #: Tensor names of which any one marks a single file as this family (checked in registry
    #: order, so a more specific family comes first).
    checkpoint_keys: tuple[str, ...] = ()
    #: Bundled diffusers config (no weights) under :data:`CONFIGS_DIR` for single files, and
    #: the tokenizer subfolders written into it (:mod:`worker.clip_tokenizer` variants).
    bundled_config: str | None = None
    tokenizers: tuple[tuple[str, str], ...] = ()
    denoiser: str = "unet"  #: the pipeline attribute holding the denoising model
    default_size: tuple[int, int] = (512, 512)
    min_side: int = 64
    max_side: int = 2048
    size_multiple: int = 8
    schedulers: tuple[str, ...] = ()
    default_scheduler: str = "euler_a"
    default_guidance: float = 7.0  #: ``guidance_scale`` of a job that leaves it unset
    negative_prompt: bool = True
    #: Peak device memory per output pixel of one image in fp16 beyond the weights, in bytes
    #: (float32 doubles it). The worker's profiles are calibrated for SD 1.5 (4096).
    bytes_per_pixel: int = 4096
    #: How its LoRA files are recognised (:meth:`owns_lora`): regular expressions on tensor
    #: names of which any one marks a LoRA as this family's (searched, so anchor with ``^``),
    #: and the widths of the text embeddings its denoiser's cross-attention reads, which
    #: decide a UNet-only LoRA whose names say nothing (:func:`lora_cross_attention_width`).
    lora_keys: tuple[str, ...] = ()
    cross_attention_widths: tuple[int, ...] = ()
    #: Latent channel -> (R, G, B), and the RGB bias, for previews without the VAE
    #: (ComfyUI's ``comfy/latent_formats.py``).
    latent_rgb_factors: tuple[tuple[float, float, float], ...] = ()
    latent_rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: The tiny VAE of its better previews (``RENDERFARM_PREVIEW_METHOD=taesd``,
    #: worker/taesd.py): ``taesd``, ``taesdxl`` or ``taef1``; empty: none.
    taesd: str = ""

    # -- recognising --------------------------------------------------------------------
    def owns_folder(self, class_name: str) -> bool:
        return class_name in self.folder_classes

    def owns_checkpoint(self, shapes: Shapes) -> bool:
        """Whether a single file with these tensor names and shapes is of this family."""
        return any(key in shapes for key in self.checkpoint_keys)

    def owns_lora(self, shapes: Shapes) -> bool:
        """Whether a LoRA file with these tensor names and shapes was made for this family:
        one of its names matches :attr:`lora_keys`, or its cross-attention width is one of
        :attr:`cross_attention_widths`. Asked in registry order (:func:`family_of_lora`)."""
        if any(re.search(pattern, key) for pattern in self.lora_keys for key in shapes):
            return True
        return lora_cross_attention_width(shapes) in self.cross_attention_widths

    # -- facts for jobs -----------------------------------------------------------------
    def memory_scale(self) -> float:
        """This family's memory per pixel relative to SD 1.5's, the profiles' yardstick."""
        return self.bytes_per_pixel / 4096

    def facts(self) -> dict[str, Any]:
        """What clients may show about the family (``GET /api/v1/families``)."""
        return {
            "name": self.name,
            "label": self.label,
            "default_size": list(self.default_size),
            "min_side": self.min_side,
            "max_side": self.max_side,
            "size_multiple": self.size_multiple,
            "schedulers": list(self.schedulers),
            "default_scheduler": self.default_scheduler,
            "default_guidance": self.default_guidance,
            "negative_prompt": self.negative_prompt,
        }

    # -- worker side: diffusers imported here, never at module import -------------------
    def pipeline_class(self, mode: str) -> type:
        import diffusers

        return getattr(diffusers, self.txt2img if mode == "txt2img" else self.img2img)

    def load(self, path: Path, options: dict[str, Any]) -> Any:
        """The txt2img pipeline of model ``path`` (a folder, or a single file whose offline
        config ``options`` already holds: :func:`worker.singlefile.single_file_options`)."""
        cls = self.pipeline_class("txt2img")
        if Path(path).is_dir():
            return cls.from_pretrained(path, **options)
        return cls.from_single_file(str(path), **options)

    def single_file_note(self) -> str:
        """What a single file of this family needs next to it where the farm has no config."""
        return "put a diffusers folder of the model, without weights, next to it"

    def load_options(self) -> dict[str, Any]:
        """Extra ``from_pretrained`` / ``from_single_file`` options of this family."""
        return {}


from worker.families import flux, sd15, sdxl  # noqa: E402  (they import Family from here)

#: Every family, in the order single files are tested against them (most specific first).
FAMILIES: dict[str, Family] = {
    f.name: f for f in (sdxl.FAMILY, flux.FAMILY, sd15.FAMILY)
}


class UnknownFamily(ValueError):
    """A model (or LoRA) whose family the farm does not know; the message says what it looks
    like."""


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"family must be one of {', '.join(FAMILIES)}, got {name!r}") from None


def family_of_folder(folder: Path) -> Family:
    """The family of a diffusers pipeline folder, by its ``model_index.json`` ``_class_name``."""
    index = Path(folder) / "model_index.json"
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError, AttributeError) as exc:
        raise UnknownFamily(f"{index}: not a readable model_index.json ({exc})") from exc
    for family in FAMILIES.values():
        if family.owns_folder(class_name):
            return family
    known = "; ".join(f"{f.name}: {', '.join(f.folder_classes)}" for f in FAMILIES.values())
    raise UnknownFamily(
        f"{folder}: pipeline {class_name!r} is of no family the farm knows ({known})")


def family_of_checkpoint(shapes: Shapes) -> Family | None:
    """The family of a single file's state dict (tensor names and shapes), or None."""
    for family in FAMILIES.values():
        if family.owns_checkpoint(shapes):
            return family
    return None


def family_of_lora(shapes: Shapes) -> Family:
    """The family a LoRA with these tensor names and shapes was made for: the first family
    in registry order whose :meth:`Family.owns_lora` says so; :class:`UnknownFamily` (naming
    the evidence) where none does."""
    for family in FAMILIES.values():
        if family.owns_lora(shapes):
            return family
    width = lora_cross_attention_width(shapes)
    seen = f"cross-attention width {width}" if width else "no cross-attention layers"
    example = next(iter(sorted(shapes)), "none")
    raise UnknownFamily(
        f"a LoRA of no model family the farm knows ({', '.join(FAMILIES)}): {seen}, "
        f"{len(shapes)} tensors such as {example!r}")


#: (path, size, mtime) of a .safetensors -> its family, so a submit does not reread headers.
_HEADER_FAMILIES: dict[tuple[Path, int, int], Family | None] = {}


def family_of(path: Path, read_ckpt: bool = False) -> Family | None:
    """The family of model ``path``, as :func:`worker.modelfiles.list_models` lists them: a
    folder by its ``model_index.json``; a single file by its ``<stem>.config/`` folder where
    there is one, else by its tensor names. A ``.safetensors`` header is read without torch;
    a ``.ckpt`` only with ``read_ckpt`` (it needs torch), else None. None also where no
    family matches; :class:`UnknownFamily` for a folder of an unknown pipeline."""
    from worker.modelfiles import safetensors_shapes
    from worker.singlefile import config_path

    path = Path(path)
    if path.is_dir():
        return family_of_folder(path)
    folder = config_path(path)
    if (folder / "model_index.json").is_file():
        return family_of_folder(folder)
    if path.suffix.lower() == ".safetensors":
        try:
            stat = path.stat()
            key = (path, stat.st_size, stat.st_mtime_ns)
            if key not in _HEADER_FAMILIES:  # a header read once per file version
                _HEADER_FAMILIES[key] = family_of_checkpoint(safetensors_shapes(path))
            return _HEADER_FAMILIES[key]
        except (OSError, ValueError):
            return None
    elif read_ckpt:
        from worker.singlefile import CheckpointError, checkpoint_shapes

        try:
            shapes = checkpoint_shapes(path)
        except CheckpointError:
            return None
    else:
        return None
    return family_of_checkpoint(shapes)


def model_families(models_dir: Path) -> dict[str, str]:
    """Model name -> family name for the models of ``models_dir`` whose family is known."""
    from worker.modelfiles import list_models

    out = {}
    for name, path in list_models(models_dir).items():
        try:
            family = family_of(path)
        except UnknownFamily:
            family = None
        if family is not None:
            out[name] = family.name
    return out


def with_family_defaults(request: JobRequest, family: Family) -> JobRequest:
    """``request`` with the family's default size, scheduler and guidance where the job left
    them unset (an SDXL job without a size renders 1024x1024, a Flux job with its
    flow-matching scheduler at distilled guidance 3.5)."""
    update: dict[str, Any] = {}
    unset = request.model_fields_set
    if "width" not in unset and "height" not in unset:
        update["width"], update["height"] = family.default_size
    if "scheduler" not in unset:
        update["scheduler"] = family.default_scheduler
    elif request.sampler_name is not None:
        # An A1111 sampler name means what it means on this family (samplers.from_a1111, as
        # the A1111 API reads it: 'Euler' on Flux is its flow-matching Euler).
        try:
            update["scheduler"] = from_a1111(request.sampler_name, None, family.name)
        except ValueError:
            pass  # job_errors names it with what the family allows
    if "guidance_scale" not in unset:
        update["guidance_scale"] = family.default_guidance
    update = {k: v for k, v in update.items() if getattr(request, k) != v}
    return request.model_copy(update=update) if update else request


def job_errors(request: JobRequest, family: Family, index: int | None = None) -> list[FieldError]:
    """What in ``request`` makes no sense for a model of ``family``: each error names the
    field, its value and what the family allows."""
    errors = []
    kind = f"{family.name} ({family.label}) models"
    if request.scheduler not in family.schedulers:
        allowed = ", ".join(family.schedulers)
        if request.sampler_name is not None:  # the job gave an A1111 name: say the family's
            names = dict.fromkeys(A1111_SAMPLERS[s][0] for s in family.schedulers
                                  if s in A1111_SAMPLERS)
            allowed += f" (A1111 names: {', '.join(names)})"
        errors.append(FieldError(
            "scheduler", f"is not a scheduler of {kind}; allowed: {allowed}",
            request.sampler_name or request.scheduler, index))
    for name in ("width", "height"):
        value = getattr(request, name)
        if not family.min_side <= value <= family.max_side or value % family.size_multiple:
            errors.append(FieldError(
                name, f"must be {family.min_side} to {family.max_side} and a multiple of "
                f"{family.size_multiple} for {kind}", value, index))
    if request.negative_prompt and not family.negative_prompt:
        errors.append(FieldError(
            "negative_prompt", f"is not used by {kind} (they take no negative prompt): leave "
            "it empty", request.negative_prompt, index))
    return errors
