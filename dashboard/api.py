"""The JSON API under /api/v1. Views return dicts; errors are ``{"errors": [...]}``.

The functions above the routes (``job_json``, ``workers``, ``queues``, ...) are shared with the
pages in ui.py, so a page and the API never disagree about what the farm holds.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, current_app, g, request, url_for
from werkzeug.exceptions import BadRequest

from producer.client import FarmClient
from producer.enqueue import priority_lists
from renderfarm import keys
from renderfarm.errors import FieldError, InvalidJob
from renderfarm.fleet import HEARTBEAT_INTERVAL, LOST_AFTER_BEATS, read_workers
from renderfarm.records import PRIORITY_BAND as BAND
from renderfarm.schema import MAX_LABEL, BatchRecord, JobRecord, JobState
from storage.local import LocalStorage

bp = Blueprint("api", __name__)

#: A worker whose last heartbeat is older than this is reported lost (3 beats of 2 s).
LOST_AFTER = LOST_AFTER_BEATS * HEARTBEAT_INTERVAL
BATCH_FIELDS = frozenset({"jobs", "label", "webhook_url"})
PLOT_FIELDS = frozenset({"job", "axes", "label", "webhook_url"})


def client() -> FarmClient:
    return current_app.extensions["renderfarm"]


# -- shaping records for output --------------------------------------------------------------
def image_url(key: str) -> str:
    """Where a browser fetches an image: our /files/ route for local storage, else presigned."""
    storage = client().storage
    if isinstance(storage, LocalStorage):
        return url_for("ui.file", key=key)
    return storage.url(key)


def timings(record: JobRecord) -> dict[str, float | None]:
    t = record.timestamps
    end = t.get(record.state.value) if record.terminal else None  # this attempt's end

    def span(a: float | None, b: float | None) -> float | None:
        return round(b - a, 3) if a is not None and b is not None else None

    return {
        "waited": span(t.get("queued"), t.get("started")),
        "loaded": span(t.get("started"), t.get("rendering")),
        "rendered": span(t.get("rendering"), t.get("uploading")),
        "uploaded": span(t.get("uploading"), end if "uploading" in t else None),
        "total": span(t.get("queued"), end),
    }


def job_json(record: JobRecord) -> dict[str, Any]:
    """A job for the API; the init image (base64, up to MiBs) is left out, flagged instead."""
    out = record.model_dump(mode="json", exclude={"request": {"init_image"}, "results": True})
    out["has_init_image"] = record.request.init_image is not None
    out["worker_lost"] = worker_lost(record)
    # key: the object's whole key in its backend (S3: with the storage URL's prefix)
    storage = client().storage
    out["results"] = [
        {**r.model_dump(mode="json"), "key": storage.object_key(r.key), "url": image_url(r.key)}
        for r in record.results
    ]
    out["timings"] = timings(record)
    return out


def batch_json(batch: BatchRecord, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    counts = {s.value: batch.counts.get(s, 0) for s in JobState}
    age = max(0.0, now - batch.created_at)
    running = not batch.finished
    return {
        "id": batch.id,
        "label": batch.label,
        "created_at": batch.created_at,
        "age": round(age, 1),
        "total": batch.total,
        "done": batch.done,
        "finished": batch.finished,
        "paused": batch.paused,
        "counts": counts,
        # jobs ended per minute since the batch was submitted; only while it still runs
        "jobs_per_minute": round(batch.done / age * 60, 2) if running and age > 0 else None,
        "prompt": batch.prompt,
        "thumbnail": image_url(batch.thumb) if batch.thumb else None,
        "images": batch.images,
        # images stored per minute since its first job started; only while it still runs
        "images_per_minute": images_per_minute(batch, now) if running else None,
        # from submit to its last job's end, once every job has ended
        "took": round(batch.ended_at - batch.created_at, 1)
        if batch.finished and batch.ended_at else None,
        "bar": progress_bar(batch, _running_steps().get(batch.id, 0.0) if running else 0.0),
        "plot": batch.plot,
        "grids": grids_json(batch),
        # a plot's grid: waiting, drawn, or redrawing (a cell was retried: grids is [] until
        # the new grid is stored)
        "grid_state": batch.grid_state,
        "webhook_url": batch.webhook_url,
        # deliveries of the batch's webhooks (its jobs' and its own) by status
        "webhooks": {s: batch.webhooks.get(s, 0) for s in ("pending", "delivered", "failed")},
    }


def images_per_minute(batch: BatchRecord, now: float) -> float | None:
    """Images stored per minute since the batch's first job started; None before that."""
    if batch.started_at is None or now <= batch.started_at:
        return None
    return round(batch.images / (now - batch.started_at) * 60, 1)


