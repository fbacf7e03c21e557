"""``FarmClient``: submit jobs and batches to the farm, follow them, fetch their images.

The producer side imports no torch or diffusers: it runs on a laptop with no GPU stack.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from producer.enqueue import drop_dead_messages, publish_records, queue_for, send
from renderfarm import keys
from renderfarm.connection import celery_app, connect
from renderfarm.errors import FarmUnavailable, FieldError, InvalidJob, JobFailed
from renderfarm.fleet import capability_errors, live_workers, read_workers
from renderfarm.plotrecords import PlotRecords
from renderfarm.plots import Plot, parse_plot, varied_fields
from renderfarm.records import Records
from renderfarm.schema import (
    MAX_LABEL,
    MAX_SEED,
    BatchRecord,
    ImageResult,
    JobRecord,
    JobRequest,
    parse_batch_id,
    parse_job,
    updated,
)
from renderfarm.settings import Settings
from worker.compat import compat_key
from worker.families import FAMILIES, job_errors, model_families, with_family_defaults
from worker.lorafiles import lora_errors, loras_with_family
from worker.modelfiles import list_models

IDEMPOTENCY_TTL = 7 * 24 * 3600
#: Cancelling at least this many queued jobs at once also removes their queued messages (one
#: pass over each queue); fewer dead messages cost a worker next to nothing to drop.
DROP_MESSAGES_AT = 50


@dataclass(frozen=True)
class Submitted:
    batch_id: str
    job_ids: list[str]  #: per request, in order: its job (the first one's, for a repeated key)
    replay: bool  #: every job had been submitted before with its idempotency key


def new_id() -> str:
    return uuid.uuid4().hex[:16]


class FarmClient:
    """A connection to one farm. ``FarmClient()`` reads ``RENDERFARM_*`` from the environment."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()

    @cached_property
    def redis(self) -> Redis:
        return connect(self.settings)

    @cached_property
    def records(self) -> Records:
        return Records(self.redis)

    @cached_property
    def celery(self):
        return celery_app(self.settings)

    @cached_property
    def storage(self):
        from storage import open_storage

        return open_storage(self.settings)

    # -- submitting -------------------------------------------------------------------------
    def models(self) -> list[str]:
        """Models the farm knows: those workers advertise, and those in the models dir."""
        advertised = {m.decode() for m in self.redis.hkeys(keys.MODELS)}
        return sorted(advertised | set(list_models(self.settings.models_path)))

    def loras(self) -> dict[str, str]:
        """LoRAs the farm knows, with their model family: those workers advertise, and those
        in the models dir's ``loras/`` folder."""
        advertised = {k.decode(): v.decode() for k, v in self.redis.hgetall(keys.LORAS).items()}
        return dict(sorted((advertised | loras_with_family(self.settings.models_path)).items()))

    def model_families(self) -> dict[str, str]:
        """Model -> family name (``sd15``, ``sdxl``, ``flux``: :mod:`worker.families`) as the
        workers' heartbeats tell it, and for the models dir as read here (without torch: a
        ``.ckpt`` whose family only a worker can read is left out until one advertises it)."""
        families = model_families(self.settings.models_path)
        for worker in sorted(read_workers(self.redis), key=lambda w: w.beat):  # newest wins
            families.update(worker.families)
        return dict(sorted(families.items()))

    def model_details(self) -> dict[str, dict]:
        """Model -> ``{"sha256", "model_hash", "workers"}`` for every model of :meth:`models`.

        ``sha256`` comes from the live workers' heartbeats (each hashes its own files once,
        worker/hashes.py), else from the models dir's hash cache (no weights are read here);
        None until some worker has hashed the model. ``model_hash`` is A1111's ``Model hash``
        (its first 10 hex digits); ``workers`` counts the live workers that have the model.
        Where workers hold different files under one name, ``sha256`` is the one most of them
        have and ``other_sha256`` lists the rest."""
        from collections import Counter

        from worker.hashes import hash_cache

        workers = live_workers(self.redis)
        local = list_models(self.settings.models_path)
        cache = hash_cache(self.settings.models_path) if local else None
        out: dict[str, dict] = {}
        for name in self.models():
            seen = Counter(w.hashes[name] for w in workers if name in w.hashes)
            if not seen and cache is not None and name in local:
                if digest := cache.cached_model_sha256(local[name]):
                    seen[digest] = 0
            ranked = [digest for digest, _ in seen.most_common()]
            sha256 = ranked[0] if ranked else None
            out[name] = {"sha256": sha256, "model_hash": sha256[:10] if sha256 else None,
                         "workers": sum(name in w.models for w in workers)}
            if len(ranked) > 1:
                out[name]["other_sha256"] = ranked[1:]
        return out

    def inventory(self) -> dict[str, dict]:
        """What the farm can render, for people (``renderfarm models``, the dashboard's Models
        page): ``{"models": {name: {family, sha256, model_hash, worker_ids, loras}},
        "loras": {name: {family, worker_ids}}}``. A model's ``loras`` are the LoRAs of its
        family, each with the live workers that have it; ``worker_ids`` are live workers."""
        families = self.model_families()
        details = self.model_details()
        loras = self.loras()  # name -> family
        live = live_workers(self.redis)
        lora_holders = {name: [w.id for w in live if name in w.loras] for name in loras}
        models = {
            name: {**info, "family": families.get(name),
                   "worker_ids": [w.id for w in live if name in w.models],
                   "loras": {n: lora_holders[n] for n, family in loras.items()
                             if family == families.get(name)}}
            for name, info in details.items()}
        return {"models": models,
                "loras": {name: {"family": family, "worker_ids": lora_holders[name]}
                          for name, family in loras.items()}}

    def validate(self, jobs: Iterable[JobRequest | dict]) -> list[JobRequest]:
        """Check every job; raise :class:`InvalidJob` naming each bad field. Enqueues nothing.

        A job whose model's family is known gets that family's default size and scheduler
        where it left them unset, and is refused where a field makes no sense for the family
        (:func:`worker.families.job_errors`)."""
        known = families = loras = None
        out, errors, positions = [], [], []
        for index, job in enumerate(jobs):
            if isinstance(job, dict) and "model" not in job:
                job = {**job, "model": self.settings.default_model}
            try:
                request = parse_job(job, index)
            except InvalidJob as exc:
                errors.extend(exc.errors)
                continue
            if known is None:
                known = set(self.models())
            if request.model not in known:
                names = ", ".join(sorted(known)) or "none"
                errors.append(FieldError(
                    "model", f"is not a model the farm has (known: {names})", request.model, index
                ))
            else:
                if families is None:
                    families = self.model_families()
                family = FAMILIES.get(families.get(request.model, ""))
                if family is not None:  # else a family this client does not know: no checks
                    request = with_family_defaults(request, family)
                    errors.extend(job_errors(request, family, index))
            if request.loras:
                if loras is None:
                    loras = self.loras()
                if families is None:
                    families = self.model_families()
                errors.extend(lora_errors(request, loras, families.get(request.model), index))
            out.append(request)
            positions.append(index)
        hooks: dict[str, FieldError | None] = {}  # each URL resolved once per call
        for index, request in zip(positions, out, strict=True):
            url = request.webhook_url
            if url is not None and url not in hooks:
                try:
                    self._check_webhook(url, index)
                    hooks[url] = None
                except InvalidJob as exc:
                    hooks[url] = exc.errors[0]
                    errors.append(exc.errors[0])
        if out and not errors:
            errors = capability_errors(out, live_workers(self.redis))
        if errors:
            if len(out) + len(errors) == 1 or all(e.index == 0 for e in errors):
                for e in errors:
                    e.index = None
            raise InvalidJob(errors)
        return out

    def submit(self, job: JobRequest | dict) -> JobHandle:
        """Submit one job (as a batch of one). Returns its handle; with an idempotency key
        already used, the handle of the job first submitted with it."""
        return JobHandle(self, self._submit([job], label="", batch_id=None).job_ids[0])

    def submit_batch(
        self, jobs: Iterable[JobRequest | dict], label: str = "", batch_id: str | None = None,
        webhook_url: str | None = None,
    ) -> BatchHandle:
        """Validate every job, then record and enqueue them all, or none if any is invalid.

        Jobs whose idempotency key was used before are not submitted again: the handle's
        ``job_ids`` name, in request order, the job each request maps to (the first one's, for
        a repeated key), and ``replay`` says that every job was a repeat; then the handle is
        the first submit's batch.

        ``webhook_url``: the farm POSTs each job's end (unless the job names its own) and the
        batch's completion there, signed (renderfarm/webhooks.py)."""
        submitted = self._submit(jobs, label, batch_id, webhook_url=webhook_url)
        return BatchHandle(self, submitted.batch_id, submitted.job_ids, submitted.replay)

    def submit_plot(
        self, job: JobRequest | dict, axes: dict, label: str = "", batch_id: str | None = None,
        webhook_url: str | None = None,
    ) -> BatchHandle:
        """Submit an X/Y/Z plot (renderfarm/plots.py): ``job`` with each combination of the
        axes' values is one job (a cell) of one batch, cells numbered x fastest. Once every
        cell has ended, a worker draws the grid (worker/gridbuilder.py); the batch record's
        ``grids`` then name the images. :class:`InvalidJob` names the axis, the field and the
        value of every problem; nothing is enqueued then."""
        if isinstance(job, JobRequest):
            job = job.model_dump(exclude_unset=True)
        if not isinstance(job, dict):
            raise InvalidJob([FieldError("job", "must be an object", job)])
        if "model" not in job:
            job = {**job, "model": self.settings.default_model}
        plot = parse_plot(axes, job, self.settings.max_plot_cells)
        try:
            self._check_plot(plot, job)
        except RedisConnectionError as exc:
            raise FarmUnavailable(f"the farm's Redis is unreachable: {exc}") from exc
        cells = plot.cells(job)
        if job.get("idempotency_key"):  # one key per cell, so the cells are not one job
            cells = [{**cell, "idempotency_key": f"{job['idempotency_key']}:cell-{i}"}
                     for i, cell in enumerate(cells)]
        nx, ny, nz = plot.shape
        definition = {"job": {k: v for k, v in job.items() if k != "init_image"},
                      "axes": plot.to_dict(), "shape": [nx, ny, nz]}
        submitted = self._submit(cells, label, batch_id, plot=definition,
                                 webhook_url=webhook_url)
        return BatchHandle(self, submitted.batch_id, submitted.job_ids, submitted.replay)

    def _check_plot(self, plot: Plot, job: dict) -> None:
        """Each axis value on its own with the base job (so an error names the value), then
        every cell (values that only fail together, e.g. a size a model's family refuses)."""
        probes = plot.probes(job)
        try:
            self.validate([p for _, _, p in probes])
        except InvalidJob as exc:
            raise InvalidJob(_plot_value_errors(exc.errors, probes)) from None
        try:
            self.validate(plot.cells(job))
        except InvalidJob as exc:
            coords = plot.coordinates()
            raise InvalidJob([
                FieldError("axes", f"cell ({plot.describe(coords[e.index or 0])}): {e.field} "
                           f"{e.message}", e.value) for e in exc.errors]) from None

    def _submit(
        self, jobs: Iterable[JobRequest | dict], label: str, batch_id: str | None,
        plot: dict | None = None,
        webhook_url: str | None = None,
    ) -> Submitted:
        if batch_id is not None:  # given apart from the jobs: the schema's rule all the same
            batch_id = parse_batch_id(batch_id)
        if not isinstance(label, str) or len(label) > MAX_LABEL:
            raise InvalidJob([FieldError(
                "label", f"must be a string of at most {MAX_LABEL} characters", label)])
        if webhook_url is not None:
            self._check_webhook(webhook_url, None)
        try:
            requests = self.validate(jobs)  # reads the known models and live workers
        except RedisConnectionError as exc:
            raise FarmUnavailable(f"the farm's Redis is unreachable: {exc}") from exc
        if not requests:
            raise InvalidJob([FieldError("jobs", "must not be empty", [])])
        batch_id = batch_id or requests[0].batch_id or new_id()
        pending = [(new_id(), _with_seed(r, batch_id)) for r in requests]
        try:
            # Records and idempotency keys are written in one atomic step (Records.add_jobs).
            owners = self.records.add_jobs(
                batch_id, pending, label=label,
                queues=[queue_for(r, self.settings) for _, r in pending],
                compat=[compat_key(r, job_id) for job_id, r in pending],
                idempotency_ttl=IDEMPOTENCY_TTL, webhook_url=webhook_url,
            )
            fresh = {job_id for (job_id, _), owner in zip(pending, owners, strict=True)
                     if owner == job_id}
            if plot is not None and fresh:  # before any message: no worker can end a cell yet
                PlotRecords(self.redis).set_plot(batch_id, {**plot, "cells": owners})
            if fresh:
                self._publish_or_abandon([(job_id, queue_for(r, self.settings), r.priority)
                                          for job_id, r in pending if job_id in fresh])
            else:  # every job was submitted before: answer with the first submit's batch
                first = self.redis.hget(keys.job(owners[0]), "batch_id")
                batch_id = first.decode() if first else batch_id
        except RedisConnectionError as exc:
            raise FarmUnavailable(f"the farm's Redis is unreachable: {exc}") from exc
        except RedisError as exc:  # refused: out of memory, read-only replica, ...
            raise FarmUnavailable(f"the farm's Redis refused the submit: {exc}") from exc
        return Submitted(batch_id, owners, replay=not fresh)

    def _check_webhook(self, url: str, index: int | None) -> None:
        """Refuse a webhook URL that is not http(s), or whose host resolves to an address the
        farm may not reach (loopback, private, link-local, ...: SSRF), naming the field."""
        from renderfarm.schema import check_webhook_url
        from renderfarm.webhook_targets import TargetRefused, checked_addresses

        try:
            check_webhook_url(url)
            checked_addresses(url, self.settings.webhook_allow_private)
        except (ValueError, TargetRefused) as exc:
            raise InvalidJob([FieldError("webhook_url", str(exc), url, index)]) from None

    def retry(self, job_ids: Iterable[str]) -> list[str]:
        """Put failed or cancelled jobs back in their queue and send their messages again.
        Returns the ids that went back (others were not failed or cancelled)."""
        moved = [job_id for job_id in job_ids if self.records.retry(job_id)]
        if moved:
            self._publish_or_abandon(self.records.messages(moved))
        return moved

    def cancel(self, job_ids: Iterable[str]) -> dict[str, str]:
        """Cancel jobs (see :meth:`Records.cancel`): job id -> outcome. When many queued jobs
        were cancelled (a batch), their messages are taken off the queues too, so a job
        submitted next does not wait behind them."""
        outcomes = {job_id: self.records.cancel(job_id) for job_id in job_ids}
        cancelled = [job_id for job_id, out in outcomes.items() if out == "cancelled"]
        if len(cancelled) >= DROP_MESSAGES_AT:
            queues = sorted({queue for _, queue, _ in self.records.messages(cancelled)})
            drop_dead_messages(self.redis, queues)
        return outcomes

    def pause(self, batch_id: str) -> int:
        """Pause a batch (see :meth:`Records.pause`): its queued jobs stay queued and no
        worker takes them until :meth:`resume`; running ones finish. Returns how many queued
        jobs it holds. :class:`JobNotFound` for an unknown batch."""
        return self.records.pause(batch_id)

    def resume(self, batch_id: str) -> list[str]:
        """Resume a paused batch: its queued jobs rejoin their queues (at the current turn of
        the fair share) and their messages are sent again. Returns their ids. If Redis fails
        before the messages are out, the jobs stay in the outbox and the workers' sweep sends
        them (``RENDERFARM_RESEND_AFTER``)."""
        ids = self.records.resume(batch_id)
        if ids:
            publish_records(self.celery, self.records, ids)
        return ids

    def _publish_or_abandon(self, messages: list[tuple[str, str, int]]) -> None:
        """Send the jobs' messages. If Redis fails part-way, the recorded jobs are failed with
        the reason (a job never sits ``queued`` with no message) and the caller is told."""
        try:
            send(self.celery, messages)
        except Exception as exc:  # kombu's OperationalError / BatchPublishError, redis errors
            reason = f"not enqueued: the farm's Redis failed during submit ({exc})"
            try:
                self.records.abandon([job_id for job_id, _, _ in messages], reason)
                outcome = "its jobs are marked failed; submit them again"
            except Exception:  # Redis is gone altogether: nothing more can be written
                outcome = "its records may remain queued; check the batch and submit again"
            raise FarmUnavailable(f"{reason}: {outcome}") from exc
        try:
            self.records.sent([job_id for job_id, _, _ in messages])
        except RedisError:  # sent all the same; the outbox sweep sends them once more, harmless
            pass

    # -- following --------------------------------------------------------------------------
    def job(self, job_id: str) -> JobHandle:
        return JobHandle(self, job_id)

    def batch(self, batch_id: str) -> BatchHandle:
        return BatchHandle(self, batch_id)

    def urls(self, record: JobRecord) -> list[ImageResult]:
        return [r.model_copy(update={"url": self.storage.url(r.key)}) for r in record.results]


