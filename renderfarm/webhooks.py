"""Webhooks: the farm POSTs a job's end and a batch's completion to the URL they carry.

Events: ``job.succeeded``, ``job.failed``, ``job.cancelled`` (to the job's ``webhook_url``,
else its batch's) and ``batch.completed`` (to the batch's, when its last job ends; again if a
retried job ends it again). Each is signed as Standard Webhooks says: headers ``webhook-id``
(stable over every try, for de-duplication), ``webhook-timestamp`` and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` with ``RENDERFARM_WEBHOOK_SECRET``).

Where the state lives: in Redis only. The event's delivery record (``rf:hook:<id>``) and its
entry in the due set (``rf:hooks:due``, id -> next try) are written by the same script that
ends the job (renderfarm/records.py ``move``), so an event is never lost between a job's end
and its delivery, and no process holds it in memory.

Who delivers: every worker, in threads of its own beside its lease thread (workers are what a
farm always runs; the dashboard is optional), and ``renderfarm webhooks`` for a farm that wants
a deliverer of its own; ``RENDERFARM_WEBHOOK_SENDERS`` threads per process, so one slow receiver
holds up one of them, not every delivery. Each try is claimed atomically (:data:`_CLAIM`: the
attempt count goes up and the delivery is pushed past the try's timeout in the due set), so
only one sender sends a given attempt; a process that dies mid-try leaves the delivery due again
once that claim runs out. An answer is recorded only by the holder of the latest attempt.
Delivery is at least once: a receiver de-duplicates on ``webhook-id``.

Retries: any answer but a 2xx (3xx included: redirects are not followed), a timeout or an
unreachable receiver is a failed try; the next follows ``RENDERFARM_WEBHOOK_RETRY_SCHEDULE``
(by default Svix's: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h), and after the last the delivery
is recorded ``failed``. The body is built at the first try and sent byte for byte on every
retry (so image URLs are presigned once: valid for ``RENDERFARM_PRESIGN_EXPIRES``; the body
also carries each image's object key).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from redis import Redis

from renderfarm import keys
from renderfarm.errors import JobNotFound
from renderfarm.settings import Settings
from renderfarm.webhook_targets import TargetRefused, post

if TYPE_CHECKING:
    from producer.client import FarmClient

log = logging.getLogger("renderfarm.webhooks")

POLL_SECONDS = 0.25  #: a deliverer looks for due deliveries this often
CLAIM_BATCH = 20  #: deliveries one deliverer tries (one claim each) per round
BODY_JOBS = 1000  #: batch.completed lists the jobs of batches up to this size

# ARGV: how many, claim seconds, sender, due by (a time; '' = now). Claims deliveries due by
# then: attempt count up, due again after the claim (if its sender dies mid-try). Returns id,
# attempt, id, attempt, ...
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local by = now
if ARGV[4] and ARGV[4] ~= '' then by = math.min(now, tonumber(ARGV[4])) end
local ids = redis.call('ZRANGEBYSCORE', 'rf:hooks:due', '-inf', by, 'LIMIT', 0,
  tonumber(ARGV[1]))
local out = {}
for _, id in ipairs(ids) do
  local h = 'rf:hook:' .. id
  if redis.call('HGET', h, 'status') ~= 'pending' then
    redis.call('ZREM', 'rf:hooks:due', id)
  else
    local n = redis.call('HINCRBY', h, 'attempts', 1)
    local until_ = now + tonumber(ARGV[2])
    redis.call('HSET', h, 'sender', ARGV[3], 'next_at', until_)
    redis.call('ZADD', 'rf:hooks:due', until_, id)
    table.insert(out, id)
    table.insert(out, tostring(n))
  end
end
return out
"""

# ARGV: id, attempt, ok|fail, answer (HTTP status or the error), delay before the next try
# ('' = give up). Only the holder of the latest attempt records; returns 'stale' otherwise.
_DONE = """
local h = 'rf:hook:' .. ARGV[1]
if redis.call('HGET', h, 'status') ~= 'pending' or redis.call('HGET', h, 'attempts') ~= ARGV[2]
then return 'stale' end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', h, 'last_answer', ARGV[4], 'last_at', now)
redis.call('HDEL', h, 'sender')
local b = 'rf:batch:' .. (redis.call('HGET', h, 'batch_id') or '_')
local status = 'pending'
if ARGV[3] == 'ok' then status = 'delivered' elseif ARGV[5] == '' then status = 'failed' end
if status == 'pending' then
  local due = now + tonumber(ARGV[5])
  redis.call('HSET', h, 'next_at', due)
  redis.call('ZADD', 'rf:hooks:due', due, ARGV[1])
else
  redis.call('HSET', h, 'status', status)
  redis.call('HDEL', h, 'next_at')
  redis.call('ZREM', 'rf:hooks:due', ARGV[1])
  if redis.call('EXISTS', b) == 1 then
    redis.call('HINCRBY', b, 'hooks:pending', -1)
    redis.call('HINCRBY', b, 'hooks:' .. status, 1)
  end
end
return status
"""


