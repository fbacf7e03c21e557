"""Who the dashboard lets in: Host checks against DNS rebinding, the bind refusal without a
token, the login redirect, sessions that end at logout, and rate limits."""

from __future__ import annotations

import base64
import http.client
import re
import threading

import pytest

pytest_plugins = ["tests.dashboard_fixtures"]

TOKEN = "tok-sec"


def csrf_token(client, path: str) -> str:
    page = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)


def login(client, next_url: str = "", token: str = TOKEN):
    data = {"token": token, "csrf_token": csrf_token(client, "/login"), "next": next_url}
    return client.post("/login", data=data)


# -- 11. DNS rebinding: without a token only the bound names are served -----------------------
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.evil.example",
                                  "localhost.evil.example"])
def test_forged_host_refused_without_token(dash_client, make_job, host):
    origin = f"http://{host}"
    assert dash_client.get("/api/v1/batches", headers={"Host": host}).status_code == 400
    rv = dash_client.post("/api/v1/batches", json={"jobs": [make_job()]},
                          headers={"Host": host, "Origin": origin})
    assert rv.status_code == 400
    assert "Host" in rv.get_json()["errors"][0]["message"]
    assert dash_client.get("/batches", headers={"Host": host}).status_code == 400


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "127.0.0.1:8080", "[::1]:8080",
                                  "LOCALHOST"])
def test_loopback_hosts_served_without_token(dash_client, host):
    assert dash_client.get("/api/v1/batches", headers={"Host": host}).status_code == 200


def test_allowed_hosts_setting_adds_names(make_dash_app, dash_settings):
    settings = dash_settings.model_copy(update={"allowed_hosts": "farm.lan, render.example"})
    client = make_dash_app(SETTINGS=settings).test_client()
    assert client.get("/api/v1/batches", headers={"Host": "farm.lan:8080"}).status_code == 200
    assert client.get("/api/v1/batches", headers={"Host": "render.example"}).status_code == 200
    assert client.get("/api/v1/batches", headers={"Host": "evil.example"}).status_code == 400


def test_with_token_any_host_is_served(make_dash_app):
    client = make_dash_app(TOKEN=TOKEN, SECRET_KEY="k").test_client()
    headers = {"Host": "farm.example.com", "Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/v1/batches", headers=headers).status_code == 200


def _raw_request(port: int, method: str, path: str, headers: dict[str, str],
                 body: bytes = b"") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_rebinding_refused_by_the_served_dashboard(make_dash_app, dash_farm, make_job):
    """The attack as a browser makes it: evil.example resolves to 127.0.0.1, so the request
    reaches the real server with ``Host: evil.example`` and a matching ``Origin``."""
    import json

    from dashboard.serve import make_server

    server = make_server(make_dash_app(TESTING=False), port=0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    port = server.effective_port
    try:
        body = json.dumps({"jobs": [make_job()]}).encode()
        evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}",
                "Content-Type": "application/json"}
        status, data = _raw_request(port, "POST", "/api/v1/batches", evil, body)
        assert status == 400, data
        assert dash_farm.records.count_batches() == 0
        status, _ = _raw_request(port, "GET", "/api/v1/batches", evil)
        assert status == 400
        good = {**evil, "Host": f"127.0.0.1:{port}", "Origin": f"http://127.0.0.1:{port}"}
        status, data = _raw_request(port, "POST", "/api/v1/batches", good, body)
        assert status == 201, data
    finally:
        server.close()
        thread.join(timeout=10)


# -- 12. no token: never on a non-loopback address unless told, unsafely ----------------------
def test_no_token_refuses_non_loopback_bind(make_dash_app):
    from dashboard.serve import resolve_host

    app = make_dash_app()
    for host in ("0.0.0.0", "::", "192.168.1.5", "farm.lan"):
        with pytest.raises(RuntimeError, match="--insecure-no-auth"):
            resolve_host(app, host)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert resolve_host(app, host) == host


def test_insecure_no_auth_flag_binds_and_warns(make_dash_app, caplog):
    from dashboard.serve import resolve_host

    with caplog.at_level("WARNING", logger="renderfarm.dashboard"):
        assert resolve_host(make_dash_app(), "0.0.0.0", insecure_no_auth=True) == "0.0.0.0"
    assert "no auth" in caplog.text


