"""The dashboard: a Flask app with the HTML pages (``ui``) and the JSON API (``api``, /api/v1).

``create_app(test_config=None)`` builds it. Configuration, later sources winning:

1. defaults below;
2. ``RENDERFARM_*`` environment variables, via ``app.config.from_prefixed_env("RENDERFARM")``:
   ``RENDERFARM_TOKEN`` turns auth on, ``RENDERFARM_SECRET_KEY`` signs sessions;
3. ``test_config``, a mapping. ``SETTINGS`` there is the farm's
   :class:`~renderfarm.settings.Settings` (default: ``Settings()``, read from the environment).

The farm client lives in ``app.extensions["renderfarm"]`` (a :class:`~producer.client.FarmClient`).
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from flask import Flask, jsonify, render_template, request
from flask_wtf.csrf import CSRFError, CSRFProtect
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from werkzeug.exceptions import HTTPException

from producer.client import FarmClient
from renderfarm.errors import BadRecord, FarmUnavailable, InvalidJob, JobNotFound
from renderfarm.settings import Settings

__all__ = ["create_app", "csrf"]

log = logging.getLogger("renderfarm.dashboard")
csrf = CSRFProtect()

DEFAULTS: dict[str, Any] = {
    "SECRET_KEY": None,  # required when TOKEN is set; else a random key per process
    "TOKEN": None,  # RENDERFARM_TOKEN: bearer token of the API and password of the UI
    "SETTINGS": None,  # a renderfarm Settings; None: Settings() from the environment
    "MAX_CONTENT_LENGTH": 16 * 1024 * 1024,  # bodies over this get 413
    "MAX_FORM_MEMORY_SIZE": 4 * 1024 * 1024,  # a prompts textarea can be long
    "MAX_BATCH_JOBS": 10_000,  # jobs in one POST /api/v1/batches
    "SESSION_COOKIE_HTTPONLY": True,
    "SESSION_COOKIE_SAMESITE": "Lax",
    "SESSION_COOKIE_SECURE": False,  # set RENDERFARM_SESSION_COOKIE_SECURE=true behind HTTPS
    "WTF_CSRF_TIME_LIMIT": None,  # valid for the session's life: a submit page may stay open
    "POLL_MS": 2000,  # how often pages poll the API; never below 2 s
    "A1111_TIMEOUT": 3600,  # seconds an /sdapi/v1 txt2img or img2img call waits for its images
}


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("RENDERFARM")
    if test_config:
        app.config.from_mapping(test_config)
    _check_auth_config(app)

    settings = app.config["SETTINGS"] or Settings()
    app.extensions["renderfarm"] = FarmClient(settings)
    app.permanent_session_lifetime = settings.session_lifetime
    app.config["POLL_MS"] = max(2000, int(app.config["POLL_MS"]))

    csrf.init_app(app)
    from dashboard import a1111, api, auth, hosts, limits, metrics, ui

    hosts.init_app(app, settings.allowed_hosts)  # first: before any other hook or view
    limits.init_app(app, settings)

    app.register_blueprint(auth.bp)
    app.register_blueprint(ui.bp)
    app.register_blueprint(api.bp, url_prefix="/api/v1")
    csrf.exempt(api.bp)  # the API takes a bearer token, not cookies, for anything it changes
    app.register_blueprint(a1111.bp, url_prefix="/sdapi/v1")  # AUTOMATIC1111's API
    csrf.exempt(a1111.bp)  # Bearer or Basic auth, never cookies
    app.register_blueprint(metrics.bp)  # /metrics (Prometheus) and /healthz (probes)

    _register_error_handlers(app)
    app.after_request(_security_headers)
    app.context_processor(lambda: {"auth_on": bool(app.config["TOKEN"])})
    return app


def _check_auth_config(app: Flask) -> None:
    token = app.config["TOKEN"]
    if token is not None:
        token = str(token)  # from_prefixed_env turns RENDERFARM_TOKEN=1234 into an int
        app.config["TOKEN"] = token or None
    if app.config["TOKEN"]:
        if not app.config["SECRET_KEY"]:
            raise RuntimeError(
                "RENDERFARM_TOKEN is set, so RENDERFARM_SECRET_KEY must be set too: it signs the "
                "login sessions (e.g. RENDERFARM_SECRET_KEY=$(python -c 'import secrets; "
                "print(secrets.token_hex(32))'))"
            )
    elif not app.config["SECRET_KEY"]:
        app.config["SECRET_KEY"] = secrets.token_hex(32)
    app.config["SECRET_KEY"] = str(app.config["SECRET_KEY"])


def wants_json() -> bool:
    return request.path.startswith("/api/")


def error_response(status: int, message: str, field: str | None = None, value: Any = None):
    """The API's error body: ``{"errors": [{"field", "message", "value", "error"}]}``."""
    text = f"{field} {message}" if field else message
    body = {"errors": [{"field": field, "message": message, "value": value, "error": text}]}
    return jsonify(body), status


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(InvalidJob)
    def invalid_job(exc: InvalidJob):
        return jsonify({"errors": [e.to_dict() for e in exc.errors]}), 400

    @app.errorhandler(JobNotFound)
    def not_found(exc: JobNotFound):
        if wants_json():
            return error_response(404, str(exc), "id", exc.args[0])
        return render_template("error.html", status=404, message=str(exc)), 404

    @app.errorhandler(BadRecord)
    def bad_record(exc: BadRecord):  # this job's page fails, with the reason; no other does
        log.error("%s", exc)
        if wants_json():
            return error_response(500, str(exc), "id", exc.job_id)
        return render_template("error.html", status=500, message=str(exc)), 500

    @app.errorhandler(FarmUnavailable)
    @app.errorhandler(RedisConnectionError)
    @app.errorhandler(RedisTimeoutError)
    def unavailable(exc: Exception):
        log.warning("farm unavailable: %s", exc)
        message = "the farm's Redis is unreachable; is the farm running?"
        if wants_json():
            return error_response(503, message)
        return render_template("error.html", status=503, message=message), 503

    @app.errorhandler(CSRFError)
    def csrf_error(exc: CSRFError):
        message = f"the form was refused: {exc.description} Reload the page and try again."
        return render_template("error.html", status=400, message=message), 400

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if wants_json():
            response, status = error_response(exc.code or 500, exc.description or exc.name)
            if exc.code == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="renderfarm"'
            return response, status
        return render_template("error.html", status=exc.code, message=exc.description), exc.code

    @app.errorhandler(Exception)
    def server_error(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        message = "internal error; the dashboard's log has the details"
        if wants_json():
            return error_response(500, message)
        return render_template("error.html", status=500, message=message), 500


def _security_headers(response):
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data: blob: http: https:; script-src 'self'; "
        "style-src 'self'; frame-ancestors 'none'; form-action 'self'",
    )
    return response
