"""Rate limits of the API (``/api/``) and the A1111-compatible routes (``/sdapi/``).

flask-limiter, its counters in the farm's Redis (``rf:limits:*``), so every dashboard process
counts together. Two limits, both settings (generous by default; empty turns one off):

- ``RENDERFARM_RATE_LIMIT_ADDRESS``: per client address (``request.remote_addr``; behind a
  reverse proxy that is the proxy's, unless waitress is told to trust its headers);
- ``RENDERFARM_RATE_LIMIT_TOKEN``: per credential, across addresses: a bearer token or HTTP
  Basic password (by its hash) or a logged-in session, so a script hammering with the token
  does not starve a person in the browser.

They apply by path to every route under the prefixes in :data:`LIMITED_PREFIXES`, also to
blueprints registered after :func:`init_app` (the ``/sdapi/v1`` routes), and to login attempts
(``POST /login``) per address. The pages are not limited. A request over a limit gets 429
with ``Retry-After`` (seconds). If Redis is down the limiter lets requests through
(``swallow_errors``); the views then answer 503 themselves.

The :class:`~flask_limiter.Limiter` is ``app.extensions["renderfarm_limiter"]``; a blueprint may
add its own limits with ``limiter.limit("10 per second")(blueprint)``.
"""

from __future__ import annotations

import hashlib
import logging

from flask import Flask, render_template, request, session
from flask_limiter import ApplicationLimit, Limiter, RateLimitExceeded

from renderfarm import keys
from renderfarm.errors import FarmUnavailable
from renderfarm.settings import Settings

log = logging.getLogger("renderfarm.dashboard")

LIMITED_PREFIXES = ("/api/", "/sdapi/")
EXTENSION = "renderfarm_limiter"


def address_key() -> str:
    return request.remote_addr or "unknown"


def credential_key() -> str:
    """The caller's credential, hashed: the bearer token or HTTP Basic password (the A1111
    routes take the token that way), else the login session; ``""`` when there is none."""
    given = request.authorization
    secret = (given.token if given.type == "bearer" else given.password) if given else None
    if secret:
        return "token:" + hashlib.sha256(secret.encode()).hexdigest()[:32]
    sid = session.get("sid")
    if isinstance(sid, str):
        return "session:" + hashlib.sha256(sid.encode()).hexdigest()[:32]
    return ""


def is_limited() -> bool:
    """An API call, or a login attempt (guessing the token through the form counts too)."""
    if request.path == "/login":
        return request.method == "POST"
    return request.path.startswith(LIMITED_PREFIXES)


def _no_credential() -> bool:
    return not is_limited() or not credential_key()


def init_app(app: Flask, settings: Settings) -> Limiter:
    limits = []
    if settings.rate_limit_address.strip():
        limits.append(ApplicationLimit(settings.rate_limit_address, key_function=address_key,
                                       scope="address", exempt_when=lambda: not is_limited()))
    if settings.rate_limit_token.strip():
        limits.append(ApplicationLimit(settings.rate_limit_token, key_function=credential_key,
                                       scope="token",
                                       exempt_when=_no_credential))
    storage, options = "memory://", {}
    try:  # the farm client's own connection pool: any URL it takes (unix sockets, TLS) works
        options = {"connection_pool": app.extensions["renderfarm"].redis.connection_pool}
        storage = "redis://"
    except FarmUnavailable:
        log.warning("no farm Redis found: rate limits count in this process only")
    limiter = Limiter(
        address_key,
        application_limits=limits,
        storage_uri=storage,
        storage_options=options,
        key_prefix=keys.RATE_LIMITS.rstrip(":"),
        headers_enabled=True,
        swallow_errors=True,
        enabled=bool(limits),
    )
    limiter.init_app(app)
    app.extensions[EXTENSION] = limiter

    @app.errorhandler(RateLimitExceeded)
    def too_many(exc: RateLimitExceeded):
        from dashboard import error_response

        message = f"rate limit exceeded ({exc.description}); retry after Retry-After seconds"
        if request.path.startswith(LIMITED_PREFIXES):
            return error_response(429, message)
        return render_template("error.html", status=429, message=message), 429

    return limiter