def _plot_value_errors(errors: list[FieldError], probes: list) -> list[FieldError]:
    """Errors of the probe jobs (one per axis value) as errors of the axis values; one that
    every probe has is the base job's own (``job.<field>``), reported once."""
    out: list[FieldError] = []
    seen: set[tuple] = set()
    counts: dict[tuple, int] = {}
    for e in errors:
        key = (e.field, e.message, repr(e.value))
        counts[key] = counts.get(key, 0) + 1
    for e in errors:
        key = (e.field, e.message, repr(e.value))
        axis, i, _ = probes[e.index or 0]
        if counts[key] == len(probes) and e.field.split(".")[0] not in varied_fields(axis.field):
            if key not in seen:
                seen.add(key)
                out.append(FieldError(f"job.{e.field}", e.message, e.value))
            continue
        given, note = axis.origin(i)
        out.append(FieldError(f"axes.{axis.name}.values.{given}", f"({axis.field}{note}): "
                              f"{e.field} {e.message}", e.value))
    return out


def _with_seed(request: JobRequest, batch_id: str) -> JobRequest:
    seed = request.seed if request.seed is not None else random.randint(0, MAX_SEED)
    return updated(request, seed=seed, batch_id=batch_id)


def _poll(fetch, done, timeout: float | None, poll: float, describe):
    """``fetch()`` until ``done(record)``; TimeoutError with ``describe(record)`` after timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        record = fetch()
        if done(record):
            return record
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(describe(record))
        time.sleep(poll)


class JobHandle:
    """A submitted job."""

    def __init__(self, client: FarmClient, job_id: str):
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"<JobHandle {self.id}>"

    def status(self) -> JobRecord:
        return self.client.records.job(self.id)

    def wait(self, timeout: float | None = None, poll: float = 0.1) -> JobRecord:
        """Block until the job ends; TimeoutError if it has not after ``timeout`` seconds."""
        return _poll(self.status, lambda r: r.terminal, timeout, poll,
                     lambda r: f"job {self.id} is still {r.state.value} after {timeout}s")

    def result(self, timeout: float | None = None) -> list[ImageResult]:
        """The job's images with URLs; raises :class:`JobFailed` if it failed or was cancelled."""
        record = self.wait(timeout)
        if record.state.value != "succeeded":
            reason = f": {record.error}" if record.error else ""
            raise JobFailed(f"job {self.id} {record.state.value}{reason}")
        return self.client.urls(record)

    def cancel(self) -> str:
        return self.client.records.cancel(self.id)


