"""Keep diffusers pipelines warm, and swap their schedulers by name.

Loading a model costs seconds (more when the page cache is cold); a step costs milliseconds.
So a worker keeps its last ``max_models`` models resident in a :class:`PipelineCache` and
swaps schedulers on the loaded pipeline (:func:`set_scheduler`) instead of reloading.

At load the profile's fast path is applied (:meth:`PipelineCache._apply_profile`): SDPA
attention, channels_last, ``torch.compile`` of the UNet; :meth:`PipelineCache.warmup` then
renders each size bucket once so a compiled UNet has compiled before the first job.
"""

from __future__ import annotations

import gc
import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.schedulers import scheduling_lms_discrete
from diffusers.utils import is_scipy_available

from renderfarm.schema import SCHEDULERS, Mode
from worker import metrics
from worker.adapters import LoraAdapters
from worker.families import Family, family_of_folder
from worker.lorafiles import list_loras
from worker.memory import available_memory
from worker.modelfiles import list_models
from worker.profiles import Profile
from worker.singlefile import single_file_options

log = logging.getLogger("renderfarm.worker")

class UnknownModel(LookupError):
    """A job names a model this worker does not have."""

    def __init__(self, model: str, models_dir: Path, present: list[str]):
        self.model = model
        self.models_dir = models_dir
        self.present = present
        super().__init__(str(self))

    def __str__(self) -> str:
        present = ", ".join(self.present) or "none"
        return f"model {self.model!r} is not in {self.models_dir}; models present: {present}"


class LMSDiscreteSchedulerNumpy(scheduling_lms_discrete.LMSDiscreteScheduler):
    """diffusers' LMS scheduler without scipy.

    diffusers integrates each LMS coefficient with ``scipy.integrate.quad``. The integrand is a
    polynomial of degree ``order - 1`` (at most 3), which 4-point Gauss-Legendre quadrature
    integrates exactly, so numpy is enough. Used only where scipy is not installed.
    """

    _nodes, _weights = np.polynomial.legendre.leggauss(4)

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        sigma = [float(self.sigmas[t - k]) for k in range(order)]
        a, b = float(self.sigmas[t]), float(self.sigmas[t + 1])
        tau = (b - a) / 2 * self._nodes + (a + b) / 2
        prod = np.ones_like(tau)
        for k in range(order):
            if k != current_order:
                prod *= (tau - sigma[k]) / (sigma[current_order] - sigma[k])
        return float((b - a) / 2 * np.dot(self._weights, prod))


LMSScheduler = (
    scheduling_lms_discrete.LMSDiscreteScheduler
    if is_scipy_available()
    else LMSDiscreteSchedulerNumpy
)

#: Scheduler name (AUTOMATIC1111's sampler names) -> class and the options it is made with.
SCHEDULER_CLASSES: dict[str, tuple[type, dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "flow_match_euler": (FlowMatchEulerDiscreteScheduler, {}),
}
assert set(SCHEDULER_CLASSES) == set(SCHEDULERS), "keep in step with renderfarm.schema"

# Per model (keyed by its denoiser, the UNet or transformer the txt2img and img2img pipelines
# share): the scheduler config the model shipped with, and the schedulers made from it.
# Entries go with the model.
_SCHEDULER_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]] = (
    weakref.WeakKeyDictionary()
)


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The pipeline's denoising model: its UNet, or its transformer (Flux)."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def _scheduler_entry(pipe: DiffusionPipeline) -> dict[str, Any]:
    key = denoiser(pipe)
    entry = _SCHEDULER_CACHE.get(key)
    if entry is None:
        entry = _SCHEDULER_CACHE[key] = {"config": pipe.scheduler.config, "made": {}}
    return entry


