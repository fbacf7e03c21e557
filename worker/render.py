"""Render jobs: requests in, PIL images out, with progress per denoising step.

Seeds: image ``k`` of a job is rendered with seed ``seed + k`` from its own ``torch.Generator``
on the CPU, so it is the image that seed gives alone, in any batch, and the starting noise of
a seed is the same on every device (CPU noise is moved to the GPU).

:func:`render_batch` renders several compatible txt2img jobs (equal
:func:`worker.compat.compat_key`) in shared pipeline calls of at most
:meth:`~worker.pipelines.PipelineCache.call_size` images (``profile.max_batch``, fewer where the
device's free memory would not hold them at that size), each image with its own prompt,
negative prompt and generator; :func:`render` renders one job (txt2img through
:func:`render_batch`, img2img on its own).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import PIL.Image
import torch

from renderfarm.images import decode_init_image
from renderfarm.schema import JobRequest, Mode
from worker.compat import compat_key, incompatibilities, lora_set
from worker.families import Family, job_errors
from worker.pipelines import PipelineCache, set_scheduler

__all__ = ["compat_key", "render", "render_batch"]

OnStep = Callable[[int, int], None]
#: ``on_latents(latents, owners)`` after each step: the call's latents (one row per image, not
#: doubled by CFG) and, per row, the index of its job in the request list (worker/previews.py).
OnLatents = Callable[[torch.Tensor, list[int]], None]


def render(
    cache: PipelineCache, request: JobRequest, on_step: OnStep | None = None,
    on_latents: OnLatents | None = None,
) -> list[PIL.Image.Image]:
    """Render ``request`` and return ``request.num_images`` images of width x height.

    ``on_step(done, total)`` is called after every denoising step; ``total`` counts the steps
    actually run: img2img runs about ``steps * strength``; Heun makes two model calls a step
    and PNDM one more than ``steps``.
    An exception raised by ``on_step`` (``renderfarm.errors.Cancelled``) stops the render at
    that step and propagates.
    """
    if request.mode is Mode.txt2img:
        return render_batch(cache, [request], on_step, on_latents)[0]

    # 1. Check the request against what this worker and the model's family can do
    family = _check(request, cache)
    if int(request.steps * request.strength) < 1:
        raise ValueError(
            f"strength {request.strength} of {request.steps} steps runs no denoising step; "
            "raise strength or steps"
        )

    # 2. The pipeline, with the job's scheduler
    pipe = cache.get(request.model, request.mode)
    set_scheduler(pipe, request.scheduler)
    cache.use_loras(request.model, lora_set(request))

    # 3. Arguments shared by every call
    init = decode_init_image(request.init_image).resize(
        (request.width, request.height), PIL.Image.Resampling.LANCZOS
    )
    kwargs = {
        "prompt": request.prompt,
        **({"negative_prompt": request.negative_prompt or None} if family.negative_prompt else {}),
        "image": init,
        # Flux's img2img renders at its default size unless told; SD's takes the image's.
        **({"width": request.width, "height": request.height}
           if _takes(pipe, "width") else {}),
        "strength": request.strength,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
    }

    # 4. Render, call_size images per call, one CPU generator per image, padded to a
    #    compiled batch size if need be (the extra images are thrown away)
    size = cache.call_size(request.width, request.height, request.model)
    chunks = _chunks(request.seeds(), size)
    images: list[PIL.Image.Image] = []
    for index, chunk in enumerate(chunks):
        padded = _padded(chunk, cache)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in padded]
        images += _call(
            pipe, kwargs | {"num_images_per_prompt": len(padded), "generator": generators},
            on_step, index, len(chunks), on_latents, [0] * len(padded),
        )[: len(chunk)]

    # 5. Check what came out
    _check_sizes(images, request)
    return images


def render_batch(
    cache: PipelineCache, requests: list[JobRequest], on_step: OnStep | None = None,
    on_latents: OnLatents | None = None,
) -> list[list[PIL.Image.Image]]:
    """Render compatible txt2img jobs together; return each job's images, in request order.

    The jobs must have equal :func:`compat_key` (model, mode, size, steps, scheduler,
    guidance, LoRA set and weights), else ``ValueError``. Their images go through the pipeline
    ``profile.max_batch`` at a time, image ``k`` of a job with its own prompt, negative prompt
    and a CPU generator seeded ``seed + k``, so each image equals the one :func:`render` gives
    for its job alone (within floating-point tolerance: batched kernels may sum in another
    order).

    ``on_step(done, total)`` counts steps over all the calls, as in :func:`render`; an
    exception it raises stops every job of the batch.
    """
    # 1. Check the requests: each against this worker, all against the first
    if not requests:
        return []
    first = requests[0]
    for index, request in enumerate(requests):
        if request.mode is not Mode.txt2img:
            raise ValueError(
                f"requests[{index}] has mode {request.mode.value!r}: only txt2img jobs are "
                "batched; render img2img jobs one at a time with render()"
            )
        differences = incompatibilities(first, request)
        if differences:
            raise ValueError(
                f"requests[{index}] cannot share a pipeline call with requests[0]: "
                + ", ".join(differences)
            )
        family = _check(request, cache)  # one model: one family for all

    # 2. The pipeline, with the jobs' scheduler
    pipe = cache.get(first.model, Mode.txt2img)
    set_scheduler(pipe, first.scheduler)
    cache.use_loras(first.model, lora_set(first))

    # 3. One entry per image: (job index, prompt, negative prompt, seed)
    entries = [
        (j, request.prompt, request.negative_prompt, seed)
        for j, request in enumerate(requests)
        for seed in request.seeds()
    ]
    kwargs = {
        "width": first.width,
        "height": first.height,
        "num_inference_steps": first.steps,
        "guidance_scale": first.guidance_scale,
        "num_images_per_prompt": 1,
    }

    # 4. Render, call_size images per call, padded to a compiled batch size if need be.
    #    SDXL (force_zeros_for_empty_prompt) conditions an image without a negative prompt on
    #    zeros, but on the encoded "" once any image of the call has one: such images go in
    #    calls of their own, so each renders as it does alone.
    size = cache.call_size(first.width, first.height, first.model)
    groups = [entries]
    if getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        groups = [[e for e in entries if not e[2]], [e for e in entries if e[2]]]
    chunks = [chunk for group in groups for chunk in _chunks(group, size)]
    out: list[list[PIL.Image.Image]] = [[] for _ in requests]
    for index, chunk in enumerate(chunks):
        padded = _padded(chunk, cache)  # the extra images are thrown away
        negatives = [negative for _, _, negative, _ in padded]
        call = kwargs | {
            "prompt": [prompt for _, prompt, _, _ in padded],
            "generator": [torch.Generator("cpu").manual_seed(s) for *_, s in padded],
        }
        if family.negative_prompt:
            # "" is what diffusers uses for None; None skips building the list.
            call["negative_prompt"] = negatives if any(negatives) else None
        images = _call(pipe, call, on_step, index, len(chunks), on_latents,
                       [j for j, *_ in padded])
        for (j, *_), image in zip(chunk, images, strict=False):
            out[j].append(image)

    # 5. Check what came out
    for request, images in zip(requests, out, strict=True):
        _check_sizes(images, request)
    return out


def _check(request: JobRequest, cache: PipelineCache) -> Family:
    """Raise ``ValueError`` where this worker or the model's family cannot render
    ``request`` (the producer refuses most such jobs at submit; a job enqueued some other way
    fails here with the same reasons); return the family."""
    if request.seed is None:
        raise ValueError("seed must be set before a job is rendered, got None")
    profile = cache.profile
    pixels = request.width * request.height
    if pixels > profile.max_pixels:
        raise ValueError(
            f"width x height is {request.width}x{request.height} = {pixels} pixels, over the "
            f"{profile.max_pixels} this worker's {profile.name!r} profile takes"
        )
    family = cache.family(request.model)
    errors = job_errors(request, family)
    if errors:
        raise ValueError("; ".join(str(e) for e in errors))
    return family


def _takes(pipe, argument: str) -> bool:
    """Whether the pipeline's ``__call__`` has parameter ``argument``."""
    return argument in inspect.signature(type(pipe).__call__).parameters


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _padded(chunk: list, cache: PipelineCache) -> list:
    """``chunk`` with its last item repeated up to the batch size a pipeline call runs at
    (:meth:`PipelineCache.batch_size_for`: a compiled UNet's warmed size)."""
    return chunk + [chunk[-1]] * (cache.batch_size_for(len(chunk)) - len(chunk))


