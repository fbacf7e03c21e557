"""Which LoRAs a models directory holds, and which model family each is for. No torch.

LoRAs are ``.safetensors`` files in ``<models dir>/loras/``; a LoRA's name is its file stem
(``<lora:name:0.8>``). The producer and the heartbeat read this module, so it stays light: a
LoRA's family comes from its safetensors header (tensor names and shapes), never its weights.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from renderfarm.errors import FieldError
from renderfarm.schema import LORA_NAME_PATTERN, JobRequest
from worker.modelfiles import safetensors_shapes  # one header reader for models and LoRAs

log = logging.getLogger("renderfarm.worker")

LORAS_DIR = "loras"
_NAME = re.compile(LORA_NAME_PATTERN)

#: Tensor-name fragments that mark a LoRA as made for a family, checked in this order: the
#: formats diffusers' ``load_lora_weights`` reads (kohya / A1111 / civitai ``lora_unet_*``,
#: ``lora_te*``; diffusers / peft ``unet.*``, ``text_encoder*.*``; Flux ``transformer.*``).
#: kohya names SDXL's UNet blocks the original way (``input_blocks``), SD 1.x's the diffusers
#: way (``down_blocks``); SDXL has a second text encoder (``te2``).
FAMILY_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("flux", ("transformer.", "lora_transformer_", "double_blocks", "single_blocks")),
    ("sdxl", ("lora_te2_", "text_encoder_2.", "lora_unet_input_blocks_",
              "lora_unet_output_blocks_", "lora_unet_middle_block_", "add_embedding")),
)
#: The width of the text embeddings a UNet's cross-attention reads (``attn2.to_k``'s input):
#: 768 for SD 1.x (CLIP ViT-L), 1024 for SD 2.x (OpenCLIP ViT-H), 2048 for SDXL (both
#: encoders). Decides where the names do not (a diffusers-format UNet-only LoRA).
CROSS_ATTENTION_FAMILIES = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
_TO_K_DOWN = re.compile(r"attn2[._]to_k.*(lora_down|lora_A|lora\.down)")
#: What a LoRA whose file says nothing more is taken for (the tiny test models have small
#: cross-attention widths): the family of most LoRAs people have.
DEFAULT_FAMILY = "sd15"


def list_loras(models_dir: Path) -> dict[str, Path]:
    """LoRA name -> ``.safetensors`` path in ``<models_dir>/loras``, sorted by name.

    Hidden files are skipped (a file being copied in under a hidden name), and so are files
    whose stem is no valid LoRA name (``LORA_NAME_PATTERN``: a job could not name them), with a
    warning. A missing folder holds no LoRAs.
    """
    folder = Path(models_dir) / LORAS_DIR
    if not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for entry in folder.iterdir():
        if entry.name.startswith(".") or entry.suffix.lower() != ".safetensors":
            continue
        if not entry.is_file():
            continue
        if not _NAME.match(entry.stem):
            log.warning("LoRA file %s skipped: its name must match %s", entry, LORA_NAME_PATTERN)
            continue
        out[entry.stem] = entry
    return dict(sorted(out.items()))


def lora_family(shapes: dict[str, tuple[int, ...]]) -> str:
    """The model family a LoRA with these tensor names and shapes was made for: its names
    (:data:`FAMILY_MARKERS`), else its cross-attention width
    (:data:`CROSS_ATTENTION_FAMILIES`), else :data:`DEFAULT_FAMILY`."""
    for family, markers in FAMILY_MARKERS:
        if any(marker in key for key in shapes for marker in markers):
            return family
    for key, shape in shapes.items():
        if _TO_K_DOWN.search(key) and len(shape) == 2:
            width = shape[1]
            if width in CROSS_ATTENTION_FAMILIES:
                return CROSS_ATTENTION_FAMILIES[width]
    return DEFAULT_FAMILY


_FAMILY_CACHE: dict[tuple[str, int, int], str] = {}


def loras_with_family(models_dir: Path) -> dict[str, str]:
    """LoRA name -> family, for the heartbeat. Each file's header is read once per (path,
    size, mtime); an unreadable file is left out with a warning (it cannot be loaded)."""
    out = {}
    for name, path in list_loras(models_dir).items():
        try:
            stat = path.stat()
            key = (str(path), stat.st_size, stat.st_mtime_ns)
            if key not in _FAMILY_CACHE:
                _FAMILY_CACHE[key] = lora_family(safetensors_shapes(path))
            out[name] = _FAMILY_CACHE[key]
        except (OSError, ValueError) as exc:
            log.warning("LoRA %s left out: %s", name, exc)
    return out


def lora_errors(request: JobRequest, known: dict[str, str], model_family: str | None,
                index: int | None = None) -> list[FieldError]:
    """Why the farm cannot apply ``request``'s LoRAs: one it has not got (``known``: LoRA ->
    family, as workers advertise them), or one of another family than the model's (when the
    model's family is known). Each error names ``loras.<i>.name`` and the LoRA."""
    errors = []
    for i, lora in enumerate(request.loras):
        family = known.get(lora.name)
        if family is None:
            names = ", ".join(sorted(known)) or "none"
            errors.append(FieldError(f"loras.{i}.name",
                                     f"is not a LoRA the farm has (known: {names})",
                                     lora.name, index))
        elif model_family is not None and family != model_family:
            errors.append(FieldError(f"loras.{i}.name",
                                     f"is a LoRA for model family {family!r}, but model "
                                     f"{request.model!r} is {model_family!r}", lora.name, index))
    return errors