def set_scheduler(pipe: DiffusionPipeline, name: str) -> None:
    """Give ``pipe`` the scheduler ``name``, made from the model's own scheduler config.

    Nothing is reloaded. Each scheduler is made once per model and reused (a scheduler resets
    its state in ``set_timesteps`` at the start of every call).
    """
    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    entry = _scheduler_entry(pipe)
    scheduler = entry["made"].get(name)
    if scheduler is None:
        cls, options = SCHEDULER_CLASSES[name]
        scheduler = entry["made"][name] = cls.from_config(entry["config"], **options)
    pipe.scheduler = scheduler


@dataclass
class _Loaded:
    family: Family
    txt2img: DiffusionPipeline
    img2img: DiffusionPipeline | None = None
    offloaded: DiffusionPipeline | None = None  # which pipeline holds the CPU-offload hooks
    loras: LoraAdapters | None = None  # the LoRAs loaded into it (worker.adapters)


class PipelineCache:
    """The models a worker keeps loaded: at most ``max_models``, least recently used evicted.

    ``loads`` counts loads from disk, so a test can prove a model stayed warm; ``lora_loads``
    counts LoRA files read (each loaded model keeps up to ``max_loras`` LoRAs loaded).
    """

    def __init__(self, models_dir: Path, profile: Profile, max_models: int = 2,
                 max_loras: int = 8):
        if max_models < 1:
            raise ValueError(f"max_models must be at least 1, got {max_models!r}")
        self.models_dir = Path(models_dir)
        self.profile = profile
        self.max_models = max_models
        self.max_loras = max_loras
        self.loads = 0
        self.lora_loads = 0
        self.warmed: dict[str, dict[str, float]] = {}  # model -> "WxHxB" -> seconds
        self._entries: OrderedDict[str, _Loaded] = OrderedDict()
        self._families: dict[Path, Family] = {}

    def family(self, model: str) -> Family:
        """The family of ``model`` (:func:`worker.families.family_of`), read once per path.
        :class:`UnknownModel` if the worker does not have it; :class:`UnknownFamily` (a
        ``ValueError`` saying what the model looks like) if no family knows it."""
        entry = self._entries.get(model)
        if entry is not None:
            return entry.family
        models = list_models(self.models_dir)
        path = models.get(model)
        if path is None:
            raise UnknownModel(model, self.models_dir, sorted(models))
        family = self._families.get(path)
        if family is None:
            if path.is_dir():
                family = family_of_folder(path)
            else:  # the config folder single_file_options picks decides
                family = family_of_folder(single_file_options(path, self.models_dir)["config"])
            self._families[path] = family
        return family

    def call_size(self, width: int, height: int, model: str | None = None) -> int:
        """The most images one pipeline call at ``width`` x ``height`` renders: the profile's
        ``max_batch``, fewer where the device's available memory
        (:func:`worker.memory.available_memory`, read now) would not hold them at
        ``bytes_per_pixel`` (scaled by ``model``'s family: :meth:`Family.memory_scale`), never
        fewer than 1; with a compiled UNet, a warmed-up batch size, so padding a call
        (:meth:`batch_size_for`) never goes over it."""
        profile = self.profile
        limit = profile.max_batch
        available = available_memory(profile.device)
        if available is not None:
            per_pixel = profile.bytes_per_pixel
            if model is not None:
                try:
                    per_pixel = int(per_pixel * self.family(model).memory_scale())
                except (LookupError, ValueError):
                    pass  # the render itself will say what is wrong with the model
            limit = min(limit, max(1, available // (width * height * per_pixel)))
        if profile.compile:
            limit = max(b for b in profile.batch_buckets() if b <= limit)
        return limit

    def batch_size_for(self, images: int) -> int:
        """The batch size a pipeline call of ``images`` images runs at: ``images`` itself,
        or with a compiled UNet the smallest warmed-up batch size that holds them (a compiled
        UNet recompiles for every new shape: padding a call is cheaper than a recompile)."""
        buckets = [b for b in self.profile.batch_buckets() if b >= images]
        return min(buckets) if self.profile.compile and buckets else images

    def loaded(self) -> list[str]:
        """Names of the loaded models, least recently used first."""
        return list(self._entries)

    def get(self, model: str, mode: Mode | str = Mode.txt2img) -> DiffusionPipeline:
        """The pipeline of ``model`` for ``mode``, loading the model if it is not loaded.

        img2img shares the txt2img pipeline's weights (``from_pipe``): one load serves both.
        """
        mode = Mode(mode)
        entry = self._entries.get(model)
        if entry is None:
            entry = self._load(model)
        self._entries.move_to_end(model)
        if mode is Mode.txt2img:
            pipe = entry.txt2img
        else:
            if entry.img2img is None:
                # from_pipe casts to float32 unless told the dtype: it would upcast the shared
                # weights of an fp16 model in place.
                entry.img2img = entry.family.pipeline_class("img2img").from_pipe(
                    entry.txt2img, dtype=self.profile.dtype
                )
                entry.img2img.set_progress_bar_config(disable=True)
            pipe = entry.img2img
        if self.profile.cpu_offload and entry.offloaded is not pipe:
            # Offload hooks live on the shared modules; move them to the pipeline in use.
            pipe.enable_model_cpu_offload(device=self.profile.device)
            entry.offloaded = pipe
        return pipe

    def use_loras(self, model: str, loras: tuple[tuple[str, float], ...] = ()) -> None:
        """Make ``loras`` (``(name, weight)`` pairs, :func:`worker.compat.lora_set`) the
        active LoRAs of loaded ``model`` for the next call of either of its pipelines (they
        share the layers the adapters live in); none turns LoRA off. LoRAs are read once and
        kept (:class:`worker.adapters.LoraAdapters`); the model is never reloaded for them.

        A compiled UNet runs a job with LoRAs eagerly: its graph was traced for the model's
        own layers, and peft's adapter layers (and every change of set or weight) would make it
        recompile. A job without LoRAs on a compiled UNet unloads the LoRAs first, so the
        compiled graph's guards hold again (the next LoRA job reads its files again).
        """
        entry = self._entries[model]
        pipe = entry.txt2img
        if entry.loras is None:
            if not loras:
                return
            entry.loras = LoraAdapters(model, entry.family.name, self.max_loras)
        unet = denoiser(pipe)
        compiled = getattr(unet, "renderfarm_forward", None)
        if compiled is not None and not loras:
            entry.loras.clear(pipe)
            unet.forward = compiled
            return
        before, begun = entry.loras.loads, time.monotonic()
        try:
            entry.loras.activate(pipe, list(loras), list_loras(self.models_dir))
        finally:
            self.lora_loads += entry.loras.loads - before
        if entry.loras.loads > before:  # LoRA files were read (not only switched between)
            metrics.LORA_LOAD_SECONDS.labels(model).observe(time.monotonic() - begun)
        if compiled is not None:
            unet.__dict__.pop("forward", None)  # the class's own (eager) forward

    def loaded_loras(self) -> dict[str, list[str]]:
        """Model -> the LoRAs loaded into it, least recently used first."""
        return {m: e.loras.loaded() for m, e in self._entries.items()
                if e.loras is not None and e.loras.loaded()}

    def evict(self, model: str) -> None:
        """Unload ``model`` and free its memory (no error if it is not loaded)."""
        entry = self._entries.pop(model, None)
        if entry is None:
            return
        if entry.offloaded is not None:
            entry.offloaded.remove_all_hooks()
        del entry
        gc.collect()
        if self.profile.device == "cuda":
            torch.cuda.empty_cache()

    def clear(self) -> None:
        for model in list(self._entries):
            self.evict(model)

    def _load(self, model: str) -> _Loaded:
        models = list_models(self.models_dir)
        path = models.get(model)
        if path is None:
            raise UnknownModel(model, self.models_dir, sorted(models))
        options = {
            "dtype": self.profile.dtype,
            "local_files_only": True,
        }
        if path.is_dir():
            family = family_of_folder(path)
        else:
            # The configs found locally (worker.singlefile), so nothing is downloaded; the
            # config folder tells the family. Before any eviction: a checkpoint that cannot
            # load must not cost a warm model.
            options |= single_file_options(path, self.models_dir)
            family = family_of_folder(Path(options["config"]))
        options |= family.load_options()
        while len(self._entries) >= self.max_models:  # free memory before loading
            self.evict(next(iter(self._entries)))
        begun = time.monotonic()
        pipe = family.load(path, options)
        self.loads += 1
        _scheduler_entry(pipe)  # remember the model's own scheduler config before any swap
        self._apply_profile(pipe)
        metrics.MODEL_LOAD_SECONDS.labels(model).observe(time.monotonic() - begun)
        entry = _Loaded(family, pipe)
        self._entries[model] = entry
        return entry

    def warmup(
        self,
        model: str,
        sizes: list[tuple[int, int]] | tuple[tuple[int, int], ...] | None = None,
        batch_sizes: list[int] | tuple[int, ...] | None = None,
        steps: int = 2,
        guidance_scale: float = 7.0,
    ) -> dict[str, float]:
        """Render ``model`` once at each size and batch size; return seconds per ``"WxHxB"``.

        Call at worker start. A compiled UNet compiles on the first call of each shape (latent
        size, batch size, and classifier-free guidance on or off, which doubles the batch), so
        a job of a warmed shape runs without compiling. By default: the profile's
        ``warmup_sizes`` (or 512x512) at its :meth:`Profile.batch_buckets` when compiling, else
        at batch 1 and ``max_batch``. Sizes over ``max_pixels`` are skipped.
        """
        profile = self.profile
        if sizes is None:
            sizes = profile.warmup_sizes or ((512, 512),)
        if batch_sizes is None:
            batch_sizes = profile.batch_buckets() if profile.compile else sorted(
                {1, profile.max_batch})
        for width, height in sizes:
            if width % 8 or height % 8:
                raise ValueError(f"warm-up size must be a multiple of 8, got {width}x{height}")
        for batch in batch_sizes:
            if not 1 <= batch <= profile.max_batch:
                raise ValueError(f"warm-up batch size must be 1 to max_batch "
                                 f"{profile.max_batch}, got {batch!r}")
        pipe = self.get(model, Mode.txt2img)
        timings = self.warmed.setdefault(model, {})
        for width, height in sizes:
            if width * height > profile.max_pixels:
                log.info("warm-up: %dx%d skipped, over max_pixels %d", width, height,
                         profile.max_pixels)
                continue
            for batch in batch_sizes:
                t = time.perf_counter()
                with torch.inference_mode():
                    pipe(
                        prompt=["warm-up"] * batch,
                        width=width,
                        height=height,
                        num_inference_steps=steps,
                        guidance_scale=guidance_scale,
                        generator=[torch.Generator("cpu").manual_seed(k) for k in range(batch)],
                        output_type="pil",
                    )
                if profile.device == "cuda":
                    torch.cuda.synchronize()
                timings[f"{width}x{height}x{batch}"] = round(time.perf_counter() - t, 3)
                log.info("warm-up %s %dx%d batch %d: %.1fs", model, width, height, batch,
                         timings[f"{width}x{height}x{batch}"])
        return dict(timings)

    def _apply_profile(self, pipe: DiffusionPipeline) -> None:
        """Put a freshly loaded pipeline on the profile's device, in its fast path."""
        profile = self.profile
        # Inference only: freeze every weight now, as loading a LoRA would (peft marks the
        # base weights frozen and unloading leaves them so), else a compiled UNet's guards on
        # requires_grad would fail after the first LoRA and it would recompile.
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
        if not profile.cpu_offload:
            pipe.to(profile.device)  # the whole pipeline: the VAE decodes on the device too
        if profile.vae_slicing:
            pipe.vae.enable_slicing()
        if profile.vae_tiling:
            pipe.vae.enable_tiling()
        if profile.attention_slicing:
            pipe.enable_attention_slicing()
        elif profile.sdpa:
            # diffusers' default on torch 2 already; set explicitly so no other processor
            # (xformers, a slicing one left by an earlier setting) is in use unnoticed.
            # (A transformer keeps its own: Flux's processors are not AttnProcessor2_0.)
            if _has_unet(pipe):
                pipe.unet.set_attn_processor(AttnProcessor2_0())
            pipe.vae.set_attn_processor(AttnProcessor2_0())
        if profile.channels_last:  # for convolutions: the UNet and the VAE
            if _has_unet(pipe):
                pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if profile.compile:
            _compile_unet(pipe, profile)
        pipe.set_progress_bar_config(disable=True)


def _has_unet(pipe: DiffusionPipeline) -> bool:
    return getattr(pipe, "unet", None) is not None


def _compile_unet(pipe: DiffusionPipeline, profile: Profile) -> None:
    """``torch.compile`` the UNet's ``forward`` in place (the module, its weights and
    ``pipe.unet`` stay the same objects, so img2img's ``from_pipe`` shares the compiled one).
    A transformer (Flux) is compiled the same way; its inputs are all keywords and its
    timesteps already float tensors, so it goes without :func:`_steady_inputs`.

    Three choices keep a warmed-up worker from ever compiling again (checked on CPU with real
    dynamo in ``tests/test_compile.py``):

    - ``dynamic=False``: one static graph per shape. By default dynamo turns the batch
      dimension symbolic after its second shape, and a dynamic-shape graph is the slower one
      (no CUDA graphs, generic kernels); here every size bucket x batch size gets its own.
    - Inputs are made steady outside the compiled region (:func:`_steady_inputs`): the
      sample contiguous, timesteps float32 tensors. Euler-type schedulers give float
      timesteps, DDIM, PNDM, DPM++ and UniPC int64 ones, and a dtype change fails dynamo's
      guards, so swapping the scheduler recompiled. The UNet's ``Timesteps`` projection casts
      to float32 first thing, so this changes no number.
    - The recompile limit is raised to the number of shapes warmed up, so no shape falls
      back to eager.

    Inductor options are those of diffusers' "accelerate inference of text-to-image diffusion
    models" guide. ``profile.compile_backend`` other than ``inductor`` (tests use ``eager``)
    keeps dynamo's tracing and guards but skips code generation.
    """
    import torch._dynamo.config

    if profile.compile_backend == "inductor":
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True
        inductor.coordinate_descent_tuning = True
        inductor.epilogue_fusion = False
        inductor.coordinate_descent_check_all_directions = True
        options: dict[str, Any] = {"mode": profile.compile_mode}
    else:
        options = {"backend": profile.compile_backend}
    shapes = 2 * max(1, len(profile.warmup_sizes)) * len(profile.batch_buckets())
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 4 * shapes))
    unet = denoiser(pipe)
    compiled = torch.compile(unet.forward, fullgraph=True, dynamic=False, **options)
    unet.forward = unet.renderfarm_forward = (
        _steady_inputs(compiled) if _has_unet(pipe) else compiled)
    unet.renderfarm_compiled = compiled  # how a test (or a log line) tells it is compiled


def _steady_inputs(forward: Any) -> Any:
    """Wrap a UNet ``forward(sample, timestep, ...)`` so its inputs always look the same to
    dynamo's guards: the timestep a float32 tensor on the sample's device whatever the
    scheduler made it, the sample contiguous (img2img's latents come out of the VAE with the
    image's NHWC strides, which would fail a stride guard)."""

    def call(sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        if not (torch.is_tensor(timestep) and timestep.dtype == torch.float32
                and timestep.device == sample.device):  # a CPU input would cost CUDA graphs
            timestep = torch.as_tensor(timestep, device=sample.device).to(torch.float32)
        return forward(sample.contiguous(), timestep, *args, **kwargs)

    return call
