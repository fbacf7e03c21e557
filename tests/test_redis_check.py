"""Workers, the dashboard and ``renderfarm status`` check the Redis they connect to: real
redis-servers without persistence, with an eviction policy, with CONFIG disabled, and open on a
non-loopback address."""

from __future__ import annotations

import logging
import socket
import subprocess

import pytest
import redis as redis_py

from renderfarm.embedded import EmbeddedRedis
from renderfarm.redis_check import check, inspect
from renderfarm.settings import Settings

pytest_plugins = ["tests.dashboard_fixtures"]


@pytest.fixture(scope="module")
def start_redis(tmp_path_factory):
    """``start_redis(name, *args, password=None)``: a redis-server with extra directives."""
    servers = []

    def start(name: str, *args: str, password: str | None = None) -> str:
        server = EmbeddedRedis(tmp_path_factory.mktemp(name), password=password,
                               extra_args=list(args))
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


def _report(url: str):
    client = redis_py.Redis.from_url(url)
    try:
        return inspect(client, url)
    finally:
        client.close()


def test_embedded_redis_is_fit(start_redis):
    report = _report(start_redis("fit"))
    assert report.ok, report.problems
    assert report.persistence == "AOF" and report.eviction == "noeviction" and report.password


def test_rdb_snapshots_count_as_persistence(start_redis):
    report = _report(start_redis("rdb", "--appendonly", "no", "--save", "60", "1"))
    assert report.ok and report.persistence == "RDB"


def test_no_persistence_and_eviction_reported(start_redis):
    url = start_redis("volatile", "--appendonly", "no", "--maxmemory-policy", "allkeys-lru")
    report = _report(url)
    assert report.persistence == "none" and report.eviction == "allkeys-lru"
    [persistence, eviction] = report.problems
    assert "no persistence" in persistence and "appendonly yes" in persistence
    assert "allkeys-lru" in eviction and "noeviction" in eviction


def test_config_disabled_is_unknown_not_a_fault(start_redis, caplog):
    """A managed Redis without CONFIG: INFO tells AOF and eviction; the rest is "unknown"."""
    url = start_redis("managed", "--appendonly", "no", "--rename-command", "CONFIG", "")
    client = redis_py.Redis.from_url(url)
    with pytest.raises(redis_py.ResponseError):
        client.config_get("save")
    report = _report(url)
    assert report.persistence == "unknown" and report.eviction == "noeviction"
    assert report.ok
    settings = Settings(redis_url=url, redis_check="refuse")
    with caplog.at_level("WARNING", logger="test.redis"):
        check(settings, client, logging.getLogger("test.redis"), "worker")  # no refusal
    assert "could not check the persistence" in caplog.text
    client.close()


def _outside_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for address in out.split():
        if ":" not in address and not address.startswith("127."):
            return address
    return None


def test_no_password_on_outside_address(start_redis):
    address = _outside_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    url = start_redis("open", "--bind", "127.0.0.1", address, "--protected-mode", "no",
                      password="")
    assert _report(url).ok  # on loopback, no password is fine
    outside = url.replace("127.0.0.1", address)
    with socket.create_connection((address, int(url.rsplit(":", 1)[1].split("/")[0])), 5):
        pass
    [problem] = _report(outside).problems
    assert f"no password on {address}" in problem and "requirepass" in problem


@pytest.fixture(scope="module")
def volatile_url(start_redis) -> str:
    return start_redis("volatile-farm", "--appendonly", "no")


def test_refuse_setting_stops_worker_before_it_starts(volatile_url, tmp_path):
    from worker.main import run_worker

    settings = Settings(redis_url=volatile_url, redis_check="refuse", data_dir=tmp_path)
    with pytest.raises(SystemExit, match="no persistence.*RENDERFARM_REDIS_CHECK=warn"):
        run_worker(settings)


def test_warn_setting_logs_loudly(volatile_url, caplog):
    settings = Settings(redis_url=volatile_url)
    client = redis_py.Redis.from_url(volatile_url)
    with caplog.at_level("WARNING", logger="test.redis"):
        report = check(settings, client, logging.getLogger("test.redis"), "dashboard")
    client.close()
    assert not report.ok
    assert "UNSAFE REDIS for the dashboard: no persistence" in caplog.text


def test_dashboard_refuses_with_setting(volatile_url, tmp_path):
    from dashboard.serve import build, check_redis

    app = build(Settings(redis_url=volatile_url, redis_check="refuse", data_dir=tmp_path))
    with pytest.raises(RuntimeError, match="no persistence"):
        check_redis(app)


@pytest.mark.parametrize("page", ["/workers", "/queues"])
def test_dashboard_pages_warn(make_dash_app, dash_settings, volatile_url, page):
    unsafe = make_dash_app(SETTINGS=dash_settings.model_copy(update={"redis_url": volatile_url}))
    html = unsafe.test_client().get(page).get_data(as_text=True)
    assert 'id="redis-warning"' in html and "no persistence" in html
    fit = make_dash_app().test_client().get(page).get_data(as_text=True)
    assert 'id="redis-warning"' not in fit


def test_status_command_warns(monkeypatch, volatile_url, tmp_path):
    from click.testing import CliRunner

    from renderfarm.cli import main

    monkeypatch.setenv("RENDERFARM_REDIS_URL", volatile_url)
    monkeypatch.setenv("RENDERFARM_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 0, result.output
    assert "persistence none" in result.output
    assert "UNSAFE" in result.output and "no persistence" in result.output
