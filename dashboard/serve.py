"""Serving the dashboard with waitress, a production WSGI server that runs everywhere.

``serve(settings, host=None, port=8000)``: with no ``RENDERFARM_TOKEN`` the dashboard has no
auth, so it binds 127.0.0.1 and refuses any non-loopback address unless told
``insecure_no_auth=True`` (the CLI's ``--insecure-no-auth``), and says so in its log.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Any

from flask import Flask

from dashboard import create_app, hosts
from renderfarm.settings import Settings

log = logging.getLogger("renderfarm.dashboard")

LOCALHOST = "127.0.0.1"


def build(settings: Settings | None = None, config: dict[str, Any] | None = None) -> Flask:
    return create_app({"SETTINGS": settings or Settings(), **(config or {})})


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_host(app: Flask, host: str | None, insecure_no_auth: bool = False) -> str:
    """The address to bind. Without a token: a loopback address, else RuntimeError unless
    ``insecure_no_auth``."""
    if app.config["TOKEN"]:
        return host or LOCALHOST
    if host and not is_loopback(host):
        if not insecure_no_auth:
            raise RuntimeError(
                f"refusing to serve the dashboard on {host} without auth: anyone who can reach "
                "it could submit and cancel jobs. Set RENDERFARM_TOKEN and "
                "RENDERFARM_SECRET_KEY, or pass --insecure-no-auth if you really mean it."
            )
        log.warning("INSECURE: the dashboard has no auth (RENDERFARM_TOKEN is unset) and "
                    "listens on %s (--insecure-no-auth): anyone who can reach it can submit and "
                    "cancel jobs. Browsers must use a name in RENDERFARM_ALLOWED_HOSTS or the "
                    "bound address.", host)
        return host
    bind = host or LOCALHOST
    log.warning("the dashboard has no auth (RENDERFARM_TOKEN is unset), so it is bound to "
                "localhost (%s) only; set RENDERFARM_TOKEN and RENDERFARM_SECRET_KEY to serve it "
                "to others", bind)
    return bind


def check_redis(app: Flask) -> None:
    """Warn loudly about the farm's Redis if it would lose queued jobs; RuntimeError with
    RENDERFARM_REDIS_CHECK=refuse. An unreachable Redis is not a reason not to serve (the pages
    say it is unreachable)."""
    from redis.exceptions import RedisError

    from renderfarm.errors import FarmUnavailable
    from renderfarm.redis_check import check

    client = app.extensions["renderfarm"]
    try:
        check(client.settings, client.redis, log, "dashboard")
    except (RedisError, FarmUnavailable) as exc:
        log.warning("could not check the farm's Redis: %s", exc)


def allow_bound_host(app: Flask, bind: str) -> None:
    """Requests naming the bound address in their Host are the dashboard's own."""
    hosts.allow(app, bind)


def serve(settings: Settings | None = None, host: str | None = None, port: int = 8000,
          threads: int | None = None, config: dict[str, Any] | None = None,
          insecure_no_auth: bool = False) -> None:
    """Serve the dashboard until interrupted. ``host=None``: 127.0.0.1."""
    from waitress import serve as waitress_serve

    app = build(settings, config)
    bind = resolve_host(app, host, insecure_no_auth)
    allow_bound_host(app, bind)
    app.config["BIND"] = bind
    check_redis(app)
    shown = f"[{bind}]" if ":" in bind else bind
    log.info("dashboard at http://%s:%d/", shown, port)
    waitress_serve(app, host=bind, port=port, threads=threads or min(16, (os.cpu_count() or 4) * 2),
                   ident="renderfarm", clear_untrusted_proxy_headers=True)


def make_server(app: Flask, host: str = LOCALHOST, port: int = 0):
    """A waitress server not yet running (``.run()`` serves; ``.close()`` stops); for tests and
    ``renderfarm up``, which run it in a thread. ``port=0`` picks a free one."""
    from waitress.server import create_server

    app.config["BIND"] = host  # the pages say when they are reachable from this machine only
    return create_server(app, host=host, port=port, threads=8, ident="renderfarm")