def _text(value: bytes | None) -> str:
    return value.decode() if value is not None else ""


def delivery_json(data: dict[bytes, bytes]) -> dict[str, Any]:
    """A delivery record for the API and the dashboard (the body left out)."""
    def number(name: str) -> float | None:
        raw = data.get(name.encode())
        return float(raw) if raw else None

    return {
        "id": _text(data.get(b"id")),
        "type": _text(data.get(b"type")),
        "url": _text(data.get(b"url")),
        "job_id": _text(data.get(b"job_id")) or None,
        "status": _text(data.get(b"status")),
        "attempts": int(data.get(b"attempts") or 0),
        "last_answer": _text(data.get(b"last_answer")) or None,
        "last_at": number("last_at"),
        "next_at": number("next_at"),
        "created_at": number("created_at"),
    }


def batch_deliveries(redis: Redis, batch_id: str, limit: int = 20) -> list[dict[str, Any]]:
    """The batch's latest ``limit`` webhook deliveries (its jobs' and its own), newest last."""
    ids = redis.lrange(keys.batch_hooks(batch_id), -limit, -1)
    pipe = redis.pipeline(transaction=False)
    for hook_id in ids:
        pipe.hgetall(keys.hook(hook_id.decode()))
    return [delivery_json(d) for d in pipe.execute() if d]


def signature_headers(secret: str, msg_id: str, body: str, timestamp: int | None = None
                      ) -> dict[str, str]:
    """Standard Webhooks' three headers for ``body``, signed with the ``whsec_`` secret by the
    reference library (``standardwebhooks``). A secret of several keys separated by spaces
    (a rotation) gives one signature per key, space-separated as the specification says, so a
    receiver holding any one of them verifies the delivery."""
    from standardwebhooks.webhooks import Webhook

    timestamp = int(time.time()) if timestamp is None else timestamp
    at = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    signed = " ".join(Webhook(key).sign(msg_id, at, body) for key in secret.split())
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signed}


