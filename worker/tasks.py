"""The Celery task: a thin shell that hands the job id to the worker service."""

from __future__ import annotations

from celery import Celery

from renderfarm.connection import TASK_NAME
from worker.service import WorkerService


def register(app: Celery, service: WorkerService) -> None:
    @app.task(name=TASK_NAME, ignore_result=True, acks_late=True)
    def render_job(job_id: str) -> str:
        return service.run_job(job_id)
