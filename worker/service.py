"""What one worker process does with a job: claim it, render it, store it, record it.

Reliability rests on the job's lease (see renderfarm/records.py), not on Celery alone:
- a job is run only by the worker that claimed it; a second delivery of the same message
  (Redis visibility timeout, a restored unacked message) finds it running or done and is
  dropped;
- the lease is renewed every second by a background thread while the job runs; a worker that
  dies stops renewing, and any live worker's reaper puts the job back in the queue once the
  lease runs out — in ``lease_seconds``, not after Redis' visibility timeout;
- each claim counts an attempt; a job whose worker was lost ``max_attempts`` times fails as
  a poison job instead of killing workers forever;
- images are stored first-writer-wins, so two runs of one job leave one set of objects.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
from secrets import token_hex

from producer.enqueue import publish
from renderfarm import keys
from renderfarm.connection import celery_app, connect
from renderfarm.errors import Cancelled, JobNotFound
from renderfarm.records import Records
from renderfarm.schema import ImageResult, JobRecord, JobState, now
from renderfarm.settings import Settings
from storage import open_storage
from storage.png import encode_png, parameters_text
from worker.modelfiles import list_models

log = logging.getLogger("renderfarm.worker")

PROGRESS_INTERVAL = 0.25  # seconds between step-progress writes to the record
RENEW_INTERVAL = 1.0  # seconds between lease renewals of the running job
HEARTBEAT_INTERVAL = 2.0  # seconds between worker heartbeats


class LostJob(Exception):
    """This worker no longer holds the job (its lease was taken over, or it ended)."""


class WorkerService:
    def __init__(self, settings: Settings, profile: str = "auto", max_models: int = 2):
        from worker.pipelines import PipelineCache
        from worker.profiles import detect_profile

        self.settings = settings
        self.redis = connect(settings)
        self.records = Records(self.redis)
        self.storage = open_storage(settings)
        self.app = celery_app(settings)
        self.profile = detect_profile(profile)
        self.cache = PipelineCache(settings.models_path, self.profile, max_models=max_models)
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}:{token_hex(2)}"
        self.jobs_done = 0
        self._current: str | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def advertise_models(self) -> list[str]:
        names = list(list_models(self.settings.models_path))
        if names:
            self.redis.hset(keys.MODELS, mapping={n: now() for n in names})
        return names

    def preload(self, models: list[str]) -> None:
        from renderfarm.schema import Mode

        for name in models:
            self.cache.get(name, Mode.txt2img)

    def start_background(self) -> None:
        """Start the thread that renews the running job's lease and reaps dead workers' jobs."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._background, name="lease", daemon=True)
            self._thread.start()

    def stop_background(self) -> None:
        self._stop.set()

    def _background(self) -> None:
        next_reap = next_beat = 0.0
        while True:
            try:
                self._renew_current()
                if time.monotonic() >= next_beat:
                    self.heartbeat()
                    next_beat = time.monotonic() + HEARTBEAT_INTERVAL
                if time.monotonic() >= next_reap:
                    self.reap()
                    next_reap = time.monotonic() + max(1.0, self.settings.lease_seconds / 2)
            except Exception:  # a Redis blip must not kill the thread
                log.warning("lease thread: %s", traceback.format_exc(limit=1).strip())
            if self._stop.wait(RENEW_INTERVAL):
                self.redis.zrem(keys.WORKERS, self.owner)
                return

    def heartbeat(self) -> None:
        """Publish what this worker is and does; the dashboard and ``up`` read it."""
        t = now()
        with self._lock:
            current = self._current or ""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.worker(self.owner), mapping={
            "id": self.owner,
            "host": self.host,
            "profile": self.profile.name,
            "device": self.profile.device,
            "models": json.dumps(list(list_models(self.settings.models_path))),
            "loaded": json.dumps(self.cache.loaded()),
            "current_job": current,
            "jobs_done": self.jobs_done,
            "beat": t,
        })
        pipe.expire(keys.worker(self.owner), 300)
        pipe.zadd(keys.WORKERS, {self.owner: t})
        pipe.execute()

    def _renew_current(self) -> None:
        with self._lock:
            job_id = self._current
        if job_id is None:
            return
        answer = self.records.renew(job_id, self.owner, self.settings.lease_seconds)
        if answer in ("cancel", "lost"):
            self._cancel.set()

    def reap(self) -> int:
        """Re-queue jobs whose worker stopped renewing their lease. Returns how many."""
        requeued = 0
        for job_id in self.records.expired_leases():
            outcome = self.records.reap(job_id, self.settings.max_attempts)
            if outcome == "requeued":
                publish(self.app, self.settings, [(job_id, self.records.job(job_id).request)])
                requeued += 1
                log.warning("job %s: its worker was lost; re-queued", job_id)
            elif outcome == "failed":
                log.error("job %s: failed, its worker was lost on every attempt", job_id)
        return requeued

    # -- one job ----------------------------------------------------------------------------
    def run_job(self, job_id: str) -> str:
        """Run one delivered job to its end. Returns the outcome; never raises for job errors."""
        try:
            record = self.records.job(job_id)
        except JobNotFound:
            log.error("message for unknown job %s discarded", job_id)
            return "missing"
        claim = self.records.claim(
            job_id, self.owner, self.settings.lease_seconds, self.settings.max_attempts
        )
        if not claim.ok:
            log.info("job %s not run: %s %s", job_id, claim.status, claim.detail)
            return claim.status
        with self._lock:
            self._current = job_id
            self._cancel.clear()
        try:
            self._render_and_store(record)
            return "succeeded"
        except Cancelled:
            self.records.update(job_id, self.owner, JobState.cancelled)
            return "cancelled"
        except LostJob:
            log.warning("job %s: lease lost mid-run; left to its new owner", job_id)
            return "lost"
        except Exception as exc:
            log.exception("job %s failed", job_id)
            self.records.fail(job_id, self.owner, _describe(exc))
            return "failed"
        finally:
            with self._lock:
                self._current = None
            self.jobs_done += 1

    def _render_and_store(self, record: JobRecord) -> None:
        from worker.render import render

        request = record.request
        last_write = 0.0

        def on_step(step: int, total: int) -> None:
            nonlocal last_write
            if self._cancel.is_set():
                self._check_still_ours(record.id)
            t = time.monotonic()
            if step == 1 or step == total or t - last_write >= PROGRESS_INTERVAL:
                last_write = t
                status, cancel = self.records.update(
                    record.id, self.owner, JobState.rendering, step=step, steps_total=total
                )
                if status != "ok":
                    raise LostJob(status)
                if cancel:
                    raise Cancelled(record.id)

        images = render(self.cache, request, on_step)
        self._move(record.id, JobState.uploading)
        results = []
        for k, (image, seed) in enumerate(zip(images, request.seeds(), strict=True)):
            key = f"{record.batch_id}/{record.id}-{k}.png"
            job_meta = {"id": record.id, "batch_id": record.batch_id, "image": k, "seed": seed,
                        **request.model_dump(mode="json", exclude={"init_image"})}
            self.storage.put(key, encode_png(image, parameters_text(request, seed), job_meta),
                             "image/png")
            results.append(ImageResult(key=key, seed=seed, width=image.width, height=image.height))
        self.storage.put(f"{record.batch_id}/{record.id}.json", self._sidecar(record, results),
                         "application/json")
        if self.records.succeed(record.id, self.owner, results) != "ok":
            log.info("job %s ended elsewhere while uploading", record.id)

    def _move(self, job_id: str, state: JobState) -> None:
        status, cancel = self.records.update(job_id, self.owner, state)
        if status != "ok":
            raise LostJob(status)

    def _check_still_ours(self, job_id: str) -> None:
        answer = self.records.renew(job_id, self.owner, self.settings.lease_seconds)
        if answer == "cancel":
            raise Cancelled(job_id)
        if answer == "lost":
            raise LostJob(job_id)
        self._cancel.clear()

    def _sidecar(self, record: JobRecord, results: list[ImageResult]) -> bytes:
        fresh = self.records.job(record.id)
        t = {**fresh.timestamps, "stored": now()}
        timings = {
            "waited": _span(t, "queued", "started"),
            "loaded": _span(t, "started", "rendering"),
            "rendered": _span(t, "rendering", "uploading"),
            "uploaded": _span(t, "uploading", "stored"),
        }
        body = {
            "id": record.id,
            "batch_id": record.batch_id,
            "request": record.request.model_dump(mode="json", exclude={"init_image"}),
            "has_init_image": record.request.init_image is not None,
            "worker": self.owner,
            "device": self.profile.name,
            "attempts": fresh.attempts,
            "timestamps": t,
            "timings": timings,
            "images": [r.model_dump(exclude={"url"}) for r in results],
        }
        return json.dumps(body, indent=2).encode()


def _span(t: dict[str, float], start: str, end: str) -> float | None:
    return round(t[end] - t[start], 4) if start in t and end in t else None


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    if "OutOfMemory" in name:
        return f"out of device memory: {exc}"
    return f"{name}: {exc}"
