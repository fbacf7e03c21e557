"""Task events that say what happened to each job, for Flower and ``celery events``.

A job's Celery task id is its job id (producer/enqueue.py). A job ends on the worker that ran
it, often after its task returned (images are stored in a background thread) and sometimes in
another job's task (micro-batch partners, model affinity). So the worker that ends a job sends
that task id's final event itself, when the job ends:

- stored: ``task-succeeded`` (result: the job's state and image keys) → SUCCESS;
- failed: ``task-failed`` with the job's error → FAILURE;
- cancelled (``renderfarm cancel``, a revoke, the dashboard): ``task-revoked`` → REVOKED.

The task that rendered it ends with celery's ``Ignore`` (no event of its own), so a task is
never reported SUCCESS before its images are stored. Celery's event state keeps a ready state
against later, lower ones, so a late duplicate delivery cannot turn SUCCESS back into STARTED.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING

from renderfarm.connection import TASK_NAME

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("renderfarm.worker")


class JobEvents:
    """Sends the final task event of jobs this worker ends; safe to call from any thread."""

    def __init__(self, app: Celery, hostname: str):
        self.app = app
        self.hostname = hostname
        self._lock = threading.Lock()
        self._dispatcher = None

    def ended(self, job_id: str, state: str, detail: str | list[str] = "") -> None:
        """Job ``job_id`` ended in ``state`` (succeeded | failed | cancelled). ``detail``: the
        image keys of a success, the error of a failure, who cancelled. Never raises: a
        monitoring event is not worth a job."""
        fields: dict
        if state == "succeeded":
            result = {"job": job_id, "state": state, "images": detail}
            kind, fields = "task-succeeded", {"result": json.dumps(result), "runtime": None}
        elif state == "failed":
            kind, fields = "task-failed", {"exception": f"JobFailed({detail!r})",
                                           "traceback": ""}
        elif state == "cancelled":
            kind, fields = "task-revoked", {"terminated": False, "signum": None,
                                            "expired": False}
        else:
            return
        try:
            with self._lock:
                if self._dispatcher is None:
                    self._dispatcher = self.app.events.Dispatcher(
                        self.app.connection_for_write(), hostname=self.hostname, enabled=True)
                self._dispatcher.send(kind, uuid=job_id, name=TASK_NAME, **fields)
        except Exception as exc:
            log.warning("job %s: could not send its %s event: %s", job_id, kind, exc)
            self._dispatcher = None

    def close(self) -> None:
        with self._lock:
            if self._dispatcher is not None:
                self._dispatcher.close()
                self._dispatcher.connection.release()
                self._dispatcher = None
