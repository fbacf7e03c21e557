"""The dashboard's pages: they render real data, forms need CSRF tokens, errors keep values."""

from __future__ import annotations

import io
import re
import zipfile

import pytest
from PIL import Image

from renderfarm.schema import ImageResult, JobState
from storage.png import encode_png, parameters_text

pytest_plugins = ["tests.dashboard_fixtures"]


def csrf_token(client, path="/submit") -> str:
    page = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)


def form(**fields) -> dict:
    base = {"prompts": "a lighthouse\na red bicycle\na cat", "model": "tiny",
            "scheduler": "euler", "steps": "2", "guidance_scale": "7", "size": "64x64",
            "num_images": "1", "hardware": "any", "priority": "5", "strength": "0.75"}
    return {**base, **fields}


def png_bytes(color="red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(out, "PNG")
    return out.getvalue()


def finish(farm, job_id: str) -> str:
    """Play a worker: claim the job and store a PNG carrying its parameters text."""
    record = farm.records.job(job_id)
    key = f"{record.batch_id}/{job_id}-0.png"
    seed = record.request.seed
    text = parameters_text(record.request, seed)
    farm.storage.put(key, encode_png(Image.new("RGB", (64, 64), "blue"), text, {}), "image/png")
    assert farm.records.claim(job_id, "w:1", 30, 3).ok
    farm.records.update(job_id, "w:1", JobState.rendering, step=2, steps_total=2)
    farm.records.update(job_id, "w:1", JobState.uploading)
    farm.records.succeed(job_id, "w:1", [ImageResult(key=key, seed=seed, width=64, height=64)])
    return key


def submit_api(client, make_job, n=2, label="ui test"):
    rv = client.post("/api/v1/batches", json={"jobs": [make_job(prompt=f"prompt {i}")
                                                       for i in range(n)], "label": label})
    return rv.get_json()


def test_pages_show_real_data(dash_client, dash_farm, make_job, fake_beat):
    data = submit_api(dash_client, make_job)
    done, waiting = data["job_ids"]
    key = finish(dash_farm, done)
    fake_beat("gpu-box:1", age=0.2, current_job=waiting)
    fake_beat("gone-box:2", age=120)

    batches = dash_client.get("/batches").get_data(as_text=True)
    assert data["id"] in batches and "ui test" in batches and "1/2" in batches

    for page in ("99", "9" * 30):  # past the end: an empty page, never a 500
        assert dash_client.get(f"/batches?page={page}").status_code == 200
        assert dash_client.get(f"/batches/{data['id']}?page={page}").status_code == 200

    batch = dash_client.get(f"/batches/{data['id']}").get_data(as_text=True)
    assert "prompt 0" in batch and "prompt 1" in batch
    assert f'src="/files/{key}"' in batch and "succeeded" in batch and "queued" in batch

    job = dash_client.get(f"/jobs/{done}").get_data(as_text=True)
    assert "Steps: 2, Sampler: Euler a" in job  # the parameters text read from the PNG
    assert "w:1" in job and f"/submit?from={done}" in job and f"/submit?init={key}" in job

    fake_beat("warm-box:3", age=0.1, status="starting")
    workers = dash_client.get("/workers").get_data(as_text=True)
    assert "gpu-box:1" in workers and "gone-box:2" in workers
    assert "starting (loading, warming up)" in workers
    fleet = dash_client.get("/api/v1/workers").get_json()["workers"]
    assert {w["id"]: w["status"] for w in fleet}["warm-box:3"] == "starting"
    assert "2 live, 1 lost" in workers  # a starting worker is live

    queues = dash_client.get("/queues").get_data(as_text=True)
    assert dash_farm.settings.queue in queues and waiting in queues

    submit = dash_client.get("/submit").get_data(as_text=True)
    assert '<option selected value="tiny">tiny</option>' in submit


def test_submit_needs_csrf_token(dash_client, dash_farm, queue_depth):
    rv = dash_client.post("/submit", data=form())
    assert rv.status_code == 400
    assert "CSRF" in rv.get_data(as_text=True)
    assert dash_farm.records.count_jobs() == 0 and queue_depth() == 0


def test_submit_form(dash_client, dash_farm, queue_depth):
    token = csrf_token(dash_client)
    rv = dash_client.post("/submit", data=form(csrf_token=token, seed="100", label="from form"))
    assert rv.status_code == 303
    batch_id = rv.headers["Location"].rsplit("/", 1)[-1]
    jobs = dash_farm.records.batch_jobs(batch_id)
    assert [j.request.prompt for j in jobs] == ["a lighthouse", "a red bicycle", "a cat"]
    assert {(j.request.width, j.request.seed, j.request.scheduler) for j in jobs} == {
        (64, 100, "euler")}
    assert dash_farm.records.batch(batch_id).label == "from form"
    assert queue_depth() == 3


def test_submit_file_images_per_prompt_and_img2img(dash_client, dash_farm):
    token = csrf_token(dash_client)
    data = form(csrf_token=token, prompts="", num_images="2", seed="7", size="custom",
                width="64", height="128")
    data["prompts_file"] = (io.BytesIO(b"first\n# a comment\nsecond\n"), "prompts.txt")
    data["init_image"] = (io.BytesIO(png_bytes()), "init.png")
    rv = dash_client.post("/submit", data=data, content_type="multipart/form-data")
    assert rv.status_code == 303, rv.get_data(as_text=True)
    jobs = dash_farm.records.batch_jobs(rv.headers["Location"].rsplit("/", 1)[-1])
    assert [(j.request.prompt, j.request.seed) for j in jobs] == [
        ("first", 7), ("first", 8), ("second", 7), ("second", 8)]
    assert all(j.request.mode.value == "img2img" and j.request.init_image for j in jobs)
    assert {(j.request.width, j.request.height) for j in jobs} == {(64, 128)}


def test_form_errors_keep_values(dash_client, dash_farm, queue_depth):
    token = csrf_token(dash_client)
    rv = dash_client.post("/submit", data=form(csrf_token=token, steps="500",
                                               prompts="keep me\nand me"))
    assert rv.status_code == 400
    page = rv.get_data(as_text=True)
    assert "steps must be at most 150, got 500" in page
    assert 'value="500"' in page and "keep me\nand me" in page
    assert re.search(r'id="field-steps">.*?steps must be at most 150', page, re.S)

    rv = dash_client.post("/submit", data=form(csrf_token=token, steps="lots"))
    assert rv.status_code == 400 and 'value="lots"' in rv.get_data(as_text=True)

    rv = dash_client.post("/submit", data=form(csrf_token=token, prompts=" \n "))
    assert "needs at least one prompt" in rv.get_data(as_text=True)
    assert dash_farm.records.count_jobs() == 0 and queue_depth() == 0


def test_new_seed_and_img2img_buttons_prefill(dash_client, dash_farm, make_job):
    data = submit_api(dash_client, make_job, n=1)
    job_id = data["job_ids"][0]
    key = finish(dash_farm, job_id)
    page = dash_client.get(f"/submit?from={job_id}").get_data(as_text=True)
    assert "prompt 0</textarea>" in page and 'name="seed" type="number" value=""' in page
    page = dash_client.get(f"/submit?init={key}").get_data(as_text=True)
    assert f'value="key:{key}"' in page and f'src="/files/{key}"' in page
    token = csrf_token(dash_client)
    rv = dash_client.post("/submit", data=form(csrf_token=token, init_ref=f"key:{key}"))
    assert rv.status_code == 303
    [new] = dash_farm.records.batch_jobs(rv.headers["Location"].rsplit("/", 1)[-1])[:1]
    assert new.request.mode.value == "img2img"


def test_batch_actions_and_zip(dash_client, dash_farm, make_job):
    data = submit_api(dash_client, make_job, n=3)
    key = finish(dash_farm, data["job_ids"][0])
    token = csrf_token(dash_client, f"/batches/{data['id']}")
    assert dash_client.post(f"/batches/{data['id']}/cancel").status_code == 400  # no token
    rv = dash_client.post(f"/batches/{data['id']}/cancel", data={"csrf_token": token})
    assert rv.status_code == 303
    assert dash_farm.records.batch(data["id"]).counts[JobState.cancelled] == 2
    rv = dash_client.post(f"/batches/{data['id']}/retry", data={"csrf_token": token})
    assert dash_farm.records.batch(data["id"]).counts[JobState.queued] == 2

    rv = dash_client.get(f"/batches/{data['id']}/images.zip")
    assert rv.status_code == 200 and rv.mimetype == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(rv.data))
    assert archive.namelist() == [key.rsplit("/", 1)[-1]]
    assert archive.read(archive.namelist()[0]) == dash_farm.storage.get(key)


