"""A batch's events as Server-Sent Events: ``GET /api/v1/batches/<id>/events``.

The events come from the batch's Redis stream (``rf:batch:<id>:events``), which the record
scripts append to in the same atomic step as each change (renderfarm/records.py), so the
stream misses nothing and orders everything. Each SSE event's ``id`` is its stream entry id:

- ``snapshot`` (first, when the client sends no ``Last-Event-ID``): the batch as
  ``GET /api/v1/batches/<id>`` describes it (counts per state), as of that id;
- ``job``: a job changed state (``job_id``, ``state``, ``from``, ``t``; a failed job's
  ``error``; a succeeded job's ``results`` with URLs);
- ``step``: a rendering job reached step ``step`` of ``steps``;
- ``preview``: a rendering job has a new live preview (worker/previews.py): ``job_id``,
  ``image`` (a ``data:image/jpeg;base64,...`` URL, or null when it has expired since: a client
  replaying old events) and ``url`` (``GET /api/v1/jobs/<id>/preview``); after the
  ``snapshot``, one for each running job that has a preview at that moment;
- ``end``: the batch has ended (every job terminal); the stream then closes.

``?job=<job id>`` keeps the ``job``, ``step`` and ``preview`` events of that one job of the batch
(the dashboard's job page; ``snapshot`` and ``end`` still come).

A client that reconnects with ``Last-Event-ID`` (browsers' ``EventSource`` do by themselves; or
``?last_event_id=``) gets every event after that one. The stream keeps a batch's latest ~10,000
events; a client asking to resume from before those gets a fresh ``snapshot`` first.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

from flask import Response, stream_with_context

from producer.client import FarmClient
from renderfarm import keys
from renderfarm.errors import FieldError, InvalidJob

log = logging.getLogger("renderfarm.dashboard")
EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
#: How long one read waits for news; a keep-alive comment goes out after each. Well under the
#: Redis client's socket timeout (5 s by default since redis-py 8), or a quiet batch's blocked
#: read times out and its stream fails.
BLOCK_MS = 2000
READ_COUNT = 500
MAX_ID_PART = 2**64 - 1  #: Redis stream ids are two unsigned 64-bit numbers
EVENTS_KEPT = 10_000  #: the stream's cap (MAXLEN ~ in renderfarm/records.py's ``event``)


def stream(c: FarmClient, batch_id: str, last_id: str | None,
           job_id: str | None = None) -> Response:
    c.records.batch(batch_id)  # JobNotFound (404) for an unknown batch, before streaming
    if last_id is not None and not (EVENT_ID.match(last_id)
                                    and max(_parse(last_id)) <= MAX_ID_PART):
        raise InvalidJob([FieldError("Last-Event-ID", "must be an event id such as "
                                     "'1700000000000-0'", last_id)])
    if job_id is not None and c.records.job(job_id).batch_id != batch_id:  # or JobNotFound
        raise InvalidJob([FieldError("job", f"is not a job of batch {batch_id}", job_id)])
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(stream_with_context(_events(c, batch_id, last_id, job_id)),
                    mimetype="text/event-stream", headers=headers)


def _sse(event: str, data: dict[str, Any], event_id: str) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data)}\n\n"


def _parse(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def _trimmed(c: FarmClient, key: str, last_id: str) -> bool:
    """Events after ``last_id`` may have been dropped by the stream's length cap: the stream is
    at its cap and its oldest event is newer than ``last_id``."""
    if c.redis.xlen(key) < EVENTS_KEPT:
        return False
    oldest = c.redis.xrange(key, count=1)
    return bool(oldest) and _parse(oldest[0][0].decode()) > _parse(last_id)


def _events(c: FarmClient, batch_id: str, last_id: str | None,
            job_id: str | None) -> Iterator[str]:
    try:
        yield from _follow(c, batch_id, last_id, job_id)
    except (GeneratorExit, OSError):  # the client went away
        raise
    except Exception:
        log.exception("event stream of batch %s failed", batch_id)
        yield "event: error\ndata: {\"error\": \"the event stream failed; reconnect\"}\n\n"


def _follow(c: FarmClient, batch_id: str, last_id: str | None,
            job_id: str | None) -> Iterator[str]:
    from dashboard.api import batch_json

    key = keys.batch_events(batch_id)
    yield "retry: 2000\n\n"
    if last_id is None or _trimmed(c, key, last_id):
        newest = c.redis.xrevrange(key, count=1)
        last_id = newest[0][0].decode() if newest else "0-0"
        snapshot = batch_json(c.records.batch(batch_id))
        yield _sse("snapshot", snapshot, last_id)
        if not snapshot["finished"]:  # the pictures running jobs have now, before any news
            for data in _current_previews(c, batch_id, job_id):
                yield _sse("preview", data, last_id)
    while True:
        # Counts first: the moves that ended the batch wrote their events with the counts,
        # so once the counts say "ended", every event is in the stream to be read below.
        batch = c.records.batch(batch_id)
        read = c.redis.xread({key: last_id}, count=READ_COUNT,
                             block=None if batch.finished else BLOCK_MS)
        entries = read[0][1] if read else []
        sent = False
        for entry_id, fields in entries:
            last_id = entry_id.decode()
            decoded = {k.decode(): v.decode() for k, v in fields.items()}
            if job_id is not None and decoded.get("job") != job_id:
                continue  # another job's: not read further (no picture fetched)
            event, data = _describe(c, decoded)
            yield _sse(event, data, last_id)
            sent = True
        if batch.finished and not entries:
            yield _sse("end", batch_json(batch), last_id)
            return
        if not sent:
            yield ": keep-alive\n\n"


def _current_previews(c: FarmClient, batch_id: str,
                      job_id: str | None) -> Iterator[dict[str, Any]]:
    """``preview`` events of the batch's running jobs (or of job ``job_id``) that have a live
    preview now: a client that connects mid-render sees it at once, not after the next one.

    Only running jobs have one (a job's preview is deleted as it leaves running: renderfarm/
    records.py ``move``), and the running ones come from the farm's lease set, already read
    for the snapshot's progress bar (dashboard/api.py ``running_jobs``): one MGET of a few
    keys, whatever the batch's size, never a read of each of its jobs."""
    from dashboard.api import running_jobs

    ids = [job_id] if job_id else [r.id for r in running_jobs() if r.batch_id == batch_id]
    pictures = c.redis.mget([keys.preview(i) for i in ids]) if ids else []
    for one, picture in zip(ids, pictures, strict=True):
        if picture:
            yield _preview(one, picture)


