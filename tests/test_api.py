"""The JSON API (/api/v1) with Flask's test client against a real Redis."""

from __future__ import annotations

import pytest

from renderfarm import keys
from renderfarm.schema import JobState

pytest_plugins = ["tests.dashboard_fixtures"]


def submit(client, jobs, **body):
    return client.post("/api/v1/batches", json={"jobs": jobs, **body})


def test_submit_records_and_enqueues(dash_client, dash_farm, make_job, queue_depth):
    rv = submit(dash_client, [make_job(), make_job(prompt="a lighthouse", priority=9)],
                label="two")
    assert rv.status_code == 201, rv.get_json()
    data = rv.get_json()
    assert rv.headers["Location"] == f"/api/v1/batches/{data['id']}"
    assert data["batch"]["total"] == 2 and data["batch"]["label"] == "two"
    assert len(data["job_ids"]) == 2
    for job_id in data["job_ids"]:
        record = dash_farm.records.job(job_id)
        assert record.state is JobState.queued and record.batch_id == data["id"]
        assert record.request.seed is not None  # a random seed, recorded
    assert queue_depth() == 2


@pytest.mark.parametrize(
    ("body", "field", "value"),
    [
        ({"jobs": [{"prompt": "x", "model": "tiny", "width": 500}]}, "width", 500),
        ({"jobs": [{"prompt": "x", "model": "tiny", "steps": 0}]}, "steps", 0),
        ({"jobs": [{"prompt": "x", "model": "tiny", "guidance_scale": 31}]}, "guidance_scale", 31),
        ({"jobs": [{"prompt": "x", "model": "tiny", "scheduler": "nope"}]}, "scheduler", "nope"),
        ({"jobs": [{"prompt": "x", "model": "tiny", "seed": -1}]}, "seed", -1),
        ({"jobs": [{"prompt": "x", "model": "tiny", "num_images": 17}]}, "num_images", 17),
        ({"jobs": [{"prompt": "x", "model": "tiny", "priority": 10}]}, "priority", 10),
        ({"jobs": [{"prompt": "x", "model": "tiny", "hardware": "tpu"}]}, "hardware", "tpu"),
        ({"jobs": [{"prompt": "x", "model": "tiny", "strength": 2}]}, "strength", 2),
        ({"jobs": [{"prompt": "x", "model": "tiny", "colour": "red"}]}, "colour", "red"),
        ({"jobs": [{"prompt": "   ", "model": "tiny"}]}, "prompt", "   "),
        ({"jobs": [{"prompt": "x", "model": "nosuchmodel"}]}, "model", "nosuchmodel"),
        ({"jobs": [{"prompt": "x", "model": "tiny", "mode": "img2img"}]}, "init_image", None),
        ({"jobs": [{"prompt": "x", "model": "tiny", "mode": "img2img",
                    "init_image": "bm90IGFuIGltYWdl"}]}, "init_image", "bm90IGFuIGltYWdl"),
        ({"jobs": []}, "jobs", []),
        ({"jobs": [{"prompt": "x"}], "colour": 1}, "colour", 1),
        ({"jobs": [{"prompt": "x"}], "label": 5}, "label", 5),
        ([1, 2], "body", [1, 2]),
    ],
)
def test_bad_field_is_named_and_nothing_enqueued(dash_client, dash_farm, queue_depth, body,
                                                 field, value):
    rv = dash_client.post("/api/v1/batches", json=body)
    assert rv.status_code == 400
    errors = rv.get_json()["errors"]
    named = [e for e in errors if e["field"] == field]
    assert named, errors
    if value is not None:
        assert named[0]["value"] == (repr(value) if isinstance(value, list) else value)
    assert dash_farm.records.count_batches() == 0 and dash_farm.records.count_jobs() == 0
    assert queue_depth() == 0


def test_second_bad_job_is_named_by_index(dash_client, dash_farm, make_job, queue_depth):
    rv = submit(dash_client, [make_job(), make_job(height=7)])
    assert rv.status_code == 400
    [error] = rv.get_json()["errors"]
    assert (error["field"], error["index"], error["value"]) == ("height", 1, 7)
    assert queue_depth() == 0 and dash_farm.records.count_jobs() == 0


