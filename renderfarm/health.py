"""Health checks a container HEALTHCHECK or a Kubernetes probe runs: ``renderfarm health``.

- ``renderfarm health worker``: healthy when a worker process on this host (the container or
  pod: its hostname) beats in Redis, fresh, and says ``ready``. The beat is written by the
  worker's lease thread with its Redis connection, so it proves the process and its Redis are
  alive; with ``--starting-ok`` a worker still loading or compiling its models passes too (a
  startup probe's job is then done by ``--starting-ok`` off).
- ``renderfarm health dashboard``: healthy when ``GET <url>/healthz`` answers 200 (the dashboard
  answers 503 there when it cannot reach Redis).

Exit status 0 healthy, 1 not; one line on stdout says why.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

from renderfarm.connection import connect
from renderfarm.fleet import HEARTBEAT_INTERVAL, LOST_AFTER_BEATS, read_workers
from renderfarm.settings import Settings


def worker_health(settings: Settings, host: str | None = None,
                  starting_ok: bool = False) -> tuple[bool, str]:
    host = host or socket.gethostname()
    redis = connect(settings)
    try:
        workers = [w for w in read_workers(redis) if w.host == host]
    except Exception as exc:
        return False, f"cannot read the heartbeats from Redis: {exc}"
    finally:
        redis.close()
    if not workers:
        return False, f"no worker of host {host} beats in Redis"
    limit = HEARTBEAT_INTERVAL * LOST_AFTER_BEATS
    for w in sorted(workers, key=lambda w: -w.beat):
        age = time.time() - w.beat
        if age <= limit and (w.status == "ready" or starting_ok):
            return True, f"worker {w.id}: {w.status}, beat {age:.1f}s ago"
    w = max(workers, key=lambda w: w.beat)
    return False, (f"worker {w.id}: {w.status}, last beat {time.time() - w.beat:.1f}s ago "
                   f"(healthy: ready and within {limit:g}s)")


def dashboard_health(url: str, timeout: float = 5.0) -> tuple[bool, str]:
    target = url.rstrip("/") + "/healthz"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as answer:  # noqa: S310 (our URL)
            return answer.status == 200, f"{target}: {answer.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{target}: {exc.code} {exc.read(300).decode(errors='replace')}"
    except OSError as exc:
        return False, f"{target}: {exc}"
