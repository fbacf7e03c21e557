"""The A1111 API (/sdapi/v1) driven by the real ``webuiapi`` client and by the bodies that
SillyTavern and Open WebUI send, against a served dashboard and the session's real worker."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import pytest
import requests
import webuiapi
from PIL import Image

TOKEN = "a1111-token"
SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def server(farm, farm_settings):
    """The dashboard on waitress, on a free port, with auth on, in front of the session farm."""
    from dashboard import create_app
    from dashboard.serve import make_server

    app = create_app({"SETTINGS": farm_settings, "TOKEN": TOKEN, "SECRET_KEY": "k" * 32})
    srv = make_server(app, port=0)
    thread = threading.Thread(target=srv.run, name="a1111-dashboard", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.effective_port}"
    srv.close()


@pytest.fixture
def api(server):
    """webuiapi as A1111's users configure it: host, port and ``--api-auth`` user/password."""
    host, port = server.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), username="anyone", password=TOKEN,
                             sampler="Euler a", steps=2)


def png_seed(image: Image.Image) -> int:
    return json.loads(image.info["renderfarm"])["seed"]


def test_webuiapi_txt2img_batch_is_spread_into_jobs_with_a1111_seeds(api, client):
    result = api.txt2img(prompt="a lighthouse at dusk", negative_prompt="blurry", seed=1234,
                         batch_size=2, n_iter=2, cfg_scale=5.5, width=64, height=64,
                         sampler_name="DPM++ 2M Karras")
    assert len(result.images) == 4
    assert [png_seed(im) for im in result.images] == [1234, 1235, 1236, 1237]
    assert all(im.size == (64, 64) for im in result.images)
    info = result.info
    assert info["all_seeds"] == [1234, 1235, 1236, 1237]
    assert info["all_prompts"] == ["a lighthouse at dusk"] * 4
    assert info["sd_model_name"] == "tiny" and info["sampler_name"] == "DPM++ 2M"
    assert info["extra_generation_params"] == {"Schedule type": "Karras"}
    assert len(info["infotexts"]) == 4
    assert "Seed: 1235" in info["infotexts"][1] and "CFG scale: 5.5" in info["infotexts"][1]
    assert result.parameters["batch_size"] == 2 and result.parameters["enable_hr"] is False
    # Four farm jobs of one image each, one batch, the legacy sampler name mapped.
    jobs = client.records.batch_jobs(info["renderfarm_batch_id"])
    assert [j.request.seed for j in jobs] == [1234, 1235, 1236, 1237]
    assert {j.request.num_images for j in jobs} == {1}
    assert {j.request.scheduler for j in jobs} == {"dpmpp_2m_karras"}
    assert {j.request.guidance_scale for j in jobs} == {5.5}


@pytest.fixture
def tiny_hash(farm, client) -> str:
    """tiny's SHA-256, once the session worker has hashed it and said so in its heartbeat."""
    from tests.test_model_hashes import advertised

    [sha256] = set(advertised(client, "tiny").values())
    return sha256


def test_webuiapi_random_seed_and_models(api, tiny_hash):
    names = api.util_get_model_names()
    assert names == [f"tiny [{tiny_hash[:10]}]"]  # A1111's checkpoint title: name [hash]
    model = api.get_sd_models()[0]
    assert model["model_name"] == "tiny" and model["filename"].endswith("tiny")
    assert model["hash"] == tiny_hash[:10] and model["sha256"] == tiny_hash
    assert "Euler a" in api.util_get_sampler_names()
    assert "Karras" in [s["label"] for s in api.get_schedulers()]
    api.util_set_model("tiny")
    assert api.util_get_current_model() == f"tiny [{tiny_hash[:10]}]"
    result = api.txt2img(prompt="a fox", seed=-1, **SMALL)
    seed = result.info["all_seeds"][0]
    assert 0 <= seed < 2**32 and png_seed(result.image) == seed


