"""The fleet as its heartbeats describe it: who is alive, and who can run a job.

Each worker writes ``rf:worker:<id>`` every ``HEARTBEAT_INTERVAL`` seconds (worker/service.py).
A worker that missed ``LOST_AFTER_BEATS`` beats is *lost*: shown as such, not dropped, and the
jobs it held come back through their expired leases (renderfarm/records.py).
"""

from __future__ import annotations

import json
import time

from pydantic import BaseModel, Field
from redis import Redis

from renderfarm import keys
from renderfarm.errors import FieldError
from renderfarm.schema import JobRequest

HEARTBEAT_INTERVAL = 2.0
LOST_AFTER_BEATS = 3


class WorkerInfo(BaseModel):
    id: str
    host: str = ""
    hardware: str = "cpu"
    device: str = ""
    device_name: str = ""
    memory_total: int | None = None
    memory_free: int | None = None
    max_pixels: int = 0
    max_batch: int = 1
    models: list[str] = Field(default_factory=list)
    families: dict[str, str] = Field(default_factory=dict, description="model -> family")
    hashes: dict[str, str] = Field(default_factory=dict,
                                   description="model -> SHA-256 (those hashed so far)")
    loaded: list[str] = Field(default_factory=list)
    loras: dict[str, str] = Field(default_factory=dict, description="LoRA -> model family")
    loaded_loras: dict[str, list[str]] = Field(default_factory=dict,
                                               description="model -> LoRAs loaded into it")
    speeds: dict[str, float] = Field(default_factory=dict, description="model@WxH -> it/s")
    status: str = Field("ready", description="starting (loading, warming up) or ready")
    current_job: str = ""
    step: int = 0
    jobs_done: int = 0
    loads: int = 0
    lora_loads: int = 0
    beat: float = 0.0

    @property
    def lost(self) -> bool:
        return time.time() - self.beat > HEARTBEAT_INTERVAL * LOST_AFTER_BEATS

    def can_run(self, request: JobRequest) -> bool:
        return (
            request.hardware in ("any", self.hardware)
            and request.model in self.models
            and request.width * request.height <= self.max_pixels
            and all(lora.name in self.loras for lora in request.loras)
        )


_JSON_FIELDS = {"models", "families", "hashes", "loaded", "speeds", "loras", "loaded_loras"}


def read_workers(redis: Redis, include_lost: bool = True) -> list[WorkerInfo]:
    """Every worker that beat in the last 5 minutes, lost ones included unless asked not to."""
    ids = redis.zrangebyscore(keys.WORKERS, time.time() - 300, "+inf")
    pipe = redis.pipeline(transaction=False)
    for worker_id in ids:
        pipe.hgetall(keys.worker(worker_id.decode()))
    out = []
    for data in pipe.execute():
        if not data:
            continue
        fields = {k.decode(): v.decode() for k, v in data.items()}
        for name in _JSON_FIELDS & fields.keys():
            fields[name] = json.loads(fields[name])
        info = WorkerInfo.model_validate({k: v for k, v in fields.items() if v != ""})
        if include_lost or not info.lost:
            out.append(info)
    return sorted(out, key=lambda w: w.id)


def live_workers(redis: Redis) -> list[WorkerInfo]:
    return read_workers(redis, include_lost=False)


def capability_errors(
    requests: list[JobRequest], workers: list[WorkerInfo], limit: int = 20
) -> list[FieldError]:
    """Why no live worker could run a job, per job. With no live worker at all, jobs are
    accepted and wait in their queue (a farm may be starting): the queues page shows them."""
    if not workers:
        return []
    errors: list[FieldError] = []
    seen: set[tuple[str, object]] = set()
    classes = sorted({w.hardware for w in workers})
    for index, request in enumerate(requests):
        if any(w.can_run(request) for w in workers):
            continue
        of_class = [w for w in workers if request.hardware in ("any", w.hardware)]
        with_model = [w for w in of_class if request.model in w.models]
        fits = [w for w in with_model if request.width * request.height <= w.max_pixels]
        missing = [(i, lora.name) for i, lora in enumerate(request.loras)
                   if not any(lora.name in w.loras for w in fits)]
        if not of_class:
            err = FieldError("hardware", f"has no live worker (live classes: {', '.join(classes)})",
                             request.hardware, index)
        elif not with_model:
            err = FieldError("model", f"is on no live worker of hardware {request.hardware!r}",
                             request.model, index)
        elif fits and missing:  # like an unknown model: no worker that could run it has it
            i, name = missing[0]
            err = FieldError(f"loras.{i}.name", f"is a LoRA on no live worker with model "
                             f"{request.model!r}", name, index)
        elif fits:
            err = FieldError("loras", f"are on no one live worker with model {request.model!r} "
                             "all together", [lora.name for lora in request.loras], index)
        else:
            largest = max(w.max_pixels for w in with_model)
            err = FieldError("width", f"x height {request.width}x{request.height} is over every "
                             f"capable worker's limit of {largest} pixels", request.width, index)
        if (err.field, err.value) not in seen:
            seen.add((err.field, err.value))
            errors.append(err)
        if len(errors) >= limit:
            break
    return errors