RUNNING_STATES = (JobState.started, JobState.rendering, JobState.uploading)


def worker_lost(record: JobRecord) -> str | None:
    """For a running job whose worker no longer beats: "worker lost, re-queue in N s", N from
    the job's lease (the reaper re-queues it when the lease runs out); else None."""
    if record.state not in RUNNING_STATES or not record.worker:
        return None
    if "live_ids" not in g:
        g.live_ids = {w.id for w in read_workers(client().redis, include_lost=False)}
    if record.worker in g.live_ids:
        return None
    c = client()
    lease = float(c.redis.hget(keys.job(record.id), "lease_until") or 0)
    left = lease - c.records.clock()
    return f"worker lost, re-queue in {left:.0f} s" if left > 0 else "worker lost, re-queue due"


#: The batch bar's parts, in order: ended states, then running (the steps done of the running
#: jobs, then the rest of them), then queued (the visible empty part).
BAR_PARTS = ("succeeded", "failed", "cancelled", "steps", "running", "queued")


def progress_bar(batch: BatchRecord, steps: float) -> list[dict[str, Any]]:
    """The batch's bar: each part's state, how many jobs it stands for and its width in % of
    the batch. ``steps`` is the sum of step/steps_total over the batch's running jobs, so the
    bar moves with every step, not only when a job ends."""
    n = {s.value: batch.counts.get(s, 0) for s in JobState}
    running = n["started"] + n["rendering"] + n["uploading"]
    steps = min(float(running), steps)
    amounts = {"succeeded": n["succeeded"], "failed": n["failed"], "cancelled": n["cancelled"],
               "steps": steps, "running": running - steps, "queued": n["queued"]}
    total = max(1, batch.total)
    return [{"part": part, "jobs": round(amounts[part], 2),
             "width": round(100 * amounts[part] / total, 2)} for part in BAR_PARTS]


def running_jobs() -> list[JobRecord]:
    """The records of the jobs workers hold now, farm-wide; read once per request.

    There is no index of a batch's running jobs: this reads the farm's lease set
    (``rf:running``, which every claim and every release keeps in the same script as the move)
    and those jobs' records, in two round trips. Its cost follows the farm's running jobs (a
    few per worker), never a batch's size: a 100,000-job batch's page or event stream reads the
    handful of jobs running, not its 100,000 records."""
    if "running_jobs" not in g:
        c = client()
        ids = [i.decode() for i in c.redis.zrange(keys.RUNNING, 0, -1)]
        g.running_jobs = [r for r in c.records.jobs(ids) if not r.terminal] if ids else []
    return g.running_jobs


def _running_steps() -> dict[str, float]:
    """Batch id -> sum of step/steps_total of its running jobs; read once per request."""
    if "running_steps" not in g:
        out: dict[str, float] = {}
        for r in running_jobs():
            if r.steps_total:
                out[r.batch_id] = out.get(r.batch_id, 0.0) + r.step / r.steps_total
        g.running_steps = out
    return g.running_steps


# Largest offset a list request takes (far past any real list; keeps Redis' ranges in range).
MAX_OFFSET = 2**31 - 1


def page_args(default: int = 50, most: int = 1000) -> tuple[int, int]:
    errors = []
    values = {}
    for name, fallback, high in (("offset", 0, MAX_OFFSET), ("limit", default, most)):
        raw = request.args.get(name, str(fallback))
        try:
            value = int(raw)
        except ValueError:
            errors.append(FieldError(name, "must be an integer", raw))
            continue
        low = 0 if name == "offset" else 1
        if not low <= value <= high:
            errors.append(FieldError(name, f"must be between {low} and {high}", value))
        values[name] = value
    if errors:
        raise InvalidJob(errors)
    return values["offset"], values["limit"]


# -- reading the fleet -----------------------------------------------------------------------
def workers(now: float | None = None) -> list[dict[str, Any]]:
    """Every worker that has beaten its heartbeat, newest beat first; stale ones ``lost``."""
    now = time.time() if now is None else now
    c = client()
    out = []
    for info in sorted(read_workers(c.redis), key=lambda w: w.beat, reverse=True):
        out.append({
            **info.model_dump(include={"id", "host", "device", "memory_total", "memory_free",
                                       "speeds", "loads", "models", "hashes", "loaded",
                                       "jobs_done",
                                       "beat"}),
            "state": "live" if now - info.beat <= LOST_AFTER else "lost",
            "profile": info.hardware,
            "device_name": info.device_name or None,
            "max_pixels": info.max_pixels or None,
            "current_job": info.current_job or None,
            "status": info.status,
            "seconds_since_beat": round(now - info.beat, 1),
        })
    _add_current_steps(c, out)
    return out


