"""Render one job: its request in, its PIL images out, with progress per denoising step.

Seeds: image ``k`` of a job is rendered with seed ``seed + k`` from its own ``torch.Generator``
on the CPU, so it is the image that seed gives alone, in any batch, and the starting noise of
a seed is the same on every device (CPU noise is moved to the GPU). Images of one job go
through the pipeline together, ``profile.max_batch`` at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import PIL.Image
import torch

from renderfarm.images import decode_init_image
from renderfarm.schema import JobRequest, Mode
from worker.pipelines import PipelineCache, set_scheduler


def render(
    cache: PipelineCache,
    request: JobRequest,
    on_step: Callable[[int, int], None] | None = None,
) -> list[PIL.Image.Image]:
    """Render ``request`` and return ``request.num_images`` images of width x height.

    ``on_step(done, total)`` is called after every denoising step; ``total`` counts the steps
    actually run: img2img runs about ``steps * strength``; Heun makes two model calls a step
    and PNDM one more than ``steps``.
    An exception raised by ``on_step`` (``renderfarm.errors.Cancelled``) stops the render at
    that step and propagates.
    """
    # 1. Check the request against what this worker can do
    if request.seed is None:
        raise ValueError("seed must be set before a job is rendered, got None")
    profile = cache.profile
    pixels = request.width * request.height
    if pixels > profile.max_pixels:
        raise ValueError(
            f"width x height is {request.width}x{request.height} = {pixels} pixels, over the "
            f"{profile.max_pixels} this worker's {profile.name!r} profile takes"
        )
    if request.mode is Mode.img2img and int(request.steps * request.strength) < 1:
        raise ValueError(
            f"strength {request.strength} of {request.steps} steps runs no denoising step; "
            "raise strength or steps"
        )

    # 2. The pipeline, with the job's scheduler
    pipe = cache.get(request.model, request.mode)
    set_scheduler(pipe, request.scheduler)

    # 3. Arguments shared by every call
    kwargs = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt or None,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "output_type": "pil",
    }
    if request.mode is Mode.img2img:
        init = decode_init_image(request.init_image).resize(
            (request.width, request.height), PIL.Image.Resampling.LANCZOS
        )
        kwargs.update(image=init, strength=request.strength)
    else:
        kwargs.update(width=request.width, height=request.height)

    # 4. Render, max_batch images per call, one CPU generator per image
    seeds = request.seeds()
    chunks = [seeds[i : i + profile.max_batch] for i in range(0, len(seeds), profile.max_batch)]
    images: list[PIL.Image.Image] = []
    for index, chunk in enumerate(chunks):
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in chunk]

        def step_end(p, i, t, callback_kwargs, index=index):
            if on_step is not None:
                per_call = p.num_timesteps
                on_step(index * per_call + i + 1, per_call * len(chunks))
            return callback_kwargs

        try:
            with torch.inference_mode():
                out = pipe(
                    **kwargs,
                    num_images_per_prompt=len(chunk),
                    generator=generators,
                    callback_on_step_end=step_end,
                )
        except BaseException:
            pipe.maybe_free_model_hooks()  # with CPU offload, put the models back
            raise
        images.extend(out.images)

    # 5. Check what came out
    for image in images:
        if image.size != (request.width, request.height):
            raise RuntimeError(
                f"pipeline returned a {image.size[0]}x{image.size[1]} image for a "
                f"{request.width}x{request.height} job"
            )
    return images