def _preview(job_id: str, picture: bytes | None) -> dict[str, Any]:
    image = ("data:image/jpeg;base64," + base64.b64encode(picture).decode()
             if picture else None)
    return {"job_id": job_id, "image": image, "url": f"/api/v1/jobs/{job_id}/preview"}


def _describe(c: FarmClient, fields: dict[str, str]) -> tuple[str, dict[str, Any]]:
    job_id = fields.get("job", "")
    if "preview" in fields:
        return "preview", _preview(job_id, c.redis.get(keys.preview(job_id)))
    if "step" in fields:
        return "step", {"job_id": job_id, "step": int(fields["step"]),
                        "steps": int(fields["steps"] or 0)}
    data: dict[str, Any] = {"job_id": job_id, "state": fields.get("state"),
                            "from": fields.get("from"), "t": float(fields.get("t") or 0)}
    if data["state"] in ("failed", "succeeded"):
        from dashboard.api import image_url

        try:
            record = c.records.job(job_id)
        except KeyError:  # pruned since: the event still says what happened
            return "job", data
        if data["state"] == "failed":
            data["error"] = record.error
        else:
            data["results"] = [{**r.model_dump(mode="json"), "key": c.storage.object_key(r.key),
                                "url": image_url(r.key)} for r in record.results]
    return "job", data
