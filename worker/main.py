"""``renderfarm worker``: one Celery worker process, solo pool, one device."""

from __future__ import annotations

import logging
import signal

from celery import signals
from celery.utils.nodenames import host_format

from renderfarm.settings import Settings
from worker.events import JobEvents
from worker.revokes import RevokeListener
from worker.service import WorkerService
from worker.tasks import affinity_queue, register

log = logging.getLogger("renderfarm.worker")


def run_worker(
    settings: Settings,
    profile: str = "auto",
    queues: list[str] | None = None,
    preload: list[str] | None = None,
    loglevel: str = "INFO",
    name: str | None = None,
    max_models: int = 2,
    affinity: bool = True,
) -> None:
    """Start a worker and block until it is shut down (SIGTERM: warm shutdown)."""
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _check_redis(settings)
    service = WorkerService(settings, profile, max_models=max_models, affinity=affinity)
    register(service.app, service)
    models = service.advertise_models()
    if not models and not queues:
        raise SystemExit(f"no models in {settings.models_path}: add one (e.g. `renderfarm "
                         "make-model tiny DIR/tiny`) or set RENDERFARM_MODELS_DIR")
    log.info("worker %s: profile %s, models %s", service.owner, service.profile.name, models)
    hostname = host_format(f"{name or 'rf-' + service.owner.replace(':', '-')}@%h")
    if settings.task_events:
        service.events = JobEvents(service.app, hostname)  # each job's final task event
    revokes = RevokeListener(service.app, service.records, hostname)
    if settings.metrics_port:
        from worker.metrics import serve

        serve(settings.metrics_port)
    service.start_background()  # beats "starting" while models load and compile
    service.preload(preload or [])

    # SIGUSR2: stop now (``renderfarm up``'s second Ctrl-C): the running job goes back to the
    # queue at once; SIGTERM (warm shutdown) then ends the worker.
    signal.signal(signal.SIGUSR2, lambda *_: service.give_back_running())

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        revokes.start()
        service.mark_ready()
        log.info("worker %s ready", service.owner)

    @signals.worker_shutting_down.connect(weak=False)
    def _stopping(**_: object) -> None:
        service.stop_background()  # no more affinity jobs; the running one finishes
        revokes.stop()

    @signals.worker_shutdown.connect(weak=False)
    def _stopped(**_: object) -> None:
        service.drain()  # jobs rendered but not yet stored are stored before exit

    argv = [
        "worker",
        "--pool=solo",  # one process per device: CUDA does not survive fork
        "--concurrency=1",
        f"--queues={','.join([*(queues or service.queues), affinity_queue(service)])}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
        f"--hostname={hostname}",
    ]
    service.app.worker_main(argv)


def _check_redis(settings: Settings) -> None:
    """Warn loudly about (or, with RENDERFARM_REDIS_CHECK=refuse, refuse) a Redis that would
    lose queued jobs; before anything is loaded."""
    from renderfarm.connection import connect
    from renderfarm.redis_check import check

    redis = connect(settings)
    try:
        check(settings, redis, log, "worker")
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    finally:
        redis.close()