def test_not_json_is_refused(dash_client, queue_depth):
    rv = dash_client.post("/api/v1/batches", data="prompt=x",
                          content_type="application/x-www-form-urlencoded")
    assert rv.status_code == 415
    assert rv.get_json()["errors"][0]["field"] == "Content-Type"
    rv = dash_client.post("/api/v1/batches", data="{nope", content_type="application/json")
    assert rv.status_code == 400 and rv.get_json()["errors"][0]["field"] == "body"
    assert queue_depth() == 0


def test_big_body_is_413(make_dash_app, queue_depth):
    client = make_dash_app(MAX_CONTENT_LENGTH=1024).test_client()
    rv = client.post("/api/v1/batches", json={"jobs": [{"prompt": "x" * 2000}]})
    assert rv.status_code == 413
    assert rv.get_json()["errors"]
    assert queue_depth() == 0


def test_list_and_get(dash_client, dash_farm, make_job):
    first = submit(dash_client, [make_job()], label="first").get_json()["id"]
    second = submit(dash_client, [make_job(), make_job(), make_job()], label="second").get_json()
    listing = dash_client.get("/api/v1/batches").get_json()
    assert [b["id"] for b in listing["batches"]] == [second["id"], first]  # newest first
    assert listing["total"] == 2
    page = dash_client.get("/api/v1/batches?offset=1&limit=1").get_json()
    assert [b["id"] for b in page["batches"]] == [first]

    batch = dash_client.get(f"/api/v1/batches/{second['id']}?limit=2").get_json()
    assert batch["batch"]["counts"]["queued"] == 3 and batch["total"] == 3
    assert [j["id"] for j in batch["jobs"]] == second["job_ids"][:2]
    rest = dash_client.get(f"/api/v1/batches/{second['id']}?offset=2&limit=2").get_json()
    assert [j["id"] for j in rest["jobs"]] == second["job_ids"][2:]

    job = dash_client.get(f"/api/v1/jobs/{second['job_ids'][0]}").get_json()
    assert job["state"] == "queued" and job["request"]["prompt"] == "a red bicycle"
    assert job["timings"]["waited"] is None and job["has_init_image"] is False

    assert dash_client.get("/api/v1/batches?limit=0").status_code == 400
    assert dash_client.get("/api/v1/batches?offset=x").get_json()["errors"][0]["field"] == "offset"
    # an offset near 2**63 once overflowed Redis' range arithmetic into a 500 (found by the fuzzer)
    huge = dash_client.get("/api/v1/batches?offset=9223372036854775759")
    assert huge.status_code == 400
    assert huge.get_json()["errors"][0]["field"] == "offset"
    assert "between 0 and 2147483647" in huge.get_json()["errors"][0]["message"]
    assert dash_farm.records.batches(offset=2**63 - 10) == []
    assert dash_farm.records.batch_job_ids(second["id"], offset=2**63 - 10, limit=5) == []


def test_results_carry_file_urls(dash_client, dash_farm, make_job):
    from renderfarm.schema import ImageResult

    job_id = submit(dash_client, [make_job()]).get_json()["job_ids"][0]
    batch_id = dash_farm.records.job(job_id).batch_id
    key = f"{batch_id}/{job_id}-0.png"
    dash_farm.storage.put(key, b"\x89PNG fake", "image/png")
    assert dash_farm.records.claim(job_id, "w1", 30, 3).ok
    dash_farm.records.succeed(job_id, "w1", [ImageResult(key=key, seed=1, width=64, height=64)])
    job = dash_client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["state"] == "succeeded"
    assert job["results"][0]["url"] == f"/files/{key}"
    assert dash_client.get(job["results"][0]["url"]).data == b"\x89PNG fake"