class WebhookSender:
    """Delivers due webhooks from Redis. Any number may run at once, in any processes."""

    def __init__(self, settings: Settings, client: FarmClient, name: str | None = None):
        self.settings = settings
        self.client = client
        self.redis: Redis = client.redis
        self.name = name or f"hooks-{uuid.uuid4().hex[:8]}"
        self._claim = self.redis.register_script(_CLAIM)
        self._done = self.redis.register_script(_DONE)
        self._warned = False

    @property
    def claim_seconds(self) -> float:
        """How long a claimed try is this sender's: past its timeout with room to record."""
        return 2 * self.settings.webhook_timeout + 10

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set; a Redis blip or a bad record never ends the loop."""
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception as exc:  # noqa: BLE001 -- keep delivering whatever happens
                log.warning("webhooks: %s", exc)
                busy = 0
            if not busy:
                stop.wait(POLL_SECONDS)

    def run_once(self) -> int:
        """Try the deliveries due now (up to :data:`CLAIM_BATCH`) once each, one claim per try."""
        secret = self.settings.webhook_secret
        if secret is None:
            if not self._warned and self.redis.zcard(keys.HOOKS_DUE):
                log.warning("webhooks are waiting but RENDERFARM_WEBHOOK_SECRET is not set here: "
                            "this process does not send them")
                self._warned = True
            return 0
        # One claim per try: a claim covers the try it is taken for (claim_seconds), so a
        # slow receiver never holds other deliveries claimed-but-unsent until their claims
        # run out and another sender sends them while this one still does.
        seconds, micros = self.redis.time()
        due_by = seconds + micros / 1e6  # this round: what is due now (each tried once)
        tried = 0
        while tried < CLAIM_BATCH:
            claimed = self._claim(args=[1, self.claim_seconds, self.name, repr(due_by)])
            if not claimed:
                break
            self.attempt(claimed[0].decode(), claimed[1].decode(), secret.get_secret_value())
            tried += 1
        return tried

    def attempt(self, hook_id: str, attempt: str, secret: str) -> str:
        """One try of one claimed delivery; records the answer. Returns the new status."""
        key = keys.hook(hook_id)
        url = _text(self.redis.hget(key, "url"))
        try:
            body = self._body(hook_id)
            answer = post(url, body.encode(), signature_headers(secret, hook_id, body),
                          self.settings.webhook_timeout, self.settings.webhook_allow_private)
            ok = 200 <= answer.status < 300
            said = f"HTTP {answer.status}" + ("" if ok else f": {answer.text[:200]}".rstrip(": "))
        except TargetRefused as exc:
            ok, said = False, f"refused: {exc}"
        except Exception as exc:  # noqa: BLE001 -- unreachable, timeout, TLS, garbage
            ok, said = False, f"{type(exc).__name__}: {exc}"[:300]
        delays = self.settings.webhook_delays
        tries = int(attempt)
        delay = "" if ok or tries > len(delays) else delays[tries - 1]
        status = self._done(args=[hook_id, attempt, "ok" if ok else "fail", said, delay]).decode()
        level = logging.INFO if ok else logging.WARNING
        log.log(level, "webhook %s try %s to %s: %s (%s)", hook_id, attempt, url, said, status)
        return status

    def _body(self, hook_id: str) -> str:
        """The delivery's body: built at its first try, then the same text on every retry."""
        key = keys.hook(hook_id)
        body = self.redis.hget(key, "body")
        if body is None:
            self.redis.hsetnx(key, "body", json.dumps(self.event(hook_id), sort_keys=True))
            body = self.redis.hget(key, "body")
        return _text(body)

    def event(self, hook_id: str) -> dict[str, Any]:
        """The event of a delivery, as Standard Webhooks shapes a payload: type, timestamp,
        data (ids, state, images with key and presigned URL, error)."""
        hook = {k.decode(): v.decode() for k, v in self.redis.hgetall(keys.hook(hook_id)).items()}
        kind, batch_id, job_id = hook.get("type", ""), hook.get("batch_id", ""), hook.get("job_id")
        created = float(hook.get("created_at") or 0)
        data: dict[str, Any] = {"batch_id": batch_id}
        if job_id:
            data.update(self._job_data(job_id, kind.removeprefix("job."), created))
            data["state"] = kind.removeprefix("job.")
        else:
            data.update(self._batch_data(batch_id))
        return {"type": kind, "timestamp": datetime.fromtimestamp(created, tz=timezone.utc)
                .isoformat().replace("+00:00", "Z"), "data": data}

    def _job_data(self, job_id: str, state: str, at: float) -> dict[str, Any]:
        """The job as it ended in ``state`` at ``at`` (the event's time): its record, or, when
        it was retried since (the body is built at the first try), that attempt's history
        entry: its error and no images, not a later attempt's."""
        try:
            record = self.client.records.job(job_id)
        except Exception as exc:  # noqa: BLE001 -- pruned or unreadable: say so, still send
            return {"job_id": job_id, "error": None, "images": [], "note": str(exc)}
        if abs(record.timestamps.get(state, 0.0) - at) > 0.01:  # not the current attempt's
            for entry in reversed(record.history):
                ended = (entry.get("timestamps") or {}).get(state)
                if entry.get("state") == state and ended is not None and abs(ended - at) <= 0.01:
                    return {"job_id": job_id, "error": entry.get("error"), "images": [],
                            "model": record.request.model, "attempts": record.attempts,
                            "note": "retried since: this is the attempt that ended then"}
        storage = self.client.storage
        images = [{"key": storage.object_key(r.key), "url": storage.url(r.key), "seed": r.seed,
                   "width": r.width, "height": r.height} for r in record.results]
        return {"job_id": job_id, "error": record.error, "images": images,
                "model": record.request.model, "attempts": record.attempts}

    def _batch_data(self, batch_id: str) -> dict[str, Any]:
        try:
            batch = self.client.records.batch(batch_id)
        except JobNotFound:
            return {"state": "completed", "note": f"batch {batch_id} is gone (pruned)"}
        out: dict[str, Any] = {
            "state": "completed", "label": batch.label, "total": batch.total,
            "counts": {s.value: n for s, n in batch.counts.items()},
        }
        if batch.grids:  # a plot: sent once its grid is stored (renderfarm/plotrecords.py)
            storage = self.client.storage
            out["grids"] = [{"key": storage.object_key(g["key"]), "url": storage.url(g["key"]),
                             "z": g.get("z", 0)} for g in batch.grids]
        if batch.total <= BODY_JOBS:
            records = self.client.records.batch_jobs(batch_id)
            storage = self.client.storage
            out["jobs"] = [{"job_id": r.id, "state": r.state.value, "error": r.error,
                            "images": [storage.object_key(i.key) for i in r.results]}
                           for r in records]
        return out


def start_sender(settings: Settings, client: FarmClient, stop: threading.Event,
                 name: str | None = None) -> list[threading.Thread]:
    """Deliver webhooks in ``RENDERFARM_WEBHOOK_SENDERS`` daemon threads until ``stop`` is set
    (each worker runs them; ``renderfarm webhooks`` too). Each thread claims one try at a time,
    as separate processes do, so a slow receiver holds one thread and no other delivery."""
    name = name or f"hooks-{uuid.uuid4().hex[:8]}"
    threads = []
    for k in range(settings.webhook_senders):
        sender = WebhookSender(settings, client, f"{name}/{k}")
        thread = threading.Thread(target=sender.run, args=(stop,), name=f"webhooks-{k}",
                                  daemon=True)
        thread.start()
        threads.append(thread)
    return threads
