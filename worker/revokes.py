"""Revoke from Flower or ``celery control revoke <job id>`` cancels the farm job.

A job's task id is its job id. Celery's own revoke only discards messages a worker has not
started, and a solo worker reads control commands only between tasks; the farm job itself
would stay ``queued`` (and render later, from the pending set) or keep rendering. So each
worker listens to the control broadcasts in a thread of its own, on a pidbox queue of its own
(``<worker hostname>.revokes``, bound to the same fanout exchange), and for every ``revoke`` it
cancels the named jobs through the same path as ``renderfarm cancel``: a queued job is
cancelled at once, a running one at its next denoising step. Every live worker does this
(cancelling is idempotent), whatever the revoke's destination: a job is the farm's, not one
worker's. A revoke's replies are one per worker from
Celery's own handler, and one from each worker's listener saying what happened to the
farm job (``farm jobs: <id> cancelled``): the command gets an answer at once even while
every worker renders.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from renderfarm.errors import JobNotFound

if TYPE_CHECKING:
    from celery import Celery

    from renderfarm.records import Records

log = logging.getLogger("renderfarm.worker")


class RevokeListener:
    def __init__(self, app: Celery, records: Records, hostname: str):
        self.app = app
        self.records = records
        self.hostname = f"{hostname}.revokes"
        self._stop = threading.Event()
        self._node = None
        self._thread = threading.Thread(target=self._run, name="revokes", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.app.connection_for_read() as conn:
                    self._node = self.app.control.mailbox.Node(self.hostname,
                                                               channel=conn.channel())
                    with self._node.listen(callback=self._on_message):
                        while not self._stop.is_set():
                            try:
                                conn.drain_events(timeout=1.0)
                            except TimeoutError:
                                continue
            except Exception as exc:  # Redis away: try again, never take the worker down
                log.warning("revoke listener: %s; reconnecting", exc)
                self._stop.wait(2.0)

    def _on_message(self, body: dict, message: object = None) -> None:
        if not isinstance(body, dict) or body.get("method") != "revoke":
            return
        task_ids = (body.get("arguments") or {}).get("task_id") or []
        said = [self.cancel(str(job_id))
                for job_id in ([task_ids] if isinstance(task_ids, str) else task_ids)]
        reply_to = body.get("reply_to")
        if reply_to and self._node is not None:
            answer = {self.hostname: {"ok": "farm jobs: " + "; ".join(said)}}
            self._node.reply(answer, reply_to["exchange"], reply_to["routing_key"],
                             body.get("ticket"))

    def cancel(self, job_id: str) -> str:
        """Cancel farm job ``job_id``; returns what happened, for the revoke's reply."""
        try:
            outcome = self.records.cancel(job_id)
        except JobNotFound:
            return f"{job_id} not found"  # not a farm job (or pruned): celery's revoke only
        except Exception as exc:
            log.warning("revoke of %s: %s", job_id, exc)
            return f"{job_id} not cancelled: {exc}"
        log.info("job %s revoked: %s", job_id, outcome)
        return f"{job_id} {outcome}"
