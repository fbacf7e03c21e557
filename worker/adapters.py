"""LoRAs in a loaded pipeline: each loaded once as a peft adapter, kept, switched per call.

A model's UNet and text encoders are shared by its txt2img and img2img pipelines, and so are
the adapters injected into them. :class:`LoraAdapters` keeps at most ``max_loras`` of them per
model (least recently used deleted first) and before every pipeline call makes the job's set
the active one with diffusers' ``set_adapters`` (or ``disable_lora`` for a job without LoRAs):
the base model is never reloaded for a LoRA change, and a LoRA is read from disk once while
it stays in the cache (again if its file changes).

A LoRA at weight 0 scales its update to exactly 0, so it renders the pixels the model gives
without it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from worker.lorafiles import lora_family, safetensors_shapes

log = logging.getLogger("renderfarm.worker")

#: The pipeline attributes that may hold a LoRA's text-encoder part (SDXL has two).
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class UnknownLora(LookupError):
    """A job names a LoRA this worker does not have."""

    def __init__(self, name: str, folder: Path, present: list[str]):
        self.name = name
        present_text = ", ".join(present) or "none"
        super().__init__(f"LoRA {name!r} is not in {folder}; LoRAs present: {present_text}")


class LoraMismatch(ValueError):
    """A LoRA made for another model family, or one that matched none of the model's layers."""


class LoraAdapters:
    """The LoRAs loaded into one model. ``loads`` counts LoRA files read (a test's proof that
    a switch reloaded nothing)."""

    def __init__(self, model: str, family: str, max_loras: int = 8):
        if max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {max_loras!r}")
        self.model = model
        self.family = family
        self.max_loras = max_loras
        self.loads = 0
        self._loaded: OrderedDict[str, tuple[str, tuple]] = OrderedDict()  # name -> adapter, file
        self._counter = 0
        self._active: tuple[tuple[str, float], ...] | None = ()

    def loaded(self) -> list[str]:
        """Names of the loaded LoRAs, least recently used first."""
        return list(self._loaded)

    def activate(self, pipe: Any, loras: list[tuple[str, float]], files: dict[str, Path]) -> None:
        """Make ``loras`` (``(name, weight)`` pairs) the pipeline's active set, loading the
        ones not loaded yet; with none, turn LoRA off. ``UnknownLora`` or ``LoraMismatch``
        (naming the LoRA, before the model is touched) when one cannot be used."""
        wanted = tuple(loras)
        for name, _ in wanted:
            if name not in files:
                raise UnknownLora(name, _folder(files), sorted(files))
        for name, _ in wanted:
            self._ensure(pipe, name, files[name], keep={n for n, _ in wanted})
        if wanted == self._active:
            return
        if not wanted:
            if self._loaded:
                pipe.disable_lora()
        else:
            pipe.enable_lora()
            pipe.set_adapters([self._loaded[n][0] for n, _ in wanted],
                              adapter_weights=[float(w) for _, w in wanted])
        self._active = wanted

    def clear(self, pipe: Any) -> None:
        """Delete every adapter (the model is back to its own layers)."""
        if self._loaded:
            pipe.unload_lora_weights()
        self._loaded.clear()
        self._active = ()

    # -- loading ------------------------------------------------------------------------------
    def _ensure(self, pipe: Any, name: str, path: Path, keep: set[str]) -> None:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        entry = self._loaded.get(name)
        if entry is not None and entry[1] == key:
            self._loaded.move_to_end(name)
            return
        if entry is not None:  # the file changed: drop the old weights
            self._delete(pipe, name)
        try:
            family = lora_family(safetensors_shapes(path))
        except ValueError as exc:  # not a LoRA, truncated, of no family the farm knows
            reason = str(exc).replace(f"{path}: ", "")
            raise LoraMismatch(f"LoRA {name!r} ({path.name}) cannot be used: {reason}") from exc
        if family != self.family:
            raise LoraMismatch(f"LoRA {name!r} is for model family {family!r}, but model "
                               f"{self.model!r} is {self.family!r}")
        while len(self._loaded) >= self.max_loras:
            victim = next((n for n in self._loaded if n not in keep), None)
            if victim is None:
                break
            self._delete(pipe, victim)
        self._counter += 1
        adapter = f"lora{self._counter}"  # file stems may hold characters peft names cannot
        try:
            _load(pipe, path, adapter)
        except Exception as exc:
            _forget(pipe, adapter)
            if isinstance(exc, LoraMismatch):
                raise
            raise LoraMismatch(f"LoRA {name!r} could not be loaded into model {self.model!r}: "
                               f"{type(exc).__name__}: {exc}") from exc
        self.loads += 1
        self._loaded[name] = (adapter, key)
        self._active = None  # the new adapter is active until set_adapters says otherwise
        log.info("LoRA %s loaded into %s as %s", name, self.model, adapter)

    def _delete(self, pipe: Any, name: str) -> None:
        adapter, _ = self._loaded.pop(name)
        pipe.delete_adapters(adapter)
        self._active = None
        log.info("LoRA %s deleted from %s", name, self.model)


