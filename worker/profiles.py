"""Hardware profiles: which device and dtype a worker renders with, and what it can take.

``detect_profile()`` picks one for the machine it runs on; a worker can also be told which
(``detect_profile("cpu")``). Asking for hardware the machine lacks is an error, never a
silent fallback to something slower.

The ``gpu`` profile is the fast path: fp16, PyTorch SDPA attention, channels_last UNet and VAE,
the VAE decoding on the GPU (never offloaded), and with ``RENDERFARM_COMPILE=1`` a
``torch.compile``d UNet warmed up at worker start for each size in ``warmup_sizes`` and each
batch size in :meth:`Profile.batch_buckets` (``RENDERFARM_COMPILE_MODE`` picks the mode,
``RENDERFARM_WARMUP_SIZES`` the sizes: :func:`apply_settings`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from renderfarm.settings import Settings

PROFILE_NAMES = ("gpu", "cpu", "jetson", "mps")
JETSON_RELEASE_FILE = Path("/etc/nv_tegra_release")
# A Jetson with less free memory than this offloads idle models to the CPU side.
JETSON_OFFLOAD_BELOW_BYTES = 12 * 2**30
# A CUDA GPU with less memory than this gets the smaller limits.
SMALL_GPU_BYTES = 16 * 2**30
# Peak memory per output pixel of a pipeline call (see Profile.bytes_per_pixel).
FP16_BYTES_PER_PIXEL = 4096
FP32_BYTES_PER_PIXEL = 8192


@dataclass(frozen=True)
class Profile:
    """How a worker renders. ``max_pixels`` bounds width * height, ``max_batch`` the images
    per pipeline call (a job with more images is rendered in several calls).

    ``sdpa``: PyTorch's scaled-dot-product attention (``AttnProcessor2_0``), set explicitly;
    ``attention_slicing`` replaces it. ``channels_last``: UNet and VAE weights in NHWC, which
    tensor-core convolutions want. ``compile``: ``torch.compile`` the UNet with
    ``compile_mode`` (``compile_backend`` other than ``inductor`` only traces: for tests);
    it compiles once per shape, so :meth:`PipelineCache.warmup` renders each
    of ``warmup_sizes`` at each of :meth:`batch_buckets` at worker start, and a pipeline call is
    padded up to a bucket (``worker.pipelines.PipelineCache.batch_size_for``).

    ``bytes_per_pixel``: the device memory one output pixel of a pipeline call takes at the
    call's peak, beyond the weights (UNet activations for the image and its unconditional
    twin, the VAE decode). A call renders at most ``max_batch`` images and no more than the
    device's available memory holds at this rate
    (:meth:`worker.pipelines.PipelineCache.call_size`), so B follows the free memory and the
    image size. The figures are estimates (about 1 GiB per 512x512 image in fp16, twice that
    in float32) erring on the side of smaller batches.
    """

    name: str  # "gpu" | "cpu" | "jetson" | "mps"
    device: str  # "cuda" | "cpu" | "mps"
    dtype: torch.dtype
    vae_slicing: bool = False
    vae_tiling: bool = False
    attention_slicing: bool = False
    cpu_offload: bool = False
    max_pixels: int = 1024 * 1024
    max_batch: int = 4
    sdpa: bool = True
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "max-autotune"
    compile_backend: str = "inductor"
    warmup_sizes: tuple[tuple[int, int], ...] = ()
    bytes_per_pixel: int = 8192

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch!r}")
        if self.bytes_per_pixel < 1:
            raise ValueError(f"bytes_per_pixel must be at least 1, got {self.bytes_per_pixel!r}")
        if self.compile and self.cpu_offload:
            raise ValueError("compile and cpu_offload cannot be combined: offload hooks move "
                             "the UNet between devices under the compiled graph")

    def batch_buckets(self) -> tuple[int, ...]:
        """Batch sizes a compiled UNet is warmed up for: powers of two up to ``max_batch``,
        and ``max_batch``."""
        sizes = {self.max_batch}
        size = 1
        while size < self.max_batch:
            sizes.add(size)
            size *= 2
        return tuple(sorted(sizes))


def detect_profile(name: str = "auto") -> Profile:
    """The profile ``name``, or for ``"auto"`` the best this machine has:
    jetson (``/etc/nv_tegra_release`` and CUDA), then gpu (CUDA), then mps, then cpu.

    Raises ``RuntimeError`` when the named hardware is missing and ``ValueError`` for an
    unknown name.
    """
    if name == "auto":
        if JETSON_RELEASE_FILE.exists() and torch.cuda.is_available():
            return _jetson()
        if torch.cuda.is_available():
            return _gpu()
        if _mps_available():
            return _mps()
        return _cpu()
    if name not in PROFILE_NAMES:
        raise ValueError(f"profile must be one of auto, {', '.join(PROFILE_NAMES)}, got {name!r}")
    if name in ("gpu", "jetson") and not torch.cuda.is_available():
        raise RuntimeError(
            f"profile {name!r} needs CUDA, but torch {torch.__version__} sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    if name == "mps" and not _mps_available():
        raise RuntimeError(f"profile 'mps' needs Apple MPS, which torch {torch.__version__} lacks")
    return {"gpu": _gpu, "jetson": _jetson, "mps": _mps, "cpu": _cpu}[name]()


def apply_settings(profile: Profile, settings: Settings) -> Profile:
    """``profile`` with the farm's settings over it: ``max_batch`` when set; on the ``gpu``
    profile ``compile``, ``compile_mode`` and ``warmup_sizes`` (the others never compile: on a
    CPU compiling costs more than it saves, and Jetson and MPS are left eager)."""
    changes: dict = {}
    if settings.max_batch is not None:
        changes["max_batch"] = settings.max_batch
    if profile.name == "gpu":
        changes |= {"compile": settings.compile, "compile_mode": settings.compile_mode,
                    "warmup_sizes": settings.warmup_size_list}
    return dataclasses.replace(profile, **changes)


def _cpu() -> Profile:
    return Profile("cpu", "cpu", torch.float32, max_pixels=1024 * 1024, max_batch=4,
                   bytes_per_pixel=FP32_BYTES_PER_PIXEL)


def _gpu() -> Profile:
    total = torch.cuda.get_device_properties(0).total_memory
    # The VAE stays on the GPU: no cpu_offload here. Never offload on this profile.
    # torch.compile is off, and its warm-up sizes unset, unless the farm's settings say
    # otherwise (apply_settings; RENDERFARM_WARMUP_SIZES defaults to 512x512,768x768).
    fast = {"sdpa": True, "channels_last": True, "bytes_per_pixel": FP16_BYTES_PER_PIXEL}
    if total < SMALL_GPU_BYTES:  # decoding a large image whole would not fit
        return Profile(
            "gpu",
            "cuda",
            torch.float16,
            vae_slicing=True,
            vae_tiling=True,
            max_pixels=1024 * 1024,
            max_batch=4,
            **fast,
        )
    return Profile("gpu", "cuda", torch.float16, max_pixels=2048 * 2048, max_batch=8, **fast)


def _jetson() -> Profile:
    free, _total = torch.cuda.mem_get_info()
    offload = free < JETSON_OFFLOAD_BELOW_BYTES
    return Profile(
        "jetson",
        "cuda",
        torch.float16,
        vae_slicing=True,
        vae_tiling=True,
        attention_slicing=not offload,
        cpu_offload=offload,
        max_pixels=768 * 768,
        max_batch=2,
        channels_last=True,
        bytes_per_pixel=FP16_BYTES_PER_PIXEL,
    )


def _mps() -> Profile:
    return Profile(
        "mps", "mps", torch.float16, attention_slicing=True, max_pixels=1024 * 1024, max_batch=4,
        bytes_per_pixel=FP16_BYTES_PER_PIXEL,
    )


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())
