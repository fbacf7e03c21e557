"""Which ``Host`` headers the dashboard answers: its defence against DNS rebinding.

Without ``RENDERFARM_TOKEN`` anyone who reaches the dashboard may use it, which is safe only
while "anyone" is the local user. A web page on ``evil.example`` can make the browser resolve
that name to 127.0.0.1 and then talk to the dashboard as a same-origin page (its ``Origin``
matches its own ``Host``), so the Origin check cannot see it. The Host header can: the browser
always sends the name it resolved. So without a token only loopback names, the address the
dashboard binds and the names in ``RENDERFARM_ALLOWED_HOSTS`` are served; anything else gets
400 before any view runs (like Django's ``ALLOWED_HOSTS``). With a token set, the token guards
every request and any Host is served (a proxy in front may use any name).
"""

from __future__ import annotations

from flask import Flask, abort, current_app, request

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
CONFIG_KEY = "RENDERFARM_HOSTS"  # app.config: the set of host names served without a token


def init_app(app: Flask, allowed: str) -> None:
    names = {name.strip().lower().rstrip(".") for name in allowed.split(",") if name.strip()}
    app.config[CONFIG_KEY] = set(LOOPBACK_NAMES) | names
    app.before_request(check_host)


def allow(app: Flask, name: str) -> None:
    """Serve ``name`` too (the address the dashboard binds, when it is not a wildcard)."""
    if name not in ("0.0.0.0", "::", ""):
        app.config[CONFIG_KEY].add(name.strip("[]").lower())


def host_name(host: str) -> str:
    """The name of a Host header, without port or brackets: ``[::1]:8080`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def check_host() -> None:
    if current_app.config["TOKEN"] or request.path == "/healthz":  # probes: it tells nothing
        return
    name = host_name(request.host)
    if name not in current_app.config[CONFIG_KEY]:
        abort(400, description=f"the Host header {name!r} is not a name this dashboard serves "
                               "without a token (add it to RENDERFARM_ALLOWED_HOSTS)")
