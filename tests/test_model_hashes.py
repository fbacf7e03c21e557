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

from renderfarm import keys
from renderfarm.fleet import live_workers
from renderfarm.schema import JobState
from storage.png import parse_parameters, read_png_info
from tests.test_cli import farm_env

pytest_plugins = ["tests.dashboard_fixtures"]


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
    out = subprocess.run([sys.executable, "-m", "renderfarm", "models", "--json"],
                         capture_output=True, text=True, env=farm_env(farm_settings), timeout=60,
                         check=True).stdout
    listed = json.loads(out)["tiny"]
    assert (listed["model_hash"], listed["sha256"]) == (tiny_sha256[:10], tiny_sha256)
    assert worker["id"] in listed["worker_ids"]


def test_details_when_workers_disagree_or_none_has_hashed(dash_settings, dash_farm):
    """Two workers with different files under one name: the majority's hash, the others listed.
    A model no live worker advertises: its hash from the models dir's cache, else None."""
    from worker.hashes import hash_cache

    t = time.time()
    beats = {"w1": {"a": "1" * 64}, "w2": {"a": "1" * 64}, "w3": {"a": "2" * 64}}
    for worker_id, hashes in beats.items():
        dash_farm.redis.hset(keys.worker(worker_id), mapping={
            "id": worker_id, "models": json.dumps(["a"]), "hashes": json.dumps(hashes),
            "beat": t})
        dash_farm.redis.zadd(keys.WORKERS, {worker_id: t})
    dash_farm.redis.hset(keys.MODELS, "a", t)  # as advertise_models() does
    checkpoint = dash_settings.models_path / "local.safetensors"
    checkpoint.write_bytes(b"weights")
    (dash_settings.models_path / "unhashed.safetensors").write_bytes(b"other")
    details = dash_farm.model_details()
    assert details["a"] == {"sha256": "1" * 64, "model_hash": "1" * 10, "workers": 3,
                            "other_sha256": ["2" * 64]}
    assert details["local"]["sha256"] is None  # nobody has hashed it: not hashed here either
    hash_cache(dash_settings.models_path).model_sha256(checkpoint)  # a worker on this machine
    details = dash_farm.model_details()
    assert details["local"] == {"sha256": hashlib.sha256(b"weights").hexdigest(),
                                "model_hash": hashlib.sha256(b"weights").hexdigest()[:10],
                                "workers": 0}
    assert details["unhashed"]["sha256"] is None and details["tiny"]["sha256"] is None