def test_cli_dashboard_refuses_public_bind_without_token(dash_settings):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RENDERFARM_TOKEN"}
    env["RENDERFARM_REDIS_URL"] = dash_settings.redis_url
    # a dashboard that starts anyway serves until the timeout, which fails the test
    result = subprocess.run([sys.executable, "-m", "renderfarm", "dashboard", "--host", "0.0.0.0",
                             "--port", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--insecure-no-auth" in result.stderr + result.stdout


def test_serve_allows_the_bound_address_as_host(make_dash_app):
    from dashboard.serve import allow_bound_host

    app = make_dash_app()
    allow_bound_host(app, "192.168.1.5")
    client = app.test_client()
    assert client.get("/api/v1/batches", headers={"Host": "192.168.1.5:8080"}).status_code == 200
    assert client.get("/api/v1/batches", headers={"Host": "192.168.1.6"}).status_code == 400


# -- 13. the redirect after login stays on the site, as the browser reads it ------------------
@pytest.mark.parametrize("target", [
    "/\t/evil.example/x", "/\r/x", "/\n/evil.example", "\t//evil.example", "/\\evil.example",
    "\\/evil.example", "//evil.example", "https://evil.example/", "/%09/evil.example/x",
    " //evil.example", "/\x00/x", "javascript:alert(1)", "///evil.example",
])
def test_login_next_stays_on_site(make_dash_app, target):
    client = make_dash_app(TOKEN=TOKEN, SECRET_KEY="k").test_client()
    rv = login(client, target)
    assert rv.status_code == 302
    assert rv.headers["Location"] == "/batches", target


def test_login_next_from_query_string_forged(make_dash_app):
    """``?next=/%09/evil.example/x``: the form's hidden field carries the decoded value."""
    client = make_dash_app(TOKEN=TOKEN, SECRET_KEY="k").test_client()
    page = client.get("/login?next=/%09/evil.example/x").get_data(as_text=True)
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)
    hidden = re.search(r'name="next"[^>]*value="([^"]*)"', page).group(1)
    rv = client.post("/login", data={"token": TOKEN, "csrf_token": token,
                                     "next": hidden.replace("&#9;", "\t")})
    assert rv.headers["Location"] == "/batches"


@pytest.mark.parametrize("target", ["/queues", "/batches/abc?page=2", "/jobs/x#top"])
def test_login_next_keeps_local_paths(make_dash_app, target):
    client = make_dash_app(TOKEN=TOKEN, SECRET_KEY="k").test_client()
    assert login(client, target).headers["Location"] == target


# -- 14. logout ends the session everywhere; sessions have a lifetime -------------------------
def test_logout_ends_copied_sessions(make_dash_app):
    app = make_dash_app(TOKEN=TOKEN, SECRET_KEY="k")
    browser, thief = app.test_client(), app.test_client()
    assert login(browser, "/queues").status_code == 302
    cookie = browser.get_cookie("session")
    thief.set_cookie("session", cookie.value)
    assert thief.get("/batches").status_code == 200  # the copy works while the session lives

    page = browser.get("/batches").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)
    assert browser.post("/logout", data={"csrf_token": csrf}).status_code == 302
    rv = thief.get("/batches")
    assert rv.status_code == 302 and rv.headers["Location"].startswith("/login")
    assert thief.get("/api/v1/batches").status_code == 401


def test_session_lifetime_is_a_setting(make_dash_app, dash_settings, dash_farm):
    from renderfarm import keys

    settings = dash_settings.model_copy(update={"session_lifetime": 600})
    app = make_dash_app(TOKEN=TOKEN, SECRET_KEY="k", SETTINGS=settings)
    client = app.test_client()
    rv = login(client)
    assert "Expires=" in rv.headers["Set-Cookie"]
    redis = app.extensions["renderfarm"].redis
    sessions = list(redis.scan_iter(keys.session("*")))
    assert len(sessions) == 1
    assert 0 < redis.ttl(sessions[0]) <= 600
    redis.delete(sessions[0])  # what Redis does when the lifetime is over
    assert client.get("/batches").status_code == 302


# -- 17. rate limits: per address and per token, in the farm's Redis --------------------------
def _limited_app(make_dash_app, dash_settings, **settings):
    return make_dash_app(SETTINGS=dash_settings.model_copy(update=settings),
                         TOKEN=TOKEN, SECRET_KEY="k")


def test_rate_limit_per_address_429_with_retry_after(make_dash_app, dash_settings):
    app = _limited_app(make_dash_app, dash_settings, rate_limit_address="5 per minute",
                       rate_limit_token="")
    client = app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    one = {"REMOTE_ADDR": "10.0.0.1"}
    for _ in range(5):
        assert client.get("/api/v1/models", headers=auth, environ_base=one).status_code == 200
    rv = client.get("/api/v1/models", headers=auth, environ_base=one)
    assert rv.status_code == 429
    assert 0 < int(rv.headers["Retry-After"]) <= 60
    assert "limit" in rv.get_json()["errors"][0]["message"]
    # another address is not starved, and neither are the pages (not API routes)
    other = {"REMOTE_ADDR": "10.0.0.2"}
    assert client.get("/api/v1/models", headers=auth, environ_base=other).status_code == 200
    login(client)
    assert client.get("/batches", environ_base=one).status_code == 200