def _add_current_steps(c: FarmClient, fleet: list[dict[str, Any]]) -> None:
    """Step i/n of each worker's current job, and its it/s since the job started rendering."""
    ids = [w["current_job"] for w in fleet if w["current_job"] and w["state"] == "live"]
    current = {r.id: r for r in c.records.jobs(ids)} if ids else {}
    for w in fleet:
        record = current.get(w["current_job"] or "")
        w["step"] = record.step if record else None
        w["steps_total"] = record.steps_total if record else None
        w["its_per_second"] = its_per_second(record) if record else None


def its_per_second(record: JobRecord) -> float | None:
    """Denoising steps per second of a rendering job: its last recorded step over the time
    from entering ``rendering`` to that step's write (both Redis' clock, so no polling delay
    or host clock is counted)."""
    started = record.timestamps.get("rendering")
    if record.state is not JobState.rendering or not (started and record.step
                                                     and record.progressed_at):
        return None
    return round(record.step / max(1e-3, record.progressed_at - started), 2)


def queue_names(c: FarmClient) -> list[str]:
    """Every queue jobs were sent to (one per model and hardware class; see enqueue.queue_for)."""
    return sorted(q.decode() for q in c.redis.smembers(keys.QUEUES))


def queues(now: float | None = None) -> dict[str, Any]:
    """Depth of each Celery queue (every priority sub-queue summed) and the oldest waiting job."""
    now = time.time() if now is None else now
    c = client()
    names = queue_names(c)
    pipe = c.redis.pipeline(transaction=False)
    for name in names:
        for key in priority_lists(name):
            pipe.llen(key)
        pipe.zcard(f"rf:pending:{name}")
    lengths = pipe.execute()
    out = []
    for i, name in enumerate(names):
        depths = lengths[i * 11 : i * 11 + 10]
        # jobs: queued jobs of this queue (what users act on); depth: Celery messages waiting,
        # which also counts messages of jobs cancelled or already taken (dropped on delivery)
        out.append({"name": name, "jobs": lengths[i * 11 + 10], "depth": sum(depths),
                    "by_priority": {str(9 - n): d for n, d in enumerate(depths) if d}})
    return {"queues": out, "queued_jobs": _count_queued(c, names),
            "oldest_waiting": _oldest_queued(c, names, now)}


def _count_queued(c: FarmClient, names: list[str]) -> int:
    """Jobs in state ``queued``: the sizes of the queues' pending sets, which every state change
    keeps exact (renderfarm/records.py ``move``). One command per queue, whatever the number of
    batches."""
    pipe = c.redis.pipeline(transaction=False)
    for name in names:
        pipe.zcard(keys.pending(name))
    return sum(pipe.execute())


def _oldest_queued(c: FarmClient, names: list[str], now: float) -> dict[str, Any] | None:
    """The ``queued`` job created first, from the queues' pending sets: the first member of
    each priority band of each set (scores are ``(9 - priority) * 1e10 + created_at``), so
    one call costs O(queues), whatever the number of batches kept. Raw fields only: a job
    whose record cannot be read is still shown."""
    pipe = c.redis.pipeline(transaction=False)
    for name in names:
        for band in range(10):
            pipe.zrangebyscore(keys.pending(name), band * BAND, f"({(band + 1) * BAND!r}",
                               start=0, num=1, withscores=True)
    heads = [(score % BAND, job_id.decode()) for found in pipe.execute() for job_id, score in found]
    if not heads:
        return None
    created_at, job_id = min(heads)
    batch_id, queued_at = c.redis.hmget(keys.job(job_id), "batch_id", "t:queued")
    queued_at = float(queued_at) if queued_at else created_at
    return {"id": job_id, "batch_id": (batch_id or b"").decode(), "queued_at": queued_at,
            "waiting": round(now - queued_at, 1)}


# -- changing the farm -----------------------------------------------------------------------
def retryable(records: list[JobRecord]) -> list[str]:
    return [r.id for r in records if r.state in (JobState.failed, JobState.cancelled)]


