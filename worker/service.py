"""What one worker process does with a job: claim it, render it, store it, record it.

Reliability rests on the job's lease (see renderfarm/records.py), not on Celery alone:
- a job is run only by the worker that claimed it; a second delivery of the same message
  (Redis visibility timeout, a restored unacked message) finds it running or done and is
  dropped;
- the leases of every job this worker holds (rendering or uploading) are renewed every second
  by a background thread; a worker that dies stops renewing, and any live worker's reaper puts
  its jobs back in the queue once the leases run out — in ``lease_seconds``, not after Redis'
  visibility timeout;
- each claim counts an attempt; a job whose worker was lost ``max_attempts`` times fails as a
  poison job instead of killing workers forever;
- images are stored first-writer-wins, so two runs of one job leave one set of objects.

Throughput (issue 6) without giving that up:
- micro-batches: with a job in hand, the worker claims as many queued jobs as fit in its
  pipeline call (``max_batch`` images, fewer where free memory would not hold them at that
  size: ``PipelineCache.call_size``) and can share it (same compat key), straight from the
  queue's pending set. Celery prefetch stays at 1: prefetched-but-unstarted messages are the
  classic source of duplicates with the Redis transport, while a claim is atomic, leased and
  counted like any other. The partners' own messages are dropped when they arrive. A lone
  job waits for nobody.
- model affinity (issue 4): after a job, the worker keeps taking queued jobs of the models it
  has loaded, for up to ``AFFINITY_SECONDS`` after the last delivered message, so a mixed
  workload does not make workers reload models back and forth. Each such job is its own task
  (worker/tasks.py sends this worker a message for it on a queue of its own), so the worker
  is back in Celery's consumer loop between jobs and answers ping, inspect and revoke.
- PNG encoding and upload run in a background thread, so the device renders the next job
  while the last one is stored.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import queue
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from secrets import token_hex

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.enqueue import publish_records, send_unsent, worker_queues
from renderfarm import keys
from renderfarm.connection import celery_app, connect
from renderfarm.errors import BadRecord, Cancelled
from renderfarm.fleet import HEARTBEAT_INTERVAL
from renderfarm.records import Claim, Records
from renderfarm.schema import ImageResult, JobRecord, JobRequest, JobState, now
from renderfarm.settings import Settings
from storage import open_storage
from storage.png import encode_png, parameters_text
from storage.retry import put_with_retries
from worker import metrics
from worker.events import JobEvents
from worker.gridbuilder import GridBuilder
from worker.hashes import hash_cache
from worker.lorafiles import list_loras, loras_with_family
from worker.memory import device_memory
from worker.modelfiles import list_models
from worker.previews import Attempt, Previews
from worker.testhooks import from_env as test_holds

log = logging.getLogger("renderfarm.worker")

#: Redis unreachable (stopped, restarting, still loading its data): never the job's fault. A
#: job that meets it is left to its lease, which runs out; the reaper queues it again. Failing
#: it instead records a failure wherever the ``fail`` that follows the error finds Redis back
#: (a restart; a Redis answering LOADING as it reads its data). A clean-clone CI run of
#: test_outages' restart test had one job of 20 end ``failed``; its error was not printed, so
#: that this was the path is inferred; tests/test_worker_redis_away.py stages it.
REDIS_AWAY = (RedisConnectionError, RedisTimeoutError)

PROGRESS_INTERVAL = 0.25  # seconds between step-progress writes to the records
RENEW_INTERVAL = 1.0  # seconds between lease renewals of the held jobs
AFFINITY_SECONDS = 120.0  # longest a worker keeps taking jobs of loaded models after a message
PRUNE_INTERVAL = 60.0  # seconds between a worker's passes of RENDERFARM_KEEP_DAYS pruning
PRUNE_BATCHES = 20  # batches one pass deletes at most: the lease thread must stay prompt
SWEEP_INTERVAL = 5.0  # seconds between a worker's passes over the outbox (unsent messages)


@dataclass
class Delivery:
    """What :meth:`WorkerService.run_job` did with a delivered job: the claim's answer and the
    outcome of every job it rendered (the delivered one and its micro-batch partners;
    'uploading' means handed to the uploader)."""

    claim: Claim
    outcomes: dict[str, str]


class LostJob(Exception):
    """This worker no longer holds the job (its lease was taken over, or it ended)."""


class SuccessUnrecorded(Exception):
    """Every object of the job is stored, but recording its success failed (Redis away). The
    record may have taken (the script ran, its reply was lost) or not: either way the objects
    stay. If it did not, the lease runs out, the job runs again and writes the same keys."""


class GivenBack(Exception):
    """The worker was told to stop now (``renderfarm up``'s second Ctrl-C, SIGUSR2): the job
    it renders goes back to the queue at once instead of finishing."""


class WorkerService:
    def __init__(self, settings: Settings, profile: str = "auto", max_models: int = 2,
                 affinity: bool = True):
        from worker.pipelines import PipelineCache
        from worker.profiles import apply_settings, detect_profile

        self.settings = settings
        self.redis = connect(settings)
        self.records = Records(self.redis)
        self.storage = open_storage(settings)
        self.holds = test_holds(self.redis)  # None unless the test suite turned them on
        self.previews = Previews(self.redis, settings.preview_seconds, settings.preview_method,
                                 settings.models_path)
        self.app = celery_app(settings)
        self.profile = apply_settings(detect_profile(profile), settings)
        self.cache = PipelineCache(settings.models_path, self.profile, max_models=max_models)
        self.affinity = affinity
        self.affinity_until = 0.0  # monotonic time affinity stops (worker/tasks.py)
        self.events: JobEvents | None = None  # final task events of jobs (worker/events.py)
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}:{token_hex(2)}"
        self.grids = GridBuilder(self.records, self.storage, self.owner)  # plots' grids
        self.models: list[str] = []
        self.families: dict[str, str] = {}  # model -> family name, advertised in heartbeats
        self.model_hashes: dict[str, str] = {}  # model -> SHA-256, as hashed (worker/hashes.py)
        self._model_paths: dict[str, Path] = {}
        self.loras: dict[str, str] = {}  # LoRA name -> family, re-read at every heartbeat
        self.queues: list[str] = []
        self.jobs_done = 0
        self.ready = False  # the heartbeat's status: "starting" until mark_ready()
        self.speeds: dict[str, float] = {}
        self._held: set[str] = set()  # jobs whose lease we renew
        self._current: list[str] = []  # jobs on the device now
        self._step = 0
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._giving_back = threading.Event()  # stop now: running jobs go back to the queue
        self._thread: threading.Thread | None = None
        self._uploads: queue.Queue = queue.Queue(maxsize=2)
        self._uploader = threading.Thread(target=self._upload_loop, name="upload", daemon=True)
        self._uploader.start()

    # -- lifecycle --------------------------------------------------------------------------
    def advertise_models(self) -> list[str]:
        """Find this worker's models and the queues it consumes (one per model and class)."""
        self._model_paths = list_models(self.settings.models_path)
        self.models = list(self._model_paths)
        self.families = self._families(self.models)
        self.queues = worker_queues(self.settings, self.models, self.profile.name)
        if adopted := self.records.adopt(self.queues):  # queued before fair share existed
            log.info("%d queued jobs put in their queues' fair sets", adopted)
        if self.models:
            self.redis.hset(keys.MODELS, mapping={n: now() for n in self.models})
        self._start_hashing()
        return self.models

    def _families(self, models: list[str]) -> dict[str, str]:
        """Each model's family (:mod:`worker.families`), for the producer's submit-time checks;
        a model whose family cannot be told is left out (its jobs fail with the reason)."""
        out = {}
        for name in models:
            try:
                out[name] = self.cache.family(name).name
            except Exception as exc:  # one bad file must not stop the worker
                log.warning("model %s: %s", name, exc)
        return out

    def _start_hashing(self) -> None:
        """Hash this worker's models in the background (worker/hashes.py: once per file, then
        from the cache), so the heartbeat advertises them and stored images name them. Cached
        ones are known at once; the rest as a thread hashes them, never on the render path."""
        cache = hash_cache(self.settings.models_path)
        for name, path in self._model_paths.items():
            if digest := cache.cached_model_sha256(path):
                self.model_hashes[name] = digest
        missing = [name for name in self.models if name not in self.model_hashes]
        if missing:
            threading.Thread(target=lambda: [self.model_sha256(n) for n in missing],
                             name="hash", daemon=True).start()

    def model_sha256(self, name: str) -> str | None:
        """SHA-256 of model ``name``, hashing it now if the background thread has not (it
        waits for that thread where it is hashing the same file). None where the model's files
        cannot be read: a missing hash never fails a job."""
        if name in self.model_hashes:
            return self.model_hashes[name]
        path = self._model_paths.get(name)
        if path is None:
            return None
        try:
            digest = hash_cache(self.settings.models_path).model_sha256(path)
        except OSError as exc:
            log.warning("cannot hash model %s: %s", name, exc)
            return None
        self.model_hashes[name] = digest
        return digest

    def preload(self, models: list[str]) -> None:
        from renderfarm.schema import Mode

        for name in models:
            self.cache.get(name, Mode.txt2img)
            if self.profile.compile:  # torch.compile compiles per shape: do it before jobs come
                log.info("warm-up of %s: %s", name, self.cache.warmup(name))

    def mark_ready(self) -> None:
        """Say in the heartbeat that this worker now takes jobs (its models are loaded and
        warmed up, its consumer is running), at once rather than at the next beat."""
        self.ready = True
        self.start_background()
        self.heartbeat()

    def start_background(self) -> None:
        """Start the thread that renews held leases, beats, and reaps dead workers' jobs.

        Started before the models are loaded and warmed up (minutes, when compiling), so the
        fleet sees the worker as ``starting`` rather than missing; :meth:`mark_ready` ends that."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._background, name="lease", daemon=True)
            self._thread.start()
            self.grids.start()
            # Webhooks are delivered by every worker, in a thread of their own (a slow receiver
            # must not hold up lease renewals): renderfarm/webhooks.py says why workers.
            from producer.client import FarmClient
            from renderfarm.webhooks import start_sender

            start_sender(self.settings, FarmClient(self.settings), self._stop, f"{self.owner}")

    def stop_background(self) -> None:
        self._stop.set()

    def give_back_running(self) -> None:
        """Stop now (a signal handler calls it): the job rendering stops at its next step and
        is queued again at once; no job is taken after it. Jobs already rendered are stored."""
        self._stop.set()
        self._giving_back.set()

    def _give_back(self, record: JobRecord) -> str:
        if self.records.give_back(record.id, self.owner) != "requeued":
            return "lost"
        publish_records(self.app, self.records, [record.id])
        log.warning("job %s: given back unfinished (worker stopping now); queued again",
                    record.id)
        return "requeued"

    def drain(self, timeout: float = 600.0) -> None:
        """Wait for the background uploads to finish (warm shutdown), then for the lease thread
        to release the last leases and take the worker off the list of live workers: the
        process exits right after (renderfarm/cli.py ``worker``), without the interpreter's
        teardown, which gave that thread time."""
        deadline = time.monotonic() + timeout
        while self._uploads.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._thread is not None and self._stop.is_set():
            self._thread.join(max(0.0, min(10.0, deadline - time.monotonic())))

    def _background(self) -> None:
        next_reap = next_beat = next_prune = next_sweep = 0.0
        keep_days = self.settings.keep_days
        while True:
            try:
                self._renew_held()
                if time.monotonic() >= next_beat:
                    self.heartbeat()
                    next_beat = time.monotonic() + HEARTBEAT_INTERVAL
                if time.monotonic() >= next_reap:
                    self.reap()
                    next_reap = time.monotonic() + max(1.0, self.settings.lease_seconds / 2)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SWEEP_INTERVAL
                    for job_id in send_unsent(self.app, self.records,
                                              self.settings.resend_after):
                        log.warning("job %s: queued with no message sent; sent it", job_id)
                    self.grids.sweep()  # plots whose last cell ended with no worker to see it
                if keep_days and time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_INTERVAL
                    pruned = self.records.prune(keep_days * 86400, limit=PRUNE_BATCHES)
                    if pruned.batches:
                        log.info("pruned %d batches (%d jobs) older than %g days",
                                 pruned.batches, pruned.jobs, keep_days)
            except Exception:  # a Redis blip must not kill the thread
                log.warning("lease thread: %s", traceback.format_exc(limit=1).strip())
            if self._stop.wait(RENEW_INTERVAL):
                # Stopping (warm shutdown): keep the leases of the jobs still rendering or
                # uploading until they are released, or another worker would take them over.
                with self._lock:
                    idle = not self._held
                if idle:
                    self.redis.zrem(keys.WORKERS, self.owner)
                    return
                time.sleep(RENEW_INTERVAL)

    def heartbeat(self) -> None:
        """Publish what this worker is and does; the dashboard, ``up`` and routing read it."""
        t = self.records.clock()  # Redis' time: readers compare beats with it, not ours
        with self._lock:
            current = self._current[0] if self._current else ""
        total, free = device_memory(self.profile.device)
        # LoRAs are re-read at every beat (a listing; headers only of new or changed files),
        # so one dropped into the loras folder can be used at once: it changes no queue.
        self.loras = loras_with_family(self.settings.models_path)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.worker(self.owner), mapping={
            "id": self.owner,
            "host": self.host,
            "hardware": self.profile.name,
            "profile": self.profile.name,
            "device": self.profile.device,
            "device_name": _device_name(self.profile.device),
            "memory_total": total if total is not None else "",
            "memory_free": free if free is not None else "",
            "max_pixels": self.profile.max_pixels,
            "max_batch": self.profile.max_batch,
            "models": json.dumps(self.models),
            "families": json.dumps(self.families),
            "hashes": json.dumps(dict(self.model_hashes)),
            "loaded": json.dumps(self.cache.loaded()),
            "loras": json.dumps(self.loras),
            "loaded_loras": json.dumps(self.cache.loaded_loras()),
            "lora_loads": self.cache.lora_loads,
            "speeds": json.dumps(self.speeds),
            "status": "ready" if self.ready else "starting",
            "current_job": current,
            "step": self._step,
            "jobs_done": self.jobs_done,
            "loads": self.cache.loads,
            "beat": t,
        })
        pipe.expire(keys.worker(self.owner), 300)
        if self.loras:
            pipe.hset(keys.LORAS, mapping=self.loras)
        pipe.zadd(keys.WORKERS, {self.owner: t})
        pipe.execute()

    def _renew_held(self) -> None:
        with self._lock:
            held = list(self._held)
            current = set(self._current)
        for job_id in held:
            answer = self.records.renew(job_id, self.owner, self.settings.lease_seconds)
            if answer in ("cancel", "lost") and job_id in current:
                self._cancel.set()

    def reap(self) -> int:
        """Re-queue jobs whose worker stopped renewing their lease. Returns how many."""
        requeued = 0
        for job_id in self.records.expired_leases():
            outcome = self.records.reap(job_id, self.settings.max_attempts)
            if outcome == "requeued":  # sent from its raw fields: a bad record cannot stop us
                publish_records(self.app, self.records, [job_id])
                requeued += 1
                log.warning("job %s: its worker was lost; re-queued", job_id)
            elif outcome == "failed":
                log.error("job %s: failed, its worker was lost on every attempt", job_id)
                self._ended(job_id, "failed", "its worker was lost on every attempt")
        return requeued

    # -- a delivered message ------------------------------------------------------------------
    def run_job(self, job_id: str) -> Delivery:
        """Run one delivered job with its micro-batch partners (one pipeline call), then return
        to Celery's consumer loop, so control commands (ping, inspect, revoke) are answered
        between jobs. Model affinity continues in :meth:`run_loaded` (worker/tasks.py sends
        this worker a message for it).

        The message is a turn of its job's queue (fair share, ``Records.claim_turn``): it
        renders the job whose turn it is, often another than its own.

        The job is claimed before its record is read: a record that cannot be read then fails
        alone, with its reason, instead of the worker."""
        claim = self.records.claim_turn(
            job_id, self.owner, self.settings.lease_seconds, self.settings.max_attempts
        )
        if not claim.ok:
            log.info("job %s not run: %s %s", job_id, claim.status, claim.detail)
            return Delivery(claim, {})
        if claim.job_id != job_id:  # fair share: the message was a turn of its queue
            log.info("delivery of job %s takes job %s (its queue's turn)", job_id, claim.job_id)
        job_id = claim.job_id
        self.affinity_until = time.monotonic() + AFFINITY_SECONDS
        [record] = self._read_claimed([job_id]) or [None]
        if record is None:
            return Delivery(claim, {job_id: "failed"})
        # A job that was lost before (its worker died) runs alone: were it a poison job, its
        # micro-batch partners would die with it and use up their own attempts.
        partners = self._partners(record) if claim.detail == "1" else []
        return Delivery(claim, self._run_group([record, *partners]))

    def run_loaded(self) -> dict[str, str]:
        """Model affinity (issue 4): render the best queued job of a loaded model (with its
        partners), if there is one and affinity has not run for ``AFFINITY_SECONDS`` since the
        last delivered message. Returns job id -> outcome ({} when nothing was taken)."""
        if not self.wants_loaded():
            return {}
        group = self._next_loaded_group()
        return self._run_group(group) if group else {}

    def wants_loaded(self) -> bool:
        """Whether affinity should look for a queued job of a loaded model now."""
        return (self.affinity and not self._stop.is_set()
                and time.monotonic() < self.affinity_until)

    def _partners(self, record: JobRecord) -> list[JobRecord]:
        request = record.request
        room = (self.cache.call_size(request.width, request.height, request.model)
                - request.num_images)
        if room <= 0 or not record.compat.startswith("txt2img:"):
            return []
        # The call is one turn of the record's batch: its next jobs first, then other batches'
        # (fair share, docs/RELIABILITY.md).
        ids = self.records.claim_more(
            [record.queue], self.owner, self.settings.lease_seconds,
            self.settings.max_attempts, n=room, compat=record.compat,
            batch_id=record.batch_id, priority=record.request.priority,
        )
        return self._read_claimed(ids)

    def _read_claimed(self, ids: list[str]) -> list[JobRecord]:
        """The records of jobs this worker just claimed; one that cannot be read is failed
        with the reason (it would fail every worker that tried it) and left out."""
        out = []
        for job_id, found in self.records.read(ids).items():
            if isinstance(found, BadRecord):
                log.error("%s; failing it", found)
                self.records.fail(job_id, self.owner, str(found))
                self._ended(job_id, "failed", str(found))
            else:
                out.append(found)
        return out

    def _next_loaded_group(self) -> list[JobRecord]:
        """Claim the best queued job of a loaded model, unless a job of higher priority waits
        for another model: then affinity yields and the next message (priority first) wins."""
        loaded = set(self.cache.loaded())
        queues = [q for m in self.models if m in loaded
                  for q in worker_queues(self.settings, [m], self.profile.name)]
        others = [q for q in self.queues if q not in queues]
        if others and self.records.best_priority(others) > self.records.best_priority(queues):
            return []
        # the best priority among the loaded models' queues first (claim_more takes the first
        # queue's head)
        ids = self.records.claim_more(self.records.by_priority(queues), self.owner,
                                      self.settings.lease_seconds, self.settings.max_attempts,
                                      n=1)
        [first] = self._read_claimed(ids) or [None]
        if first is None:
            return []
        return [first, *self._partners(first)] if first.attempts == 1 else [first]

    # -- rendering ----------------------------------------------------------------------------
    def _run_group(self, group: list[JobRecord]) -> dict[str, str]:
        """Render claimed jobs (together when there are several), hand them to the uploader.
        Returns job id -> outcome ('uploading' means handed over)."""
        ids = [r.id for r in group]
        with self._lock:
            self._held.update(ids)
        taken = now()
        for record in group:
            if "queued" in record.timestamps:
                metrics.QUEUE_WAIT_SECONDS.labels(record.request.model).observe(
                    max(0.0, taken - record.timestamps["queued"]))
        outcomes: dict[str, str] = {}
        try:
            rendered = None
            if len(group) > 1:
                try:
                    rendered = self._render(group)
                except GivenBack:
                    return {r.id: self._give_back(r) for r in group}
                except REDIS_AWAY as exc:
                    return {r.id: _left_to_lease(r.id, "rendering", exc) for r in group}
                except Exception as exc:  # one bad partner must not fail the others
                    if _out_of_memory(exc):  # each job alone needs less: the smaller retry
                        log.warning("batch of %d (jobs %s) ran out of device memory; "
                                    "rendering them one by one", len(group), " ".join(ids))
                    else:
                        log.info("batch of %d split after %s; rendering one by one",
                                 len(group), type(exc).__name__)
            if rendered is None:
                if len(group) > 1:
                    # Out of the except block: free the failed call's tensors (its traceback's
                    # frames hold them) before the first job alone needs the room.
                    gc.collect()
                for record in group:
                    outcomes[record.id] = self._run_one(record)
                return outcomes
            for record, images in zip(group, rendered, strict=True):
                try:
                    outcomes[record.id] = self._hand_over(
                        record, images, [i for i in ids if i != record.id])
                except LostJob:
                    outcomes[record.id] = "lost"
                except REDIS_AWAY as exc:
                    outcomes[record.id] = _left_to_lease(record.id, "handing over", exc)
            return outcomes
        finally:
            with self._lock:
                for job_id in ids:
                    if outcomes.get(job_id) != "uploading":
                        self._held.discard(job_id)

    def _run_one(self, record: JobRecord, retried: bool = False) -> str:
        try:
            [images] = self._render([record])
            return self._hand_over(record, images)
        except Cancelled:
            self.records.update(record.id, self.owner, JobState.cancelled)
            self._ended(record.id, "cancelled", request=record.request)
            return "cancelled"
        except GivenBack:
            return self._give_back(record)
        except LostJob:
            log.warning("job %s: lease lost mid-run; left to its new owner", record.id)
            return "lost"
        except REDIS_AWAY as exc:
            return _left_to_lease(record.id, "rendering", exc)
        except Exception as exc:
            if retried or not _out_of_memory(exc):
                log.exception("job %s failed", record.id)
                self.records.fail(record.id, self.owner, _describe(exc))
                self._ended(record.id, "failed", _describe(exc), record.request)
                return "failed"
            log.warning("job %s ran out of device memory; retrying with memory savers",
                        record.id)
            metrics.OOM_RETRIES.labels(record.request.model).inc()
        # Retry outside the except block: its traceback's frames still hold the failed
        # attempt's tensors, which would leave the retry no more room than the first try had.
        gc.collect()
        self._enable_memory_savers(record)
        return self._run_one(record, retried=True)

    def _render(self, group: list[JobRecord]) -> list[list]:
        from worker.render import render, render_batch

        ids = [r.id for r in group]
        with self._lock:
            self._current = ids
            self._cancel.clear()
        last_write = 0.0
        steps = 0  # denoising steps run, over every pipeline call of the group

        def on_step(step: int, total: int) -> None:
            nonlocal last_write, steps
            self._step = steps = step
            if self._giving_back.is_set():
                raise GivenBack()
            if self._cancel.is_set():
                self._check_still_ours(ids)
            t = time.monotonic()
            if (step == 1 or step == total or t - last_write >= PROGRESS_INTERVAL
                    or self.holds is not None):  # under test holds: every step recorded
                last_write = t
                answers = self.records.update_many(
                    ids, self.owner, JobState.rendering, step=step, steps_total=total)
                for job_id, (status, cancel) in zip(ids, answers, strict=True):
                    if status != "ok":
                        raise LostJob(status)
                    if cancel:
                        raise Cancelled(job_id)
            if self.holds is not None:
                self.holds.at_step([(r.id, r.request.prompt) for r in group], step)

        try:
            # The model is loaded first, so ``rendering`` is entered when denoising starts:
            # timestamps started -> rendering is the load, rendering -> uploading the render.
            self.cache.get(group[0].request.model)
            answers = self.records.update_many(ids, self.owner, JobState.rendering)
            for job_id, (status, cancel) in zip(ids, answers, strict=True):
                if status != "ok":
                    raise LostJob(status)
                if cancel:
                    raise Cancelled(job_id)
            first = group[0].request
            on_latents = self.previews.hook(
                ids, self.cache.family(first.model), first.width, first.height,
                [r.batch_id for r in group], [Attempt.of(self.owner, r) for r in group])
            started = time.monotonic()
            if len(group) == 1:
                rendered = [render(self.cache, group[0].request, on_step, on_latents)]
            else:
                rendered = render_batch(self.cache, [r.request for r in group], on_step,
                                        on_latents)
        finally:
            with self._lock:
                self._current = []
            self._step = 0
        request = group[0].request
        elapsed = time.monotonic() - started
        self.speeds[f"{request.model}@{request.width}x{request.height}"] = round(
            steps / max(1e-6, elapsed), 2)
        size = f"{request.width}x{request.height}"
        metrics.RENDER_SECONDS.labels(request.model, size).observe(elapsed)
        if steps:
            metrics.STEP_SECONDS.labels(request.model, size).observe(elapsed / steps)
        return rendered

    def _check_still_ours(self, ids: list[str]) -> None:
        for job_id in ids:
            answer = self.records.renew(job_id, self.owner, self.settings.lease_seconds)
            if answer == "cancel":
                raise Cancelled(job_id)
            if answer == "lost":
                raise LostJob(job_id)
        self._cancel.clear()

    def _enable_memory_savers(self, record: JobRecord) -> None:
        import torch

        pipe = self.cache.get(record.request.model, record.request.mode)
        pipe.enable_attention_slicing()
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- storing ------------------------------------------------------------------------------
    def _hand_over(self, record: JobRecord, images: list, shared: list[str] | None = None) -> str:
        """Queue the job's images for upload; ``shared``: the jobs its pipeline calls held too
        (its micro-batch partners), for the sidecar."""
        status, _ = self.records.update(record.id, self.owner, JobState.uploading)
        if status != "ok":
            raise LostJob(status)
        self._uploads.put((record, images, shared or []))  # blocks while 2 wait: bounded memory
        return "uploading"

    def _upload_loop(self) -> None:
        while True:
            record, images, shared = self._uploads.get()
            try:
                self._upload(record, images, shared)
            except Exception:  # recording how it ended failed (Redis away): the thread lives on
                log.exception("job %s: could not record how storing ended; left to its lease, "
                              "which runs out (the job is queued again)", record.id)
            finally:
                with self._lock:
                    self._held.discard(record.id)
                self.jobs_done += 1
                self._uploads.task_done()

    def _upload(self, record: JobRecord, images: list, shared: list[str]) -> None:
        try:
            begun = time.monotonic()
            self._store(record, images, shared)
            metrics.UPLOAD_SECONDS.labels(record.request.model).observe(time.monotonic() - begun)
        except Cancelled:  # before its first object: cancelled, nothing stored
            log.info("job %s cancelled before storing", record.id)
            self.records.update(record.id, self.owner, JobState.cancelled, retrying="")
            self._ended(record.id, "cancelled", request=record.request)
        except LostJob as exc:
            log.warning("job %s: lease lost while storing (%s)", record.id, exc)
        except REDIS_AWAY as exc:  # before its last object: the same keys are written again
            _left_to_lease(record.id, "storing", exc)
        except SuccessUnrecorded as exc:
            log.warning("job %s: stored, but its success not recorded (%s); its objects "
                        "stay, and it runs again if the record did not take",
                        record.id, _describe(exc.__cause__ or exc))
        except Exception as exc:
            log.exception("job %s: storing failed", record.id)
            self._unstore(record)
            self.records.fail(record.id, self.owner, f"storing failed: {_describe(exc)}")
            self._ended(record.id, "failed", f"storing failed: {_describe(exc)}", record.request)

    def _store(self, record: JobRecord, images: list,
               shared: list[str] | None = None) -> None:
        """Store the job's images and sidecar, then mark it succeeded.

        A store failure that can pass (S3 restarting) is retried for
        ``store_retry_seconds``, the job still leased and its record saying ``retrying``.
        Cancel rule: a cancel wins until the job's first object is written (then the job ends
        ``cancelled`` with nothing stored); from then on it comes too late and the job ends
        ``succeeded`` (the cancel answers ``storing``)."""
        request = record.request
        if self.holds is not None:
            self.holds.before_upload(record.id, request.prompt)
        sha256 = self.model_sha256(request.model)
        stored = False

        def before_try(tries: int, last: BaseException | None) -> None:
            if last is not None:
                note = f"storage unavailable ({_describe(last)[:300]}); retry {tries}"
                log.warning("job %s: %s", record.id, note)
                status, cancel = self.records.update(record.id, self.owner, JobState.uploading,
                                                     retrying=note)
                if status != "ok":
                    raise LostJob(status)
            if not stored:  # nothing written yet: a cancel still wins
                answer = self.records.renew(record.id, self.owner, self.settings.lease_seconds)
                if answer == "lost":
                    raise LostJob(answer)
                if answer == "cancel":
                    raise Cancelled(record.id)

        def put(key: str, data: bytes, content_type: str, metadata) -> None:
            nonlocal stored
            put_with_retries(self.storage, key, data, content_type, metadata,
                             patience=self.settings.store_retry_seconds, before_try=before_try)
            if not stored:
                stored = True
                self.records.update(record.id, self.owner, JobState.uploading, storing=1)

        loras = self._lora_hashes(request)
        addnet = {entry["name"]: entry["addnet_sha256"] for entry in loras}
        results = []
        for k, (image, seed) in enumerate(zip(images, request.seeds(), strict=True)):
            key = f"{record.batch_id}/{record.id}-{k}.png"
            job_meta = {"id": record.id, "batch_id": record.batch_id, "image": k, "seed": seed,
                        **request.model_dump(mode="json", exclude={"init_image"}),
                        "model_sha256": sha256, "lora_hashes": loras}
            text = parameters_text(request, seed, model_hash=sha256, lora_hashes=addnet)
            put(key, encode_png(image, text, job_meta), "image/png",
                object_metadata(record, seed))
            results.append(ImageResult(key=key, seed=seed, width=image.width, height=image.height))
        put(f"{record.batch_id}/{record.id}.json",
            self._sidecar(record, results, sha256, loras, shared), "application/json",
            object_metadata(record))
        try:
            answer = self.records.succeed(record.id, self.owner, results)
        except Exception as exc:
            # Never unstore from here: a Redis that went away as the script ran may have
            # recorded the success (seen in test_outages: a job recorded succeeded whose
            # objects the worker had deleted after the reply was lost).
            raise SuccessUnrecorded(record.id) from exc
        if answer != "ok":
            log.info("job %s ended elsewhere while uploading", record.id)
        else:
            self._ended(record.id, "succeeded", [r.key for r in results], request)

    def _ended(self, job_id: str, state: str, detail: str | list[str] = "",
               request: JobRequest | None = None) -> None:
        """Job ``job_id`` ended here: count it (worker/metrics.py) and send its task's final
        event (worker/events.py)."""
        model = request.model if request is not None else "unknown"
        metrics.JOBS.labels(model, state).inc()
        metrics.IMAGES.labels(model, state).inc(request.num_images if request else 0)
        if self.events is not None:
            self.events.ended(job_id, state, detail)
        self.grids.offer_job(job_id)  # the last cell of a plot: its grid is drawn now

    def _unstore(self, record: JobRecord) -> None:
        """A job that failed while storing leaves no objects behind (best effort: a store that
        is still down keeps what it has, and the log names it)."""
        n = record.request.num_images
        for key in [f"{record.batch_id}/{record.id}-{k}.png" for k in range(n)] + [
                f"{record.batch_id}/{record.id}.json"]:
            try:
                self.storage.delete(key)
            except Exception as exc:
                log.error("job %s: could not delete %s after failing: %s", record.id, key,
                          _describe(exc))

    def _lora_hashes(self, request: JobRequest) -> list[dict]:
        """Each LoRA of the job with its file's SHA-256 and A1111's LoRA hash (worker/hashes.py:
        hashed once per file, cached), for the image's metadata; None where the file cannot
        be read any more (a missing hash never fails a job)."""
        if not request.loras:
            return []
        files = list_loras(self.settings.models_path)
        cache = hash_cache(self.settings.models_path)
        out = []
        for lora in request.loras:
            entry = {"name": lora.name, "weight": lora.weight, "sha256": None,
                     "addnet_sha256": None}
            try:
                entry["sha256"] = cache.file_sha256(files[lora.name])
                entry["addnet_sha256"] = cache.addnet_hash(files[lora.name])
            except (KeyError, OSError, ValueError) as exc:
                log.warning("cannot hash LoRA %s: %s", lora.name, exc)
            out.append(entry)
        return out

    def _sidecar(self, record: JobRecord, results: list[ImageResult],
                 model_sha256: str | None = None, loras: list[dict] | None = None,
                 shared: list[str] | None = None) -> bytes:
        fresh = self.records.job(record.id)
        t = {**fresh.timestamps, "stored": self.records.clock()}
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
            "model_sha256": model_sha256,
            "lora_hashes": loras or [],
            "rendered_with": shared or [],  # micro-batch partners: jobs of the same calls
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


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out of memory: CUDA's ``OutOfMemoryError`` ("CUDA
    out of memory"), MPS's "out of memory", torch's CPU allocator ("DefaultCPUAllocator: can't
    allocate memory: you tried to allocate N bytes", a plain ``RuntimeError``) and Python's
    ``MemoryError``."""
    text = str(exc).lower()
    return (isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__
            or "out of memory" in text or "can't allocate memory" in text)


def _left_to_lease(job_id: str, doing: str, exc: BaseException) -> str:
    log.warning("job %s: Redis unreachable while %s (%s); left to its lease, which runs out: "
                "the job is queued again", job_id, doing, _describe(exc))
    return "lost"


def _describe(exc: BaseException) -> str:
    if _out_of_memory(exc):
        return f"out of device memory: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _device_name(device: str) -> str:
    import platform

    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def object_metadata(record: JobRecord, seed: int | None = None) -> dict[str, str]:
    """What a stored object says about itself (S3 user metadata, ``x-amz-meta-*``): its job,
    batch, model and, for an image, its seed; so a bucket listing can be read without Redis."""
    meta = {"job-id": record.id, "batch-id": record.batch_id, "model": record.request.model}
    if seed is not None:
        meta["seed"] = str(seed)
    return meta
