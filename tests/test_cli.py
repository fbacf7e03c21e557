"""The `renderfarm` command, run as a user would: real subprocesses against real farms."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from renderfarm.schema import JobState

RF = [sys.executable, "-m", "renderfarm"]


def farm_env(settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RENDERFARM_")}
    env.update({
        "RENDERFARM_REDIS_URL": settings.redis_url,
        "RENDERFARM_DATA_DIR": str(settings.data_path),
        "RENDERFARM_STORAGE_URL": settings.storage_url,
        "RENDERFARM_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "RENDERFARM_MODELS_DIR": str(settings.models_dir),
    })
    return env


def run(args, env, timeout=120, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run([*RF, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def test_producer_side_never_imports_torch():
    code = ("import sys, producer, renderfarm.cli, renderfarm.progress, storage; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_submit_count_wait_and_status(farm, farm_settings, client, tmp_path):
    env = farm_env(farm_settings)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a castle\n\n# a comment\na forest\n")
    out = run(["submit", "--file", str(prompts), "--count", "2", "--steps", "3", "--size",
               "64x64", "--seed", "42", "--model", "tiny", "--wait", "--timeout", "120"], env)
    batch_id = out.stdout.split()[1].rstrip(":")
    records = client.batch(batch_id).records()
    assert [r.request.seed for r in records] == [42, 43, 42, 43]
    assert [r.request.prompt for r in records] == ["a castle"] * 2 + ["a forest"] * 2
    assert all(r.state is JobState.succeeded for r in records)
    for r in records:  # --wait ends by printing where every image is
        assert r.results[0].key in out.stdout
    status = run(["status", batch_id], env)
    assert "4/4 done" in status.stdout
    job = json.loads(run(["status", records[0].id, "--json"], env).stdout)
    assert job["state"] == "succeeded" and job["request"]["seed"] == 42


def test_jsonl_file_and_bad_input(farm, farm_settings, client, tmp_path):
    env = farm_env(farm_settings)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "ok", "model": "tiny", "width": 64, "height": 64,
                                "steps": 2}) + "\n" + json.dumps({"prompt": "bad", "width": 500})
                    + "\n")
    before = client.records.count_jobs()
    out = run(["submit", "--file", str(jobs)], env, check=False)
    assert out.returncode == 2
    assert "jobs.jsonl line 2: width must be a multiple of 8, got 500" in out.stderr
    assert client.records.count_jobs() == before  # nothing enqueued
    out = run(["submit", "x", "--size", "big"], env, check=False)
    assert out.returncode == 2 and "--size must look like 512x512, got 'big'" in out.stderr
    out = run(["status", "nonexistent"], env, check=False)
    assert out.returncode == 2 and "no job or batch with id 'nonexistent'" in out.stderr


def test_no_farm_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RENDERFARM_")}
    env["RENDERFARM_DATA_DIR"] = str(tmp_path)
    out = run(["submit", "a prompt"], env, check=False)
    assert out.returncode == 2
    assert "no farm found" in out.stderr and "renderfarm up" in out.stderr


def test_up_is_found_by_submit_in_another_terminal(models_dir, tmp_path):
    """`renderfarm up` with no RENDERFARM_REDIS_URL starts its own Redis; a submit with the same
    data dir finds it; Ctrl-C stops everything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RENDERFARM_")}
    env["RENDERFARM_DATA_DIR"] = str(tmp_path / "data")
    shutil.copytree(models_dir, tmp_path / "data" / "models")
    up = subprocess.Popen([*RF, "up", "--workers", "1", "--port", "0"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        lines = []
        while not any("dashboard: http://127.0.0.1:" in line for line in lines):
            assert up.poll() is None, "".join(lines) + up.stdout.read()
            assert time.monotonic() < deadline, "".join(lines)
            lines.append(up.stdout.readline())
        assert (tmp_path / "data" / "farm.json").exists()
        out = run(["submit", "a lighthouse", "--size", "64x64", "--steps", "2", "--wait",
                   "--timeout", "60"], env)
        assert str(tmp_path / "data" / "images") in out.stdout
        assert list((tmp_path / "data" / "images").glob("*/*-0.png"))
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    assert up.returncode == 0
    assert not (tmp_path / "data" / "farm.json").exists()
    out = run(["submit", "after"], env, check=False)
    assert "no farm found" in out.stderr


@pytest.mark.timeout(450)
def test_demo(tmp_path):
    """The README's main job, end to end: copies the shipped shapes model (or, in a checkout
    without its weights, makes the tiny one), starts the embedded farm, renders 8 prompts and an
    img2img, prints where they are and what each should show, puts them side by side, stops."""
    import renderfarm
    from renderfarm.demo import PROMPTS

    shipped = (Path(renderfarm.__file__).parent / "data" / "shapes" / "model_index.json").is_file()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RENDERFARM_")}
    env["RENDERFARM_DATA_DIR"] = str(tmp_path / "data")
    out = run(["demo"], env, timeout=440)
    images = sorted(Path(tmp_path / "data" / "images").glob("*/*.png"))
    assert len(images) == 9
    assert "demo finished" in out.stdout
    text = out.stdout.replace("\n", "")
    assert f"model: {'shapes' if shipped else 'tiny'}" in text
    for image in images:
        assert str(image) in text
    for prompt in PROMPTS:
        assert f"should show {prompt}" in text
    assert (tmp_path / "data" / "demo.png").is_file()


def test_prune(farm_settings, module_redis_url, tmp_path):
    """`renderfarm prune` on a Redis database of its own (the session farm's batches in db 0
    stay): an old ended batch goes, a new one stays; a bad age names the option."""
    from redis import Redis

    from renderfarm import keys
    from renderfarm.records import Records
    from renderfarm.schema import JobRequest

    url = module_redis_url
    records = Records(Redis.from_url(url))
    records.redis.flushdb()
    for batch_id, age in (("old", 3 * 86400), ("new", 60)):
        request = JobRequest(prompt="x", model="tiny", seed=1)
        records.add_jobs(batch_id, [(f"{batch_id}-1", request)])
        records.cancel(f"{batch_id}-1")
        records.redis.zadd(keys.BATCHES, {batch_id: time.time() - age})
        records.redis.hset(keys.batch(batch_id), "created_at", time.time() - age)
    env = {**farm_env(farm_settings), "RENDERFARM_REDIS_URL": url}

    dry = run(["prune", "--older-than", "2d", "--dry-run"], env)
    assert "would remove 1 batches (1 jobs)" in dry.stdout and records.exists("old-1")
    done = run(["prune", "--older-than", "2d"], env)
    assert "removed 1 batches (1 jobs)" in done.stdout
    assert not records.exists("old-1") and records.exists("new-1")
    bad = run(["prune", "--older-than", "3x"], env, check=False)
    assert bad.returncode == 2
    assert "--older-than" in bad.stderr and "got '3x'" in bad.stderr


def test_jsonl_file_submits_each_line_and_waits(farm, farm_settings, client, tmp_path):
    """`submit --file jobs.jsonl`: one job a line, each line's own fields, rendered."""
    env = farm_env(farm_settings)
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"prompt": "jsonl one", "model": "tiny", "width": 64, "height": 64, "steps": 2,
              "seed": 5},
             {"prompt": "jsonl two", "width": 64, "height": 72, "steps": 3, "seed": 9}]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = run(["submit", "--file", str(jobs), "--wait", "--timeout", "120"], env)
    batch_id = out.stdout.split()[1].rstrip(":")
    records = client.batch(batch_id).records()
    assert [(r.request.prompt, r.request.height, r.request.steps, r.request.seed)
            for r in records] == [("jsonl one", 64, 2, 5), ("jsonl two", 72, 3, 9)]
    assert records[1].request.model == "tiny"  # RENDERFARM_DEFAULT_MODEL's default
    assert all(r.state is JobState.succeeded for r in records), [r.error for r in records]


