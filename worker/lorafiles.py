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
from worker.families import UnknownFamily, family_of_lora
from worker.modelfiles import safetensors_shapes  # one header reader for models and LoRAs

log = logging.getLogger("renderfarm.worker")

LORAS_DIR = "loras"
_NAME = re.compile(LORA_NAME_PATTERN)

#: Tensor names of LoRA weights, in the formats diffusers' ``load_lora_weights`` reads:
#: peft ``lora_A`` / ``lora_B``, kohya / A1111 / civitai ``lora_down`` / ``lora_up``, and
#: older diffusers ``to_q_lora.down`` / ``lora_linear_layer.down``. A file with none is no LoRA.
_LORA_WEIGHT = re.compile(r"(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|"
                          r"lora_linear_layer\.(down|up))\.weight$")
#: What ``loras_with_family`` advertises, followed by the reason, for a file in ``loras/`` that
#: no model can use (not a LoRA, truncated, of no family the farm knows): a job naming it is
#: refused at submit with that reason instead of "not a LoRA the farm has".
UNUSABLE = "unusable: "


class NotALora(ValueError):
    """A file in ``loras/`` that is not a LoRA any family can use; the message says why."""


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
    """The model family a LoRA with these tensor names and shapes was made for, as the
    family layer recognises it (:func:`worker.families.family_of_lora`: each family's module
    says how its LoRAs look). :class:`NotALora` for a file without LoRA weights or of no
    family the farm knows."""
    if not any(_LORA_WEIGHT.search(key) for key in shapes):
        example = next(iter(sorted(shapes)), None)
        raise NotALora(f"not a LoRA: none of its {len(shapes)} tensors is a LoRA weight "
                       "(lora_A / lora_B, lora_down / lora_up)"
                       + (f", e.g. {example!r}" if example else ""))
    try:
        return family_of_lora(shapes).name
    except UnknownFamily as exc:
        raise NotALora(str(exc)) from None


_FAMILY_CACHE: dict[tuple[str, int, int], str] = {}


def loras_with_family(models_dir: Path) -> dict[str, str]:
    """LoRA name -> family, for the heartbeat. Each file's header is read once per (path,
    size, mtime). A file no model can use (unreadable, truncated, not a LoRA, of no known
    family) is listed as :data:`UNUSABLE` and the reason, with a warning in the log, so a job
    naming it is refused at submit saying why; a file gone meanwhile is left out."""
    out = {}
    for name, path in list_loras(models_dir).items():
        try:
            stat = path.stat()
        except OSError:
            continue
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _FAMILY_CACHE:
            try:
                _FAMILY_CACHE[key] = lora_family(safetensors_shapes(path))
            except (OSError, ValueError) as exc:
                reason = str(exc).replace(f"{path}: ", "")
                log.warning("LoRA %s (%s) cannot be used: %s", name, path, reason)
                _FAMILY_CACHE[key] = UNUSABLE + reason
        out[name] = _FAMILY_CACHE[key]
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
        elif family.startswith(UNUSABLE):
            errors.append(FieldError(f"loras.{i}.name",
                                     f"is a file in the loras folder that cannot be used: "
                                     f"{family[len(UNUSABLE):]}", lora.name, index))
        elif model_family is not None and family != model_family:
            errors.append(FieldError(f"loras.{i}.name",
                                     f"is a LoRA for model family {family!r}, but model "
                                     f"{request.model!r} is {model_family!r}", lora.name, index))
    return errors
