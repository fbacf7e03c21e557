"""Model hashes through the real farm: the session worker hashes its models once (worker/hashes.py),
advertises them in its heartbeat, and writes them into every image it stores; the API and the
CLI list them."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time

import pytest

from renderfarm.fleet import live_workers
from renderfarm.schema import JobState
from storage.png import parse_parameters, read_png_info
from tests.test_cli import farm_env


@pytest.fixture(scope="module")
def tiny_sha256(models_dir) -> str:
    """A diffusers folder's hash: its UNet weights file's SHA-256 (README, Models)."""
    weights = models_dir / "tiny" / "unet" / "diffusion_pytorch_model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def advertised(client, model: str, timeout: float = 60.0) -> dict[str, str]:
    """The live workers' advertised hashes of ``model``, once one has hashed it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {w.id: w.hashes[model] for w in live_workers(client.redis) if model in w.hashes}
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no live worker advertised a hash of {model} in {timeout} s")


def test_a_rendered_image_carries_the_model_hash(farm, client, tiny_sha256):
    batch = client.submit_batch([{"prompt": "a hashed lighthouse", "model": "tiny", "width": 64,
                                  "height": 64, "steps": 2, "seed": 5, "num_images": 2}])
    assert batch.wait(timeout=120).counts == {JobState.succeeded: 1}
    [job] = batch.records()
    for image in job.results:
        info = read_png_info(client.storage.get(image.key))
        # A1111's place: after Size, before Model
        assert re.search(r"Size: 64x64, Model hash: [0-9a-f]{10}, Model: tiny",
                         info["parameters"]), info["parameters"]
        assert parse_parameters(info["parameters"])["Model hash"] == tiny_sha256[:10]
        assert info["renderfarm"]["model_sha256"] == tiny_sha256
    sidecar = json.loads(client.storage.get(f"{batch.id}/{job.id}.json"))
    assert sidecar["model_sha256"] == tiny_sha256


def test_workers_advertise_hashes_and_the_api_and_cli_list_them(farm, client, farm_settings,
                                                                 tiny_sha256):
    from dashboard import create_app

    assert set(advertised(client, "tiny").values()) == {tiny_sha256}
    api = create_app({"TESTING": True, "SETTINGS": farm_settings}).test_client()
    data = api.get("/api/v1/models").get_json()
    assert "tiny" in data["models"]
    assert data["details"]["tiny"] == {"sha256": tiny_sha256, "model_hash": tiny_sha256[:10],
                                       "workers": len(live_workers(client.redis))}
    [worker] = [w for w in api.get("/api/v1/workers").get_json()["workers"]
                if w["state"] == "live"][:1]
    assert worker["hashes"]["tiny"] == tiny_sha256
    out = subprocess.run([sys.executable, "-m", "renderfarm", "models"], capture_output=True,
                         text=True, env=farm_env(farm_settings), timeout=60, check=True).stdout
    [line] = [line.split("\t") for line in out.splitlines() if line.startswith("tiny\t")]
    assert line[2:4] == [tiny_sha256[:10], tiny_sha256]
