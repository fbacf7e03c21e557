"""Who may use the dashboard.

With no ``TOKEN`` configured everything is open (serve.py then binds 127.0.0.1 only).
With ``RENDERFARM_TOKEN`` set:

- the API needs ``Authorization: Bearer <token>``; a browser session that logged in may also
  *read* the API (the pages poll it), but anything that changes the farm through the API needs
  the bearer token: the API is exempt from CSRF tokens, so it must not act on cookies alone;
- the pages and ``/files/`` need a login: a form that takes the token and sets a signed,
  HttpOnly, SameSite=Lax session cookie. The cookie names a server-side session in Redis
  (``rf:session:<sha256 of its id>``) that expires after ``RENDERFARM_SESSION_LIFETIME``
  seconds and is deleted at logout, so a copy of the cookie dies with it.

Tokens are compared with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import unquote, urlsplit

from flask import (
    Blueprint,
    abort,
    current_app,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf import FlaskForm
from wtforms import HiddenField, PasswordField
from wtforms.validators import InputRequired

from renderfarm import keys

bp = Blueprint("auth", __name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def token() -> str | None:
    return current_app.config["TOKEN"]


def _digest(value: str) -> str:
    key = current_app.config["SECRET_KEY"].encode()
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def token_matches(given: str) -> bool:
    expected = token()
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def bearer_ok() -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and token_matches(given.strip())


def _session_key(sid: str) -> str:
    return keys.session(hashlib.sha256(sid.encode()).hexdigest())


def _redis():
    return current_app.extensions["renderfarm"].redis


def session_ok() -> bool:
    """The session logged in with the token that is configured now, and has not ended."""
    if "session_ok" not in g:
        saved, sid = session.get("auth"), session.get("sid")
        g.session_ok = (
            isinstance(saved, str) and isinstance(sid, str)
            and hmac.compare_digest(saved, _digest(token() or ""))
            and bool(_redis().exists(_session_key(sid)))
        )
    return g.session_ok


def start_session() -> None:
    lifetime = current_app.extensions["renderfarm"].settings.session_lifetime
    sid = secrets.token_urlsafe(32)
    _redis().set(_session_key(sid), "1", ex=max(1, int(lifetime)))
    session.clear()
    session.permanent = True  # the cookie expires with the server-side session
    session["auth"] = _digest(token() or "")
    session["sid"] = sid


def end_session() -> None:
    sid = session.get("sid")
    if isinstance(sid, str):
        _redis().delete(_session_key(sid))
    session.clear()


def check_api() -> None:
    """Before every API request: 401 unless the caller may make it; 403 for a cross-site write."""
    if request.method not in SAFE_METHODS:
        _refuse_cross_site()
    if not token():
        return
    if bearer_ok():
        return
    if request.method in SAFE_METHODS and session_ok():
        return
    abort(401, description="this API needs 'Authorization: Bearer <RENDERFARM_TOKEN>'")


def check_page() -> object | None:
    """Before every page: send a visitor that has not logged in to the login form."""
    if not token() or session_ok() or bearer_ok():
        return None
    if request.method in SAFE_METHODS:
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    abort(401, description="log in first")


def _refuse_cross_site() -> None:
    """A write from another site's page (a browser sends its Origin) is refused.

    Without a token the API is open on localhost; this keeps a web page the user happens to
    visit from cancelling or submitting through it with a plain form POST.
    """
    origin = request.headers.get("Origin")
    if origin and origin != request.host_url.rstrip("/"):
        abort(403, description=f"cross-site request from {origin} refused")


class LoginForm(FlaskForm):
    token = PasswordField("Token", validators=[InputRequired()])
    next = HiddenField()


def _safe_next(target: str | None) -> str:
    """``target`` if a browser would read it as a path on this site, else the batches page.

    Browsers drop tabs and newlines anywhere in a URL, trim leading control characters and
    spaces, and read ``\\`` as ``/``: ``/\t/evil.example`` is ``//evil.example``, another
    site. So a target with any control character or backslash (also percent-encoded) is
    refused outright, and what remains must be a path: no scheme, no host, one leading slash.
    """
    fallback = url_for("ui.batches")
    if not target:
        return fallback
    for text in (target, unquote(target)):
        if "\\" in text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            return fallback
        if not text.startswith("/") or text.startswith("//"):
            return fallback
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return fallback
    return target


@bp.route("/login", methods=["GET", "POST"])
def login():
    if not token():
        return redirect(url_for("ui.batches"))
    form = LoginForm(next=request.args.get("next", ""))
    error = None
    if form.validate_on_submit():
        if token_matches(form.token.data or ""):
            start_session()
            return redirect(_safe_next(form.next.data))
        error = "That is not the dashboard's token."
    status = 401 if error else 200
    return render_template("login.html", form=form, error=error), status


@bp.route("/logout", methods=["POST"])
def logout():
    end_session()
    return redirect(url_for("auth.login") if token() else url_for("ui.batches"))
