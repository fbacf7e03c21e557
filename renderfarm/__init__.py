"""renderfarm: a render farm for Stable Diffusion. ``from renderfarm import FarmClient``.

The names below are imported on first use (PEP 562), so ``import renderfarm`` stays cheap and
imports neither Celery (``celery -A renderfarm`` finds ``renderfarm.celery`` itself) nor
anything of the worker or the dashboard.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FarmClient", "BatchHandle", "JobHandle", "JobRequest", "Settings"]


def __getattr__(name: str) -> Any:
    if name in ("FarmClient", "BatchHandle", "JobHandle"):
        import producer.client

        return getattr(producer.client, name)
    if name == "JobRequest":
        from renderfarm.schema import JobRequest

        return JobRequest
    if name == "Settings":
        from renderfarm.settings import Settings

        return Settings
    raise AttributeError(f"module 'renderfarm' has no attribute {name!r}")
