"""The producer side: submit jobs to the farm from Python."""

from producer.client import BatchHandle, FarmClient, JobHandle

__all__ = ["FarmClient", "JobHandle", "BatchHandle"]
