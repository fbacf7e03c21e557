"""The OpenAPI 3.1 document of /api/v1, built from the same pydantic models the API validates with.

OpenAPI 3.1 schemas are JSON Schema 2020-12, which is what ``model_json_schema()`` produces, so
the job schema here *is* the one POST /batches checks (less ``model``, which the farm defaults).
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from pydantic import BaseModel, Field

from dashboard.api import MAX_LABEL
from renderfarm.schema import BatchRecord, ImageResult, JobRecord, JobRequest

REF = "#/components/schemas/{model}"


class BatchSubmit(BaseModel):
    """Body of POST /api/v1/batches: the jobs of one batch, all accepted or none."""

    model_config = {"extra": "forbid"}
    jobs: list[JobRequest] = Field(min_length=1)
    label: str = Field("", max_length=MAX_LABEL, description="Shown in the batches list.")
    webhook_url: str | None = Field(
        None, max_length=2000, description="http(s) URL the farm POSTs job.succeeded, "
        "job.failed, job.cancelled (jobs without their own webhook_url) and batch.completed "
        "to, signed as Standard Webhooks says. Refused if it resolves to a loopback, private or "
        "link-local address (unless RENDERFARM_WEBHOOK_ALLOW_PRIVATE=1).")


class PlotAxis(BaseModel):
    """One axis of an X/Y/Z plot (README "X/Y/Z plots and prompt matrices")."""

    model_config = {"extra": "forbid"}
    field: str = Field(description="seed, steps, guidance_scale, scheduler, model, width, "
                       "height, size, lora:<name>, prompt_sr or prompt_matrix.")
    values: list[Any] = Field(description="The values, in order (prompt_sr: the first is the "
                              "text searched; prompt_matrix: the optional parts, or none). "
                              "Number fields also take A1111's ranges as strings: '1-5', "
                              "'1-10 (+2)', '10-1 (-3)', '1-10 [5]', '5-7.5 (+0.5)'.")


class PlotAxes(BaseModel):
    model_config = {"extra": "forbid"}
    x: PlotAxis | None = None
    y: PlotAxis | None = None
    z: PlotAxis | None = Field(None, description="One grid image per value.")


class PlotSubmit(BaseModel):
    """Body of POST /api/v1/batches for an X/Y/Z plot: a cell (job) per combination of the
    axes' values, one batch; a grid image once every cell has ended (the batch's ``grids``)."""

    model_config = {"extra": "forbid"}
    job: JobRequest
    axes: PlotAxes
    label: str = Field("", max_length=MAX_LABEL, description="Shown in the batches list.")
    webhook_url: str | None = Field(None, description="As for a batch of jobs.")


class FieldErrorOut(BaseModel):
    field: str | None = Field(description="The field that was refused, e.g. `width`.")
    message: str
    value: Any = Field(None, description="The value that was refused.")
    index: int | None = Field(None, description="For a batch: which job (0-based).")
    error: str = Field(description="One readable sentence.")


class Errors(BaseModel):
    errors: list[FieldErrorOut]


def _schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (BatchSubmit, PlotSubmit, JobRecord, BatchRecord, ImageResult, Errors):
        schema = model.model_json_schema(ref_template=REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    job = schemas["JobRequest"]
    job["required"] = [f for f in job.get("required", []) if f != "model"]
    job["properties"]["model"]["description"] += " Default: the farm's default model."
    return schemas


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_OBJ = {"type": "object"}
_ERR = _ref("Errors")
_PAGE = [
    {"name": "offset", "in": "query",
     "schema": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1, "default": 0}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
]


def _id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _op(summary: str, ok: dict[str, Any], *, params: list | None = None, body: dict | None = None,
        errors: tuple[int, ...] = (404,), status: str = "200") -> dict[str, Any]:
    responses = {status: _json(ok, "OK"), "401": _json(_ERR, "RENDERFARM_TOKEN is set and the "
                                                       "bearer token is missing or wrong")}
    for code in errors:
        responses[str(code)] = _json(_ERR, {400: "A field was refused; nothing was enqueued",
                                            404: "No such id", 409: "Not in a state for this",
                                            413: "Body over the size limit",
                                            415: "Body is not application/json"}[code])
    responses["429"] = {
        **_json(_ERR, "Over a rate limit (RENDERFARM_RATE_LIMIT_ADDRESS or _TOKEN)"),
        "headers": {"Retry-After": {"description": "Seconds until a request may succeed",
                                    "schema": {"type": "integer"}}},
    }
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _events_op() -> dict[str, Any]:
    resume = {"name": "Last-Event-ID", "in": "header", "required": False,
              "schema": {"type": "string", "pattern": r"^(\d{1,20}-\d{1,20})?$"},
              "description": "Resume after this event (EventSource sends it on reconnect); "
                             "empty: as if not sent (a snapshot first)"}
    job = {"name": "job", "in": "query", "required": False, "schema": {"type": "string"},
           "description": "Only this job's job, step and preview events (a job of the batch)"}
    op = _op("Server-Sent Events of the batch: snapshot, job (state changes), step, preview "
             "(a rendering job's live preview, the picture attached), end; resumable with "
             "Last-Event-ID; the stream ends when the batch ends", _OBJ,
             params=[_id("batch_id"), resume, job], errors=(400, 404))
    op["responses"]["200"] = {"description": "An event stream",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    return op


def _preview_op() -> dict[str, Any]:
    op = _op("The latest live preview of a rendering job (at most 64 px a side, from its "
             "latents; RENDERFARM_PREVIEW_SECONDS apart); 404 when it has none", _OBJ,
             params=[_id("job_id")])
    op["responses"]["200"] = {"description": "A JPEG",
                              "content": {"image/jpeg": {"schema": {"type": "string",
                                                                    "format": "binary"}}}}
    return op


def spec(app: Flask) -> dict[str, Any]:
    job_out = _ref("JobRecord")
    paths = {
        "/batches": {
            "post": _op("Submit a batch of jobs, or an X/Y/Z plot", _OBJ,
                        body={"oneOf": [_ref("BatchSubmit"), _ref("PlotSubmit")]},
                        errors=(400, 413, 415), status="201"),
            "get": _op("Batches, newest first", _OBJ, params=_PAGE, errors=(400,)),
        },
        "/batches/{batch_id}": {
            "get": _op("A batch with a page of its jobs (each a JobRecord, results with url) "
                       "and its latest webhook deliveries (webhook_deliveries)",
                       _OBJ, params=[_id("batch_id"), *_PAGE], errors=(400, 404)),
        },
        "/batches/{batch_id}/events": {"get": _events_op()},
        "/batches/{batch_id}/cancel": {
            "post": _op("Cancel every job of the batch that has not ended", _OBJ,
                        params=[_id("batch_id")]),
        },
        "/batches/{batch_id}/pause": {
            "post": _op("Pause the batch: its queued jobs stay queued and no worker takes them "
                        "until resumed; running ones finish", _OBJ, params=[_id("batch_id")]),
        },
        "/batches/{batch_id}/resume": {
            "post": _op("Resume a paused batch: its queued jobs take turns with the other "
                        "batches again", _OBJ, params=[_id("batch_id")]),
        },
        "/batches/{batch_id}/retry": {
            "post": _op("Re-queue the batch's failed and cancelled jobs", _OBJ,
                        params=[_id("batch_id")]),
        },
        "/jobs/{job_id}": {
            "get": _op("A job; init_image left out (has_init_image says if it had one)",
                       job_out, params=[_id("job_id")]),
        },
        "/jobs/{job_id}/preview": {"get": _preview_op()},
        "/jobs/{job_id}/cancel": {
            "post": _op("Cancel a job: at once if queued, at its next step if running", _OBJ,
                        params=[_id("job_id")]),
        },
        "/jobs/{job_id}/retry": {
            "post": _op("Re-queue a failed or cancelled job", _OBJ, params=[_id("job_id")],
                        errors=(404, 409)),
        },
        "/workers": {"get": _op("Workers by heartbeat; a stale one is 'lost'", _OBJ, errors=())},
        "/queues": {"get": _op("Depth of each queue and the oldest waiting job", _OBJ,
                               errors=())},
        "/models": {"get": _op("Models the farm has", _OBJ, errors=())},
        "/families": {"get": _op("What each model family takes: sizes, schedulers, defaults",
                                 _OBJ, errors=())},
        "/openapi.json": {"get": _op("This document", _OBJ, errors=())},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "renderfarm dashboard API",
            "version": "1",
            "description": "Submit Stable Diffusion batches and follow them. Errors are "
                           "`{\"errors\": [{field, message, value, index, error}]}`.",
        },
        "servers": [{"url": "/api/v1"}],
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}] if app.config["TOKEN"] else [],
    }