def cancel_jobs(records: list[JobRecord]) -> dict[str, str]:
    return client().cancel([r.id for r in records if not r.terminal])


def parse_plot_body(body: dict) -> tuple[Any, Any, str, str | None]:
    """Check the envelope of a plot, ``{"job": {...}, "axes": {...}, "label": "...",
    "webhook_url": "..."}``; the job and the axes are checked by FarmClient.submit_plot."""
    errors = [FieldError(k, "is not a known field of a plot (expected job, axes, label, "
                         "webhook_url)", body[k]) for k in body if k not in PLOT_FIELDS]
    job, label = body.get("job"), body.get("label", "")
    webhook_url = body.get("webhook_url")
    if webhook_url is not None and not isinstance(webhook_url, str):
        errors.append(FieldError("webhook_url", "must be an http:// or https:// URL",
                                 webhook_url))
    if not isinstance(job, dict):
        errors.append(FieldError("job", "must be an object: the base job of the plot", job))
    if not isinstance(label, str) or len(label) > MAX_LABEL:
        errors.append(FieldError("label", f"must be a string of at most {MAX_LABEL} characters",
                                 label))
    if errors:
        raise InvalidJob(errors)
    return job, body.get("axes"), label, webhook_url


def grids_json(batch: BatchRecord) -> list[dict[str, Any]]:
    """A plot's grid images with where to fetch them (``[]`` until drawn, or for a batch)."""
    return [{**g, "url": image_url(g["key"])} for g in batch.grids
            if isinstance(g, dict) and isinstance(g.get("key"), str)]


def parse_batch_body(body: Any, max_jobs: int) -> tuple[list[dict], str, str | None]:
    """Check the envelope ``{"jobs": [...], "label": "...", "webhook_url": "..."}``; the jobs
    (and where the webhook URL points) are checked later."""
    if not isinstance(body, dict):
        raise InvalidJob([FieldError("body", "must be a JSON object", body)])
    errors = [FieldError(k, "is not a known field (expected jobs, label, webhook_url)", body[k])
              for k in body if k not in BATCH_FIELDS]
    jobs, label = body.get("jobs"), body.get("label", "")
    webhook_url = body.get("webhook_url")
    if webhook_url is not None and not isinstance(webhook_url, str):
        errors.append(FieldError("webhook_url", "must be an http:// or https:// URL",
                                 webhook_url))
    if not isinstance(jobs, list) or not jobs:
        errors.append(FieldError("jobs", "must be a non-empty list of jobs", jobs))
    elif len(jobs) > max_jobs:
        errors.append(FieldError("jobs", f"must hold at most {max_jobs} jobs", len(jobs)))
    if not isinstance(label, str) or len(label) > MAX_LABEL:
        errors.append(FieldError("label", f"must be a string of at most {MAX_LABEL} characters",
                                 label))
    if errors:
        raise InvalidJob(errors)
    return jobs, label, webhook_url


# -- routes ----------------------------------------------------------------------------------
@bp.before_request
def _authorize():
    from dashboard.auth import check_api

    check_api()


@bp.post("/batches")
def submit_batch():
    if not request.is_json:
        from dashboard import error_response

        return error_response(415, "must be application/json", "Content-Type",
                              request.content_type)
    try:
        body = request.get_json()
    except BadRequest:
        raise InvalidJob([FieldError("body", "is not valid JSON", None)]) from None
    c = client()
    if isinstance(body, dict) and "axes" in body:  # an X/Y/Z plot: renderfarm/plots.py
        job, axes, label, webhook_url = parse_plot_body(body)
        handle = c.submit_plot(job, axes, label=label, webhook_url=webhook_url)
    else:
        jobs, label, webhook_url = parse_batch_body(body, current_app.config["MAX_BATCH_JOBS"])
        handle = c.submit_batch(jobs, label=label, webhook_url=webhook_url)
    batch = c.records.batch(handle.id)
    location = url_for("api.get_batch", batch_id=handle.id)
    # job_ids: per request, in order (the first submit's job for a repeated idempotency key).
    # A replay of jobs that were all submitted before answers as the first submit did, 200.
    out = {"id": handle.id, "url": location, "batch": batch_json(batch),
           "job_ids": handle.job_ids}
    return out, 200 if handle.replay else 201, {"Location": location}


@bp.get("/batches")
def list_batches():
    offset, limit = page_args(default=50, most=200)
    c = client()
    now = time.time()
    return {"batches": [batch_json(b, now) for b in c.records.batches(offset, limit)],
            "total": c.records.count_batches(),
            "offset": offset, "limit": limit}