def test_unknown_pages_are_404(dash_client):
    assert dash_client.get("/batches/nope").status_code == 404
    assert dash_client.get("/jobs/nope").status_code == 404


def test_login_required_with_token(make_dash_app, make_job):
    app = make_dash_app(TOKEN="tok-2", SECRET_KEY="key")
    client = app.test_client()
    rv = client.get("/batches")
    assert rv.status_code == 302 and rv.headers["Location"].startswith("/login?next=/batches")
    assert client.get("/files/x/y.png").status_code == 302
    assert client.post("/submit", data={}).status_code in (400, 401)

    token = csrf_token(client, "/login")
    assert client.post("/login", data={"token": "wrong", "csrf_token": token}).status_code == 401
    rv = client.post("/login", data={"token": "tok-2", "csrf_token": token, "next": "/queues"})
    assert rv.status_code == 302 and rv.headers["Location"] == "/queues"
    cookie = rv.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie

    assert client.get("/batches").status_code == 200
    assert client.get("/api/v1/batches").status_code == 200  # the pages' polling reads the API
    # ...but a session cookie alone may not change the farm through the (CSRF-exempt) API
    assert client.post("/api/v1/batches", json={"jobs": [make_job()]}).status_code == 401


def test_login_redirect_stays_on_site(make_dash_app):
    client = make_dash_app(TOKEN="tok-3", SECRET_KEY="key").test_client()
    token = csrf_token(client, "/login")
    rv = client.post("/login", data={"token": "tok-3", "csrf_token": token,
                                     "next": "//evil.example/"})
    assert rv.headers["Location"] == "/batches"


