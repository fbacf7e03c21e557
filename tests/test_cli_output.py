"""What the `renderfarm` command prints for a person (and, with --json, for a script): run as a
user would, as subprocesses against the session farm. Jobs that must stay queued go to a Redis
database of the module's own, where no worker runs (``quiet``)."""

from __future__ import annotations

import json
import os

import pytest

from renderfarm.schema import JobState
from tests.fault_fixtures import wait_for
from tests.test_cli import farm_env, run

SMALL = {"model": "tiny", "width": 64, "height": 64, "steps": 2}


@pytest.fixture
def quiet(farm_settings, module_redis_url):
    """(env, client) of a farm with no worker: what is submitted stays queued."""
    from producer import FarmClient

    settings = farm_settings.model_copy(update={"redis_url": module_redis_url})
    return {**farm_env(farm_settings), "RENDERFARM_REDIS_URL": module_redis_url}, FarmClient(
        settings)


def test_status_of_a_job_is_for_people_and_json_for_scripts(farm, farm_settings, client):
    env = farm_env(farm_settings)
    job = client.submit({**SMALL, "prompt": "a status line", "seed": 5})
    record = job.wait(timeout=90)
    out = run(["status", job.id], env).stdout
    assert "{" not in out  # no raw JSON
    assert "state     succeeded  since " in out and " ago" in out
    assert "64x64, 2 steps" in out and "seed 5" in out
    assert "timeline  queued " in out and "succeeded " in out
    assert record.results[0].key in out.replace("\n", "")  # where the image is
    as_json = json.loads(run(["status", job.id, "--json"], env).stdout)
    assert as_json["state"] == "succeeded" and as_json["request"]["seed"] == 5


def test_submit_cancel_and_the_batch_table(quiet):
    env, client = quiet
    out = run(["submit", "one", "--model", "tiny"], env).stdout
    assert out.rstrip().endswith(": 1 job queued")
    job_id = client.batch(out.split()[1].rstrip(":")).records()[0].id
    out = run(["cancel", job_id], env).stdout
    assert out.strip() == f"{job_id}: cancelled"

    out = run(["submit", "a", "b", "--model", "tiny", "--label", "two cats"], env).stdout
    assert ": 2 jobs queued" in out
    batch_id = out.split()[1].rstrip(":")
    assert client.records.batch(batch_id).label == "two cats"
    ids = [r.id for r in client.batch(batch_id).records()]
    table = run(["status", batch_id], {**env, "COLUMNS": "80"}).stdout
    assert table.startswith(f"batch {batch_id} (two cats): 0/2 done")
    for job_id in ids:  # whole at 80 columns: a user copies it to cancel the job
        assert job_id in table
    assert max(len(line) for line in table.splitlines()) <= 80
    out = run(["cancel", batch_id], env).stdout
    assert sorted(out.splitlines()) == sorted(f"{i}: cancelled" for i in ids)
    again = run(["cancel", batch_id], env).stdout
    assert "nothing to cancel" in again
    assert json.loads(run(["cancel", ids[0], "--json"], env).stdout) == {ids[0]: "cancelled"}
    assert all(r.state is JobState.cancelled for r in client.batch(batch_id).records())
    out = run(["submit", "a", "--model", "tiny", "--label", "x" * 201], env, check=False)
    assert out.returncode == 2 and "label must be a string of at most 200 characters" in out.stderr


def test_jobfile_errors_say_the_line_and_csv_takes_job_fields(quiet, tmp_path):
    env, client = quiet
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("prompt,seed,negative_prompt\na cat,77,ugly\n\na dog,,\n")
    out = run(["submit", "--file", str(jobs), "--model", "tiny"], env).stdout
    records = client.batch(out.split()[1].rstrip(":")).records()
    assert [(r.request.prompt, r.request.negative_prompt) for r in records] == [
        ("a cat", "ugly"), ("a dog", "")]
    assert records[0].request.seed == 77
    client.cancel([r.id for r in records])

    jobs.write_text("prompt,colour\na cat,red\n")
    out = run(["submit", "--file", str(jobs)], env, check=False)
    assert out.returncode == 2 and "unknown column(s) 'colour'" in out.stderr
    jobs.write_text("prompt,width\na cat,64\na dog,500\n")
    out = run(["submit", "--file", str(jobs), "--model", "tiny"], env, check=False)
    assert out.returncode == 2
    assert "jobs.csv line 3: width must be a multiple of 8, got 500" in out.stderr


