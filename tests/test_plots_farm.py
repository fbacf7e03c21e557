"""An X/Y/Z plot rendered by the session's real worker: its cells are ordinary jobs, and the
worker that ends the last one draws the grid, whose cells are the jobs' own images."""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from renderfarm.schema import JobState
from storage.png import parse_parameters, read_png_info

JOB = {"prompt": "a red barn", "model": "tiny", "width": 64, "height": 64, "steps": 2,
       "scheduler": "euler"}


def wait_for_grids(batch, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        grids = batch.status().grids
        if grids:
            return grids
        time.sleep(0.1)
    raise TimeoutError(f"no grid for plot {batch.id} after {timeout}s")


def test_a_3x2_plot_renders_6_jobs_and_one_grid_of_their_images(farm, client):
    batch = client.submit_plot(JOB, {"x": {"field": "seed", "values": [1, 2, 3]},
                                     "y": {"field": "steps", "values": [1, 2]}})
    assert batch.wait(timeout=120).counts == {JobState.succeeded: 6}
    records = batch.records()
    assert [(r.request.seed, r.request.steps) for r in records] == [
        (1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (3, 2)]
    params = parse_parameters(read_png_info(client.storage.get(records[4].results[0].key))
                              ["parameters"])
    assert (params["Seed"], params["Steps"]) == (2, 2)  # each cell its own infotext

    [grid] = wait_for_grids(batch)
    assert grid["key"] == f"{batch.id}/grid.png"
    data = client.storage.get(grid["key"])
    info = read_png_info(data)["renderfarm"]
    layout = info["layout"]
    assert info["plot"]["axes"]["x"]["labels"] == ["seed: 1", "seed: 2", "seed: 3"]
    assert info["plot"]["axes"]["y"]["labels"] == ["steps: 1", "steps: 2"]
    assert info["plot"]["cells"] == [r.id for r in records]
    assert (layout["cols"], layout["rows"]) == (3, 2)
    assert layout["left"] > 0 and layout["top"] > 0  # row and column labels
    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.size == (layout["left"] + 3 * 64, layout["top"] + 2 * 64)
    pixels = np.asarray(image)
    for n, record in enumerate(records):
        col, row = n % 3, n // 3
        x, y = layout["left"] + col * 64, layout["top"] + row * 64
        cell = np.asarray(Image.open(io.BytesIO(client.storage.get(record.results[0].key)))
                          .convert("RGB"))
        assert np.array_equal(pixels[y:y + 64, x:x + 64], cell), f"cell {col},{row}"
    top_band = pixels[:layout["top"], layout["left"]:]
    left_band = pixels[layout["top"]:, :layout["left"]]
    assert len(np.unique(top_band.reshape(-1, 3), axis=0)) > 1  # text was drawn there
    assert len(np.unique(left_band.reshape(-1, 3), axis=0)) > 1
    assert client.redis.hget(f"rf:batch:{batch.id}", "grid_done") == b"0"  # drawn once


def test_cli_plot_waits_and_prints_the_grid(farm, farm_settings, client):
    from tests.test_cli import farm_env, run

    env = farm_env(farm_settings)
    out = run(["submit", "a red barn", "--model", "tiny", "--size", "64x64", "--steps", "1",
               "--scheduler", "euler", "--seed", "5", "--x", "prompt=S/R:barn,house",
               "--wait", "--timeout", "120"], env, timeout=180)
    assert "plot " in out.stdout and "2 jobs queued" in out.stdout
    batch_id = out.stdout.split("plot ", 1)[1].split(":", 1)[0]
    grid_lines = [line for line in out.stdout.splitlines() if line.startswith("grid: ")]
    assert len(grid_lines) == 1 and f"{batch_id}/grid.png" in grid_lines[0]
    prompts = [r.request.prompt for r in client.batch(batch_id).records()]
    assert prompts == ["a red barn", "a red house"]

    status = run(["status", batch_id], env)
    assert any(line.startswith("grid: ") and f"{batch_id}/grid.png" in line
               for line in status.stdout.splitlines())

    bad = run(["submit", "a red barn", "--x", "colour=1,2"], env, check=False)
    assert bad.returncode == 2
    assert "axes.x.field is not a field a plot can vary" in bad.stderr and "'colour'" in bad.stderr


def test_cells_ended_without_a_worker_get_their_grid_from_the_sweep(farm, farm_settings):
    from producer import FarmClient

    # Cells sent to a queue no worker consumes, then cancelled while queued: no worker ends
    # them, so only a worker's sweep of the waiting plots can draw the grid.
    elsewhere = FarmClient(farm_settings.model_copy(update={"queue": "nobody"}))
    batch = elsewhere.submit_plot(JOB, {"x": {"field": "seed", "values": [1, 2]}})
    assert set(batch.cancel().values()) == {"cancelled"}
    [grid] = wait_for_grids(batch, timeout=30)
    info = read_png_info(elsewhere.storage.get(grid["key"]))["renderfarm"]
    assert [c["state"] for c in info["cells"]] == ["cancelled", "cancelled"]


def test_after_a_retry_no_grid_is_listed_until_the_new_one_is_stored(farm, farm_settings,
                                                                     client, holds):
    """The session's worker draws a plot's grid of two cancelled cells; the batch is retried
    through the API: from that moment until the worker has stored the new grid, the API, the
    batch page and the record list no grid (the old one shows cells that are being redone)."""
    from dashboard import create_app

    web = create_app({"TESTING": True, "SETTINGS": farm_settings}).test_client()
    prompt = "a grid drawn twice"
    job = {**JOB, "prompt": prompt}
    held = holds.hold_step(prompt, 1)
    batch = client.submit_plot(job, {"x": {"field": "steps", "values": [2, 3]}})  # 2 calls
    holds.wait_held()
    batch.cancel()  # the held cell stops at its next step, the queued one at once
    holds.release(held)
    assert batch.wait(timeout=60).counts == {JobState.cancelled: 2}
    [old] = wait_for_grids(batch)
    assert batch.status().grid_state == "drawn"

    held = holds.hold_step(prompt, 1)
    assert web.post(f"/api/v1/batches/{batch.id}/retry").status_code == 200
    listed = web.get(f"/api/v1/batches/{batch.id}").get_json()["batch"]
    assert (listed["grids"], listed["grid_state"]) == ([], "redrawing")
    holds.wait_held()  # a retried cell renders, held: the new grid cannot be drawn yet
    page = web.get(f"/batches/{batch.id}").get_data(as_text=True)
    assert "A cell was retried: the grid is drawn again when every cell has ended." in page
    assert 'alt="grid ' not in page
    assert batch.status().grids == []
    holds.release(held)
    assert batch.wait(timeout=60).counts == {JobState.succeeded: 2}
    [new] = wait_for_grids(batch)
    assert new["key"] == old["key"]  # drawn again over the old one
    info = read_png_info(client.storage.get(new["key"]))["renderfarm"]
    assert [c["state"] for c in info["cells"]] == ["succeeded", "succeeded"]
    listed = web.get(f"/api/v1/batches/{batch.id}").get_json()["batch"]
    assert listed["grid_state"] == "drawn" and [g["key"] for g in listed["grids"]] == [new["key"]]
