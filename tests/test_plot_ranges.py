"""A1111's range shorthands in plot axis values (``1-5``, ``1-10 (+2)``, ``10-1 (-3)``,
``1-10 [5]``; renderfarm/plotranges.py): the values they stand for, on whole-number and number
axes, and that the CLI, the JSON API and the dashboard's submit page all go through the one
parser, with errors naming the axis and the value. No worker: a Redis of the module's own."""

from __future__ import annotations

import re

import pytest

from producer import FarmClient
from renderfarm.errors import InvalidJob
from renderfarm.plotranges import expand, is_range
from renderfarm.settings import Settings

pytest_plugins = ["tests.dashboard_fixtures"]

JOB = {"prompt": "a red barn", "model": "tiny", "width": 64, "height": 64, "steps": 2,
       "scheduler": "euler"}


@pytest.mark.parametrize(("text", "kind", "values"), [
    ("1-5", int, [1, 2, 3, 4, 5]),
    ("1-10 (+2)", int, [1, 3, 5, 7, 9]),
    ("10-1 (-3)", int, [10, 7, 4, 1]),
    ("1-10 [5]", int, [1, 3, 5, 7, 10]),  # A1111: int() of numpy.linspace(1, 10, 5)
    (" -2 - 2 ", int, [-2, -1, 0, 1, 2]),
    ("1-9 (2)", int, [1, 3, 5, 7, 9]),  # the step's sign may be left out
    ("3-3", int, [3]),
    ("5-7.5 (+0.5)", float, [5.0, 5.5, 6.0, 6.5, 7.0, 7.5]),
    ("0-1 (+0.1)", float, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
    ("1-2 (+0.3)", float, [1.0, 1.3, 1.6, 1.9]),  # never past the end (A1111: 2.2 too)
    ("1-10 [5]", float, [1.0, 3.25, 5.5, 7.75, 10.0]),
    ("2-1 (-.25)", float, [2.0, 1.75, 1.5, 1.25, 1.0]),
    ("1-3", float, [1.0, 2.0, 3.0]),
    ("4-8 [1]", int, [4]),
])
def test_ranges_give_a1111_s_values(text, kind, values):
    assert is_range(text, kind)
    assert expand(text, kind, limit=100) == values


@pytest.mark.parametrize(("text", "kind"), [
    ("7", int), ("-1", int), ("7.5", float), ("1-2.5", int), ("1-5 (+x)", int), ("a-b", int),
    ("1-5 [2.5]", int), ("1 5", int),
])
def test_other_texts_are_not_ranges(text, kind):
    assert not is_range(text, kind)


@pytest.mark.parametrize(("text", "message"), [
    ("5-1", "goes from 5 to 1, which a step of +1 never reaches: give a negative step"),
    ("1-5 (-1)", "goes from 1 to 5, which a step of -1 never reaches: give a positive step"),
    ("1-5 (+0)", "has a step of 0, which never moves"),
    ("1-5 [0]", "has a count of 0: a count [N] must be at least 1"),
    ("1-101", "gives 101 values; a plot has at most 100 cells (RENDERFARM_MAX_PLOT_CELLS)"),
    ("1-1000000000 [100000000]", "gives 100000000 values; a plot has at most 100 cells"),
])
def test_a_range_that_gives_no_values_or_too_many_is_refused(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        expand(text, int, limit=100)


@pytest.fixture(scope="module")
def client(module_redis_url, models_dir, tmp_path_factory) -> FarmClient:
    root = tmp_path_factory.mktemp("range-images")
    return FarmClient(Settings(redis_url=module_redis_url, models_dir=models_dir,
                               storage_url=f"file://{root}", max_plot_cells=12,
                               queue="no-worker"))


def errors_of(call) -> list[str]:
    with pytest.raises(InvalidJob) as caught:
        call()
    return [str(e) for e in caught.value.errors]


def test_a_plot_expands_ranges_among_its_values(client):
    batch = client.submit_plot(JOB, {"x": {"field": "seed", "values": ["1-3", 10]},
                                     "y": {"field": "cfg_scale", "values": ["5-6 [2]"]}})
    cells = [(r.request.seed, r.request.guidance_scale) for r in batch.records()]
    assert cells == [(1, 5.0), (2, 5.0), (3, 5.0), (10, 5.0),
                     (1, 6.0), (2, 6.0), (3, 6.0), (10, 6.0)]
    axes = batch.status().plot["axes"]
    assert axes["x"]["values"] == [1, 2, 3, 10]
    assert axes["y"]["labels"] == ["guidance_scale: 5", "guidance_scale: 6"]


def test_range_errors_name_the_axis_and_the_value(client):
    before = client.records.count_batches()
    assert errors_of(lambda: client.submit_plot(
        JOB, {"x": {"field": "seed", "values": [1, "9-3"]}})) == [
        "axes.x.values.1 (seed): the range goes from 9 to 3, which a step of +1 never reaches: "
        "give a negative step, e.g. (-1), got '9-3'"]
    assert errors_of(lambda: client.submit_plot(
        JOB, {"y": {"field": "steps", "values": ["1-30"]}})) == [
        "axes.y.values.0 (steps): the range gives 30 values; a plot has at most 12 cells "
        "(RENDERFARM_MAX_PLOT_CELLS), got '1-30'"]
    # a value of a range the job refuses is named by the range it came from
    assert errors_of(lambda: client.submit_plot(
        JOB, {"x": {"field": "steps", "values": [2, "100-200 (+50)"]}})) == [
        'axes.x.values.1 (steps, from the range "100-200 (+50)"): steps must be at most 150, '
        "got 200"]
    assert errors_of(lambda: client.submit_plot(
        JOB, {"x": {"field": "guidance_scale", "values": ["5-x"]}})) == [
        "axes.x.values.0 is not a valid guidance_scale: must be a number or a range "
        "(5-7.5 (+0.5), 0-1 [5]), got '5-x'"]
    assert client.records.count_batches() == before  # nothing was enqueued


def test_the_cli_takes_ranges(client):
    from tests.test_cli import farm_env, run

    env = {k: v for k, v in farm_env(client.settings).items() if v is not None}
    env["RENDERFARM_QUEUE"] = "no-worker"
    out = run(["submit", "a red barn", "--model", "tiny", "--size", "64x64", "--steps", "2",
               "--x", "seed=1-3", "--y", "steps=2-6 (+2)"], env)
    batch_id = out.stdout.split("plot ", 1)[1].split(":", 1)[0]
    cells = [(r.request.seed, r.request.steps) for r in client.batch(batch_id).records()]
    assert cells == [(s, n) for n in (2, 4, 6) for s in (1, 2, 3)]
    bad = run(["submit", "a red barn", "--model", "tiny", "--x", "seed=1-3 (+0)"], env,
              check=False)
    assert bad.returncode == 2
    assert "axes.x.values.0 (seed): the range has a step of 0, which never moves" in bad.stderr


def test_the_api_and_the_submit_page_take_ranges(dash_client, dash_farm, make_job):
    from tests.test_dashboard_ui import csrf_token, form

    rv = dash_client.post("/api/v1/batches", json={
        "job": make_job(), "axes": {"x": {"field": "seed", "values": ["10-1 (-3)"]}}})
    assert rv.status_code == 201, rv.get_json()
    seeds = [dash_farm.records.job(i).request.seed for i in rv.get_json()["job_ids"]]
    assert seeds == [10, 7, 4, 1]
    rv = dash_client.post("/api/v1/batches", json={
        "job": make_job(), "axes": {"x": {"field": "seed", "values": ["1-3 [0]"]}}})
    assert rv.status_code == 400
    [error] = rv.get_json()["errors"]
    assert (error["field"], error["value"]) == ("axes.x.values.0", "1-3 [0]")

    token = csrf_token(dash_client)
    rv = dash_client.post("/submit", data=form(csrf_token=token, prompts="a cat",
                                               x_field="steps", x_values="1-3, 8"))
    assert rv.status_code == 303, rv.get_data(as_text=True)
    batch_id = rv.headers["Location"].rsplit("/", 1)[-1]
    assert [j.request.steps for j in dash_farm.records.batch_jobs(batch_id)] == [1, 2, 3, 8]
    rv = dash_client.post("/submit", data=form(csrf_token=token, prompts="a cat",
                                               x_field="steps", x_values="5-1"))
    assert rv.status_code == 400
    assert re.search(r'data-field="x_values">axes.x.values.0 \(steps\): the range goes from 5 '
                     r'to 1', rv.get_data(as_text=True))