def test_models_is_a_table_and_json(farm, farm_settings):
    env = farm_env(farm_settings)
    out = run(["models"], {**env, "COLUMNS": "100"}).stdout
    (row,) = [line for line in out.splitlines() if " tiny " in line]
    assert "sd15" in row and "\t" not in out
    (worker,) = farm_workers(farm_settings)
    assert worker in out.replace("\n", "").replace("│", "").replace(" ", "")
    data = json.loads(run(["models", "--json"], env).stdout)
    assert data["tiny"]["worker_ids"] == [worker] and data["tiny"]["family"] == "sd15"


def test_models_shows_the_loras_and_the_workers_that_have_them(farm, farm_settings, models_dir):
    """A LoRA dropped in the models dir is listed under its model (of its family) and in the
    LoRA table with the live worker that advertises it; removed again after."""
    from worker.modelgen import make_lora

    env = farm_env(farm_settings)
    lora = make_lora(models_dir / "tiny", models_dir / "loras" / "cli_pen.safetensors", seed=3)
    try:
        (worker,) = farm_workers(farm_settings)
        wait_for(lambda: "cli_pen" in worker_loras(farm_settings), 30, "the LoRA advertised")
        out = run(["models"], {**env, "COLUMNS": "160"}).stdout
        (row,) = [line for line in out.splitlines() if " tiny " in line]
        assert "cli_pen" in row  # the tiny model's LoRAs column
        (row,) = [line for line in out.splitlines() if " cli_pen " in line and " tiny " not in line]
        assert "sd15" in row and worker in row
        data = json.loads(run(["models", "--json"], env).stdout)
        assert data["tiny"]["loras"]["cli_pen"] == [worker]
    finally:
        lora.unlink()
        wait_for(lambda: "cli_pen" not in worker_loras(farm_settings), 30, "the LoRA dropped")
        # The farm's LoRA catalogue (rf:loras) keeps what any worker ever advertised: take it
        # out too, so the session farm's next test module sees the LoRAs it made, only those.
        from producer import FarmClient
        from renderfarm import keys

        FarmClient(farm_settings).redis.hdel(keys.LORAS, "cli_pen")


def worker_loras(settings) -> dict[str, str]:
    from producer import FarmClient
    from renderfarm.fleet import live_workers

    return {name: family for w in live_workers(FarmClient(settings).redis)
            for name, family in w.loras.items()}


def farm_workers(settings) -> list[str]:
    from producer import FarmClient
    from renderfarm.fleet import live_workers

    return [w.id for w in live_workers(FarmClient(settings).redis)]


def test_every_command_says_no_farm_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RENDERFARM_")}
    env["RENDERFARM_DATA_DIR"] = str(tmp_path)
    for args in (["models"], ["cancel", "abc"], ["status", "abc"], ["status"],
                 ["prune", "--older-than", "1d"], ["submit", "x"]):
        out = run(args, env, check=False)
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, (
            args, out.stderr)
        assert "error:" in out.stderr


def test_make_model_refuses_a_used_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RENDERFARM_")}
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "model_index.json").write_text("{}")
    out = run(["make-model", "tiny", str(target)], env, check=False)
    assert out.returncode == 2 and "--force" in out.stderr
    assert (target / "model_index.json").read_text() == "{}"


def test_job_state_prints_as_its_value():
    assert str(JobState.queued) == "queued" and f"{JobState.rendering}" == "rendering"
