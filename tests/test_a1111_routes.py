"""The A1111 routes that need no worker: LoRA listing, refusals before anything is enqueued,
per-caller skip, unknown routes. (tests/test_a1111.py drives the rendering ones.)"""

from __future__ import annotations

pytest_plugins = ["tests.dashboard_fixtures"]

BASIC = {"Authorization": "Basic dXNlcjpwdw=="}  # user:pw (no token configured: ignored)


def test_loras_lists_the_models_dirs_lora_files(dash_client, dash_settings):
    folder = dash_settings.models_path / "loras"
    folder.mkdir()
    (folder / "ink-style.safetensors").write_bytes(b"x")
    (folder / "notes.txt").write_text("not a lora")
    loras = dash_client.get("/sdapi/v1/loras").get_json()
    assert [(item["name"], item["alias"]) for item in loras] == [("ink-style", "ink-style")]
    assert loras[0]["path"] == str(folder / "ink-style.safetensors")


def test_loras_lists_what_live_workers_advertise(dash_client, dash_farm, fake_beat):
    """Workers on other machines have LoRAs this server's folder has not: A1111 clients list
    them too (a lost worker's do not count)."""
    import json

    from renderfarm import keys

    fake_beat("w-live", age=1)
    fake_beat("w-lost", age=200)
    dash_farm.redis.hset(keys.worker("w-live"), "loras", json.dumps({"remote_ink": "sd15"}))
    dash_farm.redis.hset(keys.worker("w-lost"), "loras", json.dumps({"gone_pen": "sd15"}))
    loras = dash_client.get("/sdapi/v1/loras").get_json()
    assert [(item["name"], item["path"]) for item in loras] == [("remote_ink", "")]


def test_refusals_name_the_field_and_enqueue_nothing(make_dash_app, queue_depth):
    # No worker here: a body wrongly accepted would wait, so the wait is short (504, not 422).
    dash_client = make_dash_app(A1111_TIMEOUT=2).test_client()
    body = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64}
    cases = [
        ({"script_name": "x/y/z plot"}, "script_name"),
        ({"styles": ["cinematic"]}, "styles"),
        ({"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "alwayson_scripts"),
        ({"override_settings": {"sd_vae": "kl-f8.safetensors"}}, "override_settings.sd_vae"),
        ({"scheduler": "Exponential"}, "sampler_name"),
        ({"batch_size": 20, "n_iter": 6}, "batch_size"),
        ({"cfg_scale": 99}, "cfg_scale"),
    ]
    for extra, field in cases:
        answer = dash_client.post("/sdapi/v1/txt2img", json={**body, **extra})
        assert answer.status_code == 422, (extra, answer.get_data(as_text=True))
        assert field in [e["field"] for e in answer.get_json()["errors"]], extra
    img = dash_client.post("/sdapi/v1/img2img", json={**body, "init_images": []})
    assert img.status_code == 422 and img.get_json()["errors"][0]["field"] == "init_images"
    assert queue_depth() == 0


def test_skip_and_interrupt_touch_only_the_callers_own(dash_client, dash_farm, make_job):
    from dashboard.a1111 import _active_key

    mine = dash_farm.submit_batch([make_job(), make_job()])
    theirs = dash_farm.submit_batch([make_job()])
    dash_farm.redis.zadd(_active_key("user:user"), {mine.id: 1})
    dash_farm.redis.zadd(_active_key("user:other"), {theirs.id: 1})
    [first, second] = mine.records()
    dash_farm.records.claim(first.id, "w1", 30, 3)  # rendering now; the other one waits
    assert dash_client.post("/sdapi/v1/skip", headers=BASIC).get_json() == {}
    assert dash_farm.records.job(first.id).cancel_requested  # stops at its next step
    assert dash_farm.records.job(second.id).state.value == "queued"  # still to render
    assert dash_client.post("/sdapi/v1/interrupt", headers=BASIC).get_json() == {}
    assert dash_farm.records.job(second.id).state.value == "cancelled"
    assert theirs.records()[0].state.value == "queued"


def test_unknown_routes_answer_json_404(dash_client):
    answer = dash_client.get("/sdapi/v1/extra-single-image")
    assert answer.status_code == 404 and "not served" in answer.get_json()["detail"]


def test_euler_on_a_flux_model_is_flux_flow_matching_euler(make_dash_app, dash_settings,
                                                             dash_farm):
    """Forge/ComfyUI clients send Flux requests as sampler 'Euler' (schedule 'Simple'): the farm
    runs Flux's flow-matching Euler, its only scheduler; any other sampler is refused naming
    sampler_name before anything is enqueued. (An SD model keeps A1111's Euler.)"""
    import json

    from renderfarm import keys
    from renderfarm.samplers import from_a1111

    assert from_a1111("Euler", None, "flux") == from_a1111("Euler", "Simple", "flux")
    assert from_a1111("Euler", "Simple", "flux") == "flow_match_euler"
    assert from_a1111("Euler", None, "sd15") == "euler"
    flux = dash_settings.models_path / "flux-dev"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    dash_client = make_dash_app(A1111_TIMEOUT=1).test_client()
    body = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "cfg_scale": 3.5,
            "override_settings": {"sd_model_checkpoint": "flux-dev"}}
    refused = dash_client.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "DPM++ 2M"})
    assert refused.status_code == 422, refused.get_data(as_text=True)
    [error] = refused.get_json()["errors"]
    assert error["field"] == "sampler_name" and "Flux takes 'Euler'" in error["message"]
    assert dash_farm.redis.zcard(keys.JOBS) == 0
    # No worker here: accepted, the call waits its 1 s and answers 504; the job is queued.
    waited = dash_client.post("/sdapi/v1/txt2img",
                              json={**body, "sampler_name": "Euler", "scheduler": "Simple"})
    assert waited.status_code == 504, waited.get_data(as_text=True)
    [job_id] = [j.decode() for j in dash_farm.redis.zrange(keys.JOBS, 0, -1)]
    record = dash_farm.job(job_id).status()
    assert (record.request.model, record.request.scheduler) == ("flux-dev", "flow_match_euler")


def test_a_refused_nan_or_infinity_is_answered_in_strict_json(dash_client, queue_depth):
    """Python's JSON reader takes NaN and Infinity (JavaScript's does not): a body that uses
    them is refused, and the refusal, which echoes the value, must still be JSON a browser's
    JSON.parse reads (the value as the string "nan" / "inf", not a bare NaN)."""
    import json

    def strict(text: str):
        def refuse(name: str):
            raise ValueError(f"not JSON: {name}")
        return json.loads(text, parse_constant=refuse)

    job = '{"prompt": "a fox", "model": "tiny", "steps": 2, "width": 64, "height": 64, '
    for url, body, field in (
        ("/sdapi/v1/txt2img", '{"prompt": "a fox", "steps": 2, "cfg_scale": NaN}', "cfg_scale"),
        ("/api/v1/batches", '{"jobs": [' + job + '"guidance_scale": Infinity}]}',
         "guidance_scale"),
    ):
        answer = dash_client.post(url, data=body, content_type="application/json")
        assert answer.status_code in (400, 422), answer.get_data(as_text=True)
        errors = strict(answer.get_data(as_text=True))["errors"]
        assert field in errors[0]["field"] and errors[0]["value"] in ("nan", "inf"), errors
    assert queue_depth() == 0