def test_files_refuses_escapes(dash_client, dash_farm, tmp_path):
    (tmp_path / "secret.txt").write_text("do not serve")
    dash_farm.storage.put("b/ok.png", b"png", "image/png")
    assert dash_client.get("/files/b/ok.png").status_code == 200
    for path in ["/files/../secret.txt", "/files/..%2fsecret.txt", "/files/b/../../secret.txt",
                 "/files/%2e%2e/secret.txt", "/files//etc/passwd", "/files/b/missing.png"]:
        rv = dash_client.get(path, follow_redirects=True)
        assert rv.status_code == 404, path
        assert b"do not serve" not in rv.data


def test_cancel_and_retry(dash_client, dash_farm, make_job, queue_depth):
    data = submit(dash_client, [make_job(), make_job()]).get_json()
    one, two = data["job_ids"]
    rv = dash_client.post(f"/api/v1/jobs/{one}/cancel")
    assert rv.status_code == 200 and rv.get_json()["outcome"] == "cancelled"
    assert dash_farm.records.job(one).state is JobState.cancelled

    rv = dash_client.post(f"/api/v1/jobs/{two}/retry")  # queued: nothing to retry
    assert rv.status_code == 409 and rv.get_json()["errors"][0]["value"] == "queued"

    before = queue_depth()
    rv = dash_client.post(f"/api/v1/jobs/{one}/retry")
    assert rv.status_code == 200 and rv.get_json()["retried"] is True
    assert dash_farm.records.job(one).state is JobState.queued
    assert queue_depth() == before + 1  # its message was sent again

    rv = dash_client.post(f"/api/v1/batches/{data['id']}/cancel")
    assert set(rv.get_json()["outcomes"].values()) == {"cancelled"}
    assert rv.get_json()["batch"]["counts"]["cancelled"] == 2
    rv = dash_client.post(f"/api/v1/batches/{data['id']}/retry")
    assert sorted(rv.get_json()["retried"]) == sorted([one, two])
    assert rv.get_json()["batch"]["counts"]["queued"] == 2
    assert queue_depth() == before + 3


def test_unknown_ids_are_404(dash_client):
    for method, path in [("get", "/api/v1/jobs/nope"), ("get", "/api/v1/batches/nope"),
                         ("post", "/api/v1/jobs/nope/cancel"), ("post", "/api/v1/jobs/nope/retry"),
                         ("post", "/api/v1/batches/nope/cancel"),
                         ("post", "/api/v1/batches/nope/retry"), ("get", "/api/v1/nothing")]:
        rv = getattr(dash_client, method)(path)
        assert rv.status_code == 404, path
        assert rv.get_json()["errors"], path


def test_workers_live_and_lost(dash_client, dash_farm, make_job, fake_beat):
    job_id = submit(dash_client, [make_job()]).get_json()["job_ids"][0]
    dash_farm.records.claim(job_id, "host:1", 30, 3)
    dash_farm.records.update(job_id, "host:1", JobState.rendering, step=1, steps_total=2)
    fake_beat("host:1", age=0.5, current_job=job_id)
    fake_beat("host:2", age=60)
    data = dash_client.get("/api/v1/workers").get_json()
    by_id = {w["id"]: w for w in data["workers"]}
    assert by_id["host:1"]["state"] == "live" and by_id["host:2"]["state"] == "lost"
    assert (data["live"], data["lost"]) == (1, 1)
    assert by_id["host:1"]["current_job"] == job_id
    assert (by_id["host:1"]["step"], by_id["host:1"]["steps_total"]) == (1, 2)
    assert by_id["host:1"]["loaded"] == ["tiny"] and by_id["host:1"]["jobs_done"] == 3


def test_queues(dash_client, dash_farm, make_job):
    assert dash_client.get("/api/v1/queues").get_json()["oldest_waiting"] is None
    first = submit(dash_client, [make_job(priority=2), make_job(priority=9)]).get_json()
    submit(dash_client, [make_job()])
    dash_client.post(f"/api/v1/jobs/{first['job_ids'][0]}/cancel")
    data = dash_client.get("/api/v1/queues").get_json()
    [queue] = data["queues"]
    assert queue["name"] == f"{dash_farm.settings.queue}.tiny" and queue["depth"] == 3
    assert queue["by_priority"] == {"2": 1, "9": 1, "5": 1}
    assert data["queued_jobs"] == 2
    assert data["oldest_waiting"]["id"] == first["job_ids"][1]  # the cancelled one is not waiting