def test_security_headers(dash_client):
    rv = dash_client.get("/batches")
    assert "script-src 'self'" in rv.headers["Content-Security-Policy"]
    assert rv.headers["X-Frame-Options"] == "DENY"


def test_token_from_environment(monkeypatch, dash_settings):
    from dashboard import create_app

    monkeypatch.setenv("RENDERFARM_TOKEN", "1234")  # from_prefixed_env would make this an int
    with pytest.raises(RuntimeError, match="RENDERFARM_SECRET_KEY"):
        create_app({"SETTINGS": dash_settings})
    monkeypatch.setenv("RENDERFARM_SECRET_KEY", "from-env")
    client = create_app({"SETTINGS": dash_settings}).test_client()
    assert client.get("/api/v1/models").status_code == 401
    assert client.get("/api/v1/models", headers={"Authorization": "Bearer 1234"}).status_code == 200


def test_serve_binds_localhost_without_token(make_dash_app, caplog):
    from dashboard.serve import resolve_host

    with caplog.at_level("WARNING", logger="renderfarm.dashboard"):
        assert resolve_host(make_dash_app(), None) == "127.0.0.1"
    assert "no auth" in caplog.text and "127.0.0.1" in caplog.text
    assert resolve_host(make_dash_app(TOKEN="t", SECRET_KEY="k"), "0.0.0.0") == "0.0.0.0"
