"""Plots through the JSON API: POST /api/v1/batches with {job, axes}; the batch lists grids."""

from __future__ import annotations

import io

from PIL import Image

from renderfarm.schema import ImageResult
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
