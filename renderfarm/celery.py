"""The farm's Celery app, for Celery's own tools: ``celery -A renderfarm inspect ping``,
``celery -A renderfarm events``, ``celery -A renderfarm flower``, ``celery -A renderfarm control
revoke <job id>``.

Celery finds this module from ``-A renderfarm`` (``renderfarm.celery``, then its ``app``). The
app is the one workers and the producer build (renderfarm/connection.py): the farm's Redis,
priority steps, queues and JSON-only serializer, from the ``RENDERFARM_*`` environment like
every other command. Importing ``renderfarm`` alone does not import Celery.
"""

from __future__ import annotations

from renderfarm.connection import celery_app
from renderfarm.settings import Settings

app = celery_app(Settings())
