"""``GET /metrics`` (Prometheus, fleet-wide, read from Redis at each scrape) and ``GET /healthz``.

Metrics (all gauges, all from the farm's own records, so an autoscaler can trust them):

- ``renderfarm_jobs_queued{queue, model, hardware, priority}``: jobs in state ``queued``,
  from the queues' pending sets (a job a worker claimed is no longer in them, unlike the raw
  Celery lists, which also hold the messages of claimed micro-batch partners and are split
  over ten priority keys);
- ``renderfarm_jobs{state}``: every kept job by state, from the farm-wide counter that every
  transition keeps (renderfarm/records.py, ``rf:counts``);
- ``renderfarm_oldest_queued_job_age_seconds``: how long the oldest queued job has waited
  (0 when none waits);
- ``renderfarm_workers{hardware, status}``: live workers by class and status (starting, idle,
  busy).

Access: ``/metrics`` is not behind the browser login (Prometheus cannot log in). Without
``RENDERFARM_TOKEN`` it is open like the rest of the dashboard (Host check included: add the
name Prometheus scrapes to ``RENDERFARM_ALLOWED_HOSTS``); with a token it needs
``Authorization: Bearer <token>`` (Prometheus' ``authorization: {credentials_file: ...}``).
It is not rate-limited (the limits cover /api and /sdapi). ``/healthz`` is open to all and
exempt from the Host check (a Kubernetes probe sends the pod's address as Host); it says only
whether the dashboard reaches Redis: 200 or 503.
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, abort, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from renderfarm import keys
from renderfarm.fleet import read_workers
from renderfarm.records import PRIORITY_BAND

bp = Blueprint("metrics", __name__)

HARDWARE = ("gpu", "cpu", "jetson", "mps")

def split_queue(queue: str, prefix: str) -> tuple[str, str]:
    """(model, hardware) of a queue named by producer/enqueue.queue_for."""
    rest = queue[len(prefix) + 1:] if queue.startswith(prefix + ".") else queue
    model, _, last = rest.rpartition(".")
    if model and last in HARDWARE:
        return model, last
    return rest, "any"


class FarmCollector(Collector):
    def __init__(self, farm_client):
        self.client = farm_client

    def collect(self):
        redis = self.client.redis
        prefix = self.client.settings.queue
        now = time.time()
        names = sorted(q.decode() for q in redis.smembers(keys.QUEUES))
        pipe = redis.pipeline(transaction=False)
        for name in names:
            for band in range(10):
                pipe.zcount(keys.pending(name), band * PRIORITY_BAND,
                            f"({(band + 1) * PRIORITY_BAND!r}")
                pipe.zrangebyscore(keys.pending(name), band * PRIORITY_BAND,
                                   f"({(band + 1) * PRIORITY_BAND!r}", start=0, num=1,
                                   withscores=True)
        found = pipe.execute()

        queued = GaugeMetricFamily("renderfarm_jobs_queued", "Jobs waiting for a worker (state "
                                   "queued; claimed jobs not counted)",
                                   labels=["queue", "model", "hardware", "priority"])
        oldest = None
        for i, name in enumerate(names):
            model, hardware = split_queue(name, prefix)
            for band in range(10):
                count, head = found[(i * 10 + band) * 2], found[(i * 10 + band) * 2 + 1]
                if count:
                    queued.add_metric([name, model, hardware, str(9 - band)], count)
                for _, score in head:
                    created = score % PRIORITY_BAND
                    oldest = created if oldest is None else min(oldest, created)
        yield queued
        yield GaugeMetricFamily("renderfarm_oldest_queued_job_age_seconds",
                                "Seconds the oldest queued job has waited (0: none waits)",
                                value=max(0.0, now - oldest) if oldest is not None else 0.0)

        # one hash read (rf:counts, kept by every transition): not a pass over the batches
        by_state = GaugeMetricFamily("renderfarm_jobs", "Kept jobs by state", labels=["state"])
        for state, total in self.client.records.state_counts().items():
            by_state.add_metric([state.value], total)
        yield by_state

        workers = GaugeMetricFamily("renderfarm_workers", "Live workers by hardware class and "
                                    "status (starting, idle, busy)",
                                    labels=["hardware", "status"])
        counts: dict[tuple[str, str], int] = {}
        for w in read_workers(redis, include_lost=False):
            status = "starting" if w.status != "ready" else ("busy" if w.current_job else "idle")
            counts[(w.hardware, status)] = counts.get((w.hardware, status), 0) + 1
        for (hardware, status), n in sorted(counts.items()):
            workers.add_metric([hardware, status], n)
        yield workers


def _registry() -> CollectorRegistry:
    registry = current_app.extensions.get("renderfarm_metrics")
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FarmCollector(current_app.extensions["renderfarm"]))
        current_app.extensions["renderfarm_metrics"] = registry
    return registry


@bp.get("/metrics")
def metrics() -> Response:
    from dashboard.auth import bearer_ok, token

    if token() and not bearer_ok():
        abort(401, description="/metrics needs 'Authorization: Bearer <RENDERFARM_TOKEN>'")
    return Response(generate_latest(_registry()), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/healthz")
def healthz() -> tuple[dict, int]:
    try:
        current_app.extensions["renderfarm"].redis.ping()
    except Exception as exc:
        return {"status": "unavailable", "redis": str(exc)}, 503
    return {"status": "ok"}, 200
