"""Finding the farm's Redis and building the Celery app that talks to it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from redis import Redis

from renderfarm.embedded import read_farm_file
from renderfarm.errors import FarmUnavailable
from renderfarm.settings import Settings

if TYPE_CHECKING:  # Celery is imported when an app is made: the CLI starts faster without it
    from celery import Celery

TASK_NAME = "renderfarm.render"
AFFINITY_TASK = "renderfarm.render_loaded"  #: "take the next job of a loaded model"


def redis_url(settings: Settings) -> str:
    """``RENDERFARM_REDIS_URL``, else the embedded farm running in the data dir."""
    if settings.redis_url:
        return settings.redis_url
    url = read_farm_file(settings.farm_file)
    if url is None:
        raise FarmUnavailable(
            f"no farm found: RENDERFARM_REDIS_URL is not set and no embedded farm is running "
            f"in {settings.data_path} (start one with `renderfarm up`)"
        )
    return url


def connect(settings: Settings) -> Redis:
    url = redis_url(settings)
    tcp = {} if url.startswith("unix:") else {"socket_keepalive": True}  # not for unix sockets
    return Redis.from_url(
        url,
        health_check_interval=30,
        socket_connect_timeout=5,
        retry_on_timeout=True,
        **tcp,
    )


def celery_app(settings: Settings, url: str | None = None) -> Celery:
    """The farm's Celery app. Safety settings follow ../shared/FIELD-NOTES.md."""
    from celery import Celery

    url = url or redis_url(settings)
    transport = {
        # Must exceed the longest render, or Redis re-delivers a running job; our own leases
        # (records.py) recover jobs of dead workers long before this expires.
        "visibility_timeout": settings.visibility_timeout,
        # kombu polls priority 9 of every queue before priority 8 of any, and rotates the
        # queues of equal priority (its default round_robin): no model's queue starves.
        "priority_steps": list(range(10)),
    }
    app = Celery("renderfarm", broker=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],  # never pickle from the broker (CVE-2021-23727)
        result_serializer="json",
        task_ignore_result=True,  # job records live in rf:job:*, not in Celery's backend
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        broker_transport_options=transport,
        visibility_timeout=settings.visibility_timeout,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_soft_shutdown_timeout=0,
        worker_hijack_root_logger=False,
        # Task events on, so Flower and `celery events` see every task's life; each task's
        # final state says what happened to its job (worker/tasks.py).
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
    )
    return app


def celery_priority(priority: int) -> int:
    """Our priority: 9 runs first. Redis transport: 0 is consumed first."""
    return 9 - priority