@bp.get("/batches/<batch_id>")
def get_batch(batch_id: str):
    offset, limit = page_args(default=100, most=1000)
    c = client()
    batch = c.records.batch(batch_id)
    jobs = c.records.batch_jobs(batch_id, offset, limit)
    from renderfarm.webhooks import batch_deliveries

    return {"batch": batch_json(batch), "jobs": [job_json(r) for r in jobs],
            "offset": offset, "limit": limit, "total": batch.total,
            # the latest webhook deliveries: attempts, last answer, next try
            "webhook_deliveries": batch_deliveries(c.redis, batch_id)}


@bp.get("/batches/<batch_id>/events")
def batch_events(batch_id: str):
    """Server-Sent Events of the batch's state changes and steps, until it ends (events.py)."""
    from dashboard.events import stream

    last_id = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    return stream(client(), batch_id, last_id, request.args.get("job"))


@bp.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    c = client()
    c.records.batch(batch_id)
    outcomes = cancel_jobs(c.records.batch_jobs(batch_id))
    return {"id": batch_id, "outcomes": outcomes, "batch": batch_json(c.records.batch(batch_id))}


@bp.post("/batches/<batch_id>/pause")
def pause_batch(batch_id: str):
    """Hold the batch's queued jobs (they stay queued; no worker takes them); running ones
    finish. ``held``: how many queued jobs it holds."""
    c = client()
    held = c.pause(batch_id)
    return {"id": batch_id, "held": held, "batch": batch_json(c.records.batch(batch_id))}


@bp.post("/batches/<batch_id>/resume")
def resume_batch(batch_id: str):
    """Let a paused batch's queued jobs run again (they take turns with the other batches)."""
    c = client()
    resumed = c.resume(batch_id)
    return {"id": batch_id, "resumed": len(resumed),
            "batch": batch_json(c.records.batch(batch_id))}


@bp.post("/batches/<batch_id>/retry")
def retry_batch(batch_id: str):
    c = client()
    c.records.batch(batch_id)
    retried = c.retry(retryable(c.records.batch_jobs(batch_id)))
    return {"id": batch_id, "retried": retried, "batch": batch_json(c.records.batch(batch_id))}


@bp.get("/jobs/<job_id>")
def get_job(job_id: str):
    return job_json(client().records.job(job_id))


@bp.get("/jobs/<job_id>/preview")
def job_preview(job_id: str):
    """The latest live preview of a rendering job: a small JPEG from its latents
    (worker/previews.py), kept a few seconds after its last write and deleted as the job leaves
    running; 404 when there is none."""
    data = client().redis.get(keys.preview(job_id))
    if data is None:
        from dashboard import error_response

        return error_response(404, "has no preview (not rendering, or previews are off)",
                              "job_id", job_id)
    return data, 200, {"Content-Type": "image/jpeg", "Cache-Control": "no-store"}


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    c = client()
    outcome = c.records.cancel(job_id)
    return {"id": job_id, "outcome": outcome, "job": job_json(c.records.job(job_id))}


@bp.post("/jobs/<job_id>/retry")
def retry_job(job_id: str):
    c = client()
    record = c.records.job(job_id)
    if record.state not in (JobState.failed, JobState.cancelled):
        from dashboard import error_response

        return error_response(409, "must be failed or cancelled to retry", "state",
                              record.state.value)
    retried = c.retry([job_id])
    return {"id": job_id, "retried": bool(retried), "job": job_json(c.records.job(job_id))}


@bp.get("/workers")
def list_workers():
    fleet = workers()
    return {"workers": fleet, "live": sum(w["state"] == "live" for w in fleet),
            "lost": sum(w["state"] == "lost" for w in fleet)}


@bp.get("/queues")
def list_queues():
    return queues()


@bp.get("/models")
def list_models():
    farm = client()
    return {"models": farm.models(), "default": farm.settings.default_model,
            "families": farm.model_families(), "details": farm.model_details(),
            "loras": farm.inventory()["loras"]}


@bp.get("/families")
def list_families():
    """What each model family takes (worker/families): sizes, schedulers and defaults, so a
    client can offer only what a model's family accepts."""
    from worker.families import FAMILIES

    return {"families": {name: family.facts() for name, family in FAMILIES.items()}}


@bp.get("/openapi.json")
def openapi():
    from dashboard.openapi import spec

    return spec(current_app)