def test_models(dash_client, dash_farm):
    dash_farm.redis.hset(keys.MODELS, "advertised", 1)
    assert dash_client.get("/api/v1/models").get_json()["models"] == ["advertised", "tiny"]


def test_token(make_dash_app, make_job):
    with pytest.raises(RuntimeError, match="RENDERFARM_SECRET_KEY"):
        make_dash_app(TOKEN="t")
    client = make_dash_app(TOKEN="tok-1", SECRET_KEY="k").test_client()
    rv = client.get("/api/v1/batches")
    assert rv.status_code == 401 and rv.headers["WWW-Authenticate"].startswith("Bearer")
    assert rv.get_json()["errors"]
    wrong = {"Authorization": "Bearer nope"}
    assert client.get("/api/v1/batches", headers=wrong).status_code == 401
    body = {"jobs": [make_job()]}
    assert client.post("/api/v1/batches", json=body).status_code == 401
    ok = {"Authorization": "Bearer tok-1"}
    assert client.get("/api/v1/batches", headers=ok).status_code == 200
    assert client.post("/api/v1/batches", json=body, headers=ok).status_code == 201


def test_cross_site_write_refused(dash_client, make_job, queue_depth):
    rv = dash_client.post("/api/v1/batches", json={"jobs": [make_job()]},
                          headers={"Origin": "https://evil.example"})
    assert rv.status_code == 403 and queue_depth() == 0


def test_openapi(dash_client, dash_app):
    from openapi_spec_validator import validate

    doc = dash_client.get("/api/v1/openapi.json").get_json()
    validate(doc)
    routes = {
        rule.rule.removeprefix("/api/v1").replace("<", "{").replace(">", "}")
        for rule in dash_app.url_map.iter_rules() if rule.rule.startswith("/api/v1")
    }
    assert routes == set(doc["paths"])
    methods: dict[str, set[str]] = {}
    for rule in dash_app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1"):
            path = rule.rule.removeprefix("/api/v1").replace("<", "{").replace(">", "}")
            methods.setdefault(path, set()).update(rule.methods - {"HEAD", "OPTIONS"})
    assert methods == {path: {m.upper() for m in ops} for path, ops in doc["paths"].items()}
    job = doc["components"]["schemas"]["JobRequest"]
    assert "model" not in job["required"] and job["properties"]["width"]["multipleOf"] == 8


def test_s3_urls_are_presigned_and_secrets_stay_out(make_dash_app, dash_settings, make_job,
                                                      monkeypatch):
    from renderfarm.schema import ImageResult

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-key-do-not-leak")
    settings = dash_settings.model_copy(update={
        "storage_url": "s3://bucket-name/prefix", "s3_endpoint_url": "http://127.0.0.1:9",
        "s3_region": "us-east-1"})
    client = make_dash_app(SETTINGS=settings).test_client()
    farm = client.application.extensions["renderfarm"]
    job_id = submit(client, [make_job()]).get_json()["job_ids"][0]
    farm.records.claim(job_id, "w1", 30, 3)
    farm.records.succeed(job_id, "w1", [ImageResult(key="b/x.png", seed=1, width=64, height=64)])
    job = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["results"][0]["url"].startswith("http://127.0.0.1:9/bucket-name/prefix/b/x.png?")
    assert "X-Amz-Signature=" in job["results"][0]["url"]
    batch_id = job["batch_id"]
    bodies = [client.get(p).data for p in (f"/api/v1/jobs/{job_id}", f"/api/v1/batches/{batch_id}",
                                           f"/batches/{batch_id}", "/batches", "/workers",
                                           "/queues", "/submit", "/api/v1/openapi.json")]
    redis_password = dash_settings.redis_url.split(":")[2].split("@")[0]
    for body in bodies:
        assert b"very-secret-key-do-not-leak" not in body
        assert redis_password.encode() not in body
    assert client.get("/files/b/x.png").status_code == 404  # no file route for S3
