"""Test-mode holds: the test suite makes a job wait at a chosen point until the test releases it.

A fault test must act while a job is at a known point (rendering its third step, about to
upload its images) without sleeping for a window that a faster or slower machine misses. With
holds on, the worker stops a job there, pushes an event saying so, and waits until the test
deletes the hold:

- ``step:<prompt>`` = N in the hash :data:`HOLDS`: a job with that prompt stops after its N-th
  denoising step (its progress for step N is recorded first); setting the field to a later
  step M while it waits moves the hold: the job goes on and stops again after step M;
- ``upload:<prompt>`` in :data:`HOLDS`: a job with that prompt stops after rendering, before its
  first object is written to storage.

When a job stops, ``<point>:<job id>:<step>`` is pushed to the list :data:`REACHED` (the test
waits on it with ``BLPOP``); it goes on when the field is deleted. Its lease keeps being
renewed while it waits (the renewal thread runs on), so a held job is not taken for lost.

Never on by accident: holds are on only when the worker's environment has
:data:`ENABLE_ENV` set to exactly :data:`ENABLE_VALUE` — a sentence, not a flag a deployment
could set with ``=1`` — and the worker then logs a warning at start. It is no setting (it is in
neither ``Settings`` nor the README's table), and its keys live under ``rf:test:``, apart from
the farm's own. Without it, :func:`from_env` returns None and the worker never reads these keys.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

from redis import Redis

log = logging.getLogger("renderfarm.worker")

ENABLE_ENV = "RENDERFARM_TEST_HOLDS"
ENABLE_VALUE = "hold jobs for the renderfarm test suite"
HOLDS = "rf:test:holds"  #: hash "<point>:<prompt>" -> step number ("" for upload)
REACHED = "rf:test:reached"  #: list of "<point>:<job id>:<step>", one per stop
POLL = 0.02  # seconds between checks of a held job's field


class Holds:
    def __init__(self, redis: Redis):
        self.redis = redis

    def at_step(self, jobs: Iterable[tuple[str, str]], step: int) -> None:
        """After step ``step`` of the jobs ``(job id, prompt)`` rendered together."""
        jobs = list(jobs)
        fields = [f"step:{prompt}" for _, prompt in jobs]
        for (job_id, _), field, value in zip(jobs, fields, self.redis.hmget(HOLDS, fields),
                                             strict=True):
            if value is not None and int(value) == step:
                self._wait(field, value, f"step:{job_id}:{step}")
                return  # jobs rendered together stop together: one stop, one event

    def before_upload(self, job_id: str, prompt: str) -> None:
        field = f"upload:{prompt}"
        value = self.redis.hget(HOLDS, field)
        if value is not None:
            self._wait(field, value, f"upload:{job_id}:0")

    def _wait(self, field: str, value: bytes, event: str) -> None:
        """Until the test deletes the field, or sets it to another step (the job goes on and
        stops again there)."""
        log.warning("test hold: %s waits for the test to release %r", event, field)
        self.redis.rpush(REACHED, event)
        while self.redis.hget(HOLDS, field) == value:
            time.sleep(POLL)
        log.warning("test hold: %s released", event)


def from_env(redis: Redis) -> Holds | None:
    """Holds when the environment turns them on (see the module's doc), else None."""
    value = os.environ.get(ENABLE_ENV)
    if value is None:
        return None
    if value != ENABLE_VALUE:
        raise SystemExit(f"{ENABLE_ENV}={value!r}: test holds are for the test suite only; "
                         f"unset {ENABLE_ENV}")
    log.warning("TEST HOLDS ARE ON (%s): jobs may wait for the test suite", ENABLE_ENV)
    return Holds(redis)