def test_webuiapi_refused_features_name_the_field(api):
    with pytest.raises(RuntimeError) as err:
        api.txt2img(prompt="a fox", enable_hr=True, **SMALL)
    assert err.value.args[0] == 422 and "enable_hr" in err.value.args[1]
    with pytest.raises(RuntimeError) as err:
        api.txt2img(prompt="a fox", sampler_name="DPM++ 2M SDE", **SMALL)
    assert err.value.args[0] == 422 and "sampler_name" in err.value.args[1]
    with pytest.raises(RuntimeError) as err:
        api.txt2img(prompt="a fox", override_settings={"sd_model_checkpoint": "nope"}, **SMALL)
    assert "override_settings.sd_model_checkpoint" in err.value.args[1]
    assert "tiny" in err.value.args[1]


def test_auth_takes_bearer_and_basic_and_refuses_others(server, tiny_hash):
    url = f"{server}/sdapi/v1/sd-models"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, auth=("anyone", "wrong"), timeout=10).status_code == 401
    refused = requests.get(url, timeout=10)
    assert refused.headers["WWW-Authenticate"].startswith("Basic")
    assert requests.get(url, auth=("someone", TOKEN), timeout=10).status_code == 200
    ok = requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert ok.status_code == 200 and ok.json()[0]["title"] == f"tiny [{tiny_hash[:10]}]"


def test_native_api_takes_a1111_sampler_names(server, client):
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    job = {"prompt": "a boat", "model": "tiny", **SMALL}
    url = f"{server}/api/v1/batches"
    made = requests.post(url, json={"jobs": [{**job, "scheduler": "Euler a"},
                                             {**job, "scheduler": "DPM++ 2M Karras"}]},
                         headers=bearer, timeout=10)
    assert made.status_code == 201, made.text
    jobs = client.records.batch_jobs(made.json()["id"])
    assert [j.request.scheduler for j in jobs] == ["euler_a", "dpmpp_2m_karras"]
    refused = requests.post(url, json={"jobs": [{**job, "cfg_scale": 5}]}, headers=bearer,
                            timeout=10)
    assert refused.status_code == 400
    error = refused.json()["errors"][0]
    assert error["field"] == "cfg_scale" and "guidance_scale" in error["message"]
    refused = requests.post(url, json={"jobs": [{**job, "scheduler": "DPM++ 3M SDE"}]},
                            headers=bearer, timeout=10)
    assert refused.json()["errors"][0]["field"] == "scheduler"


def test_webuiapi_img2img_and_png_info(api, client):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    result = api.img2img(images=[init], prompt="a red square, painted", denoising_strength=0.5,
                         seed=7, batch_size=2, **SMALL)
    assert [png_seed(im) for im in result.images] == [7, 8]
    assert result.info["denoising_strength"] == 0.5
    assert result.parameters["init_images"] is None  # not echoed back, as A1111 does
    jobs = client.records.batch_jobs(result.info["renderfarm_batch_id"])
    assert {(j.request.mode.value, j.request.strength) for j in jobs} == {("img2img", 0.5)}
    read = api.png_info(result.images[1])
    assert read.parameters["Seed"] == 8 and read.parameters["prompt"] == "a red square, painted"
    assert "Denoising strength: 0.5" in read.info
    with pytest.raises(RuntimeError) as err:
        api.img2img(images=[init], mask_image=init, prompt="x", **SMALL)
    assert err.value.args[0] == 422 and "mask" in err.value.args[1]


# SillyTavern's A1111 call: public/scripts/extensions/stable-diffusion/index.js
# (generateAutoImage) builds this body, and src/endpoints/stable-diffusion.js ('/generate')
# forwards it to /sdapi/v1/txt2img as it is, its own `url` and `auth` included, with
# `Authorization: Basic` from `auth`. A seed < 0 is left out (undefined), as are an unset VAE
# and Forge's modules inside override_settings.
SILLYTAVERN_BODY = {
    "url": "http://farm:8080", "auth": f"tavern:{TOKEN}",
    "prompt": "a cozy tavern interior, warm light", "negative_prompt": "lowres",
    "sampler_name": "DPM++ 2M", "scheduler": "Karras", "steps": 2, "cfg_scale": 7,
    "width": 64, "height": 64, "restore_faces": False, "enable_hr": False,
    "hr_upscaler": "Latent", "hr_scale": 2.0, "hr_additional_modules": [],
    "denoising_strength": 0.7, "hr_second_pass_steps": 0,
    "override_settings": {"CLIP_stop_at_last_layers": 1},
    "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True,
    "send_images": True, "do_not_save_grid": False, "do_not_save_samples": False,
}