def _folder(files: dict[str, Path]) -> Path | str:
    return next(iter(files.values())).parent if files else "the loras folder"


def _load(pipe: Any, path: Path, adapter: str) -> None:
    """Load the LoRA file ``path`` into ``pipe`` as ``adapter``, checking that every layer
    of the file landed in the model (diffusers converts kohya / A1111 / civitai names to its
    own in ``lora_state_dict``; a name it cannot place is only logged)."""
    if not hasattr(pipe, "unet"):  # a transformer model (Flux): diffusers' own loader
        pipe.load_lora_weights(str(path), adapter_name=adapter)
        # A name diffusers cannot place is only logged ("No LoRA keys associated to ..."): no
        # adapter is made, and the job would fail later in set_adapters, saying only that.
        if not any(adapter in names for names in pipe.get_list_adapters().values()):
            raise LoraMismatch(
                f"{path.name}: diffusers placed none of its layers in the model (it reads "
                "Flux LoRAs in its own transformer.* names and kohya's lora_unet_double_blocks_"
                "* / lora_transformer_* names; the original double_blocks.* names only as a "
                "full-size FLUX.1 control LoRA)")
        return
    # With the UNet's config, as diffusers' own load_lora_weights passes it: kohya's SDXL
    # LoRAs name the UNet's blocks the original (SGM) way, mapped to diffusers' names by it.
    state_dict, alphas = pipe.lora_state_dict(str(path), unet_config=pipe.unet.config)
    unet_keys = [k for k in state_dict if k.startswith("unet.")]
    if not unet_keys and not any(k.startswith(a + ".") for a in TEXT_ENCODERS for k in state_dict):
        raise LoraMismatch(f"{path.name}: no UNet or text-encoder weights diffusers can read")
    if unet_keys:
        pipe.load_lora_into_unet(state_dict, network_alphas=alphas, unet=pipe.unet,
                                 adapter_name=adapter, _pipeline=pipe)
        _check_took(pipe.unet, adapter, state_dict, "unet", path)
    for attr in TEXT_ENCODERS:
        encoder = getattr(pipe, attr, None)
        if encoder is None or not any(k.startswith(attr + ".") for k in state_dict):
            continue
        pipe.load_lora_into_text_encoder(state_dict, network_alphas=alphas, text_encoder=encoder,
                                         prefix=attr, lora_scale=pipe.lora_scale,
                                         adapter_name=adapter, _pipeline=pipe)
        _check_took(encoder, adapter, state_dict, attr, path)


def _check_took(module: torch.nn.Module, adapter: str, state_dict: dict, part: str,
                path: Path) -> None:
    """Raise unless ``adapter``'s up-projections in ``module`` are the file's: a name that
    matched no layer is only logged by diffusers, and the layer's weights are left as peft or
    transformers initialised them (zero, or random), so the total of their magnitudes would
    differ from the file's."""
    ups = [p.detach().float() for n, p in module.named_parameters()
           if f"lora_B.{adapter}." in n]
    given = [v.float() for k, v in state_dict.items() if k.startswith(part + ".")
             and ("lora_B" in k or "lora.up" in k or "lora_up" in k)]
    loaded = sum(float(p.abs().sum()) for p in ups)
    expected = sum(float(v.abs().sum()) for v in given)
    if len(ups) != len(given) or abs(loaded - expected) > 1e-3 * max(expected, 1e-6):
        raise LoraMismatch(f"{path.name}: its {part} weights did not load into the model's "
                           f"layers ({len(given)} in the file, {len(ups)} layers adapted)")


def _forget(pipe: Any, adapter: str) -> None:
    """Remove what a failed load left of ``adapter`` (best effort)."""
    try:
        pipe.delete_adapters(adapter)
    except Exception:  # nothing was injected, or only part of it
        log.debug("LoRA adapter %s: nothing to delete after a failed load", adapter)