class BatchHandle:
    """A submitted batch of jobs."""

    def __init__(self, client: FarmClient, batch_id: str, job_ids: list[str] | None = None,
                 replay: bool = False):
        self.client = client
        self.id = batch_id
        self.job_ids = job_ids  #: from submit: the job of each request, in request order
        self.replay = replay  #: from submit: every job had been submitted before

    def __repr__(self) -> str:
        return f"<BatchHandle {self.id}>"

    def status(self) -> BatchRecord:
        return self.client.records.batch(self.id)

    def jobs(self) -> list[JobHandle]:
        return [JobHandle(self.client, i) for i in self.client.records.batch_job_ids(self.id)]

    def records(self) -> list[JobRecord]:
        return self.client.records.batch_jobs(self.id)

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> BatchRecord:
        """Block until every job of the batch has ended."""
        return _poll(self.status, lambda r: r.finished, timeout, poll,
                     lambda r: f"batch {self.id}: {r.done} of {r.total} done after {timeout}s")

    def result(self, timeout: float | None = None) -> dict[str, list[ImageResult]]:
        """Job id -> its images, for the jobs that succeeded."""
        self.wait(timeout)
        return {r.id: self.client.urls(r) for r in self.records() if r.state.value == "succeeded"}

    def pause(self) -> int:
        """Hold the batch's queued jobs (:meth:`FarmClient.pause`)."""
        return self.client.pause(self.id)

    def resume(self) -> list[str]:
        """Let the batch's queued jobs run again (:meth:`FarmClient.resume`)."""
        return self.client.resume(self.id)

    def cancel(self) -> dict[str, str]:
        """Cancel every job of the batch that has not ended: job id -> outcome."""
        ids = self.client.records.batch_job_ids(self.id)
        pipe = self.client.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(keys.job(job_id), "state")
        states = pipe.execute()
        return self.client.cancel(
            [i for i, s in zip(ids, states, strict=True)
             if s not in (b"succeeded", b"failed", b"cancelled")])