def test_cancel_models_and_default_model(farm, farm_settings, module_redis_url, models_dir,
                                         tmp_path):
    """`cancel` a job and a batch, on a Redis database no worker serves (nothing runs them);
    a job naming no model gets RENDERFARM_DEFAULT_MODEL; `models` lists the session farm's."""
    import shutil

    from producer import FarmClient

    models = tmp_path / "models"
    for name in ("tiny", "other"):
        shutil.copytree(models_dir / "tiny", models / name)
    env = {**farm_env(farm_settings), "RENDERFARM_REDIS_URL": module_redis_url,
           "RENDERFARM_MODELS_DIR": str(models), "RENDERFARM_DEFAULT_MODEL": "other"}
    idle = FarmClient(farm_settings.model_copy(update={"redis_url": module_redis_url}))

    out = run(["submit", "one", "two", "--size", "64x64", "--steps", "2"], env)
    batch_id = out.stdout.split()[1].rstrip(":")
    first, second = idle.batch(batch_id).records()
    assert first.request.model == second.request.model == "other"
    out = run(["cancel", first.id], env)
    assert out.stdout.strip() == f"{first.id}: cancelled"
    assert idle.records.job(first.id).state is JobState.cancelled
    assert idle.records.job(second.id).state is JobState.queued
    out = run(["cancel", batch_id, "--json"], env)
    assert json.loads(out.stdout) == {second.id: "cancelled"}
    assert {r.state for r in idle.batch(batch_id).records()} == {JobState.cancelled}
    out = run(["cancel", "no-such-job"], env, check=False)
    assert out.returncode == 2 and "no-such-job" in out.stderr

    listed = json.loads(run(["models", "--json"], farm_env(farm_settings)).stdout)
    assert list(listed) == ["tiny"] and listed["tiny"]["family"] == "sd15", listed
    assert len(listed["tiny"]["worker_ids"]) == 1  # the session farm's one worker
    assert "tiny" in run(["models"], farm_env(farm_settings)).stdout