def _call(pipe, kwargs: dict, on_step: OnStep | None, index: int, calls: int,
          on_latents: OnLatents | None = None, owners: list[int] | None = None):
    """One pipeline call, reporting its steps as call ``index`` of ``calls``, and its latents
    (rows owned by the jobs ``owners``) to ``on_latents``."""

    def step_end(p, i, t, callback_kwargs):
        if on_latents is not None and "latents" in callback_kwargs:
            on_latents(callback_kwargs["latents"], owners or [])
        if on_step is not None:
            per_call = p.num_timesteps
            on_step(index * per_call + i + 1, per_call * calls)
        return callback_kwargs

    try:
        with torch.inference_mode():
            return pipe(**kwargs, output_type="pil", callback_on_step_end=step_end).images
    except BaseException:
        pipe.maybe_free_model_hooks()  # with CPU offload, put the models back
        raise


def _check_sizes(images: list[PIL.Image.Image], request: JobRequest) -> None:
    if len(images) != request.num_images:
        raise RuntimeError(f"pipeline returned {len(images)} images for a job of "
                           f"{request.num_images}")
    for image in images:
        if image.size != (request.width, request.height):
            raise RuntimeError(
                f"pipeline returned a {image.size[0]}x{image.size[1]} image for a "
                f"{request.width}x{request.height} job"
            )
