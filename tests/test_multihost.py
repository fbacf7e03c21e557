"""A farm across hosts: Linux network namespaces stand in for four machines on one LAN.

host1 (10.77.0.1) runs Redis and the S3 endpoint, host2 and host3 a worker each, host4 the
producer. Each host is a network namespace (and a UTS namespace, so each has its own host
name) joined by veth pairs to a bridge in a fifth namespace; the 10.77.0.0/24 addresses
exist only inside them, so nothing here can work by reaching 127.0.0.1. Needs root and
iproute2; skipped, saying why, where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from renderfarm.embedded import redis_server_binary

ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.77.0"
HOSTS = (1, 2, 3, 4)
SERVER = f"{SUBNET}.1"
REDIS_PORT, S3_PORT = 6379, 5000
PASSWORD = "multihost-secret"
REDIS_URL = f"redis://:{PASSWORD}@{SERVER}:{REDIS_PORT}/0"
S3_URL = f"http://{SERVER}:{S3_PORT}"
BUCKET = "renders"


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Lan:
    """Namespaces ``rf<pid>-h<n>`` (hosts) and ``rf<pid>-lan`` (the bridge); the processes
    started in them. :meth:`remove` stops the processes and deletes the namespaces."""

    def __init__(self) -> None:
        self.prefix = f"rf{os.getpid()}"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen] = []

    def ns(self, host: int) -> str:
        return f"{self.prefix}-h{host}"

    def build(self) -> None:
        lan = f"{self.prefix}-lan"
        for name in (lan, *map(self.ns, HOSTS)):
            _ip("netns", "add", name)
            self.namespaces.append(name)
        _ip("-n", lan, "link", "add", "br0", "type", "bridge")
        _ip("-n", lan, "link", "set", "br0", "up")
        for host in HOSTS:
            ns = self.ns(host)
            _ip("-n", lan, "link", "add", f"h{host}", "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("-n", lan, "link", "set", f"h{host}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{host}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def start(self, host: int, command: list[str], log: Path, env: dict[str, str]) -> None:
        """Run ``command`` on ``host``, named ``host<n>``, output to ``log``."""
        wrapped = ["ip", "netns", "exec", self.ns(host), "unshare", "--uts", "sh", "-c",
                   f'hostname host{host} && exec "$@"', "sh", *command]
        with open(log, "ab") as out:
            self.processes.append(subprocess.Popen(
                wrapped, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL))

    def python(self, host: int, code: str, env: dict[str, str], timeout: float) -> str:
        """Run a Python snippet on ``host``; its stdout. Raises with its output if it fails."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns(host), sys.executable, "-c", textwrap.dedent(code)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise AssertionError(f"on host{host}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        return done.stdout

    def remove(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture(scope="module")
def lan():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root: run as root to test a farm across hosts")
    if not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("`ip` (iproute2) or `unshare` is missing: apt-get install -y iproute2")
    network = Lan()
    try:
        network.build()
    except OSError as exc:
        network.remove()
        pytest.skip(f"cannot make network namespaces here: {exc}")
    yield network
    network.remove()


def host_env(data_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RENDERFARM_")}
    env.update({
        "RENDERFARM_REDIS_URL": REDIS_URL,
        "RENDERFARM_STORAGE_URL": f"s3://{BUCKET}/multihost",
        "RENDERFARM_S3_ENDPOINT_URL": S3_URL,
        "RENDERFARM_DATA_DIR": str(data_dir),
        "AWS_ACCESS_KEY_ID": "multihost-key", "AWS_SECRET_ACCESS_KEY": "multihost-secret",
        "AWS_DEFAULT_REGION": "us-east-1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    })
    env.update({f"RENDERFARM_{k.upper()}": v for k, v in settings.items()})
    return env


def test_a_batch_flows_across_four_hosts(lan, models_dir, tmp_path):
    env = host_env(tmp_path / "host4")  # the producer's host has no models of its own
    # host1: Redis bound to its LAN address, and the S3 endpoint
    lan.start(1, [redis_server_binary(), "--port", str(REDIS_PORT), "--bind", SERVER,
                  "--requirepass", PASSWORD, "--dir", str(tmp_path), "--save", "",
                  "--appendonly", "no", "--maxmemory-policy", "noeviction"],
              tmp_path / "redis.log", env)
    lan.start(1, [sys.executable, "-c", "import threading; from moto.server import "
                  f"ThreadedMotoServer as S; S(ip_address='{SERVER}', port={S3_PORT}, "
                  "verbose=False).start(); threading.Event().wait()"],
              tmp_path / "s3.log", env)
    lan.python(4, f"""
        import time, redis
        from storage.s3 import S3Storage
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis.from_url({REDIS_URL!r}).ping()
                S3Storage({BUCKET!r}, endpoint_url={S3_URL!r}).ensure_bucket()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        """, env, timeout=60)

    # host2, host3: a worker each
    for host in (2, 3):
        lan.start(host, [sys.executable, "-m", "renderfarm", "worker", "--profile", "cpu",
                         "--name", f"worker{host}"],
                  tmp_path / f"worker{host}.log",
                  host_env(tmp_path / f"host{host}", models_dir=str(models_dir)))

    # host4: the producer submits a batch once both workers beat, and waits for it
    out = lan.python(4, """
        import json, time
        from producer import FarmClient
        from renderfarm.fleet import live_workers
        client = FarmClient()
        deadline = time.monotonic() + 90
        while len(live_workers(client.redis)) < 2:
            assert time.monotonic() < deadline, "workers did not start: see worker*.log"
            time.sleep(0.2)
        batch = client.submit_batch([
            {"prompt": f"across hosts {i}", "model": "tiny", "width": 64, "height": 64,
             "steps": 3 + i, "seed": i, "scheduler": "euler"} for i in range(6)])
        batch.wait(timeout=120)
        print(json.dumps({
            "hosts": sorted(w.host for w in live_workers(client.redis)),
            "jobs": [{"state": r.state.value, "worker": r.worker, "stored": all(
                client.storage.exists(image.key) for image in r.results) and bool(r.results)}
                for r in batch.records()],
        }))
        """, env, timeout=240)
    report = json.loads(out.strip().splitlines()[-1])

    assert report["hosts"] == ["host2", "host3"]
    assert [j["state"] for j in report["jobs"]] == ["succeeded"] * 6, report
    assert all(j["stored"] for j in report["jobs"]), report  # images in host1's S3
    ran_on = {j["worker"].split(":")[0] for j in report["jobs"]}
    assert ran_on == {"host2", "host3"}, report  # both workers ran jobs
