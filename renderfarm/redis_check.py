"""Is the farm's Redis fit to hold the queue? Workers, the dashboard and ``renderfarm status``
ask when they connect.

Three things lose or expose every queued job, silently: no persistence (neither AOF nor RDB
snapshots: a restart empties the queue), an eviction policy other than ``noeviction`` (a full
Redis deletes job records and queue messages), and no password on a non-loopback address.
Each gets a loud warning (``RENDERFARM_REDIS_CHECK=warn``, the default) or stops the process
(``refuse``). Managed Redis services often disable ``CONFIG``: then ``INFO`` answers what it
can and the rest is reported as "unknown", never as a fault.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from redis import Redis
from redis.exceptions import RedisError

from renderfarm.settings import Settings

UNKNOWN = "unknown"


@dataclass(frozen=True)
class RedisReport:
    address: str  #: host[:port] or the unix socket, never the password
    persistence: str  #: "AOF", "RDB", "AOF+RDB", "none" or "unknown"
    eviction: str  #: maxmemory-policy, or "unknown"
    password: bool  #: the connection authenticates (the URL has a password or user)
    loopback: bool  #: the address is this machine's (127.0.0.0/8, ::1, localhost, a socket)
    problems: tuple[str, ...]  #: what loses or exposes jobs; empty when fit

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def summary(self) -> str:
        auth = "password" if self.password else "no password"
        return (f"Redis {self.address}: persistence {self.persistence}, eviction {self.eviction}, "
                f"{auth}")


def _config(redis: Redis, name: str) -> str | None:
    try:
        value = redis.config_get(name).get(name)
    except RedisError:  # CONFIG renamed away, or NOPERM: a managed Redis
        return None
    return None if value is None else str(value)


def _info(redis: Redis, section: str) -> dict:
    try:
        return redis.info(section)
    except RedisError:
        return {}


def _persistence(redis: Redis) -> str:
    appendonly, save = _config(redis, "appendonly"), _config(redis, "save")
    if appendonly is None:  # INFO still tells whether AOF is on
        aof = _info(redis, "persistence").get("aof_enabled")
        appendonly = None if aof is None else ("yes" if int(aof) else "no")
    kinds = []
    if appendonly == "yes":
        kinds.append("AOF")
    if save:
        kinds.append("RDB")
    if kinds:
        return "+".join(kinds)
    return "none" if appendonly == "no" and save is not None else UNKNOWN


def _eviction(redis: Redis) -> str:
    policy = _config(redis, "maxmemory-policy")
    if policy is None:
        policy = _info(redis, "memory").get("maxmemory_policy")
    return str(policy) if policy else UNKNOWN


def _where(url: str) -> tuple[str, bool, bool]:
    """(address, loopback, password) of a redis URL."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path, True, bool(parts.password or "password=" in parts.query)
    host = parts.hostname or "localhost"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    address = f"{host}:{parts.port or 6379}"
    return address, loopback, bool(parts.password or parts.username)


def inspect(redis: Redis, url: str) -> RedisReport:
    address, loopback, password = _where(url)
    persistence, eviction = _persistence(redis), _eviction(redis)
    problems = []
    if persistence == "none":
        problems.append("no persistence (appendonly is no and save is empty): a Redis restart "
                        "loses every queued job; set appendonly yes")
    if eviction not in ("noeviction", UNKNOWN):
        problems.append(f"maxmemory-policy is {eviction}: a full Redis evicts job records and "
                        "queue messages; set maxmemory-policy noeviction")
    if not password and not loopback:
        problems.append(f"no password on {address}, which is not a loopback address: anyone who "
                        "reaches it can read and change the queue; set requirepass and put the "
                        "password in RENDERFARM_REDIS_URL")
    return RedisReport(address, persistence, eviction, password, loopback, tuple(problems))


def check(settings: Settings, redis: Redis, log: logging.Logger, who: str) -> RedisReport:
    """Inspect the farm's Redis, log the verdict, and raise RuntimeError when
    ``settings.redis_check`` is ``refuse`` and it is not fit."""
    from renderfarm.connection import redis_url

    report = inspect(redis, redis_url(settings))
    for problem in report.problems:
        log.warning("!!! UNSAFE REDIS for the %s: %s", who, problem)
    unknown = [name for name, value in (("persistence", report.persistence),
                                        ("eviction policy", report.eviction))
               if value == UNKNOWN]
    if unknown:
        log.warning("could not check the %s of Redis %s (CONFIG is not allowed; a managed "
                    "Redis?): make sure it persists (AOF or RDB) and never evicts",
                    " and ".join(unknown), report.address)
    if report.problems and settings.redis_check == "refuse":
        raise RuntimeError(
            f"the {who} refuses Redis {report.address}: " + "; ".join(report.problems)
            + ". Fix it, or set RENDERFARM_REDIS_CHECK=warn to run anyway."
        )
    if report.ok and not unknown:
        log.info("%s", report.summary)
    return report
