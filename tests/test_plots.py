"""X/Y/Z plots without rendering: expansion and validation at submit (FarmClient.submit_plot
against a Redis of this module's own, where no worker runs), the grid's exactly-once claim, and
the grid drawn from cells ended by hand through the records' own scripts (a failed cell, a
retry). The rendered path through a real worker is tests/test_plots_farm.py."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from producer import FarmClient
from renderfarm.errors import InvalidJob
from renderfarm.plotrecords import PlotRecords
from renderfarm.plots import parse_cli_axis
from renderfarm.schema import ImageResult, JobState
from renderfarm.settings import Settings
from storage.png import read_png_info
from worker.gridbuilder import GridBuilder

JOB = {"prompt": "a red barn", "model": "tiny", "width": 64, "height": 64, "steps": 2,
       "scheduler": "euler"}


@pytest.fixture(scope="module")
def client(module_redis_url, models_dir, tmp_path_factory) -> FarmClient:
    root = tmp_path_factory.mktemp("plot-images")
    return FarmClient(Settings(redis_url=module_redis_url, models_dir=models_dir,
                               storage_url=f"file://{root}", max_plot_cells=12))


def errors_of(call) -> list[str]:
    with pytest.raises(InvalidJob) as caught:
        call()
    return [str(e) for e in caught.value.errors]


def test_a_prompt_matrix_of_two_parts_is_four_jobs(client):
    batch = client.submit_plot({**JOB, "prompt": "a photo of a cat|in the snow|at night"},
                               {"x": {"field": "prompt_matrix"}})
    prompts = [r.request.prompt for r in batch.records()]
    assert prompts == ["a photo of a cat", "a photo of a cat, in the snow",
                       "a photo of a cat, at night", "a photo of a cat, in the snow, at night"]
    plot = batch.status().plot
    assert plot["shape"] == [4, 1, 1]
    assert plot["cells"] == batch.job_ids
    assert plot["axes"]["x"]["labels"][3] == "prompt_matrix: in the snow + at night"


def test_search_replace_replaces_in_prompt_and_negative_prompt(client):
    axes = {"x": {"field": "prompt_sr", "values": ["barn", "house", "tower"]},
            "y": {"field": "seed", "values": [1, 2]}}
    batch = client.submit_plot({**JOB, "negative_prompt": "a blurry barn"}, axes)
    records = batch.records()
    assert [(r.request.prompt, r.request.negative_prompt, r.request.seed) for r in records] == [
        ("a red barn", "a blurry barn", 1), ("a red house", "a blurry house", 1),
        ("a red tower", "a blurry tower", 1), ("a red barn", "a blurry barn", 2),
        ("a red house", "a blurry house", 2), ("a red tower", "a blurry tower", 2)]


def test_cli_axes_read_like_a1111():
    assert parse_cli_axis("seed=1, 2,3") == {"field": "seed", "values": ["1", "2", "3"]}
    assert parse_cli_axis('prompt=S/R:barn,"red, old house"') == {
        "field": "prompt_sr", "values": ["barn", "red, old house"]}


def test_errors_name_the_axis_the_field_and_the_value(client):
    assert errors_of(lambda: client.submit_plot(JOB, {"x": {"field": "colour",
                                                            "values": [1]}})) == [
        "axes.x.field is not a field a plot can vary (seed, steps, guidance_scale, scheduler, "
        "model, width, height, size, prompt_sr, prompt_matrix, lora:<name>), got 'colour'"]
    assert errors_of(lambda: client.submit_plot(JOB, {"y": {"field": "seed", "values": []}})) == [
        "axes.y.values must be a non-empty list of seed values, got []"]
    assert errors_of(lambda: client.submit_plot(
        JOB, {"x": {"field": "steps", "values": [2, 500]}})) == [
        "axes.x.values.1 (steps): steps must be at most 150, got 500"]
    assert errors_of(lambda: client.submit_plot(
        JOB, {"x": {"field": "model", "values": ["tiny", "nope"]}})) == [
        "axes.x.values.1 (model): model is not a model the farm has (known: tiny), got 'nope'"]
    assert errors_of(lambda: client.submit_plot(
        JOB, {"z": {"field": "prompt_sr", "values": ["cow", "pig"]}})) == [
        "axes.z.values.0 (prompt_sr: the text searched) is in neither the prompt nor the "
        "negative prompt, got 'cow'"]
    assert errors_of(lambda: client.submit_plot(
        JOB, {"x": {"field": "seed", "values": list(range(4))},
              "y": {"field": "steps", "values": [1, 2, 3, 4]}})) == [
        "axes make 16 cells (4 x 4 x 1); at most 12 (RENDERFARM_MAX_PLOT_CELLS), got '4x4x1'"]
    # a bad base field is the job's, named once, not once per value
    assert errors_of(lambda: client.submit_plot(
        {**JOB, "width": 500}, {"x": {"field": "seed", "values": [1, 2]}})) == [
        "job.width must be a multiple of 8, got 500"]
    before = client.records.count_batches()
    assert client.records.count_batches() == before  # nothing was enqueued by any of them


def test_two_racing_claims_grant_the_grid_once(client):
    batch = client.submit_plot(JOB, {"x": {"field": "seed", "values": [1, 2]}})
    plots = PlotRecords(client.redis)
    assert plots.claim(batch.id, "w1").status == "running"  # cells still queued
    for job_id in batch.job_ids:
        client.records.cancel(job_id)
    barrier = threading.Barrier(8)
    answers = []

    def claim(n: int) -> None:
        barrier.wait()
        answers.append(plots.claim(batch.id, f"w{n}").status)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == ["ok"] + ["taken"] * 7


def end_cell(client, job_id: str, image: Image.Image | None) -> None:
    """What a worker does with a cell, through the records' scripts: claim it, then store its
    image and succeed it, or fail it."""
    assert client.records.claim(job_id, "hand", 30, 3).ok
    if image is None:
        client.records.fail(job_id, "hand", "RuntimeError: boom")
        return
    record = client.records.job(job_id)
    key = f"{record.batch_id}/{job_id}-0.png"
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    client.storage.put(key, buf.getvalue(), "image/png")
    client.records.succeed(job_id, "hand", [ImageResult(key=key, seed=1, width=64, height=64)])


def noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), np.uint8))


def test_a_failed_cell_is_marked_and_a_retry_rebuilds_the_grid(client):
    batch = client.submit_plot(JOB, {"x": {"field": "seed", "values": [1, 2]},
                                     "y": {"field": "steps", "values": [2, 3]}})
    builder = GridBuilder(client.records, client.storage, "builder")
    ids = batch.job_ids
    for n, job_id in enumerate(ids[:3]):
        end_cell(client, job_id, noise(n))
    assert builder.build(batch.id) is None  # the last cell still runs
    end_cell(client, ids[3], None)
    [grid] = builder.build(batch.id)
    assert grid["key"] == f"{batch.id}/grid.png"
    assert builder.build(batch.id) is None  # drawn: not twice
    data = client.storage.get(grid["key"])
    info = read_png_info(data)["renderfarm"]
    assert [c["state"] for c in info["cells"]] == ["succeeded"] * 3 + ["failed"]
    layout = info["layout"]
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    x0, y0 = layout["left"] + layout["cell_width"], layout["top"] + layout["cell_height"]
    failed = pixels[y0:y0 + 64, x0:x0 + 64]
    assert (failed[32, 5] == (200, 200, 200)).all()  # the grey box ...
    assert (failed[10, 10] == (200, 30, 30)).all()  # ... crossed in red
    assert (failed[53, 10] == (200, 30, 30)).all()
    assert np.array_equal(pixels[layout["top"]:layout["top"] + 64,
                                 layout["left"]:layout["left"] + 64], np.asarray(noise(0)))

    assert client.retry([ids[3]]) == [ids[3]]
    status = batch.status()  # the old grid is no longer listed: it is being redrawn
    assert (status.grids, status.grid_state) == ([], "redrawing")
    assert builder.build(batch.id) is None  # the retried cell is queued again
    end_cell(client, ids[3], noise(3))
    [again] = builder.build(batch.id)
    info = read_png_info(client.storage.get(again["key"]))["renderfarm"]
    assert [c["state"] for c in info["cells"]] == ["succeeded"] * 4
    assert info["grid"]["epoch"] == 1
    pixels = np.asarray(Image.open(io.BytesIO(client.storage.get(again["key"]))).convert("RGB"))
    assert np.array_equal(pixels[y0:y0 + 64, x0:x0 + 64], np.asarray(noise(3)))
    assert (batch.status().grids, batch.status().grid_state) == ([again], "drawn")
    assert client.redis.sismember("rf:plots", batch.id) == 0


def test_a_z_axis_gives_one_grid_per_value(client):
    batch = client.submit_plot(JOB, {"x": {"field": "seed", "values": [1, 2]},
                                     "z": {"field": "guidance_scale", "values": [1, 7.5]}})
    for n, job_id in enumerate(batch.job_ids):
        end_cell(client, job_id, noise(10 + n))
    grids = GridBuilder(client.records, client.storage, "b").build(batch.id)
    assert [g["key"] for g in grids] == [f"{batch.id}/grid-z0.png", f"{batch.id}/grid-z1.png"]
    second = read_png_info(client.storage.get(grids[1]["key"]))["renderfarm"]
    assert [c["job_id"] for c in second["cells"]] == batch.job_ids[2:]
    assert second["plot"]["axes"]["z"]["labels"] == ["guidance_scale: 1", "guidance_scale: 7.5"]
    assert batch.records()[3].request.guidance_scale == 7.5
    assert JobState.succeeded in batch.status().counts


def test_lora_and_size_axes_set_the_fields_they_name():
    from renderfarm.plots import parse_plot

    job = {**JOB, "loras": [{"name": "ink", "weight": 1.0}, {"name": "oil", "weight": 0.3}]}
    plot = parse_plot({"x": {"field": "lora:ink", "values": [0, "0.5"]},
                       "y": {"field": "size", "values": ["64x96", "96X64"]}}, job, 10)
    cells = plot.cells(job)
    assert [(c["loras"][0]["weight"], c["width"], c["height"]) for c in cells] == [
        (0.0, 64, 96), (0.5, 64, 96), (0.0, 96, 64), (0.5, 96, 64)]
    assert all(c["loras"][1] == {"name": "oil", "weight": 0.3} for c in cells)
    assert job["loras"][0]["weight"] == 1.0  # the base job is left as it was
    assert plot.axis("x").labels == ["lora:ink: 0", "lora:ink: 0.5"]
    new = parse_plot({"x": {"field": "lora:line", "values": [1]}}, JOB, 10).cells(JOB)
    assert new[0]["loras"] == [{"name": "line", "weight": 1.0}]


def test_cells_of_different_sizes_are_centred_in_cells_of_the_largest():
    from renderfarm.grids import draw_grid

    tall, wide = noise(1).resize((64, 96)), noise(2).resize((96, 64))
    grid, layout = draw_grid([[tall, wide]], ["size: 64x96", "size: 96x64"], [])
    assert (layout.cell_width, layout.cell_height, layout.left) == (96, 96, 0)
    assert grid.size == (2 * 96, layout.top + 96)
    pixels = np.asarray(grid)
    assert np.array_equal(pixels[layout.top:layout.top + 96, 16:80], np.asarray(tall))
    assert np.array_equal(pixels[layout.top + 16:layout.top + 80, 96:192], np.asarray(wide))
    assert (pixels[layout.top, 0] == (255, 255, 255)).all()  # beside the narrow cell: blank


def test_a_grid_over_the_pixel_cap_has_its_cells_scaled_down(client):
    batch = client.submit_plot(JOB, {"x": {"field": "seed", "values": [1, 2]},
                                     "y": {"field": "steps", "values": [1, 2]}})
    for n, job_id in enumerate(batch.job_ids):
        end_cell(client, job_id, noise(20 + n))
    [grid] = GridBuilder(client.records, client.storage, "b", max_pixels=4 * 32 * 32).build(
        batch.id)
    info = read_png_info(client.storage.get(grid["key"]))["renderfarm"]
    assert info["grid"]["scale"] == 0.5
    assert (info["layout"]["cell_width"], info["layout"]["cell_height"]) == (32, 32)
    image = Image.open(io.BytesIO(client.storage.get(grid["key"])))
    assert image.size == (info["layout"]["left"] + 64, info["layout"]["top"] + 64)