def test_make_model_writes_a_model_a_worker_can_list(tmp_path, models_dir):
    from worker.modelfiles import list_models

    out = run(["make-model", "tiny", str(tmp_path / "mine")], os.environ.copy())
    assert "wrote tiny model to" in out.stdout
    assert list(list_models(tmp_path)) == ["mine"]
    for part in ("unet", "vae", "text_encoder"):  # seeded: the same weights as the fixture's
        [ours] = (tmp_path / "mine" / part).glob("*.safetensors")
        [theirs] = (models_dir / "tiny" / part).glob("*.safetensors")
        assert ours.read_bytes() == theirs.read_bytes(), part
    out = run(["make-model", "huge", str(tmp_path / "x")], os.environ.copy(), check=False)
    assert out.returncode == 2 and "'huge' is not one of" in out.stderr


def test_dashboard_serves_on_the_given_port(farm_settings, module_redis_url, tmp_path):
    import requests

    from renderfarm.embedded import free_port
    from tests.fault_fixtures import wait_for

    port = free_port()
    env = {**farm_env(farm_settings), "RENDERFARM_REDIS_URL": module_redis_url}
    proc = subprocess.Popen([*RF, "dashboard", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def answers():
            if proc.poll() is not None:
                raise AssertionError(f"dashboard exited {proc.returncode}: {proc.stdout.read()}")
            try:
                return requests.get(f"http://127.0.0.1:{port}/api/v1/models", timeout=5)
            except requests.ConnectionError:
                return None

        response = wait_for(answers, 60, f"the dashboard on port {port}", poll=0.2)
        assert response.status_code == 200
        assert response.json()["default"] == "tiny"
    finally:
        proc.terminate()
        proc.wait(15)
