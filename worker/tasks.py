"""The Celery tasks: thin shells that hand job ids to the worker service, with task states
that say what happened to each job (Flower, ``celery events``; see docs/DEPLOY.md).

A job's task id is its job id. A delivery is a turn of its job's queue (fair share,
docs/RELIABILITY.md): it renders the job whose turn it is, often another one than its own;
only when no job of the queue waits does it deal with its own job. How a delivery of
``renderfarm.render`` ends:

- it ran the job: the task ends with celery's ``Ignore`` and the worker sends the job's final
  event when the job ends (worker/events.py): SUCCESS once its images are stored, FAILURE with
  the job's error, REVOKED when it was cancelled;
- the job had already ended (a micro-batch partner, a duplicate delivery): the task reports
  that end without rendering anything: SUCCESS with the job's result and
  ``"delivery": "skipped: job already succeeded"``, FAILURE with the job's error, or REVOKED;
- the job runs on another worker now: the task is ignored (no final event from this delivery);
  the worker running it sends the final event when it ends;
- cancelled before it ran: REVOKED. A job given up (poison, missing record): FAILURE.

``renderfarm.render_loaded`` is model affinity: a message a worker sends to its own queue after
a job, to take the next queued job of a model it has loaded. One job (or micro-batch) per task,
so a worker returns to Celery's consumer loop, and answers ping and inspect, between jobs.
"""

from __future__ import annotations

import json
import logging

from celery import Celery, Task
from celery.exceptions import Ignore
from celery.signals import task_revoked

from producer.enqueue import TURN_TAG, send_turn
from renderfarm.connection import AFFINITY_TASK, TASK_NAME
from worker.service import WorkerService

log = logging.getLogger("renderfarm.worker")


class JobFailed(Exception):
    """The job failed; the message is its error."""


def affinity_queue(service: WorkerService) -> str:
    """The queue only this worker consumes: its own model-affinity messages."""
    return f"{service.settings.queue}.worker.{service.owner}"


def register(app: Celery, service: WorkerService) -> None:
    own_queue = affinity_queue(service)

    def continue_affinity() -> None:
        """Ask for the next job of a loaded model through the broker (priority 9 first), so
        control commands waiting in the consumer loop are answered before it."""
        if service.wants_loaded():
            app.send_task(AFFINITY_TASK, queue=own_queue, priority=0, ignore_result=True)

    @app.task(name=TASK_NAME, bind=True, ignore_result=True, acks_late=True)
    def render_job(self: Task, job_id: str) -> str:
        delivery = service.run_job(job_id)
        claim = delivery.claim
        if claim.ok:
            continue_affinity()
            raise Ignore()  # the job's own final event is sent when it ends (worker/events.py)
        if claim.status == "terminal":
            return ended_elsewhere(self, service, job_id, claim.detail)
        if claim.status == "cancelled":
            revoked(self)
        if claim.status == "busy":
            log.info("job %s runs on %s: this delivery does nothing", job_id, claim.detail)
            raise Ignore()
        if claim.status == "paused":  # stays queued; resume sends its message again
            log.info("job %s: its batch is paused; left queued for its resume", job_id)
            raise Ignore()
        raise JobFailed(job_error(service, job_id) or f"job {job_id}: {claim.status}")

    @task_revoked.connect(weak=False)
    def turn_back(sender: Task | None = None, request: object = None, **_: object) -> None:
        """Celery discarded a revoked (or expired) render message unrun. The message was a
        turn of its job's queue, maybe another queued job's (fair share): send one in its
        place, so no queued job is left without (docs/RELIABILITY.md)."""
        if getattr(sender, "name", None) != TASK_NAME or request is None:
            return
        job_id = str(getattr(request, "id", "") or "").split(TURN_TAG)[0]
        if not job_id:
            return
        try:
            send_turn(app, service.records, job_id)
        except Exception:  # Redis away (then the discard's ack failed too: Celery restores it)
            log.exception("job %s: could not send a turn in place of its revoked message",
                          job_id)

    @app.task(name=AFFINITY_TASK, ignore_result=True, acks_late=True)
    def render_loaded() -> dict[str, str]:
        outcomes = service.run_loaded()
        if outcomes:
            continue_affinity()
        return outcomes


def ended_elsewhere(task: Task, service: WorkerService, job_id: str, state: str) -> str:
    """A delivery of a job that had already ended reports that end; it rendered nothing."""
    if state == "succeeded":  # the same result as the worker that stored it sent, plus why
        try:
            images = [r.key for r in service.records.job(job_id).results]
        except Exception:
            images = []
        return json.dumps({"job": job_id, "state": state, "images": images,
                           "delivery": "skipped: job already succeeded"})
    if state == "cancelled":
        revoked(task)
    raise JobFailed(job_error(service, job_id) or f"job {job_id}: {state}")


def revoked(task: Task) -> None:
    """End this task as REVOKED, as celery does for a revoked task."""
    if task.app.conf.worker_send_task_events:
        task.send_event("task-revoked", terminated=False, signum=None, expired=False)
    raise Ignore()


def job_error(service: WorkerService, job_id: str) -> str:
    try:
        return service.records.job(job_id).error or ""
    except Exception:  # a record that cannot be read: the status says enough
        return ""
