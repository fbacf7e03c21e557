"""How much memory a worker's device has, and how much a pipeline call may still use.

``device_memory`` is what the heartbeat shows (total and free, as the driver or the kernel
counts them). ``available_memory`` is what sizes a micro-batch
(:meth:`worker.pipelines.PipelineCache.call_size`): on CUDA the driver's free memory plus what
PyTorch's caching allocator holds but does not use (it hands that out again before asking the
driver), on the CPU the kernel's ``MemAvailable`` (free memory plus the page cache it can drop).
"""

from __future__ import annotations

import os
from pathlib import Path

MEMINFO = Path("/proc/meminfo")


def device_memory(device: str) -> tuple[int | None, int | None]:
    """``(total, free)`` bytes of ``device``; ``None`` where they cannot be read. Off CUDA,
    the system's memory (MPS shares it)."""
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        return total, free
    try:
        size = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * size, os.sysconf("SC_AVPHYS_PAGES") * size
    except (ValueError, OSError):
        return None, None


def available_memory(device: str) -> int | None:
    """Bytes a pipeline call on ``device`` can take now; ``None`` where it cannot be told
    (MPS shares memory with the system and reports no budget)."""
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    if device != "cpu":
        return None
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    return device_memory(device)[1]
