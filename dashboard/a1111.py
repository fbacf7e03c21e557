"""AUTOMATIC1111's web API under /sdapi/v1, served by the whole farm.

A ``txt2img`` / ``img2img`` call becomes ``batch_size x n_iter`` single-image farm jobs (one
batch), which any worker may take; the call waits for them like A1111 does and answers A1111's
``{images, parameters, info}``. The read-only routes describe the farm in A1111's shapes.

Per caller (the HTTP Basic user name when the call has one, else the client's address):

- ``POST options`` sets ``sd_model_checkpoint``, the model of that caller's later calls that name
  none in ``override_settings``; it is kept in Redis, not in the process;
- ``GET progress`` reports that caller's running calls, ``POST interrupt`` cancels them and
  ``POST skip`` cancels the images being rendered now (the queued ones go on). Another caller's
  work is never touched: the farm is shared, unlike one A1111 process.

Auth: with ``RENDERFARM_TOKEN`` set, a call needs ``Authorization: Bearer <token>`` or HTTP
Basic with the token as the password and any user name (A1111's ``--api-auth user:password``
form, so clients configured with a user and password work).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from dashboard.a1111_models import (
    FARM_TO_A1111,
    FIXED_OPTIONS,
    GenerationRequest,
    Img2ImgRequest,
    Txt2ImgRequest,
    check_counts,
    option_errors,
    resolve_seed,
    to_jobs,
    unsupported,
)
from producer.client import FarmClient
from renderfarm import keys
from renderfarm.errors import FieldError, InvalidJob
from renderfarm.samplers import (
    A1111_ALIASES,
    A1111_SAMPLERS,
    A1111_SCHEDULE_TYPES,
    sampler_names,
)
from renderfarm.schema import RUNNING_STATES, JobRecord, JobState
from storage.png import read_png_info

bp = Blueprint("a1111", __name__)

#: How long a caller's options (its default checkpoint) are kept after their last change.
OPTIONS_TTL = 30 * 24 * 3600
POLL = 0.1


class A1111Error(Exception):
    """An error answered in A1111's shape: ``{"error", "detail", "errors"}``."""

    def __init__(self, status: int, detail: str, errors: list[FieldError] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors or []


def client() -> FarmClient:
    return current_app.extensions["renderfarm"]


def caller() -> str:
    """Who is calling: the Basic user name if the call has one, else its address."""
    auth = request.authorization
    if auth is not None and auth.type == "basic" and auth.username:
        return f"user:{auth.username}"
    return f"addr:{request.remote_addr or ''}"


# -- auth and errors -------------------------------------------------------------------------
@bp.before_request
def _authorize():
    from dashboard import auth

    if request.method not in auth.SAFE_METHODS:
        auth._refuse_cross_site()
    if not auth.token() or auth.bearer_ok() or _basic_ok():
        return None
    raise A1111Error(401, "Incorrect username or password: this API takes the dashboard's "
                          "token as a Bearer token, or as the password of HTTP Basic auth")


def _basic_ok() -> bool:
    from dashboard.auth import token_matches

    given = request.authorization
    return given is not None and given.type == "basic" and token_matches(given.password or "")


@bp.errorhandler(A1111Error)
def _a1111_error(exc: A1111Error):
    body = {"error": _ERROR_NAMES.get(exc.status, "HTTPException"), "detail": exc.detail,
            "body": "", "errors": [e.to_dict() for e in exc.errors]}
    response = jsonify(body)
    response.status_code = exc.status
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = 'Basic realm="renderfarm"'
    return response


_ERROR_NAMES = {401: "HTTPException", 404: "HTTPException", 422: "RequestValidationError",
                500: "RenderFailed", 504: "TimeoutError"}


@bp.errorhandler(InvalidJob)
def _invalid_job(exc: InvalidJob):
    return _a1111_error(_refused(exc.errors))


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    return _a1111_error(A1111Error(exc.code or 500, exc.description or exc.name))


def _refused(errors: list[FieldError]) -> A1111Error:
    """422 naming each field by A1111's name; the per-image copies of one error are merged."""
    seen, out = set(), []
    for e in errors:
        field = FARM_TO_A1111.get(e.field, e.field)
        if (field, e.message) in seen:
            continue
        seen.add((field, e.message))
        out.append(FieldError(field, e.message, e.value))
    return A1111Error(422, "; ".join(str(e) for e in out), out)


def _body(model: type[GenerationRequest]) -> GenerationRequest:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise A1111Error(422, "the body must be a JSON object",
                         [FieldError("body", "must be a JSON object", None)])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [FieldError(".".join(str(p) for p in e["loc"]), e["msg"].lower(), e.get("input"))
                  for e in exc.errors()]
        raise _refused(errors) from None


# -- models ----------------------------------------------------------------------------------
def model_hashes(c: FarmClient) -> dict[str, str]:
    """Model name -> SHA-256 of its weights, for the models whose hash the farm knows (the
    workers' heartbeats, FarmClient.model_details). A model no worker has hashed yet has none:
    ``hash``, ``sha256`` and ``sd_model_hash`` are null, as A1111's own are for a checkpoint it
    has not hashed."""
    return {name: info["sha256"] for name, info in c.model_details().items() if info["sha256"]}


def model_item(c: FarmClient, name: str, hashes: dict[str, str]) -> dict[str, Any]:
    sha256 = hashes.get(name)
    short = sha256[:10] if sha256 else None
    path = c.settings.models_path / name
    return {"title": f"{name} [{short}]" if short else name, "model_name": name,
            "hash": short, "sha256": sha256, "filename": str(path) if path.exists() else name,
            "config": None}


_TITLE_HASH = re.compile(r"\s*\[([0-9a-fA-F]{8,64})\]$")


def model_from_title(c: FarmClient, value: Any, field: str) -> str:
    """A model the farm has, from A1111's ways of naming a checkpoint: its title
    ``name [hash]``, its name, a file name (``name.safetensors``, with folders), or its hash."""
    known = c.models()
    if isinstance(value, str) and value.strip():
        text = value.strip()
        match = _TITLE_HASH.search(text)
        wanted_hash = match.group(1).lower() if match else None
        name = _TITLE_HASH.sub("", text).replace("\\", "/").rsplit("/", 1)[-1]
        name = re.sub(r"\.(safetensors|ckpt|pt|bin)$", "", name)
        if name in known:
            return name
        hashes = model_hashes(c)
        probe = wanted_hash or text.lower()
        by_hash = [n for n, h in hashes.items() if n in known and h.startswith(probe)]
        if len(probe) >= 8 and len(by_hash) == 1:
            return by_hash[0]
    titles = [model_item(c, n, model_hashes(c))["title"] for n in known]
    raise A1111Error(422, f"{field} is not a model the farm has", [FieldError(
        field, f"is not a model the farm has (known: {', '.join(titles) or 'none'})", value)])


def _options_key(who: str) -> str:
    return f"{keys.PREFIX}a1111:options:{who}"


def _active_key(who: str) -> str:
    return f"{keys.PREFIX}a1111:active:{who}"


def caller_model(c: FarmClient) -> str:
    """The caller's checkpoint (POST options), else the farm's default model."""
    chosen = c.redis.hget(_options_key(caller()), "sd_model_checkpoint")
    if chosen and chosen.decode() in c.models():
        return chosen.decode()
    return c.settings.default_model


# -- generating ------------------------------------------------------------------------------
@bp.post("/txt2img")
def txt2img():
    return _generate(_body(Txt2ImgRequest), "txt2img")


@bp.post("/img2img")
def img2img():
    return _generate(_body(Img2ImgRequest), "img2img")


def _generate(req: GenerationRequest, mode: str):
    c = client()
    errors = unsupported(req) + check_counts(req)
    if errors:
        raise _refused(errors)
    checkpoint = (req.override_settings or {}).get("sd_model_checkpoint")
    if checkpoint is not None:
        model = model_from_title(c, checkpoint, "override_settings.sd_model_checkpoint")
    else:
        model = caller_model(c)
    seed = resolve_seed(req.seed)
    try:
        jobs = to_jobs(req, model, seed, c.model_families().get(model))
    except ValueError as exc:
        raise _refused([FieldError("sampler_name", str(exc), req.sampler())]) from None
    who = caller()
    handle = c.submit_batch(jobs, label=f"A1111 {mode} ({who})")
    started = time.time()
    active = _active_key(who)
    c.redis.zadd(active, {handle.id: started})
    c.redis.expire(active, int(_timeout()) + 60)
    try:
        records = _wait(c, handle.id)
    finally:
        c.redis.zrem(active, handle.id)
    return _answer(c, req, mode, model, jobs, records, handle.id, started)


def _timeout() -> float:
    """Seconds a call waits for its images (``RENDERFARM_A1111_TIMEOUT``), then cancels them."""
    return float(current_app.config["A1111_TIMEOUT"])


def _wait(c: FarmClient, batch_id: str) -> list[JobRecord]:
    deadline = time.monotonic() + _timeout()
    while not c.records.batch(batch_id).finished:
        if time.monotonic() > deadline:
            for record in c.records.batch_jobs(batch_id):
                if not record.terminal:
                    c.records.cancel(record.id)
            raise A1111Error(504, f"the farm did not render batch {batch_id} within "
                                  f"{_timeout():.0f}s; its unfinished jobs were cancelled")
        time.sleep(POLL)
    return c.records.batch_jobs(batch_id)


def _answer(c: FarmClient, req: GenerationRequest, mode: str, model: str,
            jobs: list[dict[str, Any]], records: list[JobRecord], batch_id: str, started: float):
    failed = [r for r in records if r.state is JobState.failed]
    if failed:
        reasons = "; ".join(f"job {r.id}: {r.error}" for r in failed[:5])
        raise A1111Error(500, f"{len(failed)} of {len(records)} images failed in batch "
                              f"{batch_id}: {reasons}")
    images, infotexts = [], []
    for record in records:
        if record.state is not JobState.succeeded:
            continue  # cancelled by interrupt / skip: A1111 answers with what it has
        for result in record.results:
            data = c.storage.get(result.key)
            infotexts.append(read_png_info(data)["parameters"] or "")
            if req.send_images:
                images.append(base64.b64encode(data).decode())
    sha256 = model_hashes(c).get(model)
    seeds = [job["seed"] for job in jobs]
    sampler, schedule = A1111_SAMPLERS[jobs[0]["scheduler"]]
    info = {
        "prompt": req.prompt,
        "all_prompts": [req.prompt] * len(jobs),
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * len(jobs),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": req.subseed if req.subseed >= 0 else seeds[0],
        "all_subseeds": [req.subseed if req.subseed >= 0 else s for s in seeds],
        "subseed_strength": 0,
        "width": req.width,
        "height": req.height,
        "sampler_name": sampler,
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "batch_size": req.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model,
        "sd_model_hash": sha256[:10] if sha256 else None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": jobs[0].get("strength") if mode == "img2img" else None,
        "extra_generation_params": {"Schedule type": schedule},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": _timestamp(started),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": "renderfarm",
        "renderfarm_batch_id": batch_id,
    }
    parameters = req.model_dump(mode="json")
    if isinstance(req, Img2ImgRequest):
        parameters.update(init_images=None, mask=None)  # as A1111 does: not echoed back
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def _timestamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y%m%d%H%M%S")


# -- the caller's running calls --------------------------------------------------------------
def _caller_jobs(c: FarmClient) -> tuple[list[str], list[JobRecord]]:
    batches = [b.decode() for b in c.redis.zrange(_active_key(caller()), 0, -1)]
    records = [r for b in batches for r in c.records.batch_jobs(b)]
    return batches, records


@bp.get("/progress")
def progress():
    c = client()
    batches, records = _caller_jobs(c)
    idle = {"progress": 0.0, "eta_relative": 0.0, "state": {
        "skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
        "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
        "sampling_steps": 0}, "current_image": None, "textinfo": None, "current_task": None}
    if not records:
        return idle
    done = sum(r.terminal for r in records)
    running = [r for r in records if r.state in RUNNING_STATES]
    partial = sum(r.step / r.steps_total for r in running if r.steps_total)
    fraction = min(1.0, (done + partial) / len(records))
    first = min(r.created_at for r in records)
    elapsed = max(0.0, time.time() - first)
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    current = max(running, key=lambda r: r.step, default=None)
    state = {
        "skipped": False,
        "interrupted": any(r.state is JobState.cancelled for r in records),
        "stopping_generation": False,
        "job": ",".join(batches),
        "job_count": len(records),
        "job_timestamp": _timestamp(first),
        "job_no": done,
        "sampling_step": current.step if current else 0,
        "sampling_steps": current.steps_total if current else 0,
    }
    text = f"{done} of {len(records)} images done on the farm"
    return {"progress": round(fraction, 4), "eta_relative": round(eta, 2), "state": state,
            "current_image": None, "textinfo": text, "current_task": ",".join(batches)}


@bp.post("/interrupt")
def interrupt():
    """Cancel every image of the caller's running calls (each call answers with what it has)."""
    c = client()
    _, records = _caller_jobs(c)
    for record in records:
        if not record.terminal:
            c.records.cancel(record.id)
    return {}


@bp.post("/skip")
def skip():
    """Cancel the caller's images being rendered now; its queued images still render."""
    c = client()
    _, records = _caller_jobs(c)
    for record in records:
        if record.state in RUNNING_STATES:
            c.records.cancel(record.id)
    return {}


# -- describing the farm ---------------------------------------------------------------------
@bp.get("/sd-models")
def sd_models():
    c = client()
    hashes = model_hashes(c)
    return jsonify([model_item(c, name, hashes) for name in c.models()])


@bp.post("/refresh-checkpoints")
def refresh_checkpoints():
    """The farm's model list is read afresh on every call; nothing to reload."""
    client().models()
    return jsonify(None)


@bp.get("/samplers")
def samplers():
    out = []
    for name in sampler_names():
        options = {"scheduler": "karras"} if name == "DPM++ 2M" else {}
        out.append({"name": name, "aliases": A1111_ALIASES[name], "options": options})
    return jsonify(out)


@bp.get("/schedulers")
def schedulers():
    rho = {"karras": 7.0}
    return jsonify([{"name": name, "label": label, "aliases": None,
                     "default_rho": rho.get(name, -1.0), "need_inner_model": False}
                    for name, label in A1111_SCHEDULE_TYPES.items()])


@bp.get("/options")
def get_options():
    c = client()
    model = caller_model(c)
    item = model_item(c, model, model_hashes(c))
    return {"sd_model_checkpoint": item["title"], "sd_checkpoint_hash": item["sha256"],
            **FIXED_OPTIONS}


@bp.post("/options")
def set_options():
    c = client()
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise _refused([FieldError("body", "must be a JSON object", None)])
    errors = option_errors(body, "options")
    if errors:
        raise _refused(errors)
    if "sd_model_checkpoint" in body:
        model = model_from_title(c, body["sd_model_checkpoint"], "sd_model_checkpoint")
        key = _options_key(caller())
        c.redis.hset(key, "sd_model_checkpoint", model)
        c.redis.expire(key, OPTIONS_TTL)
    return jsonify(None)


@bp.post("/png-info")
def png_info():
    body = request.get_json(silent=True)
    image = body.get("image") if isinstance(body, dict) else None
    if not isinstance(image, str) or not image:
        raise _refused([FieldError("image", "must be a base64 PNG", image)])
    try:
        data = base64.b64decode(image.split(",", 1)[-1] if image.startswith("data:") else image,
                                validate=True)
        found = read_png_info(data)
    except (binascii.Error, ValueError, OSError) as exc:
        raise _refused([FieldError("image", f"is not a PNG image ({exc})", image[:40])]) from None
    from storage.png import parse_parameters

    text = found["parameters"] or ""
    items = {"parameters": text} if text else {}
    if found["renderfarm"] is not None:
        items["renderfarm"] = json.dumps(found["renderfarm"])
    return {"info": text, "items": items, "parameters": parse_parameters(text) if text else {}}


@bp.get("/loras")
def loras():
    """The LoRAs a prompt tag can name (name = file stem): those the live workers advertise
    (the farm's workers may be on other machines) and the files in this server's
    ``<models dir>/loras/``. ``path`` is the file here, empty for a LoRA only workers have."""
    from renderfarm.fleet import live_workers

    farm = client()
    folder = farm.settings.models_path / "loras"
    files = {f.stem: f for f in folder.glob("*.safetensors")} if folder.is_dir() else {}
    names = set(files) | {name for worker in live_workers(farm.redis) for name in worker.loras}
    return jsonify([{"name": name, "alias": name, "path": str(files.get(name, "")),
                     "metadata": {}} for name in sorted(names)])


@bp.get("/scripts")
def scripts():
    return {"txt2img": [], "img2img": []}


@bp.get("/sd-vae")
@bp.get("/upscalers")
@bp.get("/latent-upscale-modes")
@bp.get("/prompt-styles")
@bp.get("/embeddings")
def nothing():
    """Things the farm has none of: an empty list (embeddings: A1111's empty shape)."""
    if request.path.endswith("/embeddings"):
        return {"loaded": {}, "skipped": {}}
    return jsonify([])


@bp.route("/<path:rest>", methods=["GET", "POST"])
def unknown(rest: str):
    raise A1111Error(404, f"/sdapi/v1/{rest} is not served by the farm (see the README's "
                          "A1111-compatible API section for the routes it serves)")