def test_rate_limit_per_token_across_addresses(make_dash_app, dash_settings):
    app = _limited_app(make_dash_app, dash_settings, rate_limit_address="",
                       rate_limit_token="4 per minute")
    client = app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for n in range(4):
        rv = client.get("/api/v1/models", headers=auth, environ_base={"REMOTE_ADDR": f"10.1.0.{n}"})
        assert rv.status_code == 200
    rv = client.get("/api/v1/models", headers=auth, environ_base={"REMOTE_ADDR": "10.1.0.9"})
    assert rv.status_code == 429 and "Retry-After" in rv.headers
    # a browser session logged in with the token is another client: not starved
    browser = app.test_client()
    login(browser)
    assert browser.get("/api/v1/models").status_code == 200


def test_rate_limit_counters_shared_by_dashboard_processes(make_dash_app, dash_settings):
    """Two apps (as two dashboard processes) count in the same Redis."""
    first = _limited_app(make_dash_app, dash_settings, rate_limit_address="4 per minute")
    second = _limited_app(make_dash_app, dash_settings, rate_limit_address="4 per minute")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for app in (first, first, second, second):
        assert app.test_client().get("/api/v1/models", headers=auth).status_code == 200
    assert first.test_client().get("/api/v1/models", headers=auth).status_code == 429
    assert second.test_client().get("/api/v1/models", headers=auth).status_code == 429


def test_rate_limits_cover_blueprints_added_later(make_dash_app, dash_settings):
    """An /sdapi/v1 blueprint registered after create_app is limited like the API."""
    from flask import Blueprint

    app = _limited_app(make_dash_app, dash_settings, rate_limit_address="2 per minute")
    bp = Blueprint("sdapi_probe", __name__)
    bp.add_url_rule("/sdapi/v1/probe", "probe", lambda: {"ok": True})
    app.register_blueprint(bp)
    client = app.test_client()
    assert client.get("/sdapi/v1/probe").status_code == 200
    assert client.get("/sdapi/v1/probe").status_code == 200
    rv = client.get("/sdapi/v1/probe")
    assert rv.status_code == 429 and "Retry-After" in rv.headers


def test_rate_limit_per_token_counts_basic_auth_on_sdapi(make_dash_app, dash_settings):
    app = _limited_app(make_dash_app, dash_settings, rate_limit_address="",
                       rate_limit_token="3 per minute")
    client = app.test_client()
    basic = {"Authorization": "Basic " + base64.b64encode(f"me:{TOKEN}".encode()).decode()}
    for n in range(3):
        rv = client.get("/sdapi/v1/sd-models", headers=basic,
                        environ_base={"REMOTE_ADDR": f"10.2.0.{n}"})
        assert rv.status_code == 200
    rv = client.get("/sdapi/v1/sd-models", headers=basic)
    assert rv.status_code == 429 and "Retry-After" in rv.headers


def test_rate_limits_work_over_a_unix_socket_redis(make_dash_app, dash_settings, tmp_path):
    """The limiter uses the farm's own connection, whatever its URL (here a unix socket)."""
    from renderfarm.embedded import EmbeddedRedis

    sock = tmp_path / "r.sock"
    server = EmbeddedRedis(tmp_path / "redis", password="",
                           extra_args=["--unixsocket", str(sock), "--unixsocketperm", "700"])
    server.start()
    try:
        settings = dash_settings.model_copy(update={"redis_url": f"unix://{sock}?db=0",
                                                    "rate_limit_address": "2 per minute"})
        client = make_dash_app(SETTINGS=settings).test_client()
        assert client.get("/api/v1/models").status_code == 200
        assert client.get("/api/v1/models").status_code == 200
        assert client.get("/api/v1/models").status_code == 429
    finally:
        server.stop()


def test_login_attempts_are_rate_limited(make_dash_app, dash_settings):
    app = _limited_app(make_dash_app, dash_settings, rate_limit_address="3 per minute")
    client = app.test_client()
    for _ in range(3):
        assert login(client, token="guess").status_code == 401
    rv = login(client, token="guess")
    assert rv.status_code == 429 and "Retry-After" in rv.headers
    assert "rate limit exceeded" in rv.get_data(as_text=True) and rv.mimetype == "text/html"
    assert client.get("/login").status_code == 200  # the form itself still shows


def test_openapi_documents_429(dash_client):
    spec = dash_client.get("/api/v1/openapi.json").get_json()
    op = spec["paths"]["/batches"]["post"]
    assert "Retry-After" in op["responses"]["429"]["headers"]
