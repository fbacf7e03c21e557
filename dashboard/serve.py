"""Serving the dashboard with waitress, a production WSGI server that runs everywhere.

``serve(settings, host=None, port=8000)``: with no ``RENDERFARM_TOKEN`` the dashboard has no
auth, so it binds 127.0.0.1 unless a host is given, and says so in its log.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from flask import Flask

from dashboard import create_app
from renderfarm.settings import Settings

log = logging.getLogger("renderfarm.dashboard")

LOCALHOST = "127.0.0.1"


def build(settings: Settings | None = None, config: dict[str, Any] | None = None) -> Flask:
    return create_app({"SETTINGS": settings or Settings(), **(config or {})})


def resolve_host(app: Flask, host: str | None) -> str:
    if app.config["TOKEN"]:
        return host or LOCALHOST
    if host and host not in (LOCALHOST, "localhost", "::1"):
        log.warning("the dashboard has no auth (RENDERFARM_TOKEN is unset) and listens on %s: "
                    "anyone who can reach it can submit and cancel jobs", host)
        return host
    log.warning("the dashboard has no auth (RENDERFARM_TOKEN is unset), so it is bound to "
                "localhost (%s) only; set RENDERFARM_TOKEN and RENDERFARM_SECRET_KEY to serve it "
                "to others", LOCALHOST)
    return LOCALHOST


def serve(settings: Settings | None = None, host: str | None = None, port: int = 8000,
          threads: int | None = None, config: dict[str, Any] | None = None) -> None:
    """Serve the dashboard until interrupted. ``host=None``: 127.0.0.1."""
    from waitress import serve as waitress_serve

    app = build(settings, config)
    bind = resolve_host(app, host)
    shown = f"[{bind}]" if ":" in bind else bind
    log.info("dashboard at http://%s:%d/", shown, port)
    waitress_serve(app, host=bind, port=port, threads=threads or min(16, (os.cpu_count() or 4) * 2),
                   ident="renderfarm", clear_untrusted_proxy_headers=True)


def make_server(app: Flask, host: str = LOCALHOST, port: int = 0):
    """A waitress server not yet running (``.run()`` serves; ``.close()`` stops); for tests and
    ``renderfarm up``, which run it in a thread. ``port=0`` picks a free one."""
    from waitress.server import create_server

    return create_server(app, host=host, port=port, threads=8, ident="renderfarm")