def test_sillytavern_flow(server):
    auth = ("tavern", TOKEN)
    base = f"{server}/sdapi/v1"
    # Its model picker: titles from sd-models, then POST options and a progress poll.
    titles = [m["title"] for m in requests.get(f"{base}/sd-models", auth=auth, timeout=10).json()]
    set_model = requests.post(f"{base}/options", json={"sd_model_checkpoint": titles[0]},
                              auth=auth, timeout=10)
    assert set_model.status_code == 200
    idle = requests.get(f"{base}/progress", auth=auth, timeout=10).json()
    assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0
    options = requests.get(f"{base}/options", auth=auth, timeout=10).json()
    assert options["sd_model_checkpoint"] == titles[0]
    answer = requests.post(f"{base}/txt2img", json=SILLYTAVERN_BODY, auth=auth, timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert "Schedule type: Karras" in image.info["parameters"]
    assert json.loads(body["info"])["sd_model_name"] == "tiny"
    clip_skip_2 = {**SILLYTAVERN_BODY, "override_settings": {"CLIP_stop_at_last_layers": 2}}
    refused = requests.post(f"{base}/txt2img", json=clip_skip_2, auth=auth, timeout=10)
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["field"] == "override_settings.CLIP_stop_at_last_layers"


def test_open_webui_body(server):
    """Open WebUI (backend/open_webui/routers/images.py, engine automatic1111) sends
    ``{prompt, batch_size: n, width, height, steps, negative_prompt, cfg_scale, sampler_name,
    scheduler}`` with ``authorization: Basic base64(AUTOMATIC1111_API_AUTH)`` and reads
    ``images``; it picks a model with POST options ``{sd_model_checkpoint}``."""
    header = {"authorization": "Basic " + base64.b64encode(f"webui:{TOKEN}".encode()).decode()}
    body = {"prompt": "a watercolor owl", "batch_size": 2, "width": 64, "height": 64,
            "steps": 2, "negative_prompt": "", "cfg_scale": 7.0, "sampler_name": "Euler a",
            "scheduler": "Automatic"}
    answer = requests.post(f"{server}/sdapi/v1/txt2img", json=body, headers=header, timeout=120)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 2


def test_progress_and_interrupt_are_the_callers_own(server, client):
    base = f"{server}/sdapi/v1"
    mine, other = ("me", TOKEN), ("someone-else", TOKEN)
    body = {"prompt": "a long render", "seed": 5, "n_iter": 8, "steps": 40, "width": 64,
            "height": 64}
    answers: list[requests.Response] = []
    call = threading.Thread(target=lambda: answers.append(
        requests.post(f"{base}/txt2img", json=body, auth=mine, timeout=300)))
    call.start()
    deadline = time.monotonic() + 60
    while (progress := requests.get(f"{base}/progress", auth=mine, timeout=10).json())[
            "state"]["job_count"] == 0:
        assert time.monotonic() < deadline and call.is_alive()
    batch_id = progress["state"]["job"]
    assert progress["state"]["job_count"] == 8
    assert requests.get(f"{base}/progress", auth=other, timeout=10).json()["state"][
        "job_count"] == 0
    requests.post(f"{base}/interrupt", auth=other, timeout=10)  # not theirs: nothing cancelled
    assert not any(j.state.value == "cancelled" for j in client.records.batch_jobs(batch_id))
    assert requests.post(f"{base}/interrupt", auth=mine, timeout=10).json() == {}
    call.join(120)
    answer = answers[0]
    assert answer.status_code == 200, answer.text
    jobs = client.records.batch_jobs(batch_id)
    done = [j for j in jobs if j.state.value == "succeeded"]
    assert len(answer.json()["images"]) == len(done) < 8
    assert all(j.state.value in ("succeeded", "cancelled") for j in jobs)
