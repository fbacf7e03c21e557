"""Which jobs may share one pipeline call: :func:`compat_key`, without torch.

Jobs with equal keys render together in :func:`worker.render.render_batch`: each image keeps its
own prompt, negative prompt and seed, so only what the pipeline takes once per call has to
match. The producer imports this module to group jobs, so it must not import torch or diffusers.
"""

from __future__ import annotations

from uuid import uuid4

from renderfarm.schema import JobRequest, Mode

#: The request fields that must be equal for two jobs to share a pipeline call.
COMPAT_FIELDS = ("model", "mode", "width", "height", "steps", "scheduler", "guidance_scale",
                 "loras")


def lora_set(request: JobRequest) -> tuple[tuple[str, float], ...]:
    """The job's LoRAs as sorted ``(name, weight)`` pairs: jobs with equal sets share a
    pipeline call (the adapters are set once per call), whatever order they named them in."""
    return tuple(sorted((lora.name, float(lora.weight) + 0.0) for lora in request.loras))


def compat_key(request: JobRequest, job_id: str | None = None) -> str:
    """A stable string naming what a txt2img job shares with the jobs it can be batched with,
    e.g. ``"txt2img:sd15:512x512:25:euler_a:7.0"``, with ``":lora=ink@0.8,sketch@1.0"``
    appended for a job with LoRAs (``LORA_NAME_PATTERN`` allows no ``:``, ``,`` or ``@`` in a
    name, so the parts cannot run together).

    img2img jobs are never batched (each has its own init image and strength): their key is
    ``"img2img:<job_id>"``, or ``"img2img:<random>"`` without a job id, equal to no other key.
    """
    if request.mode is not Mode.txt2img:
        return f"{request.mode.value}:{job_id or uuid4().hex}"
    # Model names cannot hold ":" (MODEL_NAME_PATTERN), so the fields cannot run together.
    key = (
        f"txt2img:{request.model}:{request.width}x{request.height}:{request.steps}:"
        f"{request.scheduler}:{float(request.guidance_scale)!r}"
    )
    if request.loras:
        key += ":lora=" + ",".join(f"{name}@{weight!r}" for name, weight in lora_set(request))
    return key


def incompatibilities(first: JobRequest, other: JobRequest) -> list[str]:
    """The fields of :data:`COMPAT_FIELDS` where ``other`` differs from ``first``, as
    ``"width 64 != 96"``; empty when they can share a pipeline call."""
    if other.mode is not Mode.txt2img or first.mode is not Mode.txt2img:
        return ["mode img2img is never batched"]
    differences = [
        f"{name} {getattr(first, name)!r} != {getattr(other, name)!r}"
        for name in COMPAT_FIELDS
        if name != "loras" and getattr(first, name) != getattr(other, name)
    ]
    if lora_set(first) != lora_set(other):
        differences.append(f"loras {lora_set(first)!r} != {lora_set(other)!r}")
    return differences
