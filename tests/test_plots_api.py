"""Plots through the JSON API: POST /api/v1/batches with {job, axes}; the batch lists grids."""

from __future__ import annotations

import io
import re

from PIL import Image

from renderfarm.schema import ImageResult
from storage.png import read_png_info
from worker.gridbuilder import GridBuilder

pytest_plugins = ["tests.dashboard_fixtures"]


def test_a_plot_is_submitted_and_its_grid_listed(dash_client, dash_farm, make_job, queue_depth):
    rv = dash_client.post("/api/v1/batches", json={
        "job": make_job(prompt="a barn"), "label": "sweep",
        "axes": {"x": {"field": "seed", "values": [1, 2, 3]},
                 "y": {"field": "prompt_sr", "values": ["barn", "house"]}}})
    assert rv.status_code == 201, rv.get_json()
    data = rv.get_json()
    assert len(data["job_ids"]) == 6 and queue_depth() == 6
    assert data["batch"]["plot"]["shape"] == [3, 2, 1]
    assert data["batch"]["grids"] == []
    prompts = [dash_farm.records.job(i).request.prompt for i in data["job_ids"]]
    assert prompts == ["a barn"] * 3 + ["a house"] * 3

    records = dash_farm.records
    for job_id in data["job_ids"]:  # a worker's steps, by hand: claim, store, succeed
        assert records.claim(job_id, "hand", 30, 3).ok
        key = f"{data['id']}/{job_id}-0.png"
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), "blue").save(buf, format="PNG")
        dash_farm.storage.put(key, buf.getvalue(), "image/png")
        records.succeed(job_id, "hand", [ImageResult(key=key, seed=1, width=64, height=64)])
    GridBuilder(records, dash_farm.storage, "hand").build(data["id"])
    batch = dash_client.get(f"/api/v1/batches/{data['id']}").get_json()["batch"]
    [grid] = batch["grids"]
    assert grid["key"] == f"{data['id']}/grid.png"
    assert dash_client.get(grid["url"]).status_code == 200


def test_a_bad_plot_is_refused_naming_axis_field_and_value(dash_client, make_job, queue_depth):
    rv = dash_client.post("/api/v1/batches", json={
        "job": make_job(), "axes": {"x": {"field": "steps", "values": [2, "many"]}}})
    assert rv.status_code == 400
    [error] = rv.get_json()["errors"]
    assert error["field"] == "axes.x.values.1" and error["value"] == "many"
    assert "steps" in error["message"]
    rv = dash_client.post("/api/v1/batches", json={"job": make_job(), "axes": {}, "jobs": []})
    assert rv.status_code == 400
    assert {e["field"] for e in rv.get_json()["errors"]} == {"jobs"}
    assert queue_depth() == 0


def test_the_submit_page_makes_a_plot_and_the_batch_page_shows_its_grid(dash_client, dash_farm):
    from tests.test_dashboard_ui import csrf_token, finish, form

    token = csrf_token(dash_client)
    rv = dash_client.post("/submit", data=form(
        csrf_token=token, prompts="a cat|in the snow|at night", prompt_matrix="y",
        x_field="seed", x_values="3, 4"))
    assert rv.status_code == 303, rv.get_data(as_text=True)
    batch_id = rv.headers["Location"].rsplit("/", 1)[-1]
    jobs = dash_farm.records.batch_jobs(batch_id)
    assert [(j.request.seed, j.request.prompt) for j in jobs][:3] == [
        (3, "a cat"), (4, "a cat"), (3, "a cat, in the snow")]
    assert len(jobs) == 8
    page = dash_client.get(f"/batches/{batch_id}").get_data(as_text=True)
    assert "The grid is drawn when every cell has ended." in page
    for job in jobs:
        finish(dash_farm, job.id)
    GridBuilder(dash_farm.records, dash_farm.storage, "hand").build(batch_id)
    page = dash_client.get(f"/batches/{batch_id}").get_data(as_text=True)
    assert f'alt="grid {batch_id}/grid.png"' in page

    rv = dash_client.post("/submit", data=form(csrf_token=token, prompts="a cat",
                                               x_field="steps", x_values="2, 999"))
    assert rv.status_code == 400
    page = rv.get_data(as_text=True)
    assert re.search(r'data-field="x_values">axes.x.values.1 \(steps\): steps must be at most '
                     r'150, got 999', page)


def test_a_model_on_no_live_worker_is_named_by_its_axis(dash_client, dash_farm, make_job,
                                                        fake_beat, queue_depth):
    (dash_farm.settings.models_path / "other").mkdir()
    (dash_farm.settings.models_path / "other" / "model_index.json").write_text("{}")
    fake_beat("w:1", age=0)  # a live worker with model tiny only
    dash_farm.redis.hset("rf:worker:w:1", "max_pixels", 2048 * 2048)
    rv = dash_client.post("/api/v1/batches", json={
        "job": make_job(), "axes": {"x": {"field": "model", "values": ["tiny", "other"]}}})
    assert rv.status_code == 400
    [error] = rv.get_json()["errors"]
    assert error["error"] == ("axes.x.values.1 (model): model is on no live worker of hardware "
                              "'any', got 'other'")
    assert queue_depth() == 0


def test_cancelling_a_plot_cancels_its_cells_and_the_grid_shows_them(dash_client, dash_farm,
                                                                      make_job):
    data = dash_client.post("/api/v1/batches", json={
        "job": make_job(), "axes": {"x": {"field": "seed", "values": [1, 2]}}}).get_json()
    rv = dash_client.post(f"/api/v1/batches/{data['id']}/cancel")
    assert set(rv.get_json()["outcomes"].values()) == {"cancelled"}
    [grid] = GridBuilder(dash_farm.records, dash_farm.storage, "hand").build(data["id"])
    info = read_png_info(dash_farm.storage.get(grid["key"]))["renderfarm"]
    assert [c["state"] for c in info["cells"]] == ["cancelled", "cancelled"]
